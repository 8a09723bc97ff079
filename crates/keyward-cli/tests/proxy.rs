//! The credential-injecting proxy against a local HTTPS mock of the
//! providers: the mock must get the real key in the right slot and never the
//! agent token; the agent must never get the real key back; no request may
//! reach another origin with the key.
//!
//! The mock runs inside the test process: tests use a multi-threaded runtime
//! so that it keeps answering while a test waits on a CLI or curl process.

mod support;

use std::time::Duration;

use support::mock::Mock;
use support::*;

const KEY: &str = "sk-proj-REALKEY-0123456789abcdefghijklmnop";

struct Setup {
    s: Server,
    mock: Mock,
    token: String,
}

fn guard_pins() -> Vec<String> {
    ["loop.test=127.0.0.1", "ten.test=10.0.0.1", "meta.test=169.254.169.254", "six.test=::1", "mock.test=127.0.0.1"]
        .iter()
        .flat_map(|p| ["--resolve".to_owned(), p.to_string()])
        .collect()
}

async fn setup_on(b: Backend) -> Setup {
    let mock = Mock::start().await;
    let mut serve_args = vec![
        "--upstream-ca".to_owned(),
        mock.ca.display().to_string(),
        "--upstream-timeout".to_owned(),
        "2".to_owned(),
    ];
    serve_args.extend(guard_pins());
    let s = Server::start_with(b, Opts { serve_args, ..Opts::default() }).await;
    let origin = mock.origin();
    s.put_secret(None, "openai", KEY, &["--provider", "openai", "--upstream", &origin, "--allow-internal-upstream"]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "openai", "proxy", &[]);
    Setup { s, mock, token }
}

async fn setup() -> Setup {
    setup_on(Backend::Sqlite).await
}

impl Setup {
    fn url(&self, secret: &str, path: &str) -> String {
        self.s.url(&format!("/proxy/{secret}{path}"))
    }

    async fn post(&self, secret: &str, path: &str, body: &str) -> reqwest::Response {
        self.s
            .http
            .post(self.url(secret, path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// A TLS connection to keyward speaking HTTP/1.1 (WebSocket upgrades
    /// need it), and keyward's `host:port`.
    async fn tls_http1(&self) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String) {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&self.s.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let addr = self.s.addr.trim_start_matches("https://").to_owned();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
        (tls, addr)
    }

    /// A WebSocket through keyward to the mock's echo server, bound to a
    /// `realtime` secret.
    async fn realtime(
        &self,
    ) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let origin = format!("https://mock.test:{}", self.mock.ws_port);
        self.s.put_secret(
            None,
            "realtime",
            KEY,
            &["--provider", "openai", "--upstream", &origin, "--allow-internal-upstream"],
        );
        self.s.grant(None, "bot", "realtime", "proxy", &[]);
        let (tls, addr) = self.tls_http1().await;
        let mut req = format!("wss://{addr}/proxy/realtime/v1/realtime?model=gpt-x").into_client_request().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
        let (ws, resp) = tokio_tungstenite::client_async(req, tls).await.expect("handshake through keyward");
        assert_eq!(resp.status(), 101);
        ws
    }

    /// The reason of the secret's first `secret.proxy.done` event, waited for.
    async fn done_reason(&self, secret: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.s.cli(&["audit", "--secret", secret, "--action", "secret.proxy.done", "--json"]);
            let text = String::from_utf8(out.stdout).unwrap();
            if let Some(done) = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).next() {
                return done["reason"].as_str().unwrap().to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "no outcome event for {secret}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The mock saw the real key and never the agent token.
    fn assert_upstream_clean(&self) {
        for r in self.mock.requests() {
            let all = r.all_text();
            assert!(!all.contains(&self.token), "the agent token reached the upstream: {all}");
            assert!(!all.contains("kwa_"), "an agent token reached the upstream: {all}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_with_the_real_key_in_the_bearer_slot() {
    let t = setup().await;
    let resp = t
        .post("openai", "/v1/chat/completions", r#"{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}"#)
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from the mock");
    let seen = t.mock.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.header("authorization").unwrap(), format!("Bearer {KEY}"));
    assert_eq!(seen.authority, format!("mock.test:{}", t.mock.port));
    assert!(seen.header("x-keyward-purpose").is_none());
    assert!(String::from_utf8_lossy(&seen.body).contains("\"gpt-x\""));
    t.assert_upstream_clean();

    // Audited before forwarding, completed afterwards, without query values.
    let out = t.s.cli(&["audit", "--secret", "openai", "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let used = events.iter().find(|e| e["action"] == "secret.proxy").expect("proxy use audited");
    assert_eq!(used["outcome"], "allowed");
    assert_eq!(used["reason"], format!("POST {}/v1/chat/completions", t.mock.origin()));
    assert_eq!(used["actor"]["name"], "bot");
    assert_eq!(used["secret_version"], 1);
    let done = events.iter().find(|e| e["action"] == "secret.proxy.done").expect("outcome audited");
    assert!(done["reason"].as_str().unwrap().contains("status 200"), "{done}");
    assert!(!text.contains(KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_answers_arrive_chunk_by_chunk() {
    let t = setup().await;
    let mut resp = t
        .post(
            "openai",
            "/v1/chat/completions",
            r#"{"model":"gpt-x","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The first chunk arrives while the mock still holds back the last one.
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("first chunk in time")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    t.mock.release.notify_one();
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_the_agent_cuts_its_open_stream() {
    let t = setup().await;
    let mut resp = t.post("openai", "/v1/chat/completions", r#"{"model":"gpt-x","stream":true,"messages":[]}"#).await;
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    // The mock still holds its last chunk; the kill switch must not wait for it.
    assert!(t.s.cli(&["agent", "disable", "bot"]).status.success());
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        let mut got = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => got.extend_from_slice(&c),
                Ok(None) => return Ok(got),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stream is cut at once, not when the upstream finishes");
    assert!(rest.is_err(), "a cut stream must not look complete: {rest:?}");
    t.mock.release.notify_one();
    let out = t.s.cli(&["audit", "--action", "secret.proxy.done", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("killed_by_policy_change"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sdk_slot_is_read_and_every_preset_injects_its_way() {
    let t = setup().await;
    let origin = t.mock.origin();
    let internal = "--allow-internal-upstream";
    t.s.put_secret(
        None,
        "anthropic",
        "sk-ant-REAL-111111111",
        &["--provider", "anthropic", "--upstream", &origin, internal],
    );
    t.s.put_secret(None, "google", "AIzaREAL-2222222222", &["--provider", "google", "--upstream", &origin, internal]);
    t.s.put_secret(
        None,
        "twilio",
        "AC123:twilio-REAL-3333333",
        &["--provider", "twilio", "--upstream", &origin, internal],
    );
    t.s.put_secret(
        None,
        "hdr",
        "generic-REAL-4444444",
        &["--upstream", &origin, internal, "--inject", "header:X-Service-Key:Key {value}"],
    );
    t.s.put_secret(
        None,
        "qry",
        "generic-REAL-5555555",
        &["--upstream", &origin, internal, "--inject", "query:api_key:{value}"],
    );
    for name in ["anthropic", "google", "twilio", "hdr", "qry"] {
        t.s.grant(None, "bot", name, "proxy", &[]);
    }
    let h = &t.s.http;
    let tok = &t.token;
    let r = h.post(t.url("anthropic", "/v1/messages")).header("x-api-key", tok).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = t.mock.last();
    assert_eq!(seen.header("x-api-key").unwrap(), "sk-ant-REAL-111111111");
    assert!(seen.header("authorization").is_none());

    let r = h.get(t.url("google", &format!("/v1beta/models?alt=json&key={tok}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = t.mock.last();
    assert_eq!(seen.header("x-goog-api-key").unwrap(), "AIzaREAL-2222222222");
    assert_eq!(seen.query.as_deref(), Some("alt=json"));

    let r = h.get(t.url("twilio", "/2010-04-01/Accounts.json")).basic_auth("AC123", Some(tok)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode("AC123:twilio-REAL-3333333");
    assert_eq!(t.mock.last().header("authorization").unwrap(), format!("Basic {expected}"));

    let r = h.get(t.url("hdr", "/x")).bearer_auth(tok).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.mock.last().header("x-service-key").unwrap(), "Key generic-REAL-4444444");

    let r = h.get(t.url("qry", "/x?a=1")).bearer_auth(tok).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.mock.last().query.as_deref(), Some("a=1&api_key=generic-REAL-5555555"));
    t.assert_upstream_clean();

    // A value that could break a header is refused when stored.
    let out = t.s.cli_stdin(&["secret", "put", "bad", "--provider", "openai"], b"sk-1\r\nX-Evil: 1");
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_never_leave_the_bound_origin() {
    let t = setup().await;
    let before = t.mock.requests().len();
    for path in ["/../v1/x", "/v1/%2e%2e/x", "//evil.example/x", "/%2F%2Fevil.example/x", "/a%5cb"] {
        // Sent raw: reqwest would normalise dot segments itself.
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", "--cacert"])
            .arg(&t.s.ca)
            .args(["-H", &format!("Authorization: Bearer {}", t.token)])
            .arg(t.url("openai", path))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "400", "{path}");
    }
    assert_eq!(t.mock.requests().len(), before, "no tricked request reached the upstream");
    // Each probe is a denied use in the trail, naming the agent.
    let out = t.s.cli(&["audit", "--action", "secret.proxy", "--outcome", "denied", "--json"]);
    let probes: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(probes.len(), 5, "{probes:?}");
    for p in &probes {
        assert_eq!(p["actor"]["name"], "bot", "{p}");
        assert!(p["reason"].as_str().unwrap().starts_with("invalid_path: GET /proxy/openai/"), "{p}");
    }

    // Absolute-form request target and a foreign Host header: still the bound origin.
    let out = std::process::Command::new("curl")
        .args(["-s", "--http1.1", "--cacert"])
        .arg(&t.s.ca)
        .args(["-H", &format!("Authorization: Bearer {}", t.token), "-H", "Host: evil.example"])
        .args(["--request-target", "https://evil.example/proxy/openai/v1/models"])
        .arg(t.s.url("/"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(body.contains("\"ok\":true"), "{body} {}", String::from_utf8_lossy(&out.stderr));
    let seen = t.mock.last();
    assert_eq!(seen.path, "/v1/models", "{body}");
    assert_eq!(seen.authority, format!("mock.test:{}", t.mock.port));

    // Redirects are passed back, never followed.
    let r = t.s.http.get(t.url("openai", "/redirect")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://evil.example/steal");
    assert_eq!(t.mock.last().path, "/redirect");
    t.assert_upstream_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_keys_are_redacted_everywhere() {
    let t = setup().await;
    let h = &t.s.http;
    let r = h.get(t.url("openai", "/echo/header")).bearer_auth(&t.token).send().await.unwrap();
    let echo = r.headers()["x-echo"].to_str().unwrap().to_owned();
    assert_eq!(echo, "Bearer [redacted by keyward]");
    for path in ["/echo/json", "/echo/base64", "/echo/sse-split"] {
        let body = h.get(t.url("openai", path)).bearer_auth(&t.token).send().await.unwrap().text().await.unwrap();
        assert!(!body.contains(KEY), "{path}: {body}");
        assert!(body.contains("[redacted by keyward]"), "{path}: {body}");
        use base64::Engine;
        for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE] {
            for prefix in ["", "x", "xy"] {
                let enc = engine.encode(format!("{prefix}{KEY}"));
                assert!(!body.contains(&enc[4..enc.len() - 4]), "{path}: base64 of the key leaked");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_in_other_encodings_are_caught() {
    let t = setup().await;
    // A query-injected key echoed back percent-encoded in an error message.
    let value = "gen+KEY/with=chars-1234567890";
    let args = ["--upstream", &t.mock.origin(), "--allow-internal-upstream", "--inject", "query:api_key:{value}"];
    t.s.put_secret(None, "q", value, &args);
    t.s.grant(None, "bot", "q", "proxy", &[]);
    let body = t.s.http.get(t.url("q", "/echo/url")).bearer_auth(&t.token).send().await.unwrap().text().await.unwrap();
    assert!(body.contains("api_key=[redacted by keyward]"), "{body}");
    assert!(!body.contains("KEY%2Fwith") && !body.contains("KEY/with"), "{body}");
    // A compressed answer cannot be checked: refused, not passed on.
    let r = t.s.http.get(t.url("openai", "/gzip")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(&r.text().await.unwrap()).as_str()), (502, "upstream_compressed"));
    // Numeric host spellings that URL parsers read as addresses are refused when stored.
    for host in [
        "https://127.1",
        "https://2130706433",
        "https://0x7f.0.0.1",
        "https://127.0.0.1.",
        "https://0x",
        "https://10.0.0x",
    ] {
        let out =
            t.s.cli_stdin(&["secret", "put", "numeric", "--provider", "openai", "--upstream", host], KEY.as_bytes());
        assert!(!out.status.success(), "{host} must be refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_requests_never_reach_the_upstream() {
    let t = setup().await;
    t.s.cli_json(&["org", "create", "acme"]);
    let other_org = t.s.agent(Some("acme"), "bot");
    t.s.put_secret(
        None,
        "reveal-only",
        KEY,
        &["--provider", "openai", "--upstream", &t.mock.origin(), "--allow-internal-upstream"],
    );
    t.s.grant(None, "bot", "reveal-only", "reveal", &[]);
    let before = t.mock.requests().len();
    let h = &t.s.http;
    let get = |secret: &str, tok: Option<&str>| {
        let mut r = h.get(t.url(secret, "/v1/models"));
        if let Some(tok) = tok {
            r = r.bearer_auth(tok);
        }
        r.send()
    };
    let r = get("openai", None).await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    let r = get("openai", Some(&other_org)).await.unwrap();
    assert_eq!(r.status(), 404, "a token of another org");
    let r = get("reveal-only", Some(&t.token)).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(&r.text().await.unwrap()).as_str()), (403, "proxy_not_granted"));
    assert!(t.s.cli(&["secret", "revoke", "openai"]).status.success());
    let r = get("openai", Some(&t.token)).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(&r.text().await.unwrap()).as_str()), (403, "no_current_version"));
    assert!(t.s.cli_stdin(&["secret", "rotate", "openai"], KEY.as_bytes()).status.success());
    t.s.grant(None, "bot", "openai", "proxy", &["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1300));
    let r = get("openai", Some(&t.token)).await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(&r.text().await.unwrap()).as_str()), (403, "grant_expired"));
    assert_eq!(t.mock.requests().len(), before, "no denied request was forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_guard_refuses_internal_and_metadata_addresses() {
    let t = setup().await;
    let port = t.mock.port;
    let cases = [
        ("loop", format!("https://loop.test:{port}"), false, "127.0.0.1"),
        ("ten", "https://ten.test".to_owned(), false, "10.0.0.1"),
        ("six", format!("https://six.test:{port}"), false, "::1"),
        ("meta", "https://meta.test".to_owned(), true, "169.254.169.254"),
        ("metalit", "https://169.254.169.254".to_owned(), true, "169.254.169.254"),
        ("loopl", format!("https://127.0.0.1:{port}"), false, "127.0.0.1"),
    ];
    for (name, origin, allow, _) in &cases {
        let mut args = vec!["--provider", "openai", "--upstream", origin.as_str()];
        if *allow {
            args.push("--allow-internal-upstream");
        }
        t.s.put_secret(None, name, KEY, &args);
        t.s.grant(None, "bot", name, "proxy", &[]);
    }
    let before = t.mock.requests().len();
    for (name, _, _, addr) in &cases {
        let r = t.s.http.get(t.url(name, "/v1/models")).bearer_auth(&t.token).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!((status, error_code(&body).as_str()), (403, "upstream_forbidden"), "{name}: {body}");
        assert!(!body.contains(addr), "the agent is not told internal addresses: {body}");
        assert!(t.s.server_log().contains(addr), "{name}: the refused address is logged");
    }
    assert_eq!(t.mock.requests().len(), before);
    // The same loopback upstream works once the secret allows it.
    let r = t.s.http.get(t.url("openai", "/v1/models")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_clean_errors_and_the_proxy_keeps_serving() {
    let t = setup().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    t.s.put_secret(
        None,
        "down",
        KEY,
        &["--provider", "openai", "--upstream", &format!("https://mock.test:{closed}"), "--allow-internal-upstream"],
    );
    t.s.grant(None, "bot", "down", "proxy", &[]);
    let r = t.s.http.get(t.url("down", "/v1/models")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(&r.text().await.unwrap()), "upstream_unreachable");
    // A query-injected key on a failing upstream stays out of the logs
    // (upstream client errors carry the URL).
    let q_origin = format!("https://mock.test:{closed}");
    let q_args = ["--upstream", q_origin.as_str(), "--allow-internal-upstream", "--inject", "query:api_key:{value}"];
    t.s.put_secret(None, "qdown", "generic-QUERY-KEY-77777777", &q_args);
    t.s.grant(None, "bot", "qdown", "proxy", &[]);
    let r = t.s.http.get(t.url("qdown", "/x?a=1")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(!r.text().await.unwrap().contains("QUERY-KEY"));
    let log = t.s.server_log();
    assert!(log.contains("proxy upstream failed"), "the failure is logged");
    assert!(!log.contains("generic-QUERY-KEY-77777777"), "a query-injected key reached the log");

    // Reset mid-stream: the agent sees the stream fail, not a clean end.
    let r = t.s.http.get(t.url("openai", "/reset")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert!(r.bytes().await.is_err(), "a truncated stream must not look complete");

    // An upstream that does not answer in time: 504.
    let r = t.s.http.get(t.url("openai", "/slow")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(&r.text().await.unwrap()), "upstream_timeout");

    let r = t.post("openai", "/v1/chat/completions", "{}").await;
    assert_eq!(r.status(), 200, "still serving");
    let out = t.s.cli(&["audit", "--action", "secret.proxy.done", "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("upstream_unreachable"), "{text}");
    assert!(text.contains("upstream_reset"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_applies_to_the_very_next_request() {
    let t = setup().await;
    assert_eq!(t.post("openai", "/v1/models", "").await.status(), 200);
    assert_eq!(t.mock.last().header("authorization").unwrap(), format!("Bearer {KEY}"));
    assert!(t.s.cli_stdin(&["secret", "rotate", "openai"], b"sk-proj-ROTATED-999999999").status.success());
    assert_eq!(t.post("openai", "/v1/models", "").await.status(), 200);
    assert_eq!(t.mock.last().header("authorization").unwrap(), "Bearer sk-proj-ROTATED-999999999");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_works_on_postgres_too() {
    let t = setup_on(Backend::Postgres).await;
    let r = t.post("openai", "/v1/chat/completions", "{}").await;
    assert_eq!(r.status(), 200);
    assert_eq!(t.mock.last().header("authorization").unwrap(), format!("Bearer {KEY}"));
    t.assert_upstream_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_env_prints_what_an_agent_needs() {
    let t = setup().await;
    t.s.put_secret(None, "claude", "sk-ant-x-123456789", &["--provider", "anthropic"]);
    t.s.grant(None, "bot", "claude", "proxy", &[]);
    t.s.put_secret(None, "db-url", "postgres://u:p@h/db", &[]);
    t.s.grant(None, "bot", "db-url", "reveal", &[]);
    let out = t.s.cli(&["agent", "env", "bot"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("OPENAI_BASE_URL={}/proxy/openai/v1", t.s.addr)), "{text}");
    assert!(text.contains("OPENAI_API_KEY=${KEYWARD_AGENT_TOKEN}"), "{text}");
    assert!(text.contains(&format!("ANTHROPIC_BASE_URL={}/proxy/claude", t.s.addr)), "{text}");
    assert!(text.contains("SSL_CERT_FILE="), "{text}");
    assert!(!text.contains("db-url"), "reveal-only grants need no proxy environment: {text}");
    assert!(!text.contains("kwa_") && !text.contains(KEY), "{text}");
    let v = t.s.cli_json(&["agent", "env", "bot"]);
    assert_eq!(v["env"]["ANTHROPIC_API_KEY"], "${KEYWARD_AGENT_TOKEN}");
    // An agent without proxy grants gets a clear error.
    t.s.agent(None, "idle");
    let out = t.s.cli(&["agent", "env", "idle"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no proxy grant"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshake_carries_the_real_key_and_frames_flow_both_ways() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let t = setup().await;
    let mut ws = t.realtime().await;

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![1u8, 2, 3]));
    // The upstream echoes the key: the agent gets it redacted.
    ws.send(Message::text("send-key")).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert_eq!(echoed.as_str(), "your key: Bearer [redacted by keyward]");
    ws.close(None).await.ok();
    drop(ws);

    assert_eq!(t.mock.ws_auth.lock().unwrap().clone(), vec![format!("Bearer {KEY}")]);
    // The tunnel's outcome counts what reached the agent, whichever side
    // ended it.
    let reason = t.done_reason("realtime").await;
    let bytes: u64 = reason.split(", ").find_map(|p| p.strip_suffix(" bytes")?.parse().ok()).expect(&reason);
    assert!(reason.contains("status 101") && bytes >= 5, "{reason}");
}

/// A connection that stays silent after the TLS handshake is closed, not
/// kept forever (no token is needed to open one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    let t = setup().await;
    let (mut tls, _) = t.tls_http1().await;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await.expect("closed in time");
    assert!(read.as_ref().map_or(true, |n| *n == 0), "the server sent something: {read:?}");
    assert!(started.elapsed() >= Duration::from_secs(5), "closed too early: {:?}", started.elapsed());
}

/// An agent that stops reading a streamed answer is cut off after the idle
/// timeout (2 s here) and the outcome says so: it cannot pin a task and an
/// upstream connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_is_cut_off() {
    let t = setup().await;
    let resp = t.s.http.get(t.url("openai", "/endless")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Holds the response open without reading its body.
    let reason = t.done_reason("openai").await;
    assert!(reason.contains("agent_stalled"), "{reason}");
    drop(resp);
}

/// An agent that goes away before the upstream answers still leaves the
/// use's outcome in the trail: every allowed `secret.proxy` gets its
/// `secret.proxy.done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_hangs_up_early_still_gets_its_outcome_audited() {
    let t = setup().await;
    let gone =
        t.s.http.get(t.url("openai", "/slow")).bearer_auth(&t.token).timeout(Duration::from_millis(500)).send().await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "the agent gave up first");
    let reason = t.done_reason("openai").await;
    assert!(reason.contains("status 499") && reason.contains("client_gone"), "{reason}");
}

/// An echo of the key cannot come back in pieces or packed: a range request
/// is forwarded without its range, a compressed answer is refused even
/// behind an innocent first Content-Encoding line, and a WebSocket handshake
/// that declares a body (which would leave a pooled upstream connection
/// waiting for bytes the next agent's request fills) is refused before
/// anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoes_cannot_come_back_in_pieces_or_packed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = setup().await;
    let h = &t.s.http;
    let r = h
        .get(t.url("openai", "/echo/json"))
        .bearer_auth(&t.token)
        .header("range", "bytes=0-9")
        .header("if-range", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[redacted by keyward]"));
    let seen = t.mock.last();
    assert!(seen.header("range").is_none() && seen.header("if-range").is_none(), "a range reached the upstream");

    let r = h.get(t.url("openai", "/gzip-hidden")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!((r.status().as_u16(), error_code(&r.text().await.unwrap()).as_str()), (502, "upstream_compressed"));

    let before = t.mock.requests().len();
    let (mut tls, _) = t.tls_http1().await;
    let head = format!(
        "GET /proxy/openai/v1/realtime HTTP/1.1\r\nHost: keyward\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\nContent-Length: 5\r\n\r\nhello",
        t.token
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("websocket_body") {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(n > 0, "closed without the refusal: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(t.mock.requests().len(), before, "the handshake reached the upstream");
    t.assert_upstream_clean();
}

/// A tunnel where nothing moves either way for the idle timeout (2 s here)
/// is closed, and its outcome says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_tunnel_is_closed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let t = setup().await;
    let mut ws = t.realtime().await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.expect("closed in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))), "{end:?}");
    assert!(started.elapsed() >= Duration::from_secs(1), "closed too early");
    let reason = t.done_reason("realtime").await;
    assert!(reason.contains("websocket_idle"), "{reason}");
}

/// Webhooks: signed, without values, and a receiver that is down delays
/// nothing and gets its events once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_carry_no_value_and_survive_a_down_receiver() {
    use std::sync::{Arc, Mutex};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "notify_interval_secs = 1\n[[webhooks]]\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret = \"whsec-test-123\"\n"
        ),
    )
    .unwrap();
    let serve_args = vec!["--config".to_owned(), config.display().to_string()];
    let s = Server::start_with(Backend::Sqlite, Opts { serve_args, ..Opts::default() }).await;
    s.put_secret(None, "soon", "value-soon-999999", &["--expires", "3d"]);
    s.put_secret(None, "k", "value-k-11111111", &[]);
    // The receiver is down: rotating must not wait for it.
    let started = std::time::Instant::now();
    assert!(s.cli_stdin(&["secret", "rotate", "k"], b"value-k-22222222").status.success());
    assert!(started.elapsed() < Duration::from_secs(3), "a down receiver delayed the rotation");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Now it comes up and receives what was queued.
    type Deliveries = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>; // (event, signature, body)
    let got: Deliveries = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                g.lock().unwrap().push((h("keyward-event"), h("keyward-signature"), body.to_vec()));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events: Vec<String> = got.lock().unwrap().iter().map(|e| e.0.clone()).collect();
        if events.contains(&"secret.rotated".to_owned()) && events.contains(&"secret.expiring".to_owned()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "webhooks not delivered: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (event, sig, body) in got.lock().unwrap().iter() {
        let text = String::from_utf8_lossy(body);
        assert!(!text.contains("value-"), "{event}: a value in a webhook: {text}");
        let t = sig.strip_prefix("t=").unwrap().split(',').next().unwrap();
        let expected = keyward_server::webhooks::signature(b"whsec-test-123", t.parse().unwrap(), body);
        assert_eq!(sig, &expected, "{event}: bad signature");
        // And independently of keyward's own code: HMAC-SHA256 over "t.body".
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"whsec-test-123");
        let tag = aws_lc_rs::hmac::sign(&key, &[t.as_bytes(), b".", body].concat());
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert!(sig.ends_with(&hex));
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["event"], event.as_str());
    }
    // Daily reminders are not repeated every scan.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expiring = got.lock().unwrap().iter().filter(|e| e.0 == "secret.expiring").count();
    assert_eq!(expiring, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_continuous_load_fails_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let t = setup().await;
    t.s.grant(None, "bot", "openai", "proxy,reveal", &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (http, token, stop, ok, failed) =
            (t.s.http.clone(), t.token.clone(), stop.clone(), ok.clone(), failed.clone());
        let url = if i % 2 == 0 { t.url("openai", "/v1/models") } else { t.s.url("/v1/resolve/openai") };
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
                let counter = if r.status() == 200 { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rotated = t.s.cli_stdin(&["secret", "rotate", "openai", "--grace", "1h"], b"sk-proj-AFTER-ROTATE-123456");
    assert!(rotated.status.success());
    // The first request that starts after the command returned uses the new key.
    let r = t.s.http.get(t.url("openai", "/v1/models?first=after")).bearer_auth(&t.token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = t.mock.requests().into_iter().find(|x| x.query.as_deref() == Some("first=after")).unwrap();
    assert_eq!(first.header("authorization").unwrap(), "Bearer sk-proj-AFTER-ROTATE-123456");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(ok.load(Ordering::Relaxed) > 20, "too little load to mean anything");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "a rotation must fail no request");
}
