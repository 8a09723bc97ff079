//! Audit export sinks against real receivers on loopback: a required sink
//! going down refuses accesses and its return resumes them; an optional sink
//! that was down receives every missed event afterwards, none twice; a sink
//! that hangs does not hold requests beyond its bound; syslog datagrams pass
//! a strict RFC 5424 parser and JSONL lines parse, with agent-controlled
//! strings escaped and no value or token anywhere.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const VALUE: &str = "sk-sink-test-value-0123456789";

/// An HTTP audit receiver: records the sequence numbers it accepts; answers
/// 503 while `fail` is set.
#[derive(Clone, Default)]
struct Receiver {
    seqs: Arc<Mutex<Vec<i64>>>,
    bodies: Arc<Mutex<Vec<String>>>,
    fail: Arc<AtomicBool>,
}

impl Receiver {
    async fn serve_on(&self, listener: tokio::net::TcpListener) {
        let r = self.clone();
        let app = axum::Router::new().route(
            "/ingest",
            axum::routing::post(move |body: String| {
                let r = r.clone();
                async move {
                    if r.fail.load(Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    for e in v["events"].as_array().unwrap() {
                        r.seqs.lock().unwrap().push(e["seq"].as_i64().unwrap());
                    }
                    r.bodies.lock().unwrap().push(body);
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn server_with(b: Backend, dir: &std::path::Path, sinks: &str) -> Server {
    let config = dir.join("keyward.toml");
    std::fs::write(&config, sinks).unwrap();
    let serve_args = vec!["--config".to_owned(), config.display().to_string()];
    Server::start_with(b, Opts { serve_args, ..Opts::default() }).await
}

async fn wait_for(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail_seq(s: &Server) -> i64 {
    let v = ok_json(s.cli(&["--json", "audit", "verify"]));
    v["last_seq"].as_i64().unwrap()
}

async fn required_sink_fails_closed(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    rx.serve_on(listener).await;
    let cfg = format!(
        "[[audit_sinks]]\ntype = \"http\"\nname = \"siem\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nrequired = true\ntimeout_ms = 500\n"
    );
    let s = server_with(b, dir.path(), &cfg).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    wait_for("the required sink to come up", 15, async || s.resolve(&token, "k").await.0 == 200).await;

    // The receiver fails: accesses are refused (no value), fail closed.
    rx.fail.store(true, Ordering::SeqCst);
    let mut refused = None;
    wait_for("accesses to be refused", 15, async || {
        let (status, body) = s.resolve(&token, "k").await;
        assert!(!body.contains(VALUE) || status == 200);
        if status == 503 {
            refused = Some(body);
        }
        status == 503
    })
    .await;
    assert_eq!(error_code(&refused.unwrap()), "audit_sink_unavailable");

    // It comes back: accesses resume, and it gets what it missed.
    rx.fail.store(false, Ordering::SeqCst);
    wait_for("accesses to resume", 15, async || s.resolve(&token, "k").await.0 == 200).await;
    let tail = tail_seq(&s);
    wait_for("the receiver to catch up", 15, async || rx.seqs.lock().unwrap().iter().max() >= Some(&tail)).await;
    let out = s.cli(&["--json", "audit", "--outcome", "denied", "--action", "secret.resolve"]);
    let denied: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(json).collect();
    assert!(!denied.is_empty() && denied.iter().all(|e| e["reason"] == "required audit sink down"), "{denied:?}");
    assert!(!rx.bodies.lock().unwrap().iter().any(|b| b.contains(VALUE) || b.contains(&token)));
}

async fn optional_sink_catches_up_once(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "[[audit_sinks]]\ntype = \"http\"\nname = \"lake\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nbatch = 7\ntimeout_ms = 500\n"
    );
    let s = server_with(b, dir.path(), &cfg).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    // The receiver is down: nothing is refused, nothing waits for it.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(s.resolve(&token, "k").await.0, 200);
        assert!(t.elapsed() < Duration::from_secs(1), "an optional sink held a request");
    }
    let rx = Receiver::default();
    rx.serve_on(tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap()).await;
    let tail = tail_seq(&s);
    wait_for("the receiver to catch up", 30, async || rx.seqs.lock().unwrap().iter().max() >= Some(&tail)).await;
    let mut seqs = rx.seqs.lock().unwrap().clone();
    let n = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "an event was delivered twice");
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "every event from the first, no gap");
}

/// A receiver that accepts connections and never answers.
async fn black_hole() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_sinks_do_not_hold_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (optional, required) = (black_hole().await, black_hole().await);
    let cfg = format!(
        "[[audit_sinks]]\ntype = \"http\"\nname = \"slow\"\nurl = \"http://127.0.0.1:{optional}/ingest\"\ntimeout_ms = 300\n\
         [[audit_sinks]]\ntype = \"syslog\"\nname = \"stuck\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{required}\"\ntimeout_ms = 300\nrequired = true\n"
    );
    let s = server_with(Backend::Sqlite, dir.path(), &cfg).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    // The TCP syslog receiver accepts but never reads: writes may succeed
    // into the socket buffer for a while; either way no request waits on it.
    for _ in 0..10 {
        let t = Instant::now();
        let (status, _) = s.resolve(&token, "k").await;
        assert!(status == 200 || status == 503, "{status}");
        assert!(t.elapsed() < Duration::from_secs(1), "a hanging sink held a request for {:?}", t.elapsed());
    }
}

/// A strict RFC 5424 parser: (PRI, MSGID, SD params, MSG) or what is wrong.
#[allow(clippy::type_complexity)]
fn parse_rfc5424(m: &str) -> Result<(u16, String, BTreeMap<String, String>, String), String> {
    let rest = m.strip_prefix('<').ok_or("no PRI")?;
    let (pri, rest) = rest.split_once('>').ok_or("PRI not closed")?;
    if pri.is_empty()
        || pri.len() > 3
        || !pri.bytes().all(|b| b.is_ascii_digit())
        || (pri.len() > 1 && pri.starts_with('0'))
    {
        return Err(format!("bad PRI {pri}"));
    }
    let pri: u16 = pri.parse().map_err(|_| "PRI")?;
    if pri > 191 {
        return Err("PRI over 191".into());
    }
    let rest = rest.strip_prefix("1 ").ok_or("VERSION must be 1")?;
    let mut parts = rest.splitn(6, ' ');
    let mut field = |name: &str, max: usize| -> Result<String, String> {
        let f = parts.next().ok_or(format!("no {name}"))?;
        if f.is_empty() || f.len() > max || !f.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(format!("bad {name}: {f:?}"));
        }
        Ok(f.to_owned())
    };
    let ts = field("TIMESTAMP", 64)?;
    let frac_ok = ts.split_once('.').is_none_or(|(_, f)| {
        let digits: String = f.chars().take_while(char::is_ascii_digit).collect();
        (1..=6).contains(&digits.len())
    });
    if ts != "-"
        && (time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339).is_err() || !frac_ok)
    {
        return Err(format!("bad TIMESTAMP {ts}"));
    }
    field("HOSTNAME", 255)?;
    field("APP-NAME", 48)?;
    field("PROCID", 128)?;
    let msgid = field("MSGID", 32)?;
    let sd_and_msg = parts.next().ok_or("no STRUCTURED-DATA")?;
    let mut params = BTreeMap::new();
    let chars: Vec<char> = sd_and_msg.chars().collect();
    let mut i = 0;
    if chars.first() == Some(&'-') {
        i = 1;
    } else {
        while chars.get(i) == Some(&'[') {
            i += 1;
            let name_ok = |c: char| c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"');
            let start = i;
            while chars.get(i).is_some_and(|&c| name_ok(c)) {
                i += 1;
            }
            if i == start || i - start > 32 {
                return Err("bad SD-ID".into());
            }
            while chars.get(i) == Some(&' ') {
                i += 1;
                let start = i;
                while chars.get(i).is_some_and(|&c| name_ok(c)) {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name.is_empty() || name.len() > 32 {
                    return Err("bad PARAM-NAME".into());
                }
                if chars.get(i) != Some(&'=') || chars.get(i + 1) != Some(&'"') {
                    return Err(format!("PARAM {name} not =\""));
                }
                i += 2;
                let mut value = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err("PARAM-VALUE not closed".into()),
                        Some('\\') if matches!(chars.get(i + 1), Some('"' | '\\' | ']')) => {
                            value.push(chars[i + 1]);
                            i += 2;
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(']') => return Err("unescaped ] in PARAM-VALUE".into()),
                        Some(&c) => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
                params.insert(name, value);
            }
            if chars.get(i) != Some(&']') {
                return Err("SD-ELEMENT not closed".into());
            }
            i += 1;
        }
        if params.is_empty() {
            return Err("no SD-ELEMENT".into());
        }
    }
    let msg: String = chars[i..].iter().collect();
    let msg = match msg.strip_prefix(' ') {
        Some(m) => m.strip_prefix('\u{feff}').ok_or("MSG without BOM")?.to_owned(),
        None if msg.is_empty() => String::new(),
        None => return Err("no SP before MSG".into()),
    };
    Ok((pri, msgid, params, msg))
}

#[test]
fn the_parser_is_strict() {
    assert!(parse_rfc5424("<14>1 2026-01-01T00:00:00.123456Z h app 1 id [x@1 a=\"b\\]c\"] \u{feff}hi").is_ok());
    for bad in [
        "<14>1 2026-01-01T00:00:00Z h app 1 id [x@1 a=\"b]c\"] \u{feff}hi",
        "<14>1 2026-01-01T00:00:00.1234567Z h app 1 id - ",
        "<192>1 2026-01-01T00:00:00Z h app 1 id -",
        "<14>2 2026-01-01T00:00:00Z h app 1 id -",
        "<14>1 2026-01-01T00:00:00Z h app 1 id [x@1 a=\"b\"] hi",
    ] {
        assert!(parse_rfc5424(bad).is_err(), "accepted {bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_and_file_sinks_are_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let jsonl = dir.path().join("audit.jsonl");
    let cfg = format!(
        "[[audit_sinks]]\ntype = \"syslog\"\nname = \"siem\"\ntransport = \"udp\"\naddress = \"127.0.0.1:{udp_port}\"\n\
         [[audit_sinks]]\ntype = \"file\"\nname = \"local\"\npath = \"{}\"\nmax_bytes = 4096\nkeep = 2\n",
        jsonl.display()
    );
    let s = server_with(Backend::Sqlite, dir.path(), &cfg).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    let nasty = format!("quote\" bracket] backslash\\ {}", "x".repeat(400));
    for _ in 0..15 {
        let resp = s
            .http
            .get(s.url("/v1/resolve/k"))
            .bearer_auth(&token)
            .header("X-Keyward-Purpose", nasty.as_str())
            .header("User-Agent", "agent\"]\\/1.0")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let tail = tail_seq(&s);

    let mut by_seq = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    while by_seq.len() < tail as usize {
        let n =
            tokio::time::timeout(Duration::from_secs(10), udp.recv(&mut buf)).await.expect("syslog datagrams").unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap().to_owned();
        assert!(!text.contains(VALUE) && !text.contains(&token), "a value or token in syslog");
        let (pri, msgid, params, msg) = parse_rfc5424(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let event = json(&msg);
        assert_eq!(params["seq"], event["seq"].to_string());
        assert_eq!(msgid, event["action"].as_str().unwrap());
        assert_eq!(pri / 8, 10, "facility authpriv");
        if event["action"] == "secret.resolve" {
            assert!(params["purpose"].starts_with("quote\" bracket] backslash\\"), "{params:?}");
            assert!(params["purpose"].len() <= 256, "agent strings are length-limited");
            assert_eq!(params["user_agent"], "agent\"]\\/1.0");
        }
        by_seq.insert(event["seq"].as_i64().unwrap(), ());
    }
    assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), (1..=tail).collect::<Vec<_>>());

    // JSONL: rotated at the size limit, 0600, every line one event.
    wait_for("the file sink", 10, async || jsonl.with_extension("jsonl.1").exists()).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&jsonl).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!dir.path().join("audit.jsonl.3").exists(), "keep = 2");
    for f in [jsonl.clone(), jsonl.with_extension("jsonl.1")] {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains(VALUE) && !text.contains(&token));
        for line in text.lines() {
            let e = json(line);
            assert!(e["seq"].as_i64().unwrap() >= 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_required_sink_fails_closed() {
    required_sink_fails_closed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_required_sink_fails_closed() {
    required_sink_fails_closed(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_optional_sink_catches_up_once() {
    optional_sink_catches_up_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_optional_sink_catches_up_once() {
    optional_sink_catches_up_once(Backend::Postgres).await;
}
