//! The dashboard over HTTPS against a real server: every page and fragment,
//! rendered as each role, holds no stored value; cookie flags and security
//! headers on every response; CSRF refused; the auditor sees but cannot
//! change; the first account from the operator token, once.

mod support;

use std::collections::HashMap;

use support::*;

const OPENAI: &str = "sk-dash-openai-value-0123456789";
const GENERIC: &str = "generic-dash-value-9876543210";
const CREATED: &str = "created-through-the-form-555555";
const ROTATED: &str = "rotated-through-the-form-777777";

/// A browser-like HTTPS client that keeps cookies by hand and never
/// follows redirects (so each response can be checked).
struct Browser<'a> {
    s: &'a Server,
    jar: HashMap<String, String>,
    seen: Vec<(String, u16, String)>,
}

impl<'a> Browser<'a> {
    fn new(s: &'a Server) -> Self {
        Browser { s, jar: HashMap::new(), seen: Vec::new() }
    }

    fn cookie_header(&self) -> String {
        self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    async fn send(&mut self, req: reqwest::RequestBuilder, what: &str) -> (u16, String, reqwest::header::HeaderMap) {
        let resp = req.header("cookie", self.cookie_header()).send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        for h in ["content-security-policy", "x-frame-options", "x-content-type-options", "cache-control"] {
            assert!(headers.contains_key(h), "{what}: no {h}");
        }
        assert_eq!(headers["x-frame-options"], "DENY", "{what}");
        assert!(headers["content-security-policy"].to_str().unwrap().contains("script-src 'self'"), "{what}");
        assert!(!headers["content-security-policy"].to_str().unwrap().contains("unsafe-inline"), "{what}");
        for c in headers.get_all("set-cookie") {
            let c = c.to_str().unwrap();
            for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
                assert!(c.contains(flag), "{what}: cookie without {flag}: {c}");
            }
            let (kv, _) = c.split_once(';').unwrap();
            let (k, v) = kv.split_once('=').unwrap();
            if v.is_empty() {
                self.jar.remove(k);
            } else {
                self.jar.insert(k.to_owned(), v.to_owned());
            }
        }
        let body = resp.text().await.unwrap();
        self.seen.push((what.to_owned(), status, body.clone()));
        (status, body, headers)
    }

    async fn get(&mut self, path: &str) -> (u16, String) {
        let req = self.s.http.get(self.s.url(path));
        let (s, b, _) = self.send(req, &format!("GET {path}")).await;
        (s, b)
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> (u16, String, reqwest::header::HeaderMap) {
        let body: String = form.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&");
        let req =
            self.s.http.post(self.s.url(path)).header("content-type", "application/x-www-form-urlencoded").body(body);
        self.send(req, &format!("POST {path}")).await
    }

    /// The CSRF token in the page's forms.
    fn csrf(body: &str) -> String {
        let at = body.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
        body[at..].split('"').next().unwrap().to_owned()
    }

    async fn login(&mut self, name: &str, password: &str) -> u16 {
        let (_, page) = self.get("/ui/login").await;
        let csrf = Self::csrf(&page);
        self.post("/ui/login", &[("csrf", &csrf), ("name", name), ("password", password)]).await.0
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const PASSWORD: &str = "correct horse battery staple";

async fn dashboard(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "openai-prod", OPENAI, &["--provider", "openai", "--expires", "3d"]);
    s.put_secret(None, "generic-k", GENERIC, &["--rotate-every", "1d"]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "openai-prod", "proxy", &[]);
    s.grant(None, "bot", "generic-k", "reveal", &[]);
    assert_eq!(s.resolve(&token, "generic-k").await.0, 200);
    for (name, role) in [("olivia", "owner"), ("adam", "admin"), ("audrey", "auditor")] {
        let out = s.cli_stdin(&["user", "create", name, "--role", role], PASSWORD.as_bytes());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let short = s.cli_stdin(&["user", "create", "shorty", "--role", "admin"], b"short");
    assert!(!short.status.success(), "short passwords are refused");

    // Not logged in: every page sends the browser to the login form.
    let mut anon = Browser::new(&s);
    for path in ["/ui/", "/ui/secrets", "/ui/audit"] {
        let (status, _) = anon.get(path).await;
        assert_eq!(status, 303, "{path}");
    }
    assert_eq!(anon.login("adam", "wrong password!!").await, 401);
    assert_eq!(anon.post("/ui/login", &[("name", "adam"), ("password", PASSWORD)]).await.0, 403, "login CSRF");

    // The admin works through the forms.
    let mut admin = Browser::new(&s);
    assert_eq!(admin.login("adam", PASSWORD).await, 303);
    assert!(admin.jar.contains_key("__Host-kw_session"));
    let (_, page) = admin.get("/ui/secrets").await;
    let csrf = Browser::csrf(&page);
    let (st, _, h) = admin
        .post("/ui/secrets", &[("csrf", &csrf), ("name", "formed"), ("provider", "generic"), ("value", CREATED)])
        .await;
    assert_eq!((st, h["location"].to_str().unwrap()), (303, "/ui/secrets/formed"));
    let form = [("csrf", csrf.as_str()), ("value", ROTATED), ("grace", ""), ("confirm", "yes")];
    assert_eq!(admin.post("/ui/secrets/formed/rotate", &form).await.0, 303);
    let (_, detail) = admin.get("/ui/secrets/formed").await;
    assert!(detail.contains(">v2<") && detail.contains("revoked"), "rotated: {detail}");
    let grant = [("csrf", csrf.as_str()), ("agent", "bot"), ("secret", "formed"), ("reveal", "yes")];
    assert_eq!(admin.post("/ui/grants", &grant).await.0, 303);
    let (st, resolved) = s.resolve(&token, "formed").await;
    assert!(st == 200 && resolved.contains(ROTATED), "granted from the dashboard, rotated value served");
    admin.post("/ui/agents", &[("csrf", &csrf), ("name", "helper"), ("ttl", "30d")]).await;
    let created = admin.seen.last().unwrap().2.clone();
    assert!(created.contains("kwa_"), "the new agent's token is shown once");
    let (_, again) = admin.get("/ui/agents").await;
    assert!(!again.contains("kwa_"), "and never again");
    let helper = again.split("<td>helper</td>").nth(1).expect("helper listed");
    assert!(helper.split("</tr>").next().unwrap().contains(" UTC"), "its token expiry is shown");
    // A form without its CSRF token changes nothing.
    assert_eq!(admin.post("/ui/agents/bot/disable", &[("csrf", "forged")]).await.0, 403);
    assert_eq!(s.resolve(&token, "generic-k").await.0, 200, "still enabled");
    assert_eq!(admin.post("/ui/agents/bot/disable", &[("csrf", &csrf)]).await.0, 303);
    assert_eq!(s.resolve(&token, "generic-k").await.0, 401, "disabled from the dashboard");
    let (_, filtered) = admin.get("/ui/audit?agent=&secret=formed&action=secret.rotate&outcome=allowed").await;
    assert!(filtered.contains("secret.rotate") && filtered.contains("user:adam"), "audited with the human as actor");
    assert!(filtered.contains("Chain verified"));
    assert!(!filtered.contains("checkpoints hold"), "instance-wide counts are the operator's");
    // The export link keeps the filters (escaped once, as HTML wants).
    let export = "/ui/audit/export.jsonl?agent=&#38;secret=formed&#38;action=secret.rotate&#38;outcome=allowed";
    let link = filtered.lines().find(|l| l.contains("export.jsonl")).unwrap_or_default().to_owned();
    assert!(filtered.contains(export), "the export link lost the filters: {link}");

    // The auditor sees everything and can change nothing.
    let mut auditor = Browser::new(&s);
    assert_eq!(auditor.login("audrey", PASSWORD).await, 303);
    let (_, page) = auditor.get("/ui/secrets/openai-prod").await;
    assert!(!page.contains("id=\"rotate\""), "no rotate form for auditors");
    let acsrf = Browser::csrf(&page);
    let form = [("csrf", acsrf.as_str()), ("value", "auditor-should-not-rotate"), ("confirm", "yes")];
    assert_eq!(auditor.post("/ui/secrets/openai-prod/rotate", &form).await.0, 403);

    // Every page and fragment, as every role: no stored value anywhere.
    let mut owner = Browser::new(&s);
    assert_eq!(owner.login("olivia", PASSWORD).await, 303);
    for br in [&mut owner, &mut admin, &mut auditor] {
        for path in [
            "/ui/",
            "/ui/secrets",
            "/ui/secrets?q=open",
            "/ui/secrets/openai-prod",
            "/ui/secrets/generic-k",
            "/ui/secrets/formed",
            "/ui/secrets/missing",
            "/ui/agents",
            "/ui/audit",
            "/ui/audit?outcome=allowed",
            "/ui/audit/export.jsonl",
            "/ui/alerts",
            "/ui/alerts?all=true",
            "/ui/nope",
            "/ui/login",
            "/ui/setup",
            "/ui/static/app.js",
            "/ui/static/app.css",
        ] {
            br.get(path).await;
        }
    }
    let mut all = anon.seen;
    all.extend(admin.seen.clone());
    all.extend(auditor.seen.clone());
    all.extend(owner.seen.clone());
    assert!(all.len() > 60);
    for (what, status, body) in &all {
        for value in [OPENAI, GENERIC, CREATED, ROTATED] {
            assert!(!body.contains(value), "{what} ({status}) shows a stored value");
        }
        assert!(!body.contains("<script>"), "{what}: inline script");
    }

    // Logging out ends the session.
    let (_, page) = auditor.get("/ui/").await;
    let csrf = Browser::csrf(&page);
    assert_eq!(auditor.post("/ui/logout", &[("csrf", &csrf)]).await.0, 303);
    assert_eq!(auditor.get("/ui/").await.0, 303);
    // Even when the audit trail refuses the logout event.
    let (_, page) = admin.get("/ui/").await;
    let csrf = Browser::csrf(&page);
    let db = s.db().await;
    db.inject_audit_fault().await;
    let refused = admin.post("/ui/logout", &[("csrf", &csrf)]).await.0;
    db.clear_audit_fault().await;
    db.close().await;
    assert_eq!(refused, 503, "the failed audit write is reported");
    assert_eq!(admin.get("/ui/").await.0, 303, "the session ended all the same");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dashboard() {
    dashboard(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dashboard() {
    dashboard(Backend::Postgres).await;
}

/// The operator token from `init` creates the first account, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_account_from_the_operator_token_once() {
    let s = Server::start(Backend::Sqlite).await;
    let mut b = Browser::new(&s);
    let (_, login) = b.get("/ui/login").await;
    assert!(login.contains("/ui/setup"), "the login page points to the setup");
    let (_, page) = b.get("/ui/setup").await;
    let csrf = Browser::csrf(&page);
    let form = |token: &str| {
        vec![
            ("csrf", csrf.clone()),
            ("token", token.to_owned()),
            ("name", "first".into()),
            ("password", PASSWORD.into()),
        ]
    };
    let bad: Vec<(&str, String)> = form("kwu_not-a-token");
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(b.post("/ui/setup", &bad).await.0, 401);
    let good = form(&s.admin_token);
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(b.post("/ui/setup", &good).await.0, 303);
    assert_eq!(b.login("first", PASSWORD).await, 303);
    // Once: the form is gone and a replay is refused.
    let mut other = Browser::new(&s);
    assert_eq!(other.get("/ui/setup").await.0, 303);
    let (_, page) = other.get("/ui/login").await;
    let csrf = Browser::csrf(&page);
    let replay =
        [("csrf", csrf.as_str()), ("token", s.admin_token.as_str()), ("name", "second"), ("password", PASSWORD)];
    assert_eq!(other.post("/ui/setup", &replay).await.0, 409);
}
