//! Several `keyward serve` replicas on one PostgreSQL: a change made through
//! one is enforced by the others within a second (LISTEN/NOTIFY), and the
//! audit chain stays one valid chain under concurrent writers.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// Polls `check` on replica B until it holds; returns how long that took.
async fn within_a_second<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(1), "{what}: replica B still stale after 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn changes_through_one_replica_apply_on_the_other() {
    let a = Server::start(Backend::Postgres).await;
    let b = a.replica();
    a.put_secret(None, "k", "value-one-1111", &[]);
    let token = a.agent(None, "bot");
    a.grant(None, "bot", "k", "reveal", &[]);
    // B has the grant and the secret cached after this.
    assert_eq!(json(&b.resolve(&token, "k").await.1)["value"], "value-one-1111");

    // Rotate through A: B's next resolves return the new value.
    assert!(a.cli_stdin(&["secret", "rotate", "k"], b"value-two-2222").status.success());
    let took = within_a_second("rotate", || async {
        let (st, body) = b.resolve(&token, "k").await;
        st == 200 && json(&body)["value"] == "value-two-2222"
    })
    .await;
    eprintln!("rotation visible on B after {took:?}");

    // Remove the grant through A: B denies.
    assert!(a.cli(&["grant", "remove", "--agent", "bot", "--secret", "k"]).status.success());
    within_a_second("grant removal", || async { b.resolve(&token, "k").await.0 == 404 }).await;
    a.grant(None, "bot", "k", "reveal", &[]);
    within_a_second("re-grant", || async { b.resolve(&token, "k").await.0 == 200 }).await;

    // Revoke through A: B denies.
    assert!(a.cli(&["secret", "revoke", "k"]).status.success());
    within_a_second("revoke", || async { b.resolve(&token, "k").await.0 == 403 }).await;
    assert!(a.cli_stdin(&["secret", "rotate", "k"], b"value-three-333").status.success());
    within_a_second("rotate after revoke", || async { b.resolve(&token, "k").await.0 == 200 }).await;

    // Disable the agent through A: B refuses it.
    assert!(a.cli(&["agent", "disable", "bot"]).status.success());
    within_a_second("agent disable", || async {
        let (st, body) = b.resolve(&token, "k").await;
        st == 401 && error_code(&body) == "agent_disabled"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_load_on_two_replicas_keeps_one_complete_chain() {
    let a = Server::start(Backend::Postgres).await;
    let b = Arc::new(a.replica());
    a.put_secret(None, "k", "v-0000000001", &[]);
    let token = Arc::new(a.agent(None, "bot"));
    a.grant(None, "bot", "k", "reveal", &[]);
    let db = a.db().await;
    let before = db.int("SELECT COUNT(*) FROM audit_events WHERE action = 'secret.resolve'").await;

    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (http, addr) = if i % 2 == 0 { (a.http.clone(), a.addr.clone()) } else { (b.http.clone(), b.addr.clone()) };
        let (token, sent, failed, stop) = (token.clone(), sent.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (st, _) = resolve_at(&http, &addr, &token, "k").await;
                sent.fetch_add(1, Ordering::Relaxed);
                if st != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for n in 2..=6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = a.cli_stdin(&["secret", "rotate", "k"], format!("v-000000000{n}").as_bytes());
        assert!(out.status.success());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 100, "too little load to mean anything: {sent}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "rotation must not fail requests");

    // Every request left exactly one audit event, and the chain is whole.
    let after = db.int("SELECT COUNT(*) FROM audit_events WHERE action = 'secret.resolve'").await;
    assert_eq!((after - before) as u64, sent, "an audit event is missing or duplicated");
    let gaps = db.int("SELECT COUNT(*) FROM audit_events e WHERE e.seq > 1 AND NOT EXISTS (SELECT 1 FROM audit_events p WHERE p.seq = e.seq - 1)").await;
    assert_eq!(gaps, 0);
    db.close().await;
    let v = a.cli_json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
}

/// A change B never hears about (its LISTEN connection dropped) must not
/// leave B serving stale policy: on reconnect it drops its caches.
#[tokio::test]
async fn lost_notifications_do_not_leave_stale_grants() {
    let a = Server::start(Backend::Postgres).await;
    let b = a.replica();
    a.put_secret(None, "k", "value-1234567", &[]);
    let token = a.agent(None, "bot");
    a.grant(None, "bot", "k", "reveal", &[]);
    // Let B hear about those changes first, then fill its cache. A
    // notification that reached B only after the fill would empty the cache
    // again, so wait until B serves the grant, then for stragglers (a busy
    // machine delays them), then fill.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.resolve(&token, "k").await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "B never saw the grant");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.resolve(&token, "k").await.0, 200); // cached on B now

    // The grant disappears behind keyward's back: no NOTIFY is sent.
    let db = a.db().await;
    db.exec("DELETE FROM grants", vec![]).await;
    assert_eq!(b.resolve(&token, "k").await.0, 200, "B still trusts its cache (nothing told it)");

    // Cut the LISTEN connections of this test's replicas (their
    // connections carry the schema's name as application_name).
    let schema = a.pg.as_ref().unwrap().schema.clone();
    let killed = db
        .int(&format!(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{schema}' AND query LIKE 'LISTEN%'"
        ))
        .await;
    assert!(killed >= 1, "no listener connection found");
    db.close().await;
    let took = within_a_second("reconnect", || async { b.resolve(&token, "k").await.0 == 404 }).await;
    eprintln!("stale grant dropped {took:?} after the listener was cut");
}
