//! Backup, restore and migrate-store round trips: the copy decrypts with the
//! same master key, its audit chain verifies, and every table's count matches.

mod support;

use std::process::Command;

use support::*;

const VALUE: &str = "sk-backup-roundtrip-value-5150";

/// A server with some of everything: two orgs, secrets with versions,
/// agents, grants, human tokens and audit events.
async fn populated(b: Backend) -> (Server, String) {
    let s = Server::start(b).await;
    s.cli_json(&["org", "create", "acme"]);
    s.put_secret(None, "k", "first-version-value", &[]);
    assert!(s.cli_stdin(&["secret", "rotate", "k"], VALUE.as_bytes()).status.success());
    s.put_secret(Some("acme"), "k", "acme-value-0001", &[]);
    let token = s.agent(None, "bot");
    s.agent(Some("acme"), "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    s.cli_json(&["token", "create", "reader", "--role", "auditor"]);
    assert_eq!(json(&s.resolve(&token, "k").await.1)["value"], VALUE);
    (s, token)
}

fn keyward(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Serves a data dir (with its own master key) on `database`, checks that
/// the agent still resolves the value and that the chain verifies.
async fn check_copy(original: &Server, data_dir: &std::path::Path, database: Option<String>, token: &str) -> String {
    let mut copy = Server {
        backend: original.backend,
        database,
        pg: None,
        serve_args: Vec::new(),
        tmp: tempfile::tempdir().unwrap(),
        data_dir: data_dir.to_path_buf(),
        addr: String::new(),
        ca: data_dir.join("tls/ca.pem"),
        admin_token: original.admin_token.clone(),
        child: None,
        log: data_dir.with_extension("log"),
        transcript: Transcript::default(),
        http: reqwest::Client::new(),
    };
    copy.spawn();
    assert_eq!(json(&copy.resolve(token, "k").await.1)["value"], VALUE, "the copy decrypts with the master key");
    let v = copy.cli_json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(copy.cli_json(&["secret", "show", "k"])["versions"].as_array().unwrap().len(), 2);
    let backend = copy.cli_json(&["status"])["backend"].as_str().unwrap().to_owned();
    copy.stop();
    backend
}

#[tokio::test]
async fn sqlite_backup_while_serving_then_restore() {
    let (s, token) = populated(Backend::Sqlite).await;
    let file = s.tmp.path().join("backup.db");
    let out = keyward(&["backup", file.to_str().unwrap(), "--data-dir", s.data_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!contains(&std::fs::read(&file).unwrap(), VALUE), "a backup holds ciphertext only");
    // Never overwrites.
    assert!(!keyward(&["backup", file.to_str().unwrap(), "--data-dir", s.data_dir.to_str().unwrap()]).status.success());

    // Restore into a fresh data dir that has the same master key file.
    let restored = s.tmp.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(s.data_dir.join("master.key"), restored.join("master.key")).unwrap();
    std::fs::set_permissions(restored.join("master.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = keyward(&["restore", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap(), "--json"]);
    let report = ok_json(out);
    assert_eq!(report["audit"]["ok"], true);
    let counts: std::collections::BTreeMap<String, i64> = report["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_i64().unwrap()))
        .collect();
    assert_eq!(counts["orgs"], 2);
    assert_eq!(counts["secrets"], 2);
    assert_eq!(counts["secret_versions"], 3);
    assert_eq!(counts["agents"], 2);
    assert_eq!(counts["grants"], 1);
    assert_eq!(counts["user_tokens"], 2);
    assert!(counts["audit_events"] >= 10, "{counts:?}");
    // Restoring twice is refused: the target is no longer empty.
    let out = keyward(&["restore", file.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be empty"), "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(check_copy(&s, &restored, None, &token).await, "sqlite");
}

#[tokio::test]
async fn migrate_store_from_sqlite_to_postgres() {
    let (mut s, token) = populated(Backend::Sqlite).await;
    s.stop(); // migrate-store copies a store nobody is writing to
    let target = keyward_store::testing::TestSchema::create().await.expect("PostgreSQL");
    let from = format!("sqlite://{}", s.db_path().display());
    let out = keyward(&["migrate-store", "--from", &from, "--to", &target.url, "--json"]);
    let report = ok_json(out);
    assert_eq!(report["audit"]["ok"], true);
    // Same master key, same data dir for TLS; only the database changes.
    let backend = check_copy(&s, &s.data_dir.clone(), Some(target.url.clone()), &token).await;
    assert_eq!(backend, "postgres");
}

#[tokio::test]
async fn backup_refuses_postgres_and_missing_sources() {
    let out = keyward(&["backup", "/tmp/x.db", "--database", "postgres://postgres@127.0.0.1/test"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"));
    let out = keyward(&["restore", "/nonexistent/backup.db", "--data-dir", "/tmp/kw-nowhere"]);
    assert!(!out.status.success());
    let out = keyward(&["migrate-store", "--from", "sqlite:///nonexistent.db", "--to", "sqlite:///tmp/kw-x.db"]);
    assert!(!out.status.success());
}

/// A database URL's password is never printed: initialising a database that
/// is already initialised names the database without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_errors_never_show_the_database_password() {
    let Some(schema) = keyward_store::testing::TestSchema::create().await else { return };
    let mut url = reqwest::Url::parse(&schema.url).unwrap();
    if url.username().is_empty() {
        url.set_username("postgres").unwrap();
    }
    url.set_password(Some("pw-987654321")).unwrap();
    let url = url.to_string();
    // Trust authentication: the password is not checked, only carried.
    let _first = Server::start_with(Backend::Postgres, Opts { database: Some(url.clone()), ..Opts::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["init", "--json", "--data-dir"])
        .arg(dir.path().join("kw"))
        .args(["--database", &url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second init must be refused");
    let all = [out.stdout, out.stderr].concat();
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("already initialised"), "{text}");
    assert!(!text.contains("pw-987654321"), "{text}");
}
