//! The Vault service: every operation of keyward, and the one choke point
//! where a secret value is decrypted ([`Vault::use_secret`]: authorise →
//! write the audit record → decrypt → hand out). Adapters (HTTP API, proxy,
//! CLI) call these methods and hold no crypto of their own.

use std::sync::{Arc, RwLock};

use time::OffsetDateTime;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::audit::{Actor, AuditDraft, AuditRecord, ChainVerifier, Outcome, VerifyReport, clean_free_text};
use crate::audit_writer::AuditWriter;
use crate::cache::Cache;
use crate::clock::Clock;
use crate::crypto::{KeyMaterial, data_key_aad, fingerprint_prefix, value_aad};
use crate::error::CoreError;
use crate::model::*;
use crate::seal::{Argon2Params, SealConfig, SealError};
use crate::store::{AuditQuery, Store, StoreError};
use crate::token::{self, Token, TokenKind};

mod anomalies;
mod auto_rotate;
mod checkpoints;
mod users;
pub use auto_rotate::AutoRotated;
pub use checkpoints::{AuditExportPage, CheckpointPolicy, PruneReport};
pub use users::{Login, SESSION_IDLE, SESSION_MAX, SessionInfo};

/// Largest value keyward stores.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
const META_SEAL: &str = "seal";
/// Password hashes checked or made at once (see `Vault::password_work`).
const PASSWORD_WORK: usize = 2;
const META_INITIALIZED: &str = "initialized_at";
pub const DEFAULT_ORG: &str = "default";
pub const DEFAULT_EXPIRING_WINDOW: time::Duration = time::Duration::days(14);

/// A plaintext secret value. Zeroized on drop; no Debug, Display or
/// Serialize, so it cannot be printed or logged by accident.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Validates a value given by a human: non-empty, at most 64 KiB.
    pub fn new(bytes: Vec<u8>) -> Result<Self, CoreError> {
        let v = Zeroizing::new(bytes);
        if v.is_empty() {
            return Err(CoreError::invalid("value", "is empty"));
        }
        if v.len() > MAX_VALUE_BYTES {
            return Err(CoreError::invalid("value", "is larger than 64 KiB"));
        }
        Ok(Self(v))
    }
    pub fn expose_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

/// Facts about the request an operation serves, recorded in the audit trail.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub purpose: Option<String>,
    /// What an allowed use is for, recorded as the event's detail (the
    /// proxy: method and path, never query values).
    pub target: Option<String>,
}

/// An authenticated human/admin caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: String,
    pub name: String,
    /// `None`: the operator token, owner of every organization.
    pub org_id: Option<String>,
    pub role: Role,
}

impl Principal {
    fn actor(&self) -> Actor {
        Actor {
            kind: "user".into(),
            id: Some(self.token_id.clone()),
            name: Some(self.name.clone()),
            token_id: Some(self.token_id.clone()),
        }
    }
}

/// How an agent wants to use a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseMode {
    Reveal,
    Proxy,
}

impl UseMode {
    /// The audit action of a use in this mode.
    fn action(self) -> &'static str {
        match self {
            UseMode::Reveal => "secret.resolve",
            UseMode::Proxy => "secret.proxy",
        }
    }
}

/// A value handed out by [`Vault::use_secret`], after its audit record committed.
pub struct Released {
    pub secret: Secret,
    pub version: i64,
    pub audit_seq: i64,
    pub value: SecretValue,
    /// Who used which secret, for the use's follow-up audit events.
    pub record: UseRecord,
}

/// The identity of one use of a secret, without its value.
#[derive(Debug, Clone)]
pub struct UseRecord {
    pub org_id: String,
    pub actor: Actor,
    pub secret_id: String,
    pub secret_name: String,
    pub version: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionInfo {
    pub version: i64,
    pub state: &'static str,
    pub fingerprint: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub grace_until: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

impl From<&SecretVersion> for VersionInfo {
    fn from(v: &SecretVersion) -> Self {
        Self {
            version: v.version,
            state: v.state.as_str(),
            fingerprint: v.fingerprint.clone(),
            created_at: v.created_at,
            revoked_at: v.revoked_at,
            grace_until: v.grace_until,
            expires_at: v.expires_at,
        }
    }
}

/// Health of a secret, for `secret list`, the dashboard and `/metrics`.
pub const STATUSES: [&str; 5] = ["ok", "expiring", "rotation_overdue", "expired", "revoked"];

fn secret_status(
    secret: &Secret,
    current: Option<&SecretVersion>,
    now: OffsetDateTime,
    window: time::Duration,
) -> &'static str {
    let Some(cur) = current else { return "revoked" };
    let ends = [secret.expires_at, cur.expires_at].into_iter().flatten().min();
    if ends.is_some_and(|e| e <= now) {
        return "expired";
    }
    if ends.is_some_and(|e| e <= now + window) {
        return "expiring";
    }
    if secret.rotate_every_secs.is_some_and(|r| cur.created_at + time::Duration::seconds(r) <= now) {
        return "rotation_overdue";
    }
    "ok"
}

/// Metadata of a secret for humans: never its value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretInfo {
    #[serde(flatten)]
    pub secret: Secret,
    /// One of [`STATUSES`].
    pub status: &'static str,
    pub current_version: Option<i64>,
    pub versions: Vec<VersionInfo>,
    pub grants: Vec<Grant>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used: Option<OffsetDateTime>,
}

#[derive(Debug, Clone)]
pub struct NewSecret {
    pub name: String,
    pub provider: Option<String>,
    pub upstream: Option<String>,
    pub allow_internal: bool,
    pub inject: Option<String>,
    pub rotate_every: Option<time::Duration>,
    pub auto_rotation: Option<AutoRotation>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub initialized: bool,
    pub sealed: bool,
    pub seal: &'static str,
    pub backend: &'static str,
    pub version: &'static str,
}

/// What initialisation hands back once: the operator token.
pub struct Initialized {
    pub admin_token: Token,
    pub default_org: Org,
}

/// How a new instance protects its master key.
pub enum InitSeal {
    KeyFile(KeyMaterial),
    Passphrase { passphrase: Zeroizing<String>, params: Argon2Params },
}

pub struct Vault {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    seal: SealConfig,
    master: RwLock<Option<Arc<KeyMaterial>>>,
    unseal_lock: Mutex<()>,
    /// The last walk of the audit chain for the dashboard, and when
    /// (`Vault::verify_audit_recent`); one walk at a time.
    recent_verify: std::sync::Mutex<Option<(std::time::Instant, crate::audit::VerifyReport)>>,
    verify_walk: Mutex<()>,
    cache: Cache,
    audit: AuditWriter,
    /// Seconds before expiry at which a secret counts as `expiring`.
    expiring_window_secs: std::sync::atomic::AtomicI64,
    /// Uses by (action, outcome), for `/metrics`.
    uses: [std::sync::atomic::AtomicU64; 4],
    /// Bumped on every policy change (local or from another replica), so
    /// that open proxy streams re-check whether they may go on.
    policy_epoch: tokio::sync::watch::Sender<u64>,
    failures: crate::limiter::FailureLimiter,
    /// Argon2id runs at once (19 MiB and a core each): more login attempts
    /// wait their turn instead of exhausting memory and the blocking pool.
    password_work: tokio::sync::Semaphore,
    notifier: std::sync::OnceLock<Arc<dyn crate::notify::Notifier>>,
    /// (subject, event) → day last sent, so daily reminders go once a day.
    reminded: std::sync::Mutex<std::collections::HashMap<(String, &'static str), i64>>,
    rotation: RotationState,
    gate: std::sync::OnceLock<Arc<dyn crate::notify::AccessGate>>,
    anomalies: anomalies::AnomalyState,
    /// The audit checkpoint key, once loaded with the master key.
    signer: RwLock<Option<Arc<crate::checkpoint::CheckpointSigner>>>,
}

/// Automated rotation's process state.
#[derive(Default)]
struct RotationState {
    driver: std::sync::OnceLock<Arc<dyn crate::rotation::RotationDriver>>,
    /// Secrets being rotated by this process right now.
    running: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Secret id → earliest retry of a failed scheduled rotation.
    retry_at: std::sync::Mutex<std::collections::HashMap<String, OffsetDateTime>>,
}

fn seal_err(e: SealError) -> CoreError {
    match e {
        SealError::WrongPassphrase => CoreError::WrongPassphrase,
        SealError::Crypto(c) => CoreError::Crypto(c),
        other => CoreError::invalid("seal", other.to_string()),
    }
}

fn not_found(what: &'static str) -> CoreError {
    CoreError::NotFound { what }
}

fn forbidden(code: &'static str, reason: impl Into<String>) -> CoreError {
    CoreError::Forbidden { code, reason: reason.into() }
}

impl Vault {
    /// First-time set-up of an empty store: seal configuration, the
    /// `default` organization and the operator token (returned once).
    pub async fn initialize(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        seal: InitSeal,
    ) -> Result<Initialized, CoreError> {
        if store.get_meta(META_INITIALIZED).await?.is_some() {
            return Err(CoreError::Conflict { message: "keyward is already initialised".into() });
        }
        let (config, master) = match seal {
            InitSeal::KeyFile(k) => (SealConfig::Keyfile, k),
            InitSeal::Passphrase { passphrase, params } => {
                SealConfig::new_passphrase(&passphrase, params).map_err(seal_err)?
            }
        };
        store.insert_meta(META_SEAL, &config.to_json()).await.map_err(|e| match e {
            StoreError::Duplicate { .. } => CoreError::Conflict { message: "keyward is already initialised".into() },
            other => other.into(),
        })?;
        let now = clock.now();
        let org = Org { id: new_id("org"), name: DEFAULT_ORG.into(), created_at: now };
        let dek = KeyMaterial::generate()?;
        let wrapped_key = master.seal(dek.expose(), &data_key_aad(&org.id))?;
        store.create_org(&OrgRecord { org: org.clone(), wrapped_key }).await?;
        let admin_token = Token::generate(TokenKind::User)?;
        let t = UserToken {
            id: new_id("utk"),
            org_id: None,
            name: "operator".into(),
            role: Role::Owner,
            hash: admin_token.hash(),
            created_at: now,
            expires_at: None,
        };
        store.create_user_token(&t).await?;
        let draft = AuditDraft {
            org_id: None,
            actor: Actor::system(),
            action: "instance.init".into(),
            reason: Some(format!("seal={}", config.kind())),
            ..draft_base(now, Outcome::Allowed, &RequestMeta::default())
        };
        store.append_audit(vec![draft]).await?;
        let at = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        store.insert_meta(META_INITIALIZED, &at).await?;
        Ok(Initialized { admin_token, default_org: org })
    }

    pub async fn is_initialized(store: &dyn Store) -> Result<bool, CoreError> {
        Ok(store.get_meta(META_INITIALIZED).await?.is_some())
    }

    /// Opens an initialised store. With a key-file seal, `key` must be the
    /// master key and the vault starts unsealed; with a passphrase seal it
    /// starts sealed and `key` is ignored.
    pub async fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        key: Option<KeyMaterial>,
    ) -> Result<Arc<Self>, CoreError> {
        let seal_json = store
            .get_meta(META_SEAL)
            .await?
            .ok_or_else(|| CoreError::invalid("store", "not initialised; run `keyward init`"))?;
        let seal = SealConfig::from_json(&seal_json).map_err(seal_err)?;
        let master = match (&seal, key) {
            (SealConfig::Keyfile, Some(k)) => Some(Arc::new(k)),
            (SealConfig::Keyfile, None) => {
                return Err(CoreError::invalid("seal", "this instance needs its master key file"));
            }
            (SealConfig::Passphrase { .. }, _) => None,
        };
        let vault = Arc::new(Self {
            audit: AuditWriter::spawn(store.clone()),
            store,
            clock,
            seal,
            master: RwLock::new(None),
            unseal_lock: Mutex::new(()),
            recent_verify: std::sync::Mutex::new(None),
            verify_walk: Mutex::new(()),
            cache: Cache::new(),
            expiring_window_secs: std::sync::atomic::AtomicI64::new(DEFAULT_EXPIRING_WINDOW.whole_seconds()),
            uses: Default::default(),
            policy_epoch: tokio::sync::watch::Sender::new(0),
            failures: Default::default(),
            password_work: tokio::sync::Semaphore::new(PASSWORD_WORK),
            notifier: std::sync::OnceLock::new(),
            reminded: Default::default(),
            rotation: RotationState::default(),
            signer: RwLock::new(None),
            gate: std::sync::OnceLock::new(),
            anomalies: Default::default(),
        });
        if let Some(mut changes) = vault.store.watch_changes() {
            let weak = Arc::downgrade(&vault);
            tokio::spawn(async move {
                loop {
                    let news = changes.recv().await;
                    let Some(v) = weak.upgrade() else { break };
                    match news {
                        Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            v.cache.invalidate_policy()
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
        }
        if let Some(m) = master {
            vault.check_master(&m).await?;
            *vault.master.write().unwrap_or_else(|e| e.into_inner()) = Some(m);
        }
        Ok(vault)
    }

    /// A master key that does not open the orgs' data keys is the wrong key.
    async fn check_master(&self, master: &KeyMaterial) -> Result<(), CoreError> {
        let org = self
            .store
            .org_by_name(DEFAULT_ORG)
            .await?
            .ok_or_else(|| CoreError::invalid("store", "the default organization is missing"))?;
        master.open(&org.wrapped_key, &data_key_aad(&org.org.id)).map(|_| ()).map_err(|_| {
            CoreError::invalid("master key", "does not match this database (wrong key file or passphrase)")
        })
    }

    /// Where notifications go (webhooks); set once at start.
    /// Installs the required-sink gate: while it refuses, every use of a
    /// secret is refused (and audited as such).
    pub fn set_access_gate(&self, g: Arc<dyn crate::notify::AccessGate>) {
        let _ = self.gate.set(g);
    }

    pub fn set_notifier(&self, n: Arc<dyn crate::notify::Notifier>) {
        let _ = self.notifier.set(n);
    }

    fn emit(&self, event: &str, org_id: &str, data: serde_json::Value) {
        if let Some(n) = self.notifier.get() {
            n.send(crate::notify::Notification { event: event.into(), org_id: org_id.into(), time: self.now(), data });
        }
    }

    /// Emits `event` for `subject` at most once per `every_days` (0: once).
    fn remind(&self, subject: &str, event: &'static str, every_days: i64, org_id: &str, data: serde_json::Value) {
        let day = self.now().unix_timestamp() / 86_400;
        let mut sent = self.reminded.lock().unwrap_or_else(|e| e.into_inner());
        let key = (subject.to_owned(), event);
        let due = match sent.get(&key) {
            None => true,
            Some(last) => every_days > 0 && day - last >= every_days,
        };
        if due {
            sent.insert(key, day);
            drop(sent);
            self.emit(event, org_id, data);
        }
    }

    /// Looks at every lifetime and sends what is due: `secret.expiring`
    /// (daily while in the window), `secret.expired` (once),
    /// `secret.rotation_overdue` (daily), `agent.token_expiring` (daily).
    pub async fn scan_lifetimes(&self) -> Result<(), CoreError> {
        if self.notifier.get().is_none() {
            return Ok(());
        }
        let now = self.now();
        let window = self.expiring_window();
        for org in self.store.list_orgs().await? {
            for secret in self.store.list_secrets(&org.id).await? {
                let current = self.store.current_version(&secret.id).await?;
                let status = secret_status(&secret, current.as_ref(), now, window);
                let data = serde_json::json!({"secret": secret.name, "id": secret.id,
                    "expires_at": secret.expires_at.map(|t| t.unix_timestamp()),
                    "version": current.as_ref().map(|v| v.version)});
                match status {
                    "expiring" => self.remind(&secret.id, "secret.expiring", 1, &org.id, data),
                    "expired" => self.remind(&secret.id, "secret.expired", 0, &org.id, data),
                    "rotation_overdue" => self.remind(&secret.id, "secret.rotation_overdue", 1, &org.id, data),
                    _ => {}
                }
            }
        }
        for (agent, token) in self.store.expiring_agent_tokens(now + window).await? {
            if token.expires_at.is_some_and(|e| e > now) {
                let data = serde_json::json!({"agent": agent.name, "id": agent.id, "token_id": token.id,
                    "expires_at": token.expires_at.map(|t| t.unix_timestamp())});
                self.remind(&token.id, "agent.token_expiring", 1, &agent.org_id, data);
            }
        }
        Ok(())
    }

    fn policy_changed(&self) {
        self.cache.invalidate_policy();
        self.policy_epoch.send_modify(|e| *e += 1);
    }

    /// Changes whenever policy may have changed.
    pub fn watch_policy(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policy_epoch.subscribe()
    }

    /// Whether an ongoing use (an open proxy stream or WebSocket) may go on:
    /// the agent is still enabled, still granted proxy use, and the version
    /// it uses is still current. Read from the store, not the caches.
    pub async fn still_allowed(&self, record: &UseRecord) -> Result<bool, CoreError> {
        let Some(agent_id) = record.actor.id.as_deref() else { return Ok(false) };
        let agent = self.store.find_agent(&record.org_id, agent_id).await?;
        if agent.is_none_or(|a| a.disabled) {
            return Ok(false);
        }
        let now = self.now();
        let grant = self.store.find_grant(agent_id, &record.secret_id).await?;
        if !grant.is_some_and(|g| g.modes.proxy && g.expires_at.is_none_or(|e| e > now)) {
            return Ok(false);
        }
        let version = self.store.get_version(&record.secret_id, record.version).await?;
        Ok(version.is_some_and(|v| v.state == VersionState::Current && v.expires_at.is_none_or(|e| e > now)))
    }

    pub fn expiring_window(&self) -> time::Duration {
        time::Duration::seconds(self.expiring_window_secs.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set_expiring_window(&self, window: time::Duration) {
        self.expiring_window_secs.store(window.whole_seconds(), std::sync::atomic::Ordering::Relaxed);
    }

    fn count_use(&self, mode: UseMode, allowed: bool) {
        let i = match (mode, allowed) {
            (UseMode::Reveal, true) => 0,
            (UseMode::Reveal, false) => 1,
            (UseMode::Proxy, true) => 2,
            (UseMode::Proxy, false) => 3,
        };
        self.uses[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prometheus text exposition: secrets by status (the orgs the caller
    /// sees) and uses since start by mode and outcome. Counts only: no
    /// names, no values. Needs a human token (Prometheus: `bearer_token`).
    pub async fn metrics(&self, p: &Principal) -> Result<String, CoreError> {
        self.ensure_unsealed()?;
        let mut by_status = std::collections::BTreeMap::new();
        let now = self.now();
        for org in self.list_orgs(p).await? {
            for secret in self.store.list_secrets(&org.id).await? {
                let current = self.store.current_version(&secret.id).await?;
                let status = secret_status(&secret, current.as_ref(), now, self.expiring_window());
                *by_status.entry(status).or_insert(0u64) += 1;
            }
        }
        let mut out = String::from("# HELP keyward_secrets Secrets by status.\n# TYPE keyward_secrets gauge\n");
        for status in STATUSES {
            out.push_str(&format!("keyward_secrets{{status=\"{status}\"}} {}\n", by_status.get(status).unwrap_or(&0)));
        }
        out.push_str("# HELP keyward_uses_total Uses of secrets since start, by mode and outcome.\n# TYPE keyward_uses_total counter\n");
        for (i, (mode, outcome)) in
            [("reveal", "allowed"), ("reveal", "denied"), ("proxy", "allowed"), ("proxy", "denied")].iter().enumerate()
        {
            let n = self.uses[i].load(std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!("keyward_uses_total{{mode=\"{mode}\",outcome=\"{outcome}\"}} {n}\n"));
        }
        Ok(out)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn is_sealed(&self) -> bool {
        self.master.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    pub async fn status(&self) -> Result<Status, CoreError> {
        Ok(Status {
            initialized: true,
            sealed: self.is_sealed(),
            seal: self.seal.kind(),
            backend: self.store.backend(),
            version: env!("CARGO_PKG_VERSION"),
        })
    }

    fn master(&self) -> Result<Arc<KeyMaterial>, CoreError> {
        self.master.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or(CoreError::Sealed)
    }

    fn ensure_unsealed(&self) -> Result<(), CoreError> {
        self.master().map(|_| ())
    }

    /// Unseals a passphrase-sealed vault. Attempts are serialised (each costs
    /// one Argon2id derivation) and every one is audited.
    pub async fn unseal(&self, passphrase: &str, meta: &RequestMeta) -> Result<bool, CoreError> {
        let _one_at_a_time = self.unseal_lock.lock().await;
        if !self.is_sealed() {
            return Ok(false);
        }
        // Past the failure limit no guess is tried, the right one included.
        if self.failures.over_limit(meta.source_ip.as_deref()) {
            return Err(CoreError::RateLimited);
        }
        let cfg = self.seal.clone();
        let pass = Zeroizing::new(passphrase.to_owned());
        let result = tokio::task::spawn_blocking(move || cfg.unseal_with_passphrase(&pass))
            .await
            .map_err(|e| CoreError::invalid("unseal", e.to_string()))?;
        let now = self.now();
        match result {
            Ok(master) => {
                self.check_master(&master).await?;
                self.audit_now(AuditDraft {
                    actor: Actor::anonymous(),
                    action: "sys.unseal".into(),
                    ..draft_base(now, Outcome::Allowed, meta)
                })
                .await?;
                *self.master.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(master));
                Ok(true)
            }
            Err(e) => {
                let err = seal_err(e);
                self.audit_failure(AuditDraft {
                    actor: Actor::anonymous(),
                    action: "sys.unseal".into(),
                    reason: Some(err.code().into()),
                    ..draft_base(now, Outcome::Denied, meta)
                })
                .await?;
                Err(err)
            }
        }
    }

    /// Audits a failed authentication, unless its source is over the
    /// failure rate limit (then refuses with 429, summarised once a burst).
    async fn audit_failure(&self, draft: AuditDraft) -> Result<(), CoreError> {
        match self.failures.failure(draft.source_ip.as_deref()) {
            crate::limiter::Verdict::Allow => self.audit_now(draft).await.map(|_| ()),
            crate::limiter::Verdict::Limited { first } => {
                if first {
                    let summary = AuditDraft {
                        action: "auth.rate_limited".into(),
                        reason: Some(format!("failed attempts over the limit; last: {}", draft.action)),
                        ..draft
                    };
                    self.audit_now(summary).await?;
                }
                Err(CoreError::RateLimited)
            }
        }
    }

    /// Writes one event and waits for its commit; failure refuses the access.
    async fn audit_now(&self, draft: AuditDraft) -> Result<i64, CoreError> {
        let watched = matches!(draft.action.as_str(), "secret.resolve" | "secret.proxy") && draft.actor.kind == "agent";
        if !watched || self.anomalies.tx.get().is_none() {
            return self.audit.append(draft).await.map_err(CoreError::AuditUnavailable);
        }
        let copy = draft.clone();
        let seq = self.audit.append(draft).await.map_err(CoreError::AuditUnavailable)?;
        self.feed_detector(copy, seq);
        Ok(seq)
    }

    // ---- authentication -------------------------------------------------

    /// Authenticates a human/admin token. Failures are audited.
    pub async fn authenticate_user(&self, presented: &str, meta: &RequestMeta) -> Result<Principal, CoreError> {
        self.ensure_unsealed()?;
        let reason = match token::parse(presented) {
            Err(_) => "invalid_token",
            Ok(TokenKind::Agent) => "wrong_token_kind",
            Ok(TokenKind::User) => {
                let hash = token::hash_token(presented);
                match self.store.user_token_by_hash(&hash).await? {
                    Some(t) if token::hashes_equal(&t.hash, &hash) => {
                        if t.expires_at.is_some_and(|e| e <= self.now()) {
                            "token_expired"
                        } else {
                            return Ok(Principal { token_id: t.id, name: t.name, org_id: t.org_id, role: t.role });
                        }
                    }
                    _ => "unknown_token",
                }
            }
        };
        self.audit_failure(AuditDraft {
            actor: Actor::anonymous(),
            action: "auth.user".into(),
            reason: Some(reason.into()),
            ..draft_base(self.now(), Outcome::Denied, meta)
        })
        .await?;
        Err(CoreError::Unauthenticated { reason })
    }

    async fn agent_for_token(
        &self,
        presented: &str,
        source_ip: Option<&str>,
    ) -> Result<Result<(Agent, AgentToken), (&'static str, Option<(Agent, AgentToken)>)>, CoreError> {
        match token::parse(presented) {
            Err(_) => return Ok(Err(("invalid_token", None))),
            Ok(TokenKind::User) => return Ok(Err(("wrong_token_kind", None))),
            Ok(TokenKind::Agent) => {}
        }
        let hash = token::hash_token(presented);
        let found = match self.cache.agents.get(&hash) {
            Ok(hit) => Some(hit),
            Err(generation) => {
                let row = self.store.agent_by_token_hash(&hash).await?;
                if let Some(r) = &row {
                    self.cache.agents.fill(generation, hash, r.clone());
                }
                row
            }
        };
        let Some((agent, tok)) = found.filter(|(_, t)| token::hashes_equal(&t.hash, &hash)) else {
            return Ok(Err(("unknown_token", None)));
        };
        // A known token that may no longer be used: the denial names its
        // agent (a dead token in use is worth an alert).
        let dead = if tok.revoked {
            Some("token_revoked")
        } else if tok.expires_at.is_some_and(|e| e <= self.now()) {
            Some("token_expired")
        } else if agent.disabled {
            Some("agent_disabled")
        } else {
            None
        };
        if let Some(reason) = dead {
            return Ok(Err((reason, Some((agent, tok)))));
        }
        if !agent.allow_from.is_empty() {
            let ip = source_ip.and_then(|s| s.parse::<std::net::IpAddr>().ok());
            let inside = ip
                .is_some_and(|ip| agent.allow_from.iter().filter_map(|c| Cidr::parse(c).ok()).any(|c| c.contains(ip)));
            if !inside {
                return Ok(Err(("source_not_allowed", Some((agent, tok)))));
            }
        }
        Ok(Ok((agent, tok)))
    }

    async fn cached_secret(
        &self,
        org_id: &str,
        reference: &str,
    ) -> Result<Option<(Secret, Option<SecretVersion>)>, CoreError> {
        let key = (org_id.to_owned(), reference.to_owned());
        match self.cache.secrets.get(&key) {
            Ok(hit) => Ok(Some(hit)),
            Err(generation) => {
                let Some(secret) = self.store.find_secret(org_id, reference).await? else {
                    return Ok(None);
                };
                let current = self.store.current_version(&secret.id).await?;
                let entry = (secret, current);
                self.cache.secrets.fill(generation, key, entry.clone());
                Ok(Some(entry))
            }
        }
    }

    async fn cached_grant(&self, agent_id: &str, secret_id: &str) -> Result<Option<Grant>, CoreError> {
        let key = (agent_id.to_owned(), secret_id.to_owned());
        match self.cache.grants.get(&key) {
            Ok(hit) => Ok(hit),
            Err(generation) => {
                let g = self.store.find_grant(agent_id, secret_id).await?;
                self.cache.grants.fill(generation, key, g.clone());
                Ok(g)
            }
        }
    }

    async fn data_key(&self, org_id: &str) -> Result<Arc<KeyMaterial>, CoreError> {
        match self.cache.data_keys.get(&org_id.to_owned()) {
            Ok(k) => Ok(k),
            Err(generation) => {
                let master = self.master()?;
                let org = self.store.org_by_id(org_id).await?.ok_or_else(|| not_found("organization"))?;
                let raw = master.open(&org.wrapped_key, &data_key_aad(org_id))?;
                let key = Arc::new(
                    KeyMaterial::from_slice(&raw).ok_or(crate::crypto::CryptoError::Malformed("data key length"))?,
                );
                self.cache.data_keys.fill(generation, org_id.to_owned(), key.clone());
                Ok(key)
            }
        }
    }

    // ---- the choke point -------------------------------------------------

    /// The only path to a plaintext value: authenticate the agent, check its
    /// grant, commit the audit record, then decrypt. Every attempt, allowed or
    /// denied, is audited; if the record cannot be written nothing is released.
    ///
    /// Not granted and not found look the same to the agent (`not_found`).
    /// `version`: a reveal-mode consumer may ask for the previous version
    /// while its grace period lasts; `None` is the current one.
    pub async fn use_secret(
        &self,
        presented_token: &str,
        secret_ref: &str,
        mode: UseMode,
        version: Option<i64>,
        meta: &RequestMeta,
    ) -> Result<Released, CoreError> {
        self.ensure_unsealed()?;
        let now = self.now();
        let mut draft = AuditDraft {
            action: mode.action().into(),
            secret_name: Some(clean_free_text(secret_ref)),
            ..draft_base(now, Outcome::Denied, meta)
        };
        let (agent, tok) = match self.agent_for_token(presented_token, meta.source_ip.as_deref()).await? {
            Ok(found) => found,
            Err((reason, known)) => {
                self.count_use(mode, false);
                self.audit_token_refusal(draft, reason, known).await?;
                return Err(CoreError::Unauthenticated { reason });
            }
        };
        draft.org_id = Some(agent.org_id.clone());
        draft.actor = agent_actor(&agent, &tok);
        let decision = self.decide(&agent, secret_ref, mode, version, now).await?;
        let (secret, version) = match decision {
            Ok(found) => found,
            Err((secret, err)) => {
                if let Some(s) = secret {
                    draft.secret_id = Some(s.id.clone());
                    draft.secret_name = Some(s.name);
                }
                draft.reason = Some(err.0.into());
                self.count_use(mode, false);
                self.audit_now(draft).await?;
                return Err(err.1);
            }
        };
        draft.secret_id = Some(secret.id.clone());
        draft.secret_name = Some(secret.name.clone());
        draft.secret_version = Some(version.version);
        if let Some(reason) = self.gate.get().and_then(|g| g.refusal()) {
            draft.reason = Some(reason.into());
            self.count_use(mode, false);
            self.audit_now(draft).await?;
            return Err(CoreError::AuditSinkDown(reason));
        }
        draft.outcome = Outcome::Allowed;
        // Proxy targets ("METHOD /path") gain the origin the key goes to.
        draft.reason = meta.target.as_deref().map(|t| match (mode, t.split_once(' '), &secret.upstream) {
            (UseMode::Proxy, Some((method, path)), Some(origin)) => {
                clean_free_text(&format!("{method} {origin}{path}"))
            }
            _ => clean_free_text(t),
        });
        let record = UseRecord {
            org_id: agent.org_id.clone(),
            actor: draft.actor.clone(),
            secret_id: secret.id.clone(),
            secret_name: secret.name.clone(),
            version: version.version,
        };
        let audit_seq = self.audit_now(draft).await?;
        self.count_use(mode, true);
        let value = self.decrypt_version(&secret, &version).await?;
        Ok(Released { secret, version: version.version, audit_seq, value, record })
    }

    /// Audits a use refused before any secret was looked at (a malformed
    /// proxy path, an unsupported upgrade): a denied use with `reason` and
    /// the request's target, naming the agent if its token is valid; a bad
    /// token is audited as [`use_secret`](Self::use_secret) audits it. An
    /// error is an audit failure (or the failure rate limit): the caller
    /// refuses with it instead.
    pub async fn audit_refused_use(
        &self,
        presented_token: &str,
        mode: UseMode,
        reason: &'static str,
        meta: &RequestMeta,
    ) -> Result<(), CoreError> {
        self.ensure_unsealed()?;
        let draft = AuditDraft { action: mode.action().into(), ..draft_base(self.now(), Outcome::Denied, meta) };
        self.count_use(mode, false);
        match self.agent_for_token(presented_token, meta.source_ip.as_deref()).await? {
            Ok((agent, tok)) => {
                let target = meta.target.as_deref().unwrap_or("-");
                let draft = AuditDraft {
                    org_id: Some(agent.org_id.clone()),
                    actor: agent_actor(&agent, &tok),
                    reason: Some(clean_free_text(&format!("{reason}: {target}"))),
                    ..draft
                };
                self.audit_now(draft).await.map(|_| ())
            }
            Err((token_reason, known)) => self.audit_token_refusal(draft, token_reason, known).await,
        }
    }

    /// Audits a use whose token was refused (the agent named if the token
    /// is one of its dead ones), under the failure rate limit.
    async fn audit_token_refusal(
        &self,
        mut draft: AuditDraft,
        reason: &'static str,
        known: Option<(Agent, AgentToken)>,
    ) -> Result<(), CoreError> {
        draft.actor = Actor::anonymous();
        if let Some((agent, tok)) = known {
            draft.org_id = Some(agent.org_id.clone());
            draft.actor = agent_actor(&agent, &tok);
        }
        draft.reason = Some(reason.into());
        self.audit_failure(draft).await
    }

    /// Completes the trail of a proxied use once its answer is over: status,
    /// bytes, latency (`detail`). The use itself was audited before the key
    /// left; this event cannot be fail-closed any more, so it is queued for
    /// the next commit and nothing waits on it (the audit writer logs a
    /// failure).
    pub fn record_proxy_outcome(&self, record: &UseRecord, meta: &RequestMeta, ok: bool, detail: String) {
        let draft = AuditDraft {
            org_id: Some(record.org_id.clone()),
            actor: record.actor.clone(),
            action: "secret.proxy.done".into(),
            secret_id: Some(record.secret_id.clone()),
            secret_name: Some(record.secret_name.clone()),
            secret_version: Some(record.version),
            reason: Some(clean_free_text(&detail)),
            ..draft_base(self.now(), if ok { Outcome::Allowed } else { Outcome::Error }, meta)
        };
        self.audit.append_detached(draft);
    }

    /// Policy for one use: `Ok` with what to release, or the audit reason and
    /// the error the agent sees.
    #[allow(clippy::type_complexity)]
    async fn decide(
        &self,
        agent: &Agent,
        secret_ref: &str,
        mode: UseMode,
        version: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<Result<(Secret, SecretVersion), (Option<Secret>, (&'static str, CoreError))>, CoreError> {
        let hidden = || not_found("secret");
        let Some((secret, current)) = self.cached_secret(&agent.org_id, secret_ref).await? else {
            return Ok(Err((None, ("no_such_secret", hidden()))));
        };
        let Some(grant) = self.cached_grant(&agent.id, &secret.id).await? else {
            return Ok(Err((Some(secret), ("no_grant", hidden()))));
        };
        if grant.expires_at.is_some_and(|e| e <= now) {
            return Ok(Err((
                Some(secret),
                ("grant_expired", forbidden("grant_expired", "the grant for this secret has expired")),
            )));
        }
        let allowed = match mode {
            UseMode::Reveal => grant.modes.reveal,
            UseMode::Proxy => grant.modes.proxy,
        };
        if !allowed {
            let code = match mode {
                UseMode::Reveal => "reveal_not_granted",
                UseMode::Proxy => "proxy_not_granted",
            };
            return Ok(Err((Some(secret), (code, forbidden(code, "the grant does not allow this mode of use")))));
        }
        let expired = || ("secret_expired", forbidden("secret_expired", "the secret has expired"));
        if secret.expires_at.is_some_and(|e| e <= now) {
            return Ok(Err((Some(secret), expired())));
        }
        let chosen = match (version, current) {
            (None, Some(v)) if v.state == VersionState::Current => v,
            (Some(n), Some(v)) if v.state == VersionState::Current && v.version == n => v,
            (None, _) => {
                let code = "no_current_version";
                return Ok(Err((Some(secret), (code, forbidden(code, "the secret has no usable version (revoked)")))));
            }
            (Some(n), _) => {
                let previous = self.store.get_version(&secret.id, n).await?.filter(|v| {
                    mode == UseMode::Reveal
                        && v.state == VersionState::Previous
                        && v.grace_until.is_some_and(|g| g > now)
                });
                match previous {
                    Some(v) => v,
                    None => {
                        let code = "version_not_usable";
                        let why =
                            "that version is not current, nor a previous one within its grace period (reveal only)";
                        return Ok(Err((Some(secret), (code, forbidden(code, why)))));
                    }
                }
            }
        };
        if chosen.expires_at.is_some_and(|e| e <= now) {
            return Ok(Err((Some(secret), expired())));
        }
        Ok(Ok((secret, chosen)))
    }

    /// Decrypts a version. Private: reachable only through [`Self::use_secret`].
    async fn decrypt_version(&self, secret: &Secret, v: &SecretVersion) -> Result<SecretValue, CoreError> {
        let dek = self.data_key(&secret.org_id).await?;
        let plain = dek.open(&v.ciphertext, &value_aad(&secret.org_id, &secret.id, v.version))?;
        Ok(SecretValue(plain))
    }

    async fn encrypt_version(
        &self,
        secret: &Secret,
        version: i64,
        value: &SecretValue,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<SecretVersion, CoreError> {
        let dek = self.data_key(&secret.org_id).await?;
        let ciphertext = dek.seal(value.expose_bytes(), &value_aad(&secret.org_id, &secret.id, version))?;
        Ok(SecretVersion {
            secret_id: secret.id.clone(),
            version,
            state: VersionState::Current,
            ciphertext,
            fingerprint: fingerprint_prefix(value.expose_bytes()),
            created_at: self.now(),
            revoked_at: None,
            grace_until: None,
            expires_at,
        })
    }

    // ---- admin operations ------------------------------------------------

    /// Finds the org a principal acts in. An org the principal may not see
    /// is reported as not found.
    async fn org_for(&self, p: &Principal, org: &str) -> Result<Org, CoreError> {
        let rec = match self.store.org_by_name(org).await? {
            Some(r) => Some(r),
            None if org.starts_with("org_") => self.store.org_by_id(org).await?,
            None => None,
        };
        match rec {
            Some(r) if p.org_id.as_deref().is_none_or(|o| o == r.org.id) => Ok(r.org),
            _ => Err(not_found("organization")),
        }
    }

    /// Authorises an admin action and writes its audit record before it runs.
    async fn authorize(&self, p: &Principal, org: &str, min: Role, draft: AuditDraft) -> Result<Org, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let mut draft = AuditDraft { org_id: Some(org.id.clone()), actor: p.actor(), ..draft };
        if p.role < min {
            draft.outcome = Outcome::Denied;
            draft.reason = Some("insufficient_role".into());
            self.audit_now(draft).await?;
            return Err(forbidden("insufficient_role", format!("this needs the {} role or higher", min.as_str())));
        }
        draft.outcome = Outcome::Allowed;
        self.audit_now(draft).await?;
        Ok(org)
    }

    fn admin_draft(&self, action: &str, secret: Option<&str>, meta: &RequestMeta) -> AuditDraft {
        AuditDraft {
            action: action.into(),
            secret_name: secret.map(clean_free_text),
            ..draft_base(self.now(), Outcome::Allowed, meta)
        }
    }

    pub async fn create_org(&self, p: &Principal, name: &str, meta: &RequestMeta) -> Result<Org, CoreError> {
        self.ensure_unsealed()?;
        validate_name("organization name", name)?;
        let mut draft = AuditDraft {
            actor: p.actor(),
            reason: Some(format!("org={name}")),
            ..self.admin_draft("org.create", None, meta)
        };
        if p.org_id.is_some() || p.role != Role::Owner {
            draft.outcome = Outcome::Denied;
            self.audit_now(draft).await?;
            return Err(forbidden("insufficient_role", "only the operator token can create organizations"));
        }
        let org = Org { id: new_id("org"), name: name.into(), created_at: self.now() };
        draft.org_id = Some(org.id.clone());
        self.audit_now(draft).await?;
        let dek = KeyMaterial::generate()?;
        let wrapped_key = self.master()?.seal(dek.expose(), &data_key_aad(&org.id))?;
        self.store.create_org(&OrgRecord { org: org.clone(), wrapped_key }).await.map_err(dup("organization"))?;
        Ok(org)
    }

    pub async fn list_orgs(&self, p: &Principal) -> Result<Vec<Org>, CoreError> {
        self.ensure_unsealed()?;
        let all = self.store.list_orgs().await?;
        Ok(all.into_iter().filter(|o| p.org_id.as_deref().is_none_or(|id| id == o.id)).collect())
    }

    /// Mints a human token in an org (owners only). Shown once.
    pub async fn create_user_token(
        &self,
        p: &Principal,
        org: &str,
        name: &str,
        role: Role,
        expires_at: Option<OffsetDateTime>,
        meta: &RequestMeta,
    ) -> Result<(String, Token), CoreError> {
        validate_name("token name", name)?;
        let draft = AuditDraft {
            reason: Some(format!("name={name} role={}", role.as_str())),
            ..self.admin_draft("token.create", None, meta)
        };
        let org = self.authorize(p, org, Role::Owner, draft).await?;
        let token = Token::generate(TokenKind::User)?;
        let t = UserToken {
            id: new_id("utk"),
            org_id: Some(org.id),
            name: name.into(),
            role,
            hash: token.hash(),
            created_at: self.now(),
            expires_at,
        };
        self.store.create_user_token(&t).await?;
        Ok((t.id, token))
    }

    pub async fn put_secret(
        &self,
        p: &Principal,
        org: &str,
        new: NewSecret,
        value: SecretValue,
        meta: &RequestMeta,
    ) -> Result<SecretInfo, CoreError> {
        validate_name("secret name", &new.name)?;
        let provider = Provider::parse(new.provider.as_deref().unwrap_or("generic"))?;
        let upstream = match new.upstream.as_deref() {
            Some(u) => Some(validate_origin(u)?),
            None => provider.default_upstream().map(str::to_owned),
        };
        let tags = validate_tags(new.tags)?;
        let description = new.description.map(|d| validate_text("description", d)).transpose()?;
        let inject = match new.inject {
            Some(i) if provider == Provider::Generic => Some(Injection::parse(&i).map(|_| i)?),
            Some(_) => return Err(CoreError::invalid("inject", "only generic secrets take an injection rule")),
            None => None,
        };
        let now = self.now();
        if new.expires_at.is_some_and(|e| e <= now) {
            return Err(CoreError::invalid("expires", "is in the past"));
        }
        if let Some(a) = &new.auto_rotation {
            a.validate()?;
            self.driver_for(&a.hook)?;
            if a.verify.is_some() && upstream.is_none() {
                return Err(CoreError::invalid("verify", "the secret is bound to no upstream to probe"));
            }
        }
        let draft = AuditDraft { secret_version: Some(1), ..self.admin_draft("secret.put", Some(&new.name), meta) };
        let org = self.authorize(p, org, Role::Admin, draft).await?;
        if self.store.find_secret(&org.id, &new.name).await?.is_some() {
            return Err(CoreError::Conflict {
                message: format!("secret `{}` already exists; use `secret rotate`", new.name),
            });
        }
        let secret = Secret {
            id: new_id("sec"),
            org_id: org.id.clone(),
            name: new.name,
            provider: provider.as_str().into(),
            upstream,
            allow_internal: new.allow_internal,
            inject,
            rotate_every_secs: new.rotate_every.map(|d| d.whole_seconds()),
            auto_rotation: new.auto_rotation,
            description,
            tags,
            expires_at: new.expires_at,
            created_at: now,
            updated_at: now,
        };
        check_injectable(&secret, &value)?;
        let v1 = self.encrypt_version(&secret, 1, &value, None).await?;
        self.store.create_secret(&secret, &v1).await.map_err(dup("secret"))?;
        self.policy_changed();
        self.secret_info_of(secret).await
    }

    async fn find_secret_in(&self, org: &Org, reference: &str) -> Result<Secret, CoreError> {
        self.store.find_secret(&org.id, reference).await?.ok_or_else(|| not_found("secret"))
    }

    async fn secret_info_of(&self, secret: Secret) -> Result<SecretInfo, CoreError> {
        let versions = self.store.list_versions(&secret.id).await?;
        let grants = self.store.list_grants(&secret.org_id, None, Some(&secret.id)).await?;
        let mut last_used = None;
        for action in ["secret.resolve", "secret.proxy"] {
            let q = AuditQuery {
                org_id: Some(secret.org_id.clone()),
                secret: Some(secret.id.clone()),
                outcome: Some(Outcome::Allowed),
                action: Some(action.into()),
                limit: 1,
                ..AuditQuery::default()
            };
            let t = self.store.query_audit(&q).await?.first().map(|r| r.event.time);
            last_used = last_used.max(t);
        }
        let current = versions.iter().find(|v| v.state == VersionState::Current);
        Ok(SecretInfo {
            status: secret_status(&secret, current, self.now(), self.expiring_window()),
            current_version: current.map(|v| v.version),
            versions: versions.iter().map(VersionInfo::from).collect(),
            secret,
            grants,
            last_used,
        })
    }

    pub async fn list_secrets(&self, p: &Principal, org: &str) -> Result<Vec<SecretInfo>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let mut out = Vec::new();
        for s in self.store.list_secrets(&org.id).await? {
            out.push(self.secret_info_of(s).await?);
        }
        Ok(out)
    }

    pub async fn show_secret(&self, p: &Principal, org: &str, reference: &str) -> Result<SecretInfo, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let s = self.find_secret_in(&org, reference).await?;
        self.secret_info_of(s).await
    }

    /// Adds a new current version; the previous one is revoked.
    /// A new version: `grace` keeps the replaced one usable by reveal-mode
    /// consumers for that long (proxy use switches at once); `expires` ends
    /// the new version's life.
    #[allow(clippy::too_many_arguments)]
    pub async fn rotate_secret(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        value: SecretValue,
        grace: Option<time::Duration>,
        expires: Option<OffsetDateTime>,
        meta: &RequestMeta,
    ) -> Result<SecretInfo, CoreError> {
        self.ensure_unsealed()?;
        let now = self.now();
        if expires.is_some_and(|e| e <= now) {
            return Err(CoreError::invalid("expires", "is in the past"));
        }
        let org_rec = self.org_for(p, org).await?;
        let secret = self.find_secret_in(&org_rec, reference).await?;
        // Not while an automated rotation of it runs: both would number and
        // promote versions from the same current one.
        let _claim = self.claim_rotation(&secret.id)?;
        let next = self.store.list_versions(&secret.id).await?.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let draft = AuditDraft {
            secret_id: Some(secret.id.clone()),
            secret_version: Some(next),
            reason: grace.map(|g| format!("grace={}s", g.whole_seconds())),
            ..self.admin_draft("secret.rotate", Some(&secret.name), meta)
        };
        check_injectable(&secret, &value)?;
        self.authorize(p, org, Role::Admin, draft).await?;
        let v = self.encrypt_version(&secret, next, &value, expires).await?;
        self.store.rotate_secret(&v, now, grace.map(|g| now + g)).await.map_err(dup("version"))?;
        self.policy_changed();
        self.emit(
            "secret.rotated",
            &secret.org_id,
            serde_json::json!({"secret": secret.name, "id": secret.id, "version": next,
                "grace_until": grace.map(|g| (now + g).unix_timestamp()), "by": p.name}),
        );
        self.secret_info_of(secret).await
    }

    /// Makes the previous version current again (a new key turned out
    /// wrong), only while the previous one is within its grace period.
    pub async fn rollback_secret(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        meta: &RequestMeta,
    ) -> Result<SecretInfo, CoreError> {
        let secret = self.secret_action(p, org, reference, "secret.rollback", None, meta).await?;
        let restored = self.store.rollback_secret(&secret.id, self.now()).await?;
        self.policy_changed();
        if restored.is_none() {
            return Err(CoreError::Conflict {
                message: "no previous version to roll back to (none, or its grace period is over)".into(),
            });
        }
        self.secret_info_of(secret).await
    }

    /// Revokes previous versions whose grace period is over. The server
    /// runs this every second; uses also check the time themselves.
    pub async fn sweep(&self) -> Result<u64, CoreError> {
        let n = self.store.expire_grace(self.now()).await?;
        if n > 0 {
            self.policy_changed();
            self.audit_now(AuditDraft {
                actor: Actor::system(),
                action: "secret.grace_expired".into(),
                reason: Some(format!("{n} previous version(s) revoked")),
                ..draft_base(self.now(), Outcome::Allowed, &RequestMeta::default())
            })
            .await?;
        }
        Ok(n)
    }

    /// Finds a secret of `org` and authorises an admin action on it, writing
    /// the action's audit record first.
    async fn secret_action(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        action: &str,
        version: Option<i64>,
        meta: &RequestMeta,
    ) -> Result<Secret, CoreError> {
        self.ensure_unsealed()?;
        let org_rec = self.org_for(p, org).await?;
        let secret = self.find_secret_in(&org_rec, reference).await?;
        let draft = AuditDraft {
            secret_id: Some(secret.id.clone()),
            secret_version: version,
            ..self.admin_draft(action, Some(&secret.name), meta)
        };
        self.authorize(p, org, Role::Admin, draft).await?;
        Ok(secret)
    }

    pub async fn revoke_secret(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        version: Option<i64>,
        meta: &RequestMeta,
    ) -> Result<SecretInfo, CoreError> {
        let secret = self.secret_action(p, org, reference, "secret.revoke", version, meta).await?;
        let changed = self.store.revoke_versions(&secret.id, version, self.now()).await?;
        self.policy_changed();
        if changed == 0 && version.is_some() {
            return Err(not_found("active version"));
        }
        self.secret_info_of(secret).await
    }

    pub async fn delete_secret(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        meta: &RequestMeta,
    ) -> Result<(), CoreError> {
        let secret = self.secret_action(p, org, reference, "secret.delete", None, meta).await?;
        self.store.delete_secret(&secret.id).await?;
        self.policy_changed();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create_agent(
        &self,
        p: &Principal,
        org: &str,
        name: &str,
        description: Option<String>,
        token_ttl: Option<time::Duration>,
        allow_from: Vec<String>,
        meta: &RequestMeta,
    ) -> Result<(Agent, Token), CoreError> {
        validate_name("agent name", name)?;
        for c in &allow_from {
            Cidr::parse(c)?;
        }
        let description = description.map(|d| validate_text("description", d)).transpose()?;
        let draft =
            AuditDraft { reason: Some(format!("agent={name}")), ..self.admin_draft("agent.create", None, meta) };
        let org = self.authorize(p, org, Role::Admin, draft).await?;
        let now = self.now();
        let agent = Agent {
            id: new_id("agt"),
            org_id: org.id,
            name: name.into(),
            description,
            disabled: false,
            allow_from,
            created_at: now,
        };
        let token = Token::generate(TokenKind::Agent)?;
        let t = AgentToken {
            id: new_id("atk"),
            agent_id: agent.id.clone(),
            hash: token.hash(),
            created_at: now,
            expires_at: token_ttl.map(|d| now + d),
            revoked: false,
        };
        self.store.create_agent(&agent, &t).await.map_err(dup("agent"))?;
        Ok((agent, token))
    }

    pub async fn list_agents(&self, p: &Principal, org: &str) -> Result<Vec<Agent>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        Ok(self.store.list_agents(&org.id).await?)
    }

    pub async fn show_agent(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
    ) -> Result<(Agent, Vec<Grant>), CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let agent = self.store.find_agent(&org.id, reference).await?.ok_or_else(|| not_found("agent"))?;
        let grants = self.store.list_grants(&org.id, Some(&agent.id), None).await?;
        Ok((agent, grants))
    }

    /// When each agent's token next expires (live tokens only; an agent
    /// absent from the map has tokens that never expire).
    pub async fn agent_token_expiry(
        &self,
        p: &Principal,
        org: &str,
    ) -> Result<std::collections::HashMap<String, OffsetDateTime>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let now = self.now();
        let mut out: std::collections::HashMap<String, OffsetDateTime> = std::collections::HashMap::new();
        for (agent, tok) in self.store.expiring_agent_tokens(now + time::Duration::days(365 * 100)).await? {
            if let Some(e) = tok.expires_at.filter(|e| *e > now && agent.org_id == org.id) {
                let soonest = out.get(&agent.id).map_or(e, |x| (*x).min(e));
                out.insert(agent.id, soonest);
            }
        }
        Ok(out)
    }

    pub async fn set_agent_disabled(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        disabled: bool,
        meta: &RequestMeta,
    ) -> Result<Agent, CoreError> {
        self.ensure_unsealed()?;
        let org_rec = self.org_for(p, org).await?;
        let mut agent = self.store.find_agent(&org_rec.id, reference).await?.ok_or_else(|| not_found("agent"))?;
        let action = if disabled { "agent.disable" } else { "agent.enable" };
        let draft =
            AuditDraft { reason: Some(format!("agent={}", agent.name)), ..self.admin_draft(action, None, meta) };
        self.authorize(p, org, Role::Admin, draft).await?;
        self.store.set_agent_disabled(&agent.id, disabled).await?;
        self.policy_changed();
        agent.disabled = disabled;
        Ok(agent)
    }

    /// A new token for an agent, shown once. Its other tokens keep working
    /// for `overlap` (a rolling redeploy), or stop at once.
    pub async fn rotate_agent_token(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        overlap: Option<time::Duration>,
        meta: &RequestMeta,
    ) -> Result<(Agent, Token), CoreError> {
        self.ensure_unsealed()?;
        let org_rec = self.org_for(p, org).await?;
        let agent = self.store.find_agent(&org_rec.id, reference).await?.ok_or_else(|| not_found("agent"))?;
        let reason = format!("agent={} overlap={}s", agent.name, overlap.map_or(0, |o| o.whole_seconds()));
        let draft = AuditDraft { reason: Some(reason), ..self.admin_draft("agent.token_rotate", None, meta) };
        self.authorize(p, org, Role::Admin, draft).await?;
        let now = self.now();
        let token = Token::generate(TokenKind::Agent)?;
        let t = AgentToken {
            id: new_id("atk"),
            agent_id: agent.id.clone(),
            hash: token.hash(),
            created_at: now,
            expires_at: None,
            revoked: false,
        };
        self.store.rotate_agent_token(&t, now + overlap.unwrap_or(time::Duration::ZERO)).await?;
        self.policy_changed();
        Ok((agent, token))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn add_grant(
        &self,
        p: &Principal,
        org: &str,
        agent_ref: &str,
        secret_ref: &str,
        modes: Modes,
        expires_at: Option<OffsetDateTime>,
        meta: &RequestMeta,
    ) -> Result<Grant, CoreError> {
        self.ensure_unsealed()?;
        let org_rec = self.org_for(p, org).await?;
        let agent = self.store.find_agent(&org_rec.id, agent_ref).await?.ok_or_else(|| not_found("agent"))?;
        let secret = self.find_secret_in(&org_rec, secret_ref).await?;
        if expires_at.is_some_and(|e| e <= self.now()) {
            return Err(CoreError::invalid("expires", "is in the past"));
        }
        let draft = AuditDraft {
            secret_id: Some(secret.id.clone()),
            reason: Some(format!("agent={} modes={}", agent.name, modes.names().join(","))),
            ..self.admin_draft("grant.add", Some(&secret.name), meta)
        };
        self.authorize(p, org, Role::Admin, draft).await?;
        let grant = Grant {
            id: new_id("grt"),
            org_id: org_rec.id,
            agent_id: agent.id,
            secret_id: secret.id,
            modes,
            expires_at,
            created_at: self.now(),
        };
        self.store.put_grant(&grant).await?;
        self.policy_changed();
        Ok(grant)
    }

    pub async fn list_grants(
        &self,
        p: &Principal,
        org: &str,
        agent_ref: Option<&str>,
        secret_ref: Option<&str>,
    ) -> Result<Vec<Grant>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let agent_id = match agent_ref {
            Some(a) => Some(self.store.find_agent(&org.id, a).await?.ok_or_else(|| not_found("agent"))?.id),
            None => None,
        };
        let secret_id = match secret_ref {
            Some(s) => Some(self.find_secret_in(&org, s).await?.id),
            None => None,
        };
        Ok(self.store.list_grants(&org.id, agent_id.as_deref(), secret_id.as_deref()).await?)
    }

    pub async fn remove_grant(
        &self,
        p: &Principal,
        org: &str,
        agent_ref: &str,
        secret_ref: &str,
        meta: &RequestMeta,
    ) -> Result<(), CoreError> {
        self.ensure_unsealed()?;
        let org_rec = self.org_for(p, org).await?;
        let agent = self.store.find_agent(&org_rec.id, agent_ref).await?.ok_or_else(|| not_found("agent"))?;
        let secret = self.find_secret_in(&org_rec, secret_ref).await?;
        let draft = AuditDraft {
            secret_id: Some(secret.id.clone()),
            reason: Some(format!("agent={}", agent.name)),
            ..self.admin_draft("grant.remove", Some(&secret.name), meta)
        };
        self.authorize(p, org, Role::Admin, draft).await?;
        let removed = self.store.delete_grant(&agent.id, &secret.id).await?;
        self.policy_changed();
        if removed { Ok(()) } else { Err(not_found("grant")) }
    }

    pub async fn query_audit(
        &self,
        p: &Principal,
        org: &str,
        mut q: AuditQuery,
    ) -> Result<Vec<AuditRecord>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        q.org_id = Some(org.id);
        q.limit = q.limit.clamp(1, 1000);
        // Outcome events may be lingering for a commit to share: a reader
        // sees every event recorded before it asked.
        self.audit.flush().await;
        Ok(self.store.query_audit(&q).await?)
    }
}

fn dup(what: &'static str) -> impl Fn(StoreError) -> CoreError {
    move |e| match e {
        StoreError::Duplicate { .. } => CoreError::Conflict { message: format!("{what} already exists") },
        other => other.into(),
    }
}

/// A value the proxy may put into a header or query must not be able to
/// break out of it: no control characters (CR, LF, NUL, …). Twilio values
/// are `ACCOUNT_SID:AUTH_TOKEN` (HTTP Basic's two fields).
fn check_injectable(secret: &Secret, value: &SecretValue) -> Result<(), CoreError> {
    let injectable = secret.provider != Provider::Generic.as_str() || secret.inject.is_some();
    if !injectable {
        return Ok(());
    }
    let text = value.expose_str().ok_or_else(|| CoreError::invalid("value", "must be UTF-8 text"))?;
    if text.chars().any(|c| c.is_control()) {
        return Err(CoreError::invalid(
            "value",
            "contains control characters (CR, LF, …) that would break the header it is sent in",
        ));
    }
    // Shorter values could not be told apart from ordinary text when the
    // proxy redacts echoes of them.
    if text.len() < 8 {
        return Err(CoreError::invalid("value", "a key the proxy injects must be at least 8 characters"));
    }
    if secret.provider == Provider::Twilio.as_str() && !text.contains(':') {
        return Err(CoreError::invalid("value", "a twilio value is ACCOUNT_SID:AUTH_TOKEN"));
    }
    Ok(())
}

fn validate_text(field: &'static str, s: String) -> Result<String, CoreError> {
    if s.len() > 1024 || s.chars().any(|c| c.is_control() && c != '\n') {
        return Err(CoreError::invalid(field, "at most 1024 bytes, no control characters"));
    }
    Ok(s)
}

fn validate_tags(tags: Vec<String>) -> Result<Vec<String>, CoreError> {
    if tags.len() > 32 {
        return Err(CoreError::invalid("tag", "at most 32 tags"));
    }
    for t in &tags {
        if t.is_empty() || t.len() > 64 || !t.chars().all(|c| c.is_ascii_alphanumeric() || "._-:=/".contains(c)) {
            return Err(CoreError::invalid(
                "tag",
                format!("`{}` must be 1-64 of [A-Za-z0-9._-:=/]", clean_free_text(t)),
            ));
        }
    }
    Ok(tags)
}

fn agent_actor(agent: &Agent, tok: &AgentToken) -> Actor {
    Actor {
        kind: "agent".into(),
        id: Some(agent.id.clone()),
        name: Some(agent.name.clone()),
        token_id: Some(tok.id.clone()),
    }
}

fn draft_base(time: OffsetDateTime, outcome: Outcome, meta: &RequestMeta) -> AuditDraft {
    AuditDraft {
        time,
        org_id: None,
        actor: Actor::anonymous(),
        action: String::new(),
        secret_id: None,
        secret_name: None,
        secret_version: None,
        purpose: meta.purpose.as_deref().map(clean_free_text),
        source_ip: meta.source_ip.clone(),
        user_agent: meta.user_agent.as_deref().map(clean_free_text),
        outcome,
        reason: None,
        request_id: meta.request_id.clone(),
    }
}
