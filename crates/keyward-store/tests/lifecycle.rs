//! Version lifecycle on a controllable clock (no sleeps), on both stores:
//! rotation with a grace period, grace expiry, rollback inside and after
//! the window, expired secrets and versions, statuses and metrics.

use std::sync::Arc;

use keyward_core::CoreError;
use keyward_core::clock::ManualClock;
use keyward_core::crypto::KeyMaterial;
use keyward_core::model::Modes;
use keyward_core::store::Store;
use keyward_core::vault::{InitSeal, NewSecret, Principal, RequestMeta, SecretValue, UseMode, Vault};
use time::{Duration, OffsetDateTime};

struct Env {
    vault: Arc<Vault>,
    clock: ManualClock,
    admin: Principal,
    token: String,
    _keep: Box<dyn std::any::Any>,
}

async fn env(store: Arc<dyn Store>, keep: Box<dyn std::any::Any>) -> Env {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let key = KeyMaterial::generate().unwrap();
    let copy = KeyMaterial::from_slice(key.expose()).unwrap();
    let init = Vault::initialize(store.clone(), Arc::new(clock.clone()), InitSeal::KeyFile(key)).await.unwrap();
    let vault = Vault::open(store, Arc::new(clock.clone()), Some(copy)).await.unwrap();
    let admin = vault.authenticate_user(init.admin_token.expose(), &RequestMeta::default()).await.unwrap();
    let (_, token) =
        vault.create_agent(&admin, "default", "bot", None, None, vec![], &RequestMeta::default()).await.unwrap();
    Env { vault, clock, admin, token: token.expose().to_owned(), _keep: keep }
}

async fn sqlite() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = keyward_store::open(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
    env(store, Box::new(dir)).await
}

async fn postgres() -> Env {
    let db = keyward_store::testing::TestSchema::create().await.expect("PostgreSQL");
    let store = keyward_store::open(&db.url).await.unwrap();
    env(store, Box::new(db)).await
}

fn new(name: &str, expires: Option<OffsetDateTime>, rotate_every: Option<Duration>) -> NewSecret {
    NewSecret {
        name: name.into(),
        provider: None,
        upstream: None,
        allow_internal: false,
        inject: None,
        rotate_every,
        auto_rotation: None,
        description: None,
        tags: vec![],
        expires_at: expires,
    }
}

fn v(s: &str) -> SecretValue {
    SecretValue::new(s.as_bytes().to_vec()).unwrap()
}

impl Env {
    async fn put(&self, name: &str, value: &str, expires: Option<OffsetDateTime>, every: Option<Duration>) {
        let m = RequestMeta::default();
        self.vault.put_secret(&self.admin, "default", new(name, expires, every), v(value), &m).await.unwrap();
        let modes = Modes { proxy: true, reveal: true };
        self.vault.add_grant(&self.admin, "default", "bot", name, modes, None, &m).await.unwrap();
    }

    async fn reveal(&self, name: &str, version: Option<i64>) -> Result<String, CoreError> {
        let r = self.vault.use_secret(&self.token, name, UseMode::Reveal, version, &RequestMeta::default()).await?;
        Ok(r.value.expose_str().unwrap().to_owned())
    }

    async fn rotate(&self, name: &str, value: &str, grace: Option<Duration>, expires: Option<OffsetDateTime>) {
        let m = RequestMeta::default();
        self.vault.rotate_secret(&self.admin, "default", name, v(value), grace, expires, &m).await.unwrap();
    }

    async fn status(&self, name: &str) -> &'static str {
        self.vault.show_secret(&self.admin, "default", name).await.unwrap().status
    }
}

fn code(r: Result<String, CoreError>) -> &'static str {
    r.expect_err("must be denied").code()
}

async fn grace_and_rollback(e: Env) {
    e.put("k", "v1-aaaaaaaa", None, None).await;
    e.rotate("k", "v2-bbbbbbbb", Some(Duration::hours(1)), None).await;
    // The new version is current for everyone at once.
    assert_eq!(e.reveal("k", None).await.unwrap(), "v2-bbbbbbbb");
    let proxied = e.vault.use_secret(&e.token, "k", UseMode::Proxy, None, &RequestMeta::default()).await.unwrap();
    assert_eq!(proxied.version, 2);
    // The previous one: reveal consumers only, during the grace period.
    assert_eq!(e.reveal("k", Some(1)).await.unwrap(), "v1-aaaaaaaa");
    let proxy_old = e.vault.use_secret(&e.token, "k", UseMode::Proxy, Some(1), &RequestMeta::default()).await;
    assert_eq!(proxy_old.err().unwrap().code(), "version_not_usable");
    assert_eq!(e.reveal("k", Some(7)).await.err().unwrap().code(), "version_not_usable");

    // Rollback inside the window makes v1 current again and revokes v2.
    e.vault.rollback_secret(&e.admin, "default", "k", &RequestMeta::default()).await.unwrap();
    assert_eq!(e.reveal("k", None).await.unwrap(), "v1-aaaaaaaa");
    assert_eq!(code(e.reveal("k", Some(2)).await), "version_not_usable");

    // Rotate again with a grace period, and let it run out.
    e.rotate("k", "v3-cccccccc", Some(Duration::minutes(10)), None).await;
    e.clock.advance(Duration::minutes(9));
    assert_eq!(e.reveal("k", Some(1)).await.unwrap(), "v1-aaaaaaaa");
    e.clock.advance(Duration::minutes(2));
    // Past the grace period the previous version is refused even before the sweep...
    assert_eq!(code(e.reveal("k", Some(1)).await), "version_not_usable");
    // ...and the sweep revokes it on time.
    assert_eq!(e.vault.sweep().await.unwrap(), 1);
    let info = e.vault.show_secret(&e.admin, "default", "k").await.unwrap();
    let v1 = info.versions.iter().find(|x| x.version == 1).unwrap();
    assert_eq!(v1.state, "revoked");
    assert_eq!(v1.revoked_at, v1.grace_until, "revoked when its grace period ended");
    let err = e.vault.rollback_secret(&e.admin, "default", "k", &RequestMeta::default()).await.err().unwrap();
    assert_eq!(err.code(), "conflict", "rollback after the window is refused");
    assert_eq!(e.reveal("k", None).await.unwrap(), "v3-cccccccc");

    // Without a grace period the previous version is revoked at once.
    e.rotate("k", "v4-dddddddd", None, None).await;
    assert_eq!(code(e.reveal("k", Some(3)).await), "version_not_usable");
    assert!(e.vault.rollback_secret(&e.admin, "default", "k", &RequestMeta::default()).await.is_err());
}

async fn expiry_and_statuses(e: Env) {
    let now = e.clock.now_for_tests();
    e.put("ok", "value-ok-1", None, None).await;
    e.put("expiring", "value-exp-1", Some(now + Duration::days(3)), None).await;
    e.put("expired", "value-dead-1", Some(now + Duration::hours(1)), None).await;
    e.put("overdue", "value-old-1", None, Some(Duration::days(30))).await;
    e.put("version-expires", "value-ve-1", None, None).await;
    e.rotate("version-expires", "value-ve-2", None, Some(now + Duration::hours(2))).await;
    e.put("revoked", "value-rev-1", None, None).await;
    e.vault.revoke_secret(&e.admin, "default", "revoked", None, &RequestMeta::default()).await.unwrap();

    e.clock.advance(Duration::days(31));
    assert_eq!(e.status("ok").await, "ok");
    assert_eq!(e.status("expiring").await, "expired", "3 days have passed");
    assert_eq!(e.status("expired").await, "expired");
    assert_eq!(e.status("overdue").await, "rotation_overdue");
    assert_eq!(e.status("version-expires").await, "expired");
    assert_eq!(e.status("revoked").await, "revoked");
    assert_eq!(code(e.reveal("expired", None).await), "secret_expired");
    assert_eq!(code(e.reveal("version-expires", None).await), "secret_expired");
    assert_eq!(e.reveal("overdue", None).await.unwrap(), "value-old-1", "overdue is a warning, not a denial");

    e.put("soon", "value-soon-1", Some(e.clock.now_for_tests() + Duration::days(10)), None).await;
    assert_eq!(e.status("soon").await, "expiring");
    e.vault.set_expiring_window(Duration::days(7));
    assert_eq!(e.status("soon").await, "ok", "the window is configurable");

    let metrics = e.vault.metrics(&e.admin).await.unwrap();
    for line in [
        "keyward_secrets{status=\"ok\"} 2",
        "keyward_secrets{status=\"expired\"} 3",
        "keyward_secrets{status=\"rotation_overdue\"} 1",
        "keyward_secrets{status=\"revoked\"} 1",
        "keyward_secrets{status=\"expiring\"} 0",
        "keyward_uses_total{mode=\"reveal\",outcome=\"allowed\"} 1",
        "keyward_uses_total{mode=\"reveal\",outcome=\"denied\"} 2",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    // The trail records the denials with their reason.
    let q = keyward_core::store::AuditQuery {
        outcome: Some(keyward_core::audit::Outcome::Denied),
        limit: 10,
        ..Default::default()
    };
    let denied = e.vault.query_audit(&e.admin, "default", q).await.unwrap();
    assert!(denied.iter().any(|r| r.event.reason.as_deref() == Some("secret_expired")));
}

#[tokio::test]
async fn sqlite_grace_and_rollback() {
    grace_and_rollback(sqlite().await).await;
}

#[tokio::test]
async fn postgres_grace_and_rollback() {
    grace_and_rollback(postgres().await).await;
}

#[tokio::test]
async fn sqlite_expiry_and_statuses() {
    expiry_and_statuses(sqlite().await).await;
}

#[tokio::test]
async fn postgres_expiry_and_statuses() {
    expiry_and_statuses(postgres().await).await;
}

async fn agent_tokens(e: Env) {
    let m = RequestMeta::default();
    e.put("k", "value-k-123456", None, None).await;
    // TTL: the token stops at its end.
    let (_, short) =
        e.vault.create_agent(&e.admin, "default", "temp", None, Some(Duration::days(30)), vec![], &m).await.unwrap();
    let modes = Modes { proxy: false, reveal: true };
    e.vault.add_grant(&e.admin, "default", "temp", "k", modes, None, &m).await.unwrap();
    let use_as = |t: String| {
        let vault = e.vault.clone();
        async move { vault.use_secret(&t, "k", UseMode::Reveal, None, &RequestMeta::default()).await.map(|_| ()) }
    };
    assert!(use_as(short.expose().to_owned()).await.is_ok());
    e.clock.advance(Duration::days(31));
    assert_eq!(use_as(short.expose().to_owned()).await.unwrap_err().code(), "token_expired");

    // Rotation with an overlap: both tokens work, then only the new one.
    let (_, new) = e.vault.rotate_agent_token(&e.admin, "default", "bot", Some(Duration::hours(1)), &m).await.unwrap();
    assert!(use_as(e.token.clone()).await.is_ok(), "the old token works during the overlap");
    assert!(use_as(new.expose().to_owned()).await.is_ok());
    e.clock.advance(Duration::minutes(61));
    assert_eq!(use_as(e.token.clone()).await.unwrap_err().code(), "token_expired");
    assert!(use_as(new.expose().to_owned()).await.is_ok());
    // Without an overlap the old token stops at once.
    let (_, newer) = e.vault.rotate_agent_token(&e.admin, "default", "bot", None, &m).await.unwrap();
    assert_eq!(use_as(new.expose().to_owned()).await.unwrap_err().code(), "token_expired");
    assert!(use_as(newer.expose().to_owned()).await.is_ok());
}

#[tokio::test]
async fn sqlite_agent_tokens() {
    agent_tokens(sqlite().await).await;
}

#[tokio::test]
async fn postgres_agent_tokens() {
    agent_tokens(postgres().await).await;
}

/// A provider stand-in for automated rotation: issues `next` (or fails),
/// accepts or refuses the probe, records what it was asked to revoke.
#[derive(Default)]
struct FakeProvider {
    next: std::sync::Mutex<Vec<Result<String, String>>>,
    probe_ok: std::sync::atomic::AtomicBool,
    issued_with: std::sync::Mutex<Vec<Option<String>>>,
    revoked: std::sync::Mutex<Vec<(i64, Option<String>)>>,
}

#[async_trait::async_trait]
impl keyward_core::rotation::RotationDriver for FakeProvider {
    fn has_hook(&self, name: &str) -> bool {
        name == "fake"
    }
    async fn issue(&self, _: &str, call: &keyward_core::rotation::HookCall<'_>) -> Result<SecretValue, String> {
        let doc: serde_json::Value = serde_json::from_slice(&call.to_json()).unwrap();
        self.issued_with.lock().unwrap().push(doc["value"].as_str().map(str::to_owned));
        let next = self.next.lock().unwrap().remove(0)?;
        Ok(v(&next))
    }
    async fn revoke(&self, _: &str, call: &keyward_core::rotation::HookCall<'_>) -> Result<(), String> {
        let value = call.value.map(|x| x.expose_str().unwrap().to_owned());
        self.revoked.lock().unwrap().push((call.version, value));
        Ok(())
    }
    async fn verify(&self, _: &keyward_core::model::Secret, probe: &str, _: &SecretValue) -> Result<(), String> {
        assert_eq!(probe, "GET /v1/models");
        if self.probe_ok.load(std::sync::atomic::Ordering::SeqCst) { Ok(()) } else { Err("answered 401".into()) }
    }
}

async fn automated_rotation(e: Env) {
    let fake = Arc::new(FakeProvider::default());
    fake.probe_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    e.vault.set_rotation_driver(fake.clone());
    let m = RequestMeta::default();
    let auto = keyward_core::model::AutoRotation {
        hook: "fake".into(),
        pass_value: true,
        verify: Some("GET /v1/models".into()),
    };
    // A hook the server config does not name is refused.
    let unknown = keyward_core::model::AutoRotation { hook: "nope".into(), ..auto.clone() };
    let mut bad = new("k", None, None);
    bad.provider = Some("openai".into());
    bad.auto_rotation = Some(unknown);
    assert_eq!(
        e.vault.put_secret(&e.admin, "default", bad, v("sk-one-111111"), &m).await.unwrap_err().code(),
        "invalid_input"
    );
    let mut openai = new("k", None, None);
    openai.provider = Some("openai".into());
    e.vault.put_secret(&e.admin, "default", openai, v("sk-one-111111"), &m).await.unwrap();
    let modes = Modes { proxy: true, reveal: true };
    e.vault.add_grant(&e.admin, "default", "bot", "k", modes, None, &m).await.unwrap();
    let every = Some(Duration::days(30));
    e.vault.set_rotation_policy(&e.admin, "default", "k", every, Some(auto), &m).await.unwrap();

    // Success: issue (given the current value) → pending → verify → promote → revoke the old one.
    fake.next.lock().unwrap().push(Ok("sk-two-222222".into()));
    let done = e.vault.auto_rotate(&e.admin, "default", "k", &m).await.unwrap();
    assert_eq!((done.promoted_version, done.revoke_error.clone()), (2, None));
    assert_eq!(e.reveal("k", None).await.unwrap(), "sk-two-222222");
    assert_eq!(code(e.reveal("k", Some(1)).await), "version_not_usable", "the old version is revoked");
    assert_eq!(fake.issued_with.lock().unwrap().last().unwrap().as_deref(), Some("sk-one-111111"));
    assert_eq!(fake.revoked.lock().unwrap().last().unwrap(), &(1, Some("sk-one-111111".to_owned())));

    // Hook failure and verify failure leave the current version as it was.
    fake.next.lock().unwrap().push(Err("hook `fake` issue failed (exit status: 1)".into()));
    let err = e.vault.auto_rotate(&e.admin, "default", "k", &m).await.unwrap_err();
    assert_eq!(err.code(), "rotation_failed");
    fake.probe_ok.store(false, std::sync::atomic::Ordering::SeqCst);
    fake.next.lock().unwrap().push(Ok("sk-bad-333333".into()));
    let err = e.vault.auto_rotate(&e.admin, "default", "k", &m).await.unwrap_err();
    assert!(err.to_string().contains("verify"), "{err}");
    assert_eq!(e.reveal("k", None).await.unwrap(), "sk-two-222222");
    let info = e.vault.show_secret(&e.admin, "default", "k").await.unwrap();
    let states: Vec<_> = info.versions.iter().map(|x| (x.version, x.state)).collect();
    assert_eq!(states, vec![(1, "revoked"), (2, "current"), (3, "revoked")], "the unverified version never served");
    assert_eq!(fake.revoked.lock().unwrap().len(), 1, "no provider revocation after a failure");
    // A hook that hands back the current value is refused too.
    fake.probe_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    fake.next.lock().unwrap().push(Ok("sk-two-222222".into()));
    assert_eq!(e.vault.auto_rotate(&e.admin, "default", "k", &m).await.unwrap_err().code(), "rotation_failed");

    // Every step is in the trail, failures included.
    let q = keyward_core::store::AuditQuery { limit: 100, ..Default::default() };
    let actions: Vec<String> =
        e.vault.store().query_audit(&q).await.unwrap().into_iter().map(|r| r.event.action).collect();
    for a in [
        "secret.rotate.auto",
        "secret.rotate.pending",
        "secret.rotate.promoted",
        "secret.rotate.revoke_old",
        "secret.rotate.failed",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} missing from {actions:?}");
    }

    // The schedule: nothing is due before rotate_every has passed...
    assert!(e.vault.rotate_due().await.unwrap().is_empty());
    e.clock.advance(Duration::days(31));
    fake.next.lock().unwrap().push(Err("provider down".into()));
    let attempts = e.vault.rotate_due().await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].1.is_err());
    // ...a failed one waits an hour before it is tried again...
    assert!(e.vault.rotate_due().await.unwrap().is_empty());
    e.clock.advance(Duration::minutes(61));
    fake.next.lock().unwrap().push(Ok("sk-four-44444".into()));
    let attempts = e.vault.rotate_due().await.unwrap();
    assert_eq!(attempts, vec![("k".to_owned(), Ok(4))]);
    assert_eq!(e.reveal("k", None).await.unwrap(), "sk-four-44444");
    // ...and once rotated it is not due again.
    assert!(e.vault.rotate_due().await.unwrap().is_empty());
    assert_eq!(e.status("k").await, "ok");
}

#[tokio::test]
async fn sqlite_automated_rotation() {
    automated_rotation(sqlite().await).await;
}

#[tokio::test]
async fn postgres_automated_rotation() {
    automated_rotation(postgres().await).await;
}

/// Records notification events.
#[derive(Default)]
struct Captured(std::sync::Mutex<Vec<String>>);

impl keyward_core::notify::Notifier for Captured {
    fn send(&self, n: keyward_core::notify::Notification) {
        self.0.lock().unwrap().push(n.event);
    }
}

async fn anomaly_rules_fire_and_quarantine(e: Env) {
    use keyward_core::anomaly::AnomalyPolicy;
    let notes = Arc::new(Captured::default());
    e.vault.set_notifier(notes.clone());
    e.vault.start_anomaly_detection();
    e.put("k", "value-k-11111111", None, None).await;
    let from = |ip: &str| RequestMeta { source_ip: Some(ip.into()), ..RequestMeta::default() };
    let m = RequestMeta::default();
    let use_from = async |token: &str, ip: &str, secret: &str| {
        e.vault.use_secret(token, secret, UseMode::Reveal, None, &from(ip)).await.map(|_| ())
    };
    let rules = async || {
        e.vault.flush_anomaly_detection().await;
        let mut r: Vec<String> =
            e.vault.list_alerts(&e.admin, "default", true).await.unwrap().into_iter().map(|a| a.rule).collect();
        r.reverse();
        r
    };

    // Twenty minutes of steady traffic: only the first use of the secret.
    for _ in 0..20 {
        for _ in 0..10 {
            use_from(&e.token, "10.0.0.1", "k").await.unwrap();
        }
        e.clock.advance(Duration::minutes(1));
    }
    assert_eq!(rules().await, vec!["first_use"], "steady traffic stays quiet");

    // A new source address; a burst of 60 in a minute; 5 denials.
    use_from(&e.token, "10.0.0.2", "k").await.unwrap();
    assert_eq!(rules().await.last().unwrap(), "new_source_ip");
    for _ in 0..60 {
        use_from(&e.token, "10.0.0.1", "k").await.unwrap();
    }
    assert_eq!(rules().await.last().unwrap(), "rate_spike");
    for _ in 0..5 {
        assert!(use_from(&e.token, "10.0.0.1", "not-granted").await.is_err());
    }
    assert_eq!(rules().await.last().unwrap(), "denial_burst");

    // Use outside the agent's hours.
    let hour = e.clock.now_for_tests().hour();
    let hours = format!("{:02}-{:02}", (hour + 2) % 24, (hour + 3) % 24);
    let outside = AnomalyPolicy { allowed_hours: Some(hours), ..AnomalyPolicy::default() };
    e.vault.set_anomaly_policy(&e.admin, "default", Some("bot"), outside, &m).await.unwrap();
    e.clock.advance(Duration::seconds(11));
    use_from(&e.token, "10.0.0.1", "k").await.unwrap();
    assert_eq!(rules().await.last().unwrap(), "outside_hours");
    let any_hour = AnomalyPolicy { allowed_hours: Some("00-24".into()), ..AnomalyPolicy::default() };
    e.vault.set_anomaly_policy(&e.admin, "default", Some("bot"), any_hour, &m).await.unwrap();

    // A rotated-away token.
    let (_, fresh) = e.vault.rotate_agent_token(&e.admin, "default", "bot", None, &m).await.unwrap();
    e.clock.advance(Duration::seconds(11));
    assert_eq!(use_from(&e.token, "10.0.0.1", "k").await.unwrap_err().code(), "token_expired");
    assert_eq!(rules().await.last().unwrap(), "dead_token");

    // Alerts are notified, audited, listed and acknowledged.
    for rule in ["first_use", "new_source_ip", "rate_spike", "denial_burst", "outside_hours", "dead_token"] {
        assert!(notes.0.lock().unwrap().contains(&format!("alert.{rule}")), "alert.{rule} not notified");
    }
    let open = e.vault.list_alerts(&e.admin, "default", false).await.unwrap();
    assert_eq!(open.len(), 6);
    e.vault.ack_alert(&e.admin, "default", &open[0].id, &m).await.unwrap();
    assert_eq!(e.vault.list_alerts(&e.admin, "default", false).await.unwrap().len(), 5);
    assert_eq!(e.vault.ack_alert(&e.admin, "default", &open[0].id, &m).await.unwrap_err().code(), "not_found");

    // Quarantine: the next alert disables the agent until a human enables it.
    let q = AnomalyPolicy { quarantine: Some(true), ..AnomalyPolicy::default() };
    e.vault.set_anomaly_policy(&e.admin, "default", Some("bot"), q, &m).await.unwrap();
    e.clock.advance(Duration::seconds(11));
    let fresh = fresh.expose().to_owned();
    use_from(&fresh, "192.0.2.9", "k").await.unwrap();
    assert_eq!(rules().await.last().unwrap(), "new_source_ip");
    assert_eq!(use_from(&fresh, "10.0.0.1", "k").await.unwrap_err().code(), "agent_disabled");
    assert!(notes.0.lock().unwrap().contains(&"agent.quarantined".to_owned()));
    e.vault.set_agent_disabled(&e.admin, "default", "bot", false, &m).await.unwrap();
    use_from(&fresh, "10.0.0.1", "k").await.unwrap();
}

#[tokio::test]
async fn sqlite_anomaly_rules_fire_and_quarantine() {
    anomaly_rules_fire_and_quarantine(sqlite().await).await;
}

#[tokio::test]
async fn postgres_anomaly_rules_fire_and_quarantine() {
    anomaly_rules_fire_and_quarantine(postgres().await).await;
}

async fn sessions_time_out(e: Env) {
    use keyward_core::model::Role;
    use zeroize::Zeroizing;
    let m = RequestMeta { source_ip: Some("192.0.2.7".into()), ..RequestMeta::default() };
    let pw = || Zeroizing::new("correct horse battery staple".to_owned());
    e.vault.create_user(&e.admin, "default", "olivia", Role::Owner, pw(), &m).await.unwrap();
    let short = e.vault.create_user(&e.admin, "default", "x", Role::Admin, Zeroizing::new("short".into()), &m).await;
    assert_eq!(short.unwrap_err().code(), "invalid_input");

    // Idle timeout: 30 minutes without a request ends the session.
    let login = e.vault.login("olivia", pw(), &m).await.unwrap();
    let s = e.vault.session(&login.cookie).await.unwrap().expect("live");
    assert_eq!((s.principal.role, s.user.name.as_str()), (Role::Owner, "olivia"));
    e.clock.advance(Duration::minutes(29));
    assert!(e.vault.session(&login.cookie).await.unwrap().is_some());
    e.clock.advance(Duration::minutes(29));
    assert!(e.vault.session(&login.cookie).await.unwrap().is_some(), "activity keeps it alive");
    e.clock.advance(Duration::minutes(31));
    assert!(e.vault.session(&login.cookie).await.unwrap().is_none(), "idle timeout");

    // Absolute timeout: 12 hours, however active.
    let login = e.vault.login("olivia", pw(), &m).await.unwrap();
    for _ in 0..35 {
        e.clock.advance(Duration::minutes(20));
        assert!(e.vault.session(&login.cookie).await.unwrap().is_some());
    }
    e.clock.advance(Duration::minutes(21));
    assert!(e.vault.session(&login.cookie).await.unwrap().is_none(), "absolute timeout");

    // Logout ends it; failed logins are audited, then rate-limited.
    let login = e.vault.login("olivia", pw(), &m).await.unwrap();
    e.vault.logout(&login.cookie, &m).await.unwrap();
    assert!(e.vault.session(&login.cookie).await.unwrap().is_none());
    // Failed logins are audited until the per-address limit, then refused
    // with 429 (the limiter runs on real time; attempts cost an Argon2id run).
    let mut codes = Vec::new();
    while codes.last() != Some(&"rate_limited") && codes.len() < 300 {
        let bad = e.vault.login("olivia", Zeroizing::new("wrong password!".into()), &m).await;
        codes.push(bad.err().unwrap().code());
    }
    assert_eq!(codes[0], "bad_credentials");
    assert_eq!(*codes.last().unwrap(), "rate_limited", "limited within 300 attempts");
    // Past the limit no guess is tried: the right password is refused too,
    // so guessing on teaches nothing.
    let right = e.vault.login("olivia", pw(), &m).await;
    assert_eq!(right.err().map(|e| e.code()), Some("rate_limited"));
    let q = keyward_core::store::AuditQuery { action: Some("auth.login".into()), limit: 1000, ..Default::default() };
    let failures = e.vault.store().query_audit(&q).await.unwrap();
    assert!(!failures.is_empty() && failures.len() < codes.len(), "audited up to the limit: {}", failures.len());

    // A failed login names an existing account, never what was typed for an
    // unknown one: that may be a password in the wrong field.
    let elsewhere = RequestMeta { source_ip: Some("192.0.2.77".into()), ..RequestMeta::default() };
    assert!(e.vault.login("hunter2-typed-as-name", pw(), &elsewhere).await.is_err());
    assert!(e.vault.login("olivia", Zeroizing::new("wrong password!".into()), &elsewhere).await.is_err());
    let q = keyward_core::store::AuditQuery {
        action: Some("auth.login".into()),
        source_ip: Some("192.0.2.77".into()),
        limit: 10,
        ..Default::default()
    };
    let mut reasons: Vec<String> =
        e.vault.store().query_audit(&q).await.unwrap().into_iter().filter_map(|r| r.event.reason).collect();
    reasons.sort();
    assert_eq!(reasons, ["bad_credentials user=(unknown)", "bad_credentials user=olivia"]);
}

#[tokio::test]
async fn sqlite_sessions_time_out() {
    sessions_time_out(sqlite().await).await;
}

#[tokio::test]
async fn postgres_sessions_time_out() {
    sessions_time_out(postgres().await).await;
}

/// The dashboard's chain check is walked at most once per `max_age`: views
/// within it reuse the last walk, later ones walk again.
async fn recent_verification_is_reused(e: Env) {
    use std::time::Duration as StdDuration;
    let first = e.vault.verify_audit_recent(&e.admin, "default", StdDuration::from_secs(60)).await.unwrap();
    assert!(first.ok);
    e.put("another", "value-another-1111", None, None).await;
    let again = e.vault.verify_audit_recent(&e.admin, "default", StdDuration::from_secs(60)).await.unwrap();
    assert_eq!(again.events, first.events, "within the minute: the last walk");
    let fresh = e.vault.verify_audit_recent(&e.admin, "default", StdDuration::ZERO).await.unwrap();
    assert!(fresh.ok && fresh.events > first.events, "past it: a new walk sees the new events");
}

#[tokio::test]
async fn sqlite_recent_verification_is_reused() {
    recent_verification_is_reused(sqlite().await).await;
}
