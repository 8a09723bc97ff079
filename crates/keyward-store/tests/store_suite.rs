//! One suite for every Store implementation (the way rustls runs one suite
//! against every crypto provider), plus Vault-level checks over a real store.

use std::sync::Arc;

use keyward_core::audit::{AuditDraft, ChainVerifier};
use keyward_core::clock::SystemClock;
use keyward_core::crypto::KeyMaterial;
use keyward_core::model::*;
use keyward_core::store::{AuditQuery, Store, StoreError};
use keyward_core::vault::{InitSeal, NewSecret, RequestMeta, SecretValue, UseMode, Vault};
use time::OffsetDateTime;

async fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = keyward_store::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
    (dir, store)
}

fn now() -> OffsetDateTime {
    keyward_core::audit::normalise_time(OffsetDateTime::now_utc())
}

fn draft(action: &str) -> AuditDraft {
    keyward_store::testing::audit_draft(action)
}

fn version(secret_id: &str, n: i64) -> SecretVersion {
    SecretVersion {
        secret_id: secret_id.into(),
        version: n,
        state: VersionState::Current,
        ciphertext: vec![n as u8; 40],
        fingerprint: format!("{n:08x}"),
        created_at: now(),
        revoked_at: None,
        grace_until: None,
        expires_at: None,
    }
}

/// Reads the whole trail back and checks it is one unbroken chain.
async fn verified_events(store: &dyn Store) -> u64 {
    let mut v = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.audit_page(after, 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        assert!(page.iter().all(|r| v.feed(r)), "chain broken near seq {after}");
    }
    let report = v.finish();
    assert!(report.ok, "{report:?}");
    report.events
}

async fn suite(store: Arc<dyn Store>) {
    // Metadata: first writer wins.
    store.insert_meta("k", "v").await.unwrap();
    assert!(matches!(store.insert_meta("k", "w").await, Err(StoreError::Duplicate { .. })));
    assert_eq!(store.get_meta("k").await.unwrap().as_deref(), Some("v"));

    // Organizations: unique names.
    let org = Org { id: new_id("org"), name: "default".into(), created_at: now() };
    store.create_org(&OrgRecord { org: org.clone(), wrapped_key: vec![1, 2, 3] }).await.unwrap();
    let dup = Org { id: new_id("org"), ..org.clone() };
    assert!(matches!(
        store.create_org(&OrgRecord { org: dup, wrapped_key: vec![] }).await,
        Err(StoreError::Duplicate { .. })
    ));
    assert_eq!(store.org_by_name("default").await.unwrap().unwrap().wrapped_key, vec![1, 2, 3]);
    assert_eq!(store.org_by_id(&org.id).await.unwrap().unwrap().org.name, "default");

    // Secrets and versions.
    let s = Secret {
        id: new_id("sec"),
        org_id: org.id.clone(),
        name: "openai".into(),
        provider: "openai".into(),
        upstream: Some("https://api.openai.com".into()),
        allow_internal: false,
        inject: None,
        rotate_every_secs: None,
        auto_rotation: Some(AutoRotation { hook: "h".into(), pass_value: true, verify: Some("GET /v1/models".into()) }),
        description: Some("d".into()),
        tags: vec!["team:a".into()],
        expires_at: None,
        created_at: now(),
        updated_at: now(),
    };
    store.create_secret(&s, &version(&s.id, 1)).await.unwrap();
    let again = Secret { id: new_id("sec"), ..s.clone() };
    assert!(store.create_secret(&again, &version(&again.id, 1)).await.is_err(), "names are unique per org");
    assert!(store.find_secret(&org.id, &again.id).await.unwrap().is_none(), "a failed create leaves nothing");
    let by_name = store.find_secret(&org.id, "openai").await.unwrap().unwrap();
    let by_id = store.find_secret(&org.id, &s.id).await.unwrap().unwrap();
    assert_eq!((by_name.id.as_str(), by_name.tags.clone()), (s.id.as_str(), vec!["team:a".to_owned()]));
    assert_eq!(by_id.name, "openai");
    assert_eq!(by_id.auto_rotation, s.auto_rotation, "the rotation policy round-trips");
    assert!(store.find_secret("org_other", "openai").await.unwrap().is_none());

    store.rotate_secret(&version(&s.id, 2), now(), None).await.unwrap();
    let vs = store.list_versions(&s.id).await.unwrap();
    assert_eq!(
        vs.iter().map(|v| (v.version, v.state)).collect::<Vec<_>>(),
        vec![(1, VersionState::Revoked), (2, VersionState::Current)]
    );
    assert_eq!(store.current_version(&s.id).await.unwrap().unwrap().ciphertext, vec![2u8; 40]);
    // A rotation to an existing version number fails whole: v2 stays current.
    assert!(store.rotate_secret(&version(&s.id, 2), now(), None).await.is_err());
    assert_eq!(store.current_version(&s.id).await.unwrap().unwrap().version, 2);
    // Pending versions are stored, never current, until promoted whole.
    store.add_pending_version(&version(&s.id, 3)).await.unwrap();
    assert_eq!(store.current_version(&s.id).await.unwrap().unwrap().version, 2, "pending is not current");
    assert_eq!(store.get_version(&s.id, 3).await.unwrap().unwrap().state, VersionState::Pending);
    assert!(!store.promote_pending(&s.id, 2, now()).await.unwrap(), "only a pending version is promoted");
    assert!(store.promote_pending(&s.id, 3, now()).await.unwrap());
    assert_eq!(
        store.list_versions(&s.id).await.unwrap().iter().map(|v| (v.version, v.state)).collect::<Vec<_>>(),
        vec![(1, VersionState::Revoked), (2, VersionState::Revoked), (3, VersionState::Current)]
    );
    assert!(!store.promote_pending(&s.id, 3, now()).await.unwrap(), "promotion happens once");
    assert!(store.set_rotation_policy(&s.id, Some(60), None, now()).await.unwrap());
    let changed = store.find_secret(&org.id, &s.id).await.unwrap().unwrap();
    assert_eq!((changed.rotate_every_secs, changed.auto_rotation), (Some(60), None));
    assert_eq!(store.revoke_versions(&s.id, Some(1), now()).await.unwrap(), 0, "already revoked");
    assert_eq!(store.revoke_versions(&s.id, None, now()).await.unwrap(), 1);
    assert!(store.current_version(&s.id).await.unwrap().is_none());

    // Agents and tokens.
    let a = Agent {
        id: new_id("agt"),
        org_id: org.id.clone(),
        name: "bot".into(),
        description: None,
        disabled: false,
        allow_from: vec![],
        created_at: now(),
    };
    let t = AgentToken {
        id: new_id("atk"),
        agent_id: a.id.clone(),
        hash: [7; 32],
        created_at: now(),
        expires_at: None,
        revoked: false,
    };
    store.create_agent(&a, &t).await.unwrap();
    let (found, tok) = store.agent_by_token_hash(&[7; 32]).await.unwrap().unwrap();
    assert_eq!((found.name.as_str(), tok.id.as_str()), ("bot", t.id.as_str()));
    assert!(store.agent_by_token_hash(&[8; 32]).await.unwrap().is_none());
    assert!(store.set_agent_disabled(&a.id, true).await.unwrap());
    assert!(store.find_agent(&org.id, "bot").await.unwrap().unwrap().disabled);

    // Grants: one per (agent, secret), replaced on re-grant.
    let g = Grant {
        id: new_id("grt"),
        org_id: org.id.clone(),
        agent_id: a.id.clone(),
        secret_id: s.id.clone(),
        modes: Modes { proxy: true, reveal: false },
        expires_at: None,
        created_at: now(),
    };
    store.put_grant(&g).await.unwrap();
    store
        .put_grant(&Grant { id: new_id("grt"), modes: Modes { proxy: false, reveal: true }, ..g.clone() })
        .await
        .unwrap();
    let gs = store.list_grants(&org.id, Some(&a.id), None).await.unwrap();
    assert_eq!(gs.len(), 1);
    assert!(gs[0].modes.reveal && !gs[0].modes.proxy);
    assert!(store.find_grant(&a.id, &s.id).await.unwrap().is_some());
    assert!(store.delete_grant(&a.id, &s.id).await.unwrap());
    assert!(!store.delete_grant(&a.id, &s.id).await.unwrap());

    // Deleting a secret takes its versions and grants.
    store.put_grant(&g).await.unwrap();
    assert!(store.delete_secret(&s.id).await.unwrap());
    assert!(store.list_versions(&s.id).await.unwrap().is_empty());
    assert!(store.list_grants(&org.id, None, None).await.unwrap().is_empty());

    // Human tokens.
    let u = UserToken {
        id: new_id("utk"),
        org_id: None,
        name: "op".into(),
        role: Role::Owner,
        hash: [9; 32],
        created_at: now(),
        expires_at: None,
    };
    store.create_user_token(&u).await.unwrap();
    assert_eq!(store.user_token_by_hash(&[9; 32]).await.unwrap().unwrap().role, Role::Owner);

    // Audit: concurrent appenders still form one chain with no gaps.
    let mut tasks = Vec::new();
    for w in 0..16 {
        let st = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let batch: Vec<_> = (0..4).map(|j| draft(&format!("w{w}.{i}.{j}"))).collect();
                st.append_audit(batch.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(verified_events(&*store).await, 16 * 5 * 4);

    let newest = store.query_audit(&AuditQuery { limit: 3, ..Default::default() }).await.unwrap();
    assert_eq!(newest.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![320, 319, 318]);
    let page2 = store.query_audit(&AuditQuery { limit: 2, before_seq: Some(318), ..Default::default() }).await.unwrap();
    assert_eq!(page2.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![317, 316]);
    let by_action = store
        .query_audit(&AuditQuery { action: Some("w3.2.1".into()), limit: 10, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(by_action.len(), 1);
}

#[tokio::test]
async fn sqlite_store_suite() {
    let (_dir, store) = sqlite().await;
    suite(store).await;
}

/// SQLite has two writer connections: the audit writer's own (single
/// autocommit INSERTs) and the pool's (transactions). Under a continuous
/// stream of small audit appends, transactions that read before they write
/// (a rotation) must still never fail, and appends through both paths and
/// through a second store on the same file (its own tail cache, stale at
/// once) must still form one unbroken chain.
/// Both durabilities: `buffered` tries each small append on the caller's
/// thread first and falls back to waiting on a blocking thread when a
/// transaction holds the write lock, which this provokes again and again
/// (appenders and transactions run in parallel on two workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_audit_connection_and_transactions_share_the_file() {
    for durability in [keyward_store::Durability::Fsync, keyward_store::Durability::Buffered] {
        audit_connection_and_transactions_share_the_file(durability).await;
    }
}

async fn audit_connection_and_transactions_share_the_file(durability: keyward_store::Durability) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = keyward_store::open_with(&url, durability).await.unwrap();
    let other = keyward_store::open_with(&url, durability).await.unwrap();
    let org = Org { id: new_id("org"), name: "o".into(), created_at: now() };
    store.create_org(&OrgRecord { org: org.clone(), wrapped_key: vec![0] }).await.unwrap();
    let s = Secret {
        id: new_id("sec"),
        org_id: org.id.clone(),
        name: "k".into(),
        provider: "openai".into(),
        upstream: None,
        allow_internal: false,
        inject: None,
        rotate_every_secs: None,
        auto_rotation: None,
        description: None,
        tags: vec![],
        expires_at: None,
        created_at: now(),
        updated_at: now(),
    };
    store.create_secret(&s, &version(&s.id, 1)).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut appenders = Vec::new();
    for (w, st) in [store.clone(), store.clone(), other.clone()].into_iter().enumerate() {
        let stop = stop.clone();
        appenders.push(tokio::spawn(async move {
            let mut n = 0u64;
            for round in 0u64.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                // Most batches fit one statement; every tenth does not.
                let size = if round % 10 == 9 { 70 } else { 3 };
                let batch: Vec<_> = (0..size).map(|j| draft(&format!("w{w}.{n}.{j}"))).collect();
                st.append_audit(batch).await.unwrap();
                n += size;
                // An append may finish without waiting: let the others run.
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    for v in 2..=40 {
        store.rotate_secret(&version(&s.id, v), now(), None).await.unwrap();
        // Leave the appenders time between transactions too.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut appended = 0;
    for a in appenders {
        appended += a.await.unwrap();
    }
    assert_eq!(store.current_version(&s.id).await.unwrap().unwrap().version, 40);
    assert!(appended > 0);
    assert_eq!(verified_events(&*store).await, appended);
}

#[tokio::test]
async fn postgres_store_suite() {
    let Some(db) = keyward_store::testing::TestSchema::create().await else { return };
    let store = keyward_store::open(&db.url).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    suite(store).await;
}

/// A change committed through one PostgreSQL store reaches another
/// replica's store as a notification.
#[tokio::test]
async fn postgres_changes_reach_other_replicas() {
    let Some(db) = keyward_store::testing::TestSchema::create().await else { return };
    let a = keyward_store::open(&db.url).await.unwrap();
    let b = keyward_store::open(&db.url).await.unwrap();
    let mut news = b.watch_changes().expect("postgres publishes changes");
    // Drain the connect-time invalidation, then expect one for the change.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), news.recv()).await;
    let org = Org { id: new_id("org"), name: "o".into(), created_at: now() };
    a.create_org(&OrgRecord { org: org.clone(), wrapped_key: vec![0] }).await.unwrap();
    let agent = Agent {
        id: new_id("agt"),
        org_id: org.id,
        name: "a".into(),
        description: None,
        disabled: false,
        allow_from: vec![],
        created_at: now(),
    };
    let tok = AgentToken {
        id: new_id("atk"),
        agent_id: agent.id.clone(),
        hash: [1; 32],
        created_at: now(),
        expires_at: None,
        revoked: false,
    };
    a.create_agent(&agent, &tok).await.unwrap();
    while news.try_recv().is_ok() {}
    a.set_agent_disabled(&agent.id, true).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(1), news.recv()).await.expect("notified within 1 s").unwrap();
    assert!(keyward_store::open("sqlite:///nonexistent-dir/x.db").await.is_err());
}

/// Two handles appending to one trail in turns: each one's idea of the tail
/// goes stale whenever the other writes. A stale tail must cost a retry,
/// never a fork or a gap (SQLite's writer caches the tail it last wrote).
async fn appenders_take_turns(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let mut expected = 0u64;
    for (i, n) in [1usize, 1, 3, 2, 4, 5, 1, 259, 2, 1].into_iter().enumerate() {
        let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let batch: Vec<_> = (0..n).map(|j| draft(&format!("turn{i}.{j}"))).collect();
        let written = first.append_audit(batch).await.unwrap();
        assert_eq!(written.first().unwrap().seq as u64, expected + 1, "no gap, no reuse");
        expected += n as u64;
        let again = second.append_audit(vec![draft(&format!("turn{i}.other"))]).await.unwrap();
        assert_eq!(again[0].seq as u64, expected + 1);
        assert_eq!(again[0].prev_hash, written.last().unwrap().hash, "linked to the other handle's tail");
        expected += 1;
    }
    assert_eq!(verified_events(&*a).await, expected);
}

#[tokio::test]
async fn sqlite_appenders_with_stale_tails_keep_one_chain() {
    // `buffered` meets the stale tail on the caller's thread, `fsync` on a
    // blocking one: both must see the taken sequence number as a retry.
    for durability in [keyward_store::Durability::Fsync, keyward_store::Durability::Buffered] {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let a = keyward_store::open_with(&url, durability).await.unwrap();
        let b = keyward_store::open_with(&url, durability).await.unwrap();
        appenders_take_turns(a, b).await;
    }
}

#[tokio::test]
async fn postgres_appenders_with_stale_tails_keep_one_chain() {
    let Some(db) = keyward_store::testing::TestSchema::create().await else { return };
    let a = keyward_store::open(&db.url).await.unwrap();
    let b = keyward_store::open(&db.url).await.unwrap();
    appenders_take_turns(a, b).await;
}

/// `buffered` relaxes the commit sync of the connections that write, and
/// nothing else: what was appended is there when the store is reopened.
#[tokio::test]
async fn sqlite_durability_sets_the_commit_sync() {
    use keyward_store::{Durability, SqliteStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let strict = SqliteStore::open_with(&path, Durability::Fsync).await.unwrap();
    assert_eq!(strict.commit_sync_setting().await.unwrap(), "2", "FULL");
    drop(strict);
    let buffered = SqliteStore::open_with(&path, Durability::Buffered).await.unwrap();
    assert_eq!(buffered.commit_sync_setting().await.unwrap(), "1", "NORMAL");
    buffered.append_audit(vec![draft("a"), draft("b"), draft("c")]).await.unwrap();
    drop(buffered);
    let reopened = SqliteStore::open(&path).await.unwrap();
    assert_eq!(verified_events(&reopened).await, 3);
    assert_eq!("buffered".parse::<Durability>(), Ok(Durability::Buffered));
    assert_eq!("fsync".parse::<Durability>(), Ok(Durability::Fsync));
    assert!("none".parse::<Durability>().unwrap_err().contains("expected `fsync`"));
}

/// Audit appends run without SQLite's own autocheckpoint (its copy and
/// fsyncs would stall them: on async workers with `buffered` durability,
/// behind every queued append with `fsync`); keyward's checkpoints on a
/// blocking thread must still keep the WAL from growing without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_audit_appends_keep_the_wal_bounded() {
    use keyward_store::{Durability, SqliteStore};
    // Each small commit adds at least two pages (table and index) to the
    // WAL: 6000 of them would be over 48 MB without checkpoints, 3000 over 24.
    for (durability, commits) in [(Durability::Buffered, 6000), (Durability::Fsync, 3000)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open_with(&path, durability).await.unwrap();
        for i in 0..commits {
            store.append_audit(vec![draft(&format!("e{i}"))]).await.unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("t.db-wal")).unwrap().len();
        assert!(wal < 16 << 20, "{durability:?}: the WAL grew to {wal} bytes");
        assert_eq!(verified_events(&store).await, commits);
    }
}

#[tokio::test]
async fn postgres_durability_sets_synchronous_commit() {
    use keyward_store::{Durability, PgStore};
    let Some(db) = keyward_store::testing::TestSchema::create().await else { return };
    let strict = PgStore::open_with(&db.url, Durability::Fsync).await.unwrap();
    assert_eq!(strict.commit_sync_setting().await.unwrap(), "on");
    let buffered = PgStore::open_with(&db.url, Durability::Buffered).await.unwrap();
    assert_eq!(buffered.commit_sync_setting().await.unwrap(), "off");
    buffered.append_audit(vec![draft("a"), draft("b")]).await.unwrap();
    assert_eq!(verified_events(&strict).await, 2);
}

/// An event nothing waits on lingers for a commit to share: it goes with
/// the next urgent one, or with a flush (what readers of the trail do
/// first), and is never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_events_share_the_next_commit() {
    use keyward_core::audit_writer::AuditWriter;
    use std::time::Duration;
    let (_dir, store) = sqlite().await;
    // A linger far longer than the test: only a commit can release them.
    let writer = Arc::new(AuditWriter::spawn_with_linger(store.clone(), Duration::from_secs(60)));
    let w = writer.clone();
    let soon = tokio::spawn(async move { w.append_soon(draft("outcome")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.audit_page(0, 10).await.unwrap().is_empty(), "still lingering");
    let urgent = writer.append(draft("use")).await.unwrap();
    let soon = tokio::time::timeout(Duration::from_secs(5), soon).await.expect("rode along").unwrap().unwrap();
    assert_eq!((soon, urgent), (1, 2), "one commit, in queue order");

    let w = writer.clone();
    let soon = tokio::spawn(async move { w.append_soon(draft("outcome 2")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(5), writer.flush()).await.expect("flush answers");
    assert_eq!(store.audit_page(0, 10).await.unwrap().len(), 3, "a flush commits what lingers");
    assert_eq!(soon.await.unwrap().unwrap(), 3);
    // With nothing queued, a flush returns at once.
    tokio::time::timeout(Duration::from_secs(5), writer.flush()).await.expect("idle flush answers");

    // A detached event (a proxied call's outcome) is queued before the call
    // returns and lingers the same way: the next access's commit takes it,
    // in queue order, and so does a flush.
    writer.append_detached(draft("outcome 3"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.audit_page(0, 10).await.unwrap().len(), 3, "detached event lingers");
    assert_eq!(writer.append(draft("use 2")).await.unwrap(), 5, "rode along, queued first");
    let page = store.audit_page(0, 10).await.unwrap();
    assert_eq!(page.iter().map(|r| r.event.action.as_str()).collect::<Vec<_>>()[3..], ["outcome 3", "use 2"]);
    writer.append_detached(draft("outcome 4"));
    tokio::time::timeout(Duration::from_secs(5), writer.flush()).await.expect("flush answers");
    assert_eq!(store.audit_page(0, 10).await.unwrap().len(), 6, "a flush commits a detached event");
}

/// A flush commits what was queued before it and returns, even while
/// events keep arriving faster than the queue ever runs dry (a busy proxy:
/// outcome events never stop); a reader of the trail is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_returns_while_events_keep_coming() {
    use keyward_core::audit_writer::AuditWriter;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (_dir, store) = sqlite().await;
    let writer = Arc::new(AuditWriter::spawn(store.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    // A steady stream from a thread of its own, faster than commits drain
    // it one by one: every commit finds new events queued behind it.
    let (w, halt, rt) = (writer.clone(), stop.clone(), tokio::runtime::Handle::current());
    let stream = std::thread::spawn(move || {
        let _in_runtime = rt.enter(); // a full queue hands the event to a task
        let mut n = 0u64;
        while !halt.load(Ordering::Relaxed) {
            w.append_detached(draft(&format!("outcome {n}")));
            n += 1;
            // Spin: a sleep this short would round up to a much longer one.
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(5) {
                std::hint::spin_loop();
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        // (That a flush takes what was queued before it is
        // `lingering_events_share_the_next_commit`'s; here the queue may be
        // full, and an event then waits for room instead.)
        tokio::time::timeout(Duration::from_secs(2), writer.flush()).await.expect("the flush returned");
    }
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    writer.flush().await;
    let events = verified_events(store.as_ref()).await;
    assert!(events > 1000, "{events} events: the stream did not run");
}

/// An access whose request goes away while it commits (the client hung up)
/// takes nobody's answer with it: a commit once begun finishes, so every
/// other event in its batch still gets its sequence number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_that_goes_away_mid_commit_costs_nobody_their_answer() {
    use keyward_core::audit_writer::AuditWriter;
    use sqlx::Connection;
    use std::time::Duration;
    let (dir, store) = sqlite().await;
    // A linger far longer than the test: only the access's commit takes them.
    let writer = Arc::new(AuditWriter::spawn_with_linger(store.clone(), Duration::from_secs(60)));
    // Another connection holds the write lock: the commit will wait for it.
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut blocker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut blocker).await.unwrap();
    let waiting: Vec<_> = (0..8)
        .map(|i| {
            let w = writer.clone();
            tokio::spawn(async move { w.append_soon(draft(&format!("outcome {i}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let w = writer.clone();
    let access = tokio::spawn(async move { w.append(draft("use")).await });
    // It has taken the eight with its own and waits for the lock; it goes away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    access.abort();
    assert!(access.await.unwrap_err().is_cancelled());
    sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await.unwrap();
    let mut seqs = Vec::new();
    for t in waiting {
        let appended = tokio::time::timeout(Duration::from_secs(10), t).await.expect("answered").unwrap();
        seqs.push(appended.expect("an event lost its answer"));
    }
    seqs.sort();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "queued first, committed first");
    writer.flush().await;
    assert_eq!(verified_events(store.as_ref()).await, 9);
}

#[tokio::test]
async fn sqlite_reopens_migrated_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let s = keyward_store::open(&url).await.unwrap();
    s.insert_meta("x", "1").await.unwrap();
    drop(s);
    let s = keyward_store::open(&url).await.unwrap();
    assert_eq!(s.get_meta("x").await.unwrap().as_deref(), Some("1"));
    assert!(keyward_store::open("mysql://x").await.is_err());
}

/// Many concurrent resolves through the Vault: each is audited (group
/// commit), none is lost, and the chain verifies afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resolves_are_each_audited_once() {
    let (_dir, store) = sqlite().await;
    concurrent_resolves(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resolves_are_each_audited_once_on_postgres() {
    let Some(db) = keyward_store::testing::TestSchema::create().await else { return };
    concurrent_resolves(keyward_store::open(&db.url).await.unwrap()).await;
}

async fn concurrent_resolves(store: Arc<dyn Store>) {
    let key = KeyMaterial::generate().unwrap();
    let copy = KeyMaterial::from_slice(key.expose()).unwrap();
    let init = Vault::initialize(store.clone(), Arc::new(SystemClock), InitSeal::KeyFile(key)).await.unwrap();
    let vault = Vault::open(store.clone(), Arc::new(SystemClock), Some(copy)).await.unwrap();
    let meta = RequestMeta::default();
    let p = vault.authenticate_user(init.admin_token.expose(), &meta).await.unwrap();
    let new = NewSecret {
        name: "k".into(),
        provider: None,
        upstream: None,
        allow_internal: false,
        inject: None,
        rotate_every: None,
        auto_rotation: None,
        description: None,
        tags: vec![],
        expires_at: None,
    };
    vault.put_secret(&p, "default", new, SecretValue::new(b"the-value".to_vec()).unwrap(), &meta).await.unwrap();
    let (_, token) = vault.create_agent(&p, "default", "bot", None, None, vec![], &meta).await.unwrap();
    vault.add_grant(&p, "default", "bot", "k", Modes { proxy: false, reveal: true }, None, &meta).await.unwrap();

    let before = store.audit_page(0, 10_000).await.unwrap().len();
    let token = Arc::new(token.expose().to_owned());
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (v, t) = (vault.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let r = v.use_secret(&t, "k", UseMode::Reveal, None, &RequestMeta::default()).await.unwrap();
            assert_eq!(r.value.expose_bytes(), b"the-value");
            r.audit_seq
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "every release has its own audit record");
    let all = store.audit_page(0, 10_000).await.unwrap();
    assert_eq!(all.len() - before, 200);
    assert!(vault.verify_audit(&p, "default").await.unwrap().ok);

    // Revocation takes effect on the very next use (caches are invalidated).
    vault.revoke_secret(&p, "default", "k", None, &meta).await.unwrap();
    assert!(vault.use_secret(&token, "k", UseMode::Reveal, None, &meta).await.is_err());
}
