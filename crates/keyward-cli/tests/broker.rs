//! End-to-end tests of the core broker over a real TLS socket, with the real
//! CLI binary and a real HTTP client. Each test starts its own server.

mod support;

use support::*;

const VALUE: &str = "sk-proj-TESTVALUE-9f8e7d6c5b4a39281706";

async fn walkthrough_put_agent_grant_resolve_audit(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "openai-prod", VALUE, &["--provider", "openai"]);
    let token = s.agent(None, "support-bot");
    assert!(token.starts_with("kwa_"));
    s.grant(None, "support-bot", "openai-prod", "reveal", &[]);

    let (status, body) = s.resolve(&token, "openai-prod").await;
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["value"], VALUE);
    assert_eq!(v["version"], 1);

    // By stable id too.
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sec_"));
    let (status, body) = s.resolve(&token, &id).await;
    assert_eq!(status, 200, "{body}");

    // The audit trail says who, what, for what, from where, and the outcome.
    let out = s.cli(&["audit", "--secret", "openai-prod", "--json"]);
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let resolves: Vec<_> = lines.iter().filter(|e| e["action"] == "secret.resolve").collect();
    assert_eq!(resolves.len(), 2);
    let e = resolves[0];
    assert_eq!(e["actor"]["kind"], "agent");
    assert_eq!(e["actor"]["name"], "support-bot");
    assert!(e["actor"]["token_id"].as_str().unwrap().starts_with("atk_"));
    assert_eq!(e["purpose"], "test purpose");
    assert_eq!(e["source_ip"], "127.0.0.1");
    assert_eq!(e["outcome"], "allowed");
    assert_eq!(e["secret_version"], 1);
    assert!(e["request_id"].is_string());

    // Human-readable audit works too.
    let out = s.cli(&["audit"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("secret.resolve"));

    // Metadata only: no value field anywhere in `secret show --json`.
    let shown = s.cli_json(&["secret", "show", "openai-prod"]);
    assert_eq!(shown["name"], "openai-prod");
    assert_eq!(shown["provider"], "openai");
    assert_eq!(shown["upstream"], "https://api.openai.com");
    assert!(shown.get("value").is_none());
    assert!(!shown.to_string().contains(VALUE));
    assert_eq!(shown["versions"][0]["fingerprint"].as_str().unwrap().len(), 8);
    assert!(shown["last_used"].is_string());

    let verify = s.cli_json(&["audit", "verify"]);
    assert_eq!(verify["ok"], true);
}

async fn organizations_are_isolated(b: Backend) {
    let s = Server::start(b).await;
    let org = s.cli_json(&["org", "create", "acme"]);
    assert_eq!(org["name"], "acme");
    s.put_secret(None, "shared-name", "value-of-default-org", &[]);
    s.put_secret(Some("acme"), "shared-name", "value-of-acme-org", &[]);
    s.put_secret(Some("acme"), "acme-only", "acme-only-value", &[]);
    let t_default = s.agent(None, "bot");
    let t_acme = s.agent(Some("acme"), "bot");
    s.grant(None, "bot", "shared-name", "reveal", &[]);
    s.grant(Some("acme"), "bot", "shared-name", "reveal", &[]);
    s.grant(Some("acme"), "bot", "acme-only", "reveal", &[]);

    assert_eq!(json(&s.resolve(&t_default, "shared-name").await.1)["value"], "value-of-default-org");
    assert_eq!(json(&s.resolve(&t_acme, "shared-name").await.1)["value"], "value-of-acme-org");
    // An agent of one org cannot reach another org's secret, by name or id.
    assert_eq!(s.resolve(&t_default, "acme-only").await.0, 404);
    let acme_id = json(&s.resolve(&t_acme, "acme-only").await.1)["id"].as_str().unwrap().to_owned();
    assert_eq!(s.resolve(&t_default, &acme_id).await.0, 404);

    // An owner token of acme sees acme only, and cannot act in default.
    let tok = ok_json(s.cli_as(
        &s.admin_token,
        Some("acme"),
        &["token", "create", "acme-owner", "--role", "owner", "--json"],
        b"",
    ));
    let acme_owner = tok["token"].as_str().unwrap();
    let out = s.cli_as(acme_owner, Some("acme"), &["secret", "list", "--json"], b"");
    let list = ok_json(out);
    assert_eq!(list["secrets"].as_array().unwrap().len(), 2);
    let out = s.cli_as(acme_owner, Some("default"), &["secret", "list", "--json"], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
    let out = s.cli_as(acme_owner, Some("acme"), &["org", "create", "other"], b"");
    assert!(!out.status.success(), "only the operator creates organizations");
}

async fn not_granted_looks_exactly_like_not_found(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "exists", VALUE, &[]);
    let token = s.agent(None, "bot");
    let (st1, body1) = s.resolve(&token, "exists").await;
    let (st2, body2) = s.resolve(&token, "does-not-exist").await;
    assert_eq!((st1, st2), (404, 404));
    assert_eq!(body1, body2);
    assert_eq!(error_code(&body1), "not_found");
    // The audit trail knows the difference.
    let out = s.cli(&["audit", "--outcome", "denied", "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"no_grant\"") && text.contains("\"no_such_secret\""), "{text}");
}

async fn disabled_agent_gets_401_and_enable_restores(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(s.resolve(&token, "k").await.0, 200);
    assert!(s.cli(&["agent", "disable", "bot"]).status.success());
    let (status, body) = s.resolve(&token, "k").await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "agent_disabled");
    assert!(!body.contains(VALUE));
    assert!(s.cli(&["agent", "enable", "bot"]).status.success());
    assert_eq!(s.resolve(&token, "k").await.0, 200);
}

async fn proxy_only_grant_cannot_resolve(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "proxy", &[]);
    let (status, body) = s.resolve(&token, "k").await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "reveal_not_granted");
    assert!(!body.contains(VALUE));
}

async fn expired_grant_is_denied(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &["--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1300));
    let (status, body) = s.resolve(&token, "k").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(error_code(&body), "grant_expired");
    // A grant that is already expired is refused at creation.
    let out =
        s.cli(&["grant", "add", "--agent", "bot", "--secret", "k", "--mode", "reveal", "--expires", "2001-01-01"]);
    assert!(!out.status.success());
}

async fn rotate_revoke_delete_lifecycle(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", "first-value-1", &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(json(&s.resolve(&token, "k").await.1)["value"], "first-value-1");
    let out = s.cli_stdin(&["secret", "rotate", "k"], b"second-value-2\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&s.resolve(&token, "k").await.1);
    assert_eq!((v["value"].as_str().unwrap(), v["version"].as_i64().unwrap()), ("second-value-2", 2));
    let shown = s.cli_json(&["secret", "show", "k"]);
    assert_eq!(shown["versions"][0]["state"], "revoked");
    assert_eq!(shown["versions"][1]["state"], "current");

    assert!(s.cli(&["secret", "revoke", "k"]).status.success());
    let (status, body) = s.resolve(&token, "k").await;
    assert_eq!((status, error_code(&body).as_str()), (403, "no_current_version"));

    assert!(s.cli(&["secret", "delete", "k"]).status.success());
    assert_eq!(s.resolve(&token, "k").await.0, 404);
    assert!(s.cli_json(&["grant", "list"])["grants"].as_array().unwrap().is_empty());
}

async fn rotation_with_grace_rollback_versions_and_metrics(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", "value-one-11111", &["--rotate-every", "90d", "--expires", "7d"]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal,proxy", &[]);
    let out = s.cli_stdin(&["secret", "rotate", "k", "--grace", "1h", "--expires", "30d"], b"value-two-22222");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&s.resolve(&token, "k").await.1)["value"], "value-two-22222");
    let old = s.http.get(s.url("/v1/resolve/k?version=1")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(old.status(), 200, "the previous version stays readable during its grace period");
    assert_eq!(old.json::<serde_json::Value>().await.unwrap()["version"], 1);
    let bad = s.http.get(s.url("/v1/resolve/k?version=x")).bearer_auth(&token).send().await.unwrap();
    assert_eq!((bad.status().as_u16(), error_code(&bad.text().await.unwrap()).as_str()), (400, "invalid_query"));

    let versions = s.cli_json(&["secret", "versions", "k"]);
    let states: Vec<&str> =
        versions["versions"].as_array().unwrap().iter().map(|v| v["state"].as_str().unwrap()).collect();
    assert_eq!(states, vec!["previous", "current"]);
    assert!(versions["versions"][0]["grace_until"].is_string());
    let list = s.cli_json(&["secret", "list"]);
    assert_eq!(list["secrets"][0]["status"], "expiring", "the secret itself expires in 7 days");

    assert!(s.cli(&["secret", "rollback", "k"]).status.success());
    assert_eq!(json(&s.resolve(&token, "k").await.1)["value"], "value-one-11111");
    assert!(!s.cli(&["secret", "rollback", "k"]).status.success(), "nothing left to roll back to");

    let anonymous = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "metrics need a token");
    let metrics = s.http.get(s.url("/metrics")).bearer_auth(&s.admin_token).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keyward_secrets{status=\"expiring\"} 1"), "{metrics}");
    assert!(metrics.contains("keyward_uses_total{mode=\"reveal\",outcome=\"allowed\"} 3"), "{metrics}");
    assert!(!metrics.contains("value-"));
}

async fn failed_authentication_is_rate_limited_per_source(b: Backend) {
    let s = Server::start(b).await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(s.resolve("kwa_not-a-real-token", "k").await.0);
    }
    assert_eq!(statuses[0], 401);
    assert!(statuses.contains(&429), "a burst of failures is cut: {statuses:?}");
    let db = s.db().await;
    let failures = db.int("SELECT COUNT(*) FROM audit_events WHERE action = 'secret.resolve'").await;
    let summaries = db.int("SELECT COUNT(*) FROM audit_events WHERE action = 'auth.rate_limited'").await;
    db.close().await;
    assert!(failures < 45, "not every failure costs a durable write: {failures}");
    assert!(summaries >= 1, "the limiting itself is audited");
    // A real token from the same address still works.
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(s.resolve(&token, "k").await.0, 200);
}

async fn agents_bound_to_networks_and_token_rotation(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    for (name, net) in [("inside", "127.0.0.0/8"), ("outside", "10.0.0.0/8")] {
        s.cli_json(&["agent", "create", name, "--allow-from", net]);
        s.grant(None, name, "k", "reveal", &[]);
    }
    let inside = s.cli_json(&["agent", "token", "rotate", "inside"])["token"].as_str().unwrap().to_owned();
    let outside = s.cli_json(&["agent", "token", "rotate", "outside"])["token"].as_str().unwrap().to_owned();
    assert_eq!(s.resolve(&inside, "k").await.0, 200, "127.0.0.1 is inside 127.0.0.0/8");
    let (status, body) = s.resolve(&outside, "k").await;
    assert_eq!((status, error_code(&body).as_str()), (401, "source_not_allowed"));
    let out = s.cli(&["agent", "create", "bad", "--allow-from", "10.0.0.0/99"]);
    assert!(!out.status.success());

    // Rotation without overlap: the old token stops at once.
    let old = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(s.resolve(&old, "k").await.0, 200);
    let new = s.cli_json(&["agent", "token", "rotate", "bot"])["token"].as_str().unwrap().to_owned();
    assert!(new.starts_with("kwa_") && new != old);
    assert_eq!(s.resolve(&old, "k").await.0, 401);
    assert_eq!(s.resolve(&new, "k").await.0, 200);
    let with_overlap =
        s.cli_json(&["agent", "token", "rotate", "bot", "--overlap", "1h"])["token"].as_str().unwrap().to_owned();
    assert_eq!(s.resolve(&new, "k").await.0, 200, "the previous token works during the overlap");
    assert_eq!(s.resolve(&with_overlap, "k").await.0, 200);
}

async fn auditor_reads_but_cannot_change(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    let tok = s.cli_json(&["token", "create", "reader", "--role", "auditor"]);
    let auditor = tok["token"].as_str().unwrap();
    assert!(s.cli_as(auditor, None, &["secret", "list"], b"").status.success());
    assert!(s.cli_as(auditor, None, &["audit"], b"").status.success());
    assert!(s.cli_as(auditor, None, &["audit", "verify"], b"").status.success());
    for args in [
        &["secret", "put", "new"][..],
        &["secret", "rotate", "k"][..],
        &["agent", "create", "x"][..],
        &["secret", "delete", "k"][..],
    ] {
        let out = s.cli_as(auditor, None, args, b"some-value");
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(String::from_utf8_lossy(&out.stderr).contains("insufficient_role"), "{args:?}");
    }
    assert_eq!(s.cli_json(&["secret", "list"])["secrets"].as_array().unwrap().len(), 1);
}

async fn value_never_leaves_in_clear(b: Backend) {
    let s = Server::start(b).await;
    let other = "xoxb-SECOND-VALUE-31337-abcdef";
    s.put_secret(None, "openai-prod", VALUE, &["--provider", "openai"]);
    s.put_secret(None, "slack", other, &["--provider", "slack"]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "openai-prod", "reveal", &[]);
    assert_eq!(s.resolve(&token, "openai-prod").await.0, 200);
    let out = s.cli_stdin(&["secret", "rotate", "slack"], b"xoxb-THIRD-VALUE-424242-fedcba");
    assert!(out.status.success());
    for args in [
        &["secret", "list"][..],
        &["secret", "list", "--json"][..],
        &["secret", "show", "openai-prod"][..],
        &["secret", "show", "slack", "--json"][..],
        &["agent", "list", "--json"][..],
        &["agent", "show", "bot", "--json"][..],
        &["grant", "list", "--json"][..],
        &["audit", "--json"][..],
        &["audit", "verify"][..],
    ] {
        assert!(s.cli(args).status.success(), "{args:?}");
    }
    let audit_export = s.cli(&["audit", "--json", "--limit", "1000"]).stdout;
    let mut s = s;
    s.stop(); // flush everything to disk
    let disk = s.stored_bytes().await;
    let wal = std::fs::read(s.data_dir.join("keyward.db-wal")).unwrap_or_default();
    let log = s.server_log();
    let cli = s.transcript.text();
    assert!(!log.is_empty(), "the server logged nothing: the log check would be vacuous");
    for secret in [VALUE, other, "xoxb-THIRD-VALUE-424242-fedcba"] {
        assert!(!contains(&disk, secret), "value found in the data dir (database, WAL, files)");
        assert!(!contains(&wal, secret), "value found in the WAL");
        assert!(!log.contains(secret), "value found in the server log");
        assert!(!cli.contains(secret), "value found in CLI output");
        assert!(!contains(&audit_export, secret), "value found in the audit export");
    }
    // Tokens are never logged or stored either (only their hashes).
    assert!(!log.contains(&token) && !log.contains(&s.admin_token), "token in the server log");
    assert!(!contains(&disk, &token) && !contains(&disk, &s.admin_token), "token stored in clear");
}

async fn tampered_audit_row_is_named_by_verify(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    for _ in 0..3 {
        assert_eq!(s.resolve(&token, "k").await.0, 200);
    }
    let clean = s.cli(&["audit", "verify"]);
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stderr));

    let db = s.db().await;
    let seq =
        db.int("SELECT seq FROM audit_events WHERE action = 'secret.resolve' ORDER BY seq LIMIT 1 OFFSET 1").await;
    db.exec("UPDATE audit_events SET outcome = 'denied' WHERE seq = ?", vec![Bind::I(seq)]).await;
    db.close().await;

    let out = s.cli(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(4), "verify must fail on a tampered trail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("sequence {seq}")), "{err}");
    let v = ok_json_allow_fail(s.cli(&["audit", "verify", "--json"]));
    assert_eq!(v["broken_at"], seq);
}

fn serve_once(s: &Server) -> std::process::Output {
    let mut c = std::process::Command::new(BIN);
    c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&s.data_dir);
    if let Some(db) = &s.database {
        c.args(["--database", db]);
    }
    c.output().unwrap()
}

fn ok_json_allow_fail(out: std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn audit_write_failure_refuses_the_access(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(s.resolve(&token, "k").await.0, 200);

    // Inject a fault: every audit insert now fails inside the database.
    let db = s.db().await;
    db.inject_audit_fault().await;
    let (status, body) = s.resolve(&token, "k").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&body), "audit_unavailable");
    assert!(!body.contains(VALUE));

    db.clear_audit_fault().await;
    db.close().await;
    assert_eq!(s.resolve(&token, "k").await.0, 200, "recovers when the audit trail is writable again");
    assert!(s.cli(&["audit", "verify"]).status.success());
}

#[tokio::test]
async fn read_only_database_refuses_the_access() {
    let s = Server::start(Backend::Sqlite).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    // Another process holds the write lock past the busy timeout: audit
    // writes cannot commit, so nothing is released.
    let Db::Sqlite(db) = s.db().await else { unreachable!() };
    let mut conn = db.acquire().await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut *conn).await.unwrap();
    let (status, body) = s.resolve(&token, "k").await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains(VALUE));
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    drop(conn);
    db.close().await;
    assert_eq!(s.resolve(&token, "k").await.0, 200);
}

async fn tampered_ciphertext_fails_with_integrity_error(b: Backend) {
    let s = Server::start(b).await;
    s.cli_json(&["org", "create", "acme"]);
    s.put_secret(None, "a", "value-a-aaaaaaaa", &[]);
    s.put_secret(None, "b", "value-b-bbbbbbbb", &[]);
    s.put_secret(None, "c", "value-c-cccccccc", &[]);
    s.put_secret(Some("acme"), "a", "value-acme-aaaa", &[]);
    let token = s.agent(None, "bot");
    for k in ["a", "b", "c"] {
        s.grant(None, "bot", k, "reveal", &[]);
    }
    let acme = s.agent(Some("acme"), "bot");
    s.grant(Some("acme"), "bot", "a", "reveal", &[]);

    let db = s.db().await;
    let ct_of = "SELECT v.ciphertext FROM secret_versions v JOIN secrets s ON s.id = v.secret_id \
                 JOIN orgs o ON o.id = s.org_id WHERE s.name = ? AND o.name = ?";
    let set = "UPDATE secret_versions SET ciphertext = ? WHERE secret_id = \
               (SELECT s.id FROM secrets s JOIN orgs o ON o.id = s.org_id WHERE s.name = ? AND o.name = ?)";
    let org = |n: &str| Bind::S(n.to_owned());
    // a: one byte flipped.
    let mut flipped = db.bytes(ct_of, vec![org("a"), org("default")]).await;
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    db.exec(set, vec![Bind::B(flipped), org("a"), org("default")]).await;
    // b: c's ciphertext copied over (another secret's row).
    let ct_c = db.bytes(ct_of, vec![org("c"), org("default")]).await;
    db.exec(set, vec![Bind::B(ct_c.clone()), org("b"), org("default")]).await;
    // acme/a: default/c's ciphertext copied into another org.
    db.exec(set, vec![Bind::B(ct_c), org("a"), org("acme")]).await;
    db.close().await;

    for (tok, name) in [(&token, "a"), (&token, "b"), (&acme, "a")] {
        let (status, body) = s.resolve(tok, name).await;
        assert_eq!(status, 500, "{name}: {body}");
        assert_eq!(error_code(&body), "integrity_error", "{name}");
        assert!(!body.contains("value-"), "no garbage or other value is returned");
    }
    assert_eq!(json(&s.resolve(&token, "c").await.1)["value"], "value-c-cccccccc");
}

async fn bad_input_gets_a_json_error_and_stores_nothing(b: Backend) {
    let s = Server::start(b).await;
    let agent = s.agent(None, "bot");
    let url = s.url("/v1/orgs/default/secrets");
    let post = |body: String| {
        s.http.post(&url).bearer_auth(&s.admin_token).header("content-type", "application/json").body(body)
    };
    let big = "x".repeat(64 * 1024 + 1);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("invalid name", r#"{"name":"Bad Name","value":"v"}"#.into(), 400, "invalid_input"),
        ("name too long", format!(r#"{{"name":"{}","value":"v"}}"#, "a".repeat(64)), 400, "invalid_input"),
        ("empty value", r#"{"name":"ok","value":""}"#.into(), 400, "invalid_input"),
        ("value over 64 KiB", format!(r#"{{"name":"ok","value":"{big}"}}"#), 400, "invalid_input"),
        ("malformed JSON", r#"{"name":"ok","value":"#.into(), 400, "invalid_json"),
        ("unknown field", r#"{"name":"ok","value":"v","colour":"red"}"#.into(), 400, "invalid_json"),
        ("wrong type", r#"{"name":"ok","value":987654321}"#.into(), 400, "invalid_json"),
        (
            "a value in a number's place",
            r#"{"name":"ok","value":"v","allow_internal":"sk-live-987654321"}"#.into(),
            400,
            "invalid_json",
        ),
        ("unknown provider", r#"{"name":"ok","value":"v","provider":"nope"}"#.into(), 400, "invalid_input"),
        (
            "upstream with a path",
            r#"{"name":"ok","value":"v","upstream":"https://a.example/x"}"#.into(),
            400,
            "invalid_input",
        ),
        ("bad expiry", r#"{"name":"ok","value":"v","expires":"someday"}"#.into(), 400, "invalid_input"),
    ];
    for (what, body, status, code) in cases {
        let resp = post(body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{what}");
        let text = resp.text().await.unwrap();
        assert_eq!(error_code(&text), code, "{what}");
        // An error never quotes what was sent: it may be a value.
        assert!(!text.contains("987654321"), "{what}: {text}");
    }
    let huge = format!(r#"{{"name":"ok","value":"{}"}}"#, "x".repeat(600 * 1024));
    let resp = post(huge).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(error_code(&resp.text().await.unwrap()), "body_too_large");

    // Tokens: missing, garbled, wrong checksum, the other kind.
    let mut wrong_checksum = s.admin_token.clone();
    let last = wrong_checksum.pop().unwrap();
    wrong_checksum.push(if last == 'a' { 'b' } else { 'a' });
    let list = s.url("/v1/orgs/default/secrets");
    let no_token = s.http.get(&list).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(error_code(&no_token.text().await.unwrap()), "missing_token");
    for (what, tok, code) in [
        ("garbled", "kwu_not-a-token", "invalid_token"),
        ("wrong checksum", wrong_checksum.as_str(), "invalid_token"),
        ("agent token on the admin API", agent.as_str(), "wrong_token_kind"),
    ] {
        let resp = s.http.get(&list).bearer_auth(tok).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        assert_eq!(error_code(&resp.text().await.unwrap()), code, "{what}");
    }
    let (status, body) = s.resolve(&s.admin_token, "anything").await;
    assert_eq!((status, error_code(&body).as_str()), (401, "wrong_token_kind"));
    let (status, body) = s.resolve("kwa_garbage", "anything").await;
    assert_eq!((status, error_code(&body).as_str()), (401, "invalid_token"));
    let resp = s.http.get(s.url("/v1/resolve/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // Nothing was stored.
    assert!(s.cli_json(&["secret", "list"])["secrets"].as_array().unwrap().is_empty());
    // Unknown routes are JSON errors too.
    let resp = s.http.get(s.url("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(&resp.text().await.unwrap()), "not_found");
}

#[test]
fn cli_has_no_flag_that_takes_a_value() {
    let out = std::process::Command::new(BIN).args(["secret", "put", "x", "--value", "y"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--value'"));
    let out = std::process::Command::new(BIN).args(["secret", "rotate", "x", "--value", "y"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

async fn cli_errors_are_one_line_and_non_zero(b: Backend) {
    let s = Server::start(b).await;
    let out = s.cli(&["secret", "show", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("keyward: "), "{err}");
    let out = s.cli(&["secret", "show", "missing", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    // Without a token the CLI says what to do.
    let out = s.cli_no_token(&["secret", "list"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYWARD_TOKEN"));
    // An empty value from stdin is refused.
    let out = s.cli_stdin(&["secret", "put", "empty"], b"");
    assert!(!out.status.success());
}

async fn passphrase_sealed_server_refuses_until_unsealed(b: Backend) {
    let pass = "correct horse battery staple";
    let s = Server::start_with(b, Opts { passphrase: Some(pass.into()), ..Opts::default() }).await;
    let status = ok_json(s.cli_no_token(&["status", "--json"], b""));
    assert_eq!(status["sealed"], true);
    assert_eq!(status["seal"], "passphrase");
    let resp = s.http.get(s.url("/v1/orgs/default/secrets")).bearer_auth(&s.admin_token).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_code(&resp.text().await.unwrap()), "sealed");
    let (status, body) = s.resolve("kwa_x", "k").await;
    assert_eq!((status, error_code(&body).as_str()), (503, "sealed"));
    // A browser gets a page saying so, with the dashboard's headers.
    let page = s.http.get(s.url("/ui/")).send().await.unwrap();
    assert_eq!(page.status(), 503);
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("keyward unseal"));

    let wrong = s.cli_no_token(&["unseal"], b"wrong horse battery staple\n");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong_passphrase"));
    assert_eq!(ok_json(s.cli_no_token(&["status", "--json"], b""))["sealed"], true);

    let right = s.cli_no_token(&["unseal"], format!("{pass}\n").as_bytes());
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    assert_eq!(ok_json(s.cli_no_token(&["status", "--json"], b""))["sealed"], false);

    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(json(&s.resolve(&token, "k").await.1)["value"], VALUE);
    // The wrong attempt is in the trail.
    // Unseal events belong to no organization: read them from the database.
    let db = s.db().await;
    let outcomes = db
        .strings(
            "SELECT outcome || ':' || COALESCE(reason, '') FROM audit_events WHERE action = 'sys.unseal' ORDER BY seq",
        )
        .await;
    db.close().await;
    assert_eq!(outcomes, vec!["denied:wrong_passphrase".to_owned(), "allowed:".to_owned()]);
    // The passphrase is stored nowhere.
    let mut s = s;
    s.stop();
    assert!(!contains(&s.stored_bytes().await, pass));
    assert!(!s.server_log().contains(pass));
}

async fn key_file_readable_by_others_is_refused(b: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let mut s = Server::start(b).await;
    s.stop();
    let key = s.data_dir.join("master.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = serve_once(&s);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readable by group or others"));
    // A wrong key (another instance's) is refused too.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(&key).unwrap();
    keyward_core::seal::create_key_file(&key).unwrap();
    let out = serve_once(&s);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match this database"));
}

async fn serves_http2_openapi_health_and_request_ids(b: Backend) {
    let s = Server::start(b).await;
    let resp = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN offers h2");
    assert!(resp.headers().contains_key("x-request-id"));
    let doc: serde_json::Value = s.http.get(s.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/resolve/{secret}"]["get"].is_object());
    let h1 = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&std::fs::read(&s.ca).unwrap()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let resp = h1.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    // Only the generated CA is trusted: a client without it fails the handshake.
    assert!(reqwest::Client::new().get(s.url("/healthz")).send().await.is_err());
}

async fn cli_finds_a_local_server_without_keyward_addr(b: Backend) {
    let s = Server::start(b).await;
    let out = std::process::Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&s.data_dir)
        .env_remove("KEYWARD_ADDR")
        .env_remove("KEYWARD_CACERT")
        .output()
        .unwrap();
    let v = ok_json(out);
    assert_eq!(v["backend"], if b == Backend::Sqlite { "sqlite" } else { "postgres" });
}

/// Every end-to-end test above runs once per store.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await } )*
        }
    };
}

on_every_store!(
    agents_bound_to_networks_and_token_rotation,
    failed_authentication_is_rate_limited_per_source,
    rotation_with_grace_rollback_versions_and_metrics,
    walkthrough_put_agent_grant_resolve_audit,
    organizations_are_isolated,
    not_granted_looks_exactly_like_not_found,
    disabled_agent_gets_401_and_enable_restores,
    proxy_only_grant_cannot_resolve,
    expired_grant_is_denied,
    rotate_revoke_delete_lifecycle,
    auditor_reads_but_cannot_change,
    value_never_leaves_in_clear,
    tampered_audit_row_is_named_by_verify,
    audit_write_failure_refuses_the_access,
    tampered_ciphertext_fails_with_integrity_error,
    bad_input_gets_a_json_error_and_stores_nothing,
    cli_errors_are_one_line_and_non_zero,
    passphrase_sealed_server_refuses_until_unsealed,
    key_file_readable_by_others_is_refused,
    serves_http2_openapi_health_and_request_ids,
    cli_finds_a_local_server_without_keyward_addr,
);
