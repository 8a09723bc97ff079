//! The persistence boundary. Implementations (SQLite, PostgreSQL) live in
//! `keyward-store`; they know no policy and never see a plaintext value.
//! Every method is atomic: it either applies whole or not at all.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::audit::{AuditDraft, AuditRecord, Outcome};
use crate::model::{
    Agent, AgentToken, AutoRotation, Grant, Org, OrgRecord, Secret, SecretVersion, Session, User, UserToken,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A uniqueness rule would be broken (`what` names it).
    #[error("{what} already exists")]
    Duplicate { what: &'static str },
    /// The database cannot be reached or refuses writes right now.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Stored data does not decode (a bug or tampering).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything a store holds except the audit trail, for backup, restore and
/// moving between stores. Holds ciphertext and hashes only.
#[derive(Default, Clone)]
pub struct StateSnapshot {
    pub meta: Vec<(String, String)>,
    pub orgs: Vec<OrgRecord>,
    pub secrets: Vec<Secret>,
    pub versions: Vec<SecretVersion>,
    pub agents: Vec<Agent>,
    pub agent_tokens: Vec<AgentToken>,
    pub grants: Vec<Grant>,
    pub user_tokens: Vec<UserToken>,
}

/// Filters for reading the audit trail.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub org_id: Option<String>,
    /// Matches the secret's id or name.
    pub secret: Option<String>,
    /// Matches an agent actor's id or name.
    pub agent: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<Outcome>,
    pub since: Option<OffsetDateTime>,
    /// Only events before this time.
    pub until: Option<OffsetDateTime>,
    pub source_ip: Option<String>,
    /// Cursor: only events with a smaller sequence number.
    pub before_seq: Option<i64>,
    /// Only events with a larger sequence number, oldest first (following
    /// the trail live); without it the newest come first.
    pub after_seq: Option<i64>,
    pub limit: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`, for status output.
    fn backend(&self) -> &'static str;

    /// Fires when another process may have changed policy data (secrets,
    /// versions, agents, grants, tokens), or when such news may have been
    /// missed: the Vault then drops its caches. `None` when this process is
    /// the only writer (embedded SQLite).
    fn watch_changes(&self) -> Option<tokio::sync::broadcast::Receiver<()>> {
        None
    }

    // Instance metadata (seal parameters, initialisation marker).
    async fn get_meta(&self, key: &str) -> StoreResult<Option<String>>;
    /// Inserts; `Duplicate` if the key exists (so two initialisers cannot both win).
    async fn insert_meta(&self, key: &str, value: &str) -> StoreResult<()>;
    /// Inserts or replaces (sink cursors and other bookkeeping).
    async fn put_meta(&self, key: &str, value: &str) -> StoreResult<()>;

    // Organizations.
    async fn create_org(&self, org: &OrgRecord) -> StoreResult<()>;
    async fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRecord>>;
    async fn org_by_id(&self, id: &str) -> StoreResult<Option<OrgRecord>>;
    async fn list_orgs(&self) -> StoreResult<Vec<Org>>;

    // Secrets and versions.
    async fn create_secret(&self, secret: &Secret, first: &SecretVersion) -> StoreResult<()>;
    /// By id (`sec_…`) or by name, within one org.
    async fn find_secret(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Secret>>;
    async fn list_secrets(&self, org_id: &str) -> StoreResult<Vec<Secret>>;
    async fn current_version(&self, secret_id: &str) -> StoreResult<Option<SecretVersion>>;
    async fn list_versions(&self, secret_id: &str) -> StoreResult<Vec<SecretVersion>>;
    /// Adds `next` as the current version, in one transaction: the current
    /// one becomes `previous` until `grace_until` (or is revoked without a
    /// grace period), and an older previous or pending one is revoked.
    async fn rotate_secret(
        &self,
        next: &SecretVersion,
        at: OffsetDateTime,
        grace_until: Option<OffsetDateTime>,
    ) -> StoreResult<()>;
    /// Makes the previous version current again and revokes the current
    /// one, if the previous is still within its grace period at `at`.
    /// Returns the version made current.
    async fn rollback_secret(&self, secret_id: &str, at: OffsetDateTime) -> StoreResult<Option<i64>>;
    /// Stores `pending` (state `pending`): kept, never served, until
    /// [`Store::promote_pending`]. `Duplicate` if its number is taken.
    async fn add_pending_version(&self, pending: &SecretVersion) -> StoreResult<()>;
    /// In one transaction: the pending `version` becomes current, the
    /// current one and any previous or other pending one are revoked.
    /// `false` (nothing changed) when that version is no longer pending.
    async fn promote_pending(&self, secret_id: &str, version: i64, at: OffsetDateTime) -> StoreResult<bool>;
    /// Replaces a secret's rotation policy (interval and automated rotation).
    async fn set_rotation_policy(
        &self,
        secret_id: &str,
        rotate_every_secs: Option<i64>,
        auto: Option<&AutoRotation>,
        at: OffsetDateTime,
    ) -> StoreResult<bool>;
    async fn get_version(&self, secret_id: &str, version: i64) -> StoreResult<Option<SecretVersion>>;
    /// Revokes previous versions whose grace period ended by `now`.
    async fn expire_grace(&self, now: OffsetDateTime) -> StoreResult<u64>;
    /// Revokes one version (`Some`) or all (`None`); returns how many changed.
    async fn revoke_versions(&self, secret_id: &str, version: Option<i64>, at: OffsetDateTime) -> StoreResult<u64>;
    /// Deletes a secret with its versions and grants.
    async fn delete_secret(&self, secret_id: &str) -> StoreResult<bool>;

    // Agents and their tokens.
    async fn create_agent(&self, agent: &Agent, token: &AgentToken) -> StoreResult<()>;
    async fn find_agent(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Agent>>;
    async fn list_agents(&self, org_id: &str) -> StoreResult<Vec<Agent>>;
    async fn set_agent_disabled(&self, agent_id: &str, disabled: bool) -> StoreResult<bool>;
    async fn agent_by_token_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<(Agent, AgentToken)>>;
    /// Live agent tokens that expire before `before`, with their agents.
    async fn expiring_agent_tokens(&self, before: OffsetDateTime) -> StoreResult<Vec<(Agent, AgentToken)>>;
    /// Adds `new`; the agent's other live tokens expire at `old_until`
    /// (now: at once; later: an overlap for a rolling deployment).
    async fn rotate_agent_token(&self, new: &AgentToken, old_until: OffsetDateTime) -> StoreResult<()>;

    // Grants.
    /// Inserts or replaces the grant for (agent, secret).
    async fn put_grant(&self, grant: &Grant) -> StoreResult<()>;
    async fn find_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<Option<Grant>>;
    async fn list_grants(
        &self,
        org_id: &str,
        agent_id: Option<&str>,
        secret_id: Option<&str>,
    ) -> StoreResult<Vec<Grant>>;
    async fn delete_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<bool>;

    // Human tokens.
    async fn create_user_token(&self, token: &UserToken) -> StoreResult<()>;
    async fn user_token_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<UserToken>>;

    // Audit trail.
    /// Appends a batch at the chain's tail in one transaction, computing
    /// sequence numbers and hashes with [`crate::audit::chain_batch`] while
    /// holding the tail, so concurrent appenders still form one chain.
    async fn append_audit(&self, batch: Vec<AuditDraft>) -> StoreResult<Vec<AuditRecord>>;
    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditRecord>>;
    /// Events with `seq > after_seq` in ascending order, for verification.
    async fn audit_page(&self, after_seq: i64, limit: u32) -> StoreResult<Vec<AuditRecord>>;

    /// The newest event older than `before`: (sequence, hash).
    async fn audit_last_before(&self, before: OffsetDateTime) -> StoreResult<Option<(i64, [u8; 32])>>;
    /// Deletes events up to `through_seq` and checkpoints before it, in one
    /// transaction (the checkpoint at `through_seq` must exist: it anchors
    /// what remains). Returns the events deleted.
    async fn prune_audit(&self, through_seq: i64) -> StoreResult<u64>;
    /// The chain's last (sequence, hash); `(0, GENESIS_HASH)` when empty.
    async fn audit_tail(&self) -> StoreResult<(i64, [u8; 32])>;
    /// Stores a signed checkpoint; `false` if one exists at that sequence
    /// (another replica signed it first).
    async fn add_checkpoint(&self, cp: &crate::checkpoint::Checkpoint) -> StoreResult<bool>;
    /// Every checkpoint, in sequence order.
    async fn list_checkpoints(&self) -> StoreResult<Vec<crate::checkpoint::Checkpoint>>;

    // Dashboard accounts and sessions.
    /// `Duplicate` if the name is taken.
    async fn create_user(&self, user: &User) -> StoreResult<()>;
    async fn user_by_name(&self, name: &str) -> StoreResult<Option<User>>;
    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    async fn create_session(&self, session: &Session) -> StoreResult<()>;
    async fn session_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<Session>>;
    async fn touch_session(&self, hash: &[u8; 32], at: OffsetDateTime) -> StoreResult<()>;
    async fn delete_session(&self, hash: &[u8; 32]) -> StoreResult<()>;
    /// Allowed uses of secrets (resolve and proxy) per UTC day since
    /// `since`, in one org, optionally of one secret: (unix day, count).
    async fn uses_per_day(
        &self,
        org_id: &str,
        secret_id: Option<&str>,
        since: OffsetDateTime,
    ) -> StoreResult<Vec<(i64, i64)>>;

    // Alerts (anomaly detection).
    async fn add_alert(&self, alert: &crate::anomaly::Alert) -> StoreResult<()>;
    /// Newest first; acknowledged ones only with `include_acknowledged`.
    async fn list_alerts(
        &self,
        org_id: &str,
        include_acknowledged: bool,
        limit: u32,
    ) -> StoreResult<Vec<crate::anomaly::Alert>>;
    /// `false` if there is no such unacknowledged alert in the org.
    async fn ack_alert(&self, org_id: &str, id: &str, by: &str, at: OffsetDateTime) -> StoreResult<bool>;

    // Moving data between stores.
    /// Every table but the audit trail, read in one transaction.
    async fn export_state(&self) -> StoreResult<StateSnapshot>;
    /// Loads a snapshot into an empty store in one transaction (`Duplicate`
    /// if the store holds data).
    async fn import_state(&self, snapshot: &StateSnapshot) -> StoreResult<()>;
    /// Appends audit records verbatim (sequence numbers and hashes kept).
    async fn import_audit(&self, records: &[AuditRecord]) -> StoreResult<()>;
    /// Row count of every table, by table name.
    async fn table_counts(&self) -> StoreResult<Vec<(&'static str, i64)>>;
}
