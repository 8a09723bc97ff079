//! Tamper evidence of the audit trail, end to end: signed checkpoints are
//! written by the server, `audit verify` checks them, and an export verifies
//! offline with only the public key. Each tamper case — a modified event, a
//! deleted event, a truncated tail, reordering, a chain rewritten by someone
//! without the key (hashes recomputed), a forged checkpoint — is detected by
//! the server (in its database) and offline (in an export).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use keyward_core::audit::{AuditRecord, GENESIS_HASH, chain_batch};
use keyward_core::checkpoint::{Checkpoint, CheckpointSigner, export_line_checkpoint, export_line_event};
use support::*;

const VALUE: &str = "sk-audit-test-value-0123456789";

async fn busy_server(b: Backend, dir: &Path) -> Server {
    let config = dir.join("keyward.toml");
    std::fs::write(&config, "audit_checkpoint_events = 5\naudit_checkpoint_secs = 1\n").unwrap();
    let serve_args = vec!["--config".to_owned(), config.display().to_string()];
    let s = Server::start_with(b, Opts { serve_args, ..Opts::default() }).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    for _ in 0..12 {
        assert_eq!(s.resolve(&token, "k").await.0, 200);
    }
    // Wait until the checkpointer has signed the whole tail.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = ok_json(s.cli(&["--json", "audit", "verify"]));
        if v["checkpoints_verified"].as_u64().unwrap_or(0) >= 2 && v["unsigned_tail"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint covers the tail: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s
}

/// `keyward audit verify` (server, or offline with `file`): (exit code, stderr + stdout).
fn verify(s: &Server, file: Option<(&Path, &Path)>) -> (i32, String) {
    let out = match file {
        Some((f, key)) => s.cli(&["audit", "verify", "--file", f.to_str().unwrap(), "--pubkey", key.to_str().unwrap()]),
        None => s.cli(&["audit", "verify"]),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap_or(-1), text)
}

fn parse(lines: &[String]) -> (Vec<Checkpoint>, Vec<AuditRecord>) {
    let (mut cps, mut events) = (Vec::new(), Vec::new());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        match v["type"].as_str().unwrap() {
            "checkpoint" => cps.push(serde_json::from_value(v).unwrap()),
            _ => events.push(serde_json::from_value(v).unwrap()),
        }
    }
    (cps, events)
}

async fn tamper_evidence(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = busy_server(b, dir.path()).await;
    let (code, text) = verify(&s, None);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("signed checkpoints hold"), "{text}");

    // Export and public key; the untouched export verifies offline.
    let key = dir.path().join("audit.pem");
    let pem = s.cli(&["audit", "pubkey"]);
    assert!(pem.status.success());
    std::fs::write(&key, &pem.stdout).unwrap();
    let export = dir.path().join("export.jsonl");
    let out = s.cli(&["audit", "export", "--format", "jsonl", "--output", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(!text.contains(VALUE), "a value in the export");
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let (cps, events) = parse(&lines);
    assert!(cps.len() >= 2 && events.len() >= 15, "{} checkpoints, {} events", cps.len(), events.len());
    let (code, text) = verify(&s, Some((&export, &key)));
    assert_eq!(code, 0, "{text}");

    // Offline tampering, one copy of the export per case.
    let first_event = cps.len();
    let last_cp = cps.last().unwrap().seq;
    let write = |name: &str, ls: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, ls.join("\n")).unwrap();
        p
    };
    let mut modified = lines.clone();
    modified[first_event + 4] = modified[first_event + 4].replace("\"action\":\"", "\"action\":\"x");
    let mut deleted = lines.clone();
    deleted.remove(first_event + 3);
    let mut truncated = lines.clone();
    truncated.truncate(first_event + last_cp as usize - 2);
    let mut reordered = lines.clone();
    reordered.swap(first_event + 6, first_event + 7);
    // Without the key: rewrite event 3 and recompute every hash after it.
    let mut drafts: Vec<_> = events.iter().map(|r| r.event.clone()).collect();
    drafts[2].action = "secret.nothing_to_see".into();
    let mut rewritten: Vec<String> = cps.iter().map(export_line_checkpoint).collect();
    rewritten.extend(chain_batch(0, GENESIS_HASH, &drafts).iter().map(export_line_event));
    // ...or forge a checkpoint over it with a key of one's own.
    let (forger, _) = CheckpointSigner::generate().unwrap();
    let mut forged_cp = lines.clone();
    let forged = forger.sign(cps[0].seq, cps[0].hash, cps[0].time);
    forged_cp[0] = export_line_checkpoint(&forged);
    for (name, ls, expect) in [
        ("modified", modified, "modified"),
        ("deleted", deleted, "missing"),
        ("truncated", truncated, "truncated"),
        ("reordered", reordered, "missing or reordered"),
        ("rewritten", rewritten, "rewritten"),
        ("forged-checkpoint", forged_cp, "invalid signature"),
    ] {
        let (code, text) = verify(&s, Some((&write(name, &ls), &key)));
        assert_eq!(code, 4, "{name}: offline verify must fail: {text}");
        assert!(text.contains(expect), "{name}: {text}");
    }

    // The same cases in the server's database, each undone before the next.
    let db = s.db().await;
    let server_fails = |expect: &'static str| {
        let (code, text) = verify(&s, None);
        assert_eq!(code, 4, "server verify must fail ({expect}): {text}");
        assert!(text.contains(expect), "{text}");
    };
    db.exec("UPDATE audit_events SET action = action || 'x' WHERE seq = 5", vec![]).await;
    server_fails("modified");
    db.exec("UPDATE audit_events SET action = substr(action, 1, length(action) - 1) WHERE seq = 5", vec![]).await;
    assert_eq!(verify(&s, None).0, 0);

    for (from, to) in [(7, -7), (8, 7), (-7, 8)] {
        db.exec("UPDATE audit_events SET seq = ? WHERE seq = ?", vec![Bind::I(to), Bind::I(from)]).await;
    }
    server_fails("reordered");
    for (from, to) in [(7, -7), (8, 7), (-7, 8)] {
        db.exec("UPDATE audit_events SET seq = ? WHERE seq = ?", vec![Bind::I(to), Bind::I(from)]).await;
    }
    assert_eq!(verify(&s, None).0, 0);

    let first = cps[0].seq;
    let signature = db.bytes("SELECT signature FROM audit_checkpoints WHERE seq = ?", vec![Bind::I(first)]).await;
    db.exec(
        "UPDATE audit_checkpoints SET signature = ? WHERE seq = ?",
        vec![Bind::B(forged.signature.clone()), Bind::I(first)],
    )
    .await;
    server_fails("invalid signature");
    db.exec("UPDATE audit_checkpoints SET signature = ? WHERE seq = ?", vec![Bind::B(signature), Bind::I(first)]).await;
    assert_eq!(verify(&s, None).0, 0);

    db.exec("DELETE FROM audit_events WHERE seq > ?", vec![Bind::I(last_cp - 2)]).await;
    server_fails("truncated");
    db.exec("DELETE FROM audit_events WHERE seq = 3", vec![]).await;
    server_fails("missing");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tamper_evidence() {
    tamper_evidence(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tamper_evidence() {
    tamper_evidence(Backend::Postgres).await;
}

/// Only the operator token may export the chain (it spans every org).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_needs_the_operator_token() {
    let s = Server::start(Backend::Sqlite).await;
    let out = s.cli(&["--json", "token", "create", "alice", "--role", "owner"]);
    let owner = ok_json(out)["token"].as_str().unwrap().to_owned();
    let out = s.cli_as(&owner, None, &["audit", "export"], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator_only"));
    let pem = s.cli_as(&owner, None, &["audit", "pubkey"], b"");
    assert!(String::from_utf8_lossy(&pem.stdout).starts_with("-----BEGIN PUBLIC KEY-----"));
}

/// `--json` audit lines of a CLI call.
fn lines(s: &Server, args: &[&str]) -> Vec<serde_json::Value> {
    let out = s.cli(&[&["--json", "audit"], args].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(json).collect()
}

async fn search_pages_and_follows(b: Backend) {
    let s = Server::start(b).await;
    s.put_secret(None, "k", VALUE, &[]);
    s.put_secret(None, "other", "sk-other-value-000000", &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    for _ in 0..5 {
        assert_eq!(s.resolve(&token, "k").await.0, 200);
    }
    assert_eq!(s.resolve(&token, "other").await.0, 404);

    // Filters: agent, secret, action, outcome, source address, time range.
    let resolves =
        lines(&s, &["--agent", "bot", "--secret", "k", "--action", "secret.resolve", "--outcome", "allowed"]);
    assert_eq!(resolves.len(), 5);
    assert_eq!(lines(&s, &["--agent", "bot", "--outcome", "denied"]).len(), 1);
    assert_eq!(lines(&s, &["--action", "secret.resolve", "--source-ip", "127.0.0.1"]).len(), 6);
    assert!(lines(&s, &["--source-ip", "10.9.9.9"]).is_empty());
    assert_eq!(lines(&s, &["--action", "secret.resolve", "--since", "1h"]).len(), 6);
    assert!(lines(&s, &["--until", "1h"]).is_empty(), "nothing is older than an hour");
    let bad = s.cli(&["audit", "--source-ip", "not-an-ip"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("source_ip"));

    // Cursor paging: pages of 3, newest first, no overlap, nothing missed.
    let all: Vec<i64> = lines(&s, &["--limit", "1000"]).iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let mut seen = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut args = vec!["--limit".to_owned(), "3".to_owned()];
        if let Some(b) = before {
            args.extend(["--before".to_owned(), b.to_string()]);
        }
        let page = lines(&s, &args.iter().map(String::as_str).collect::<Vec<_>>());
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        let seqs: Vec<i64> = page.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        before = seqs.iter().min().copied();
        seen.extend(seqs);
    }
    seen.sort();
    assert_eq!(seen, all, "pages cover the trail exactly once");

    // Following: only new events, filtered, as they happen.
    let mut follower = s
        .cli_command(&["--json", "audit", "--follow", "--action", "secret.resolve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.cli(&["agent", "list"]);
    assert_eq!(s.resolve(&token, "k").await.0, 200);
    assert_eq!(s.resolve(&token, "other").await.0, 404);
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("followed events arrive");
        got.push(json(&line));
    }
    follower.kill().unwrap();
    let _ = follower.wait();
    assert!(got.iter().all(|e| e["action"] == "secret.resolve"), "{got:?}");
    assert_eq!((got[0]["outcome"].as_str(), got[1]["outcome"].as_str()), (Some("allowed"), Some("denied")));
    assert!(got[0]["seq"].as_i64().unwrap() > *all.iter().max().unwrap(), "only new events");
    assert!(!got.iter().any(|e| e.to_string().contains(VALUE)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_search_pages_and_follows() {
    search_pages_and_follows(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_search_pages_and_follows() {
    search_pages_and_follows(Backend::Postgres).await;
}

/// Retention: pruning keeps the rest verifiable (anchored by a signed
/// checkpoint), on the server and offline; removing the anchor or the new
/// first event is detected.
async fn prune_keeps_the_rest_verifiable(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = busy_server(b, dir.path()).await;
    let before_prune = ok_json(s.cli(&["--json", "audit", "verify"]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cut = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = s.agent(None, "late");
    s.grant(None, "late", "k", "reveal", &[]);
    assert_eq!(s.resolve(&token, "k").await.0, 200);

    // A dry run counts and deletes nothing.
    let dry = ok_json(s.cli(&["--json", "audit", "prune", "--before", &cut]));
    let through = dry["through_seq"].as_i64().unwrap();
    assert_eq!((dry["dry_run"].as_bool(), dry["pruned"].as_i64()), (Some(true), Some(through)));
    let after_dry = ok_json(s.cli(&["--json", "audit", "verify"]));
    assert!(after_dry["events"].as_u64() >= before_prune["events"].as_u64(), "a dry run deletes nothing");
    assert_eq!(after_dry["ok"], true, "and the whole chain, from sequence 1, still verifies");
    // An owner of one org may not prune the instance-wide chain.
    let owner = ok_json(s.cli(&["--json", "token", "create", "alice", "--role", "owner"]))["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = s.cli_as(&owner, None, &["audit", "prune", "--before", &cut, "--yes"], b"");
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator_only"));

    let done = ok_json(s.cli(&["--json", "audit", "prune", "--before", &cut, "--yes"]));
    assert_eq!(done["pruned"].as_i64(), Some(through));
    let v = ok_json(s.cli(&["--json", "audit", "verify"]));
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checkpoints_verified"].as_u64().unwrap() >= 1);
    let rest = lines(&s, &["--limit", "1000"]);
    assert!(rest.iter().all(|e| e["seq"].as_i64().unwrap() > through));
    assert!(rest.iter().any(|e| e["action"] == "audit.prune"), "the prune is audited");

    // Offline, the export of what remains verifies from its anchor.
    let key = dir.path().join("audit.pem");
    std::fs::write(&key, s.cli(&["audit", "pubkey"]).stdout).unwrap();
    let export = dir.path().join("pruned.jsonl");
    assert!(s.cli(&["audit", "export", "--output", export.to_str().unwrap()]).status.success());
    let (code, text) = verify(&s, Some((&export, &key)));
    assert_eq!(code, 0, "{text}");

    // Without its anchor, or without its new first event, it does not.
    let db = s.db().await;
    db.exec("DELETE FROM audit_checkpoints WHERE seq = ?", vec![Bind::I(through)]).await;
    let (code, text) = verify(&s, None);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("no signed checkpoint anchoring"), "{text}");
    let mut lines_: Vec<String> = std::fs::read_to_string(&export).unwrap().lines().map(str::to_owned).collect();
    let first_event = lines_.iter().position(|l| l.contains("\"type\":\"event\"")).unwrap();
    lines_.remove(first_event);
    let cut_export = dir.path().join("cut.jsonl");
    std::fs::write(&cut_export, lines_.join("\n")).unwrap();
    let (code, text) = verify(&s, Some((&cut_export, &key)));
    assert_eq!(code, 4, "{text}");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_prune_keeps_the_rest_verifiable() {
    prune_keeps_the_rest_verifiable(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_prune_keeps_the_rest_verifiable() {
    prune_keeps_the_rest_verifiable(Backend::Postgres).await;
}

/// The server runs detection: a rule fires on real traffic, the CLI lists,
/// configures and acknowledges, and a quarantined agent is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_from_the_cli() {
    let s = Server::start(Backend::Sqlite).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "k", "reveal", &[]);
    let v = ok_json(s.cli(&[
        "--json",
        "alerts",
        "policy",
        "--agent",
        "bot",
        "--quarantine",
        "on",
        "--denials",
        "3",
        "--first-use",
        "off",
    ]));
    assert_eq!((v["effective"]["quarantine"].as_bool(), v["effective"]["denials"].as_u64()), (Some(true), Some(3)));
    let bad = s.cli(&["alerts", "policy", "--allowed-hours", "25-99"]);
    assert!(!bad.status.success());
    for _ in 0..3 {
        assert_eq!(s.resolve(&token, "not-granted").await.0, 404);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let alerts = loop {
        let v = ok_json(s.cli(&["--json", "alerts"]));
        let a = v["alerts"].as_array().unwrap().clone();
        if !a.is_empty() {
            break a;
        }
        assert!(Instant::now() < deadline, "no alert");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alerts[0]["rule"], "denial_burst");
    assert_eq!(alerts[0]["agent_name"], "bot");
    // Quarantined: disabled until a human enables it.
    assert_eq!(s.resolve(&token, "k").await.0, 401);
    assert!(s.cli(&["agent", "enable", "bot"]).status.success());
    assert_eq!(s.resolve(&token, "k").await.0, 200);
    let id = alerts[0]["id"].as_str().unwrap();
    assert!(s.cli(&["alerts", "ack", id]).status.success());
    assert!(ok_json(s.cli(&["--json", "alerts"]))["alerts"].as_array().unwrap().iter().all(|a| a["id"] != id));
    assert!(lines(&s, &["--action", "alert.denial_burst"]).len() == 1);
    assert!(lines(&s, &["--action", "agent.quarantined"]).len() == 1);
}
