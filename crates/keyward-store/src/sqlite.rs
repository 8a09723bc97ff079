//! The embedded default store: SQLite in WAL mode.
//!
//! Two pools: readers (several connections, WAL lets them run beside a
//! writer) and one writer connection, so write transactions queue in-process
//! instead of failing with SQLITE_BUSY. `synchronous=FULL`: a commit that
//! returned survives a power loss, not only a process crash; group commit in
//! the audit writer keeps that affordable.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use time::OffsetDateTime;

use keyward_core::audit::{Actor, AuditDraft, AuditRecord, GENESIS_HASH, Outcome, chain_batch, from_micros};
use keyward_core::model::*;
use keyward_core::store::{AuditQuery, StateSnapshot, Store, StoreError, StoreResult};

use crate::map_err;
use crate::migrate::{self, Migration};
use crate::rows::{AUDIT_ROWS_PER_STATEMENT, TABLE_COUNTS, corrupt, hash32, micros, opt_micros};

const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../migrations/sqlite/0001_init.sql") },
    Migration { version: 2, name: "proxy", sql: include_str!("../migrations/sqlite/0002_proxy.sql") },
    Migration { version: 3, name: "lifecycle", sql: include_str!("../migrations/sqlite/0003_lifecycle.sql") },
    Migration { version: 4, name: "agent_sources", sql: include_str!("../migrations/sqlite/0004_agent_sources.sql") },
];

pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(map_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.clone())
            .await
            .map_err(map_err)?;
        restrict_permissions(path);
        migrate::run(&write, MIGRATIONS).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.read_only(true))
            .await
            .map_err(map_err)?;
        Ok(Self { read, write })
    }
}

impl SqliteStore {
    /// Writes a consistent snapshot while the server keeps serving.
    pub async fn backup_to(&self, file: &Path) -> StoreResult<()> {
        let target = file.to_str().ok_or_else(|| StoreError::Other("backup path is not UTF-8".into()))?;
        sqlx::query("VACUUM INTO ?").bind(target).execute(&self.read).await.map_err(map_err)?;
        restrict_permissions(file);
        Ok(())
    }
}

/// The database holds ciphertext and hashes only, but it is still nobody
/// else's business: 0600 like the key file.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{}", path.display(), suffix);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

crate::rows::row_mappers!(SqliteRow);
crate::rows::row_writers!(sqlx::SqliteConnection, SqliteRow, sqlx::Sqlite);

const AUDIT_COLUMNS: &str = "seq, time, org_id, actor_kind, actor_id, actor_name, token_id, action, secret_id, \
     secret_name, secret_version, purpose, source_ip, user_agent, outcome, reason, request_id, prev_hash, hash";

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.map(|r| r.try_get("value").map_err(corrupt)).transpose()
    }

    async fn insert_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        sqlx::query("INSERT INTO meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.write)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn create_org(&self, org: &OrgRecord) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        insert_org(&mut tx, org).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(org_from).transpose()
    }

    async fn org_by_id(&self, id: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(org_from).transpose()
    }

    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        let rows = sqlx::query("SELECT * FROM orgs ORDER BY name").fetch_all(&self.read).await.map_err(map_err)?;
        rows.iter().map(|r| org_from(r).map(|o| o.org)).collect()
    }

    async fn create_secret(&self, s: &Secret, v: &SecretVersion) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        insert_secret(&mut tx, s).await?;
        insert_version(&mut tx, v).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_secret(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Secret>> {
        let row = sqlx::query("SELECT * FROM secrets WHERE org_id = ? AND (name = ? OR id = ?)")
            .bind(org_id)
            .bind(name_or_id)
            .bind(name_or_id)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(secret_from).transpose()
    }

    async fn list_secrets(&self, org_id: &str) -> StoreResult<Vec<Secret>> {
        let rows = sqlx::query("SELECT * FROM secrets WHERE org_id = ? ORDER BY name")
            .bind(org_id)
            .fetch_all(&self.read)
            .await
            .map_err(map_err)?;
        rows.iter().map(secret_from).collect()
    }

    async fn current_version(&self, secret_id: &str) -> StoreResult<Option<SecretVersion>> {
        let row = sqlx::query(
            "SELECT * FROM secret_versions WHERE secret_id = ? AND state = 'current' ORDER BY version DESC LIMIT 1",
        )
        .bind(secret_id)
        .fetch_optional(&self.read)
        .await
        .map_err(map_err)?;
        row.as_ref().map(version_from).transpose()
    }

    async fn list_versions(&self, secret_id: &str) -> StoreResult<Vec<SecretVersion>> {
        let rows = sqlx::query("SELECT * FROM secret_versions WHERE secret_id = ? ORDER BY version")
            .bind(secret_id)
            .fetch_all(&self.read)
            .await
            .map_err(map_err)?;
        rows.iter().map(version_from).collect()
    }

    async fn rotate_secret(
        &self,
        next: &SecretVersion,
        at: OffsetDateTime,
        grace_until: Option<OffsetDateTime>,
    ) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        rotate_versions(&mut tx, next, at, grace_until).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn rollback_secret(&self, secret_id: &str, at: OffsetDateTime) -> StoreResult<Option<i64>> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        let v = rollback_versions(&mut tx, secret_id, at).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(v)
    }

    async fn get_version(&self, secret_id: &str, version: i64) -> StoreResult<Option<SecretVersion>> {
        let row = sqlx::query("SELECT * FROM secret_versions WHERE secret_id = $1 AND version = $2")
            .bind(secret_id)
            .bind(version)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(version_from).transpose()
    }

    async fn expire_grace(&self, now: OffsetDateTime) -> StoreResult<u64> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        let n = expire_grace_in(&mut tx, now).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(n)
    }

    async fn revoke_versions(&self, secret_id: &str, version: Option<i64>, at: OffsetDateTime) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE secret_versions SET state = 'revoked', revoked_at = ? \
             WHERE secret_id = ? AND state <> 'revoked' AND (? IS NULL OR version = ?)",
        )
        .bind(micros(at))
        .bind(secret_id)
        .bind(version)
        .bind(version)
        .execute(&self.write)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn delete_secret(&self, secret_id: &str) -> StoreResult<bool> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        for sql in ["DELETE FROM grants WHERE secret_id = ?", "DELETE FROM secret_versions WHERE secret_id = ?"] {
            sqlx::query(sql).bind(secret_id).execute(&mut *tx).await.map_err(map_err)?;
        }
        let done =
            sqlx::query("DELETE FROM secrets WHERE id = ?").bind(secret_id).execute(&mut *tx).await.map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_agent(&self, a: &Agent, t: &AgentToken) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        insert_agent(&mut tx, a).await?;
        insert_agent_token(&mut tx, t).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_agent(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Agent>> {
        let row = sqlx::query("SELECT * FROM agents WHERE org_id = ? AND (name = ? OR id = ?)")
            .bind(org_id)
            .bind(name_or_id)
            .bind(name_or_id)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(agent_from).transpose()
    }

    async fn list_agents(&self, org_id: &str) -> StoreResult<Vec<Agent>> {
        let rows = sqlx::query("SELECT * FROM agents WHERE org_id = ? ORDER BY name")
            .bind(org_id)
            .fetch_all(&self.read)
            .await
            .map_err(map_err)?;
        rows.iter().map(agent_from).collect()
    }

    async fn set_agent_disabled(&self, agent_id: &str, disabled: bool) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE agents SET disabled = ? WHERE id = ?")
            .bind(disabled)
            .bind(agent_id)
            .execute(&self.write)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn agent_by_token_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<(Agent, AgentToken)>> {
        let row = sqlx::query(
            "SELECT a.*, t.id AS t_id, t.hash AS t_hash, t.created_at AS t_created_at, \
                    t.expires_at AS t_expires_at, t.revoked AS t_revoked \
             FROM agent_tokens t JOIN agents a ON a.id = t.agent_id WHERE t.hash = ?",
        )
        .bind(&hash[..])
        .fetch_optional(&self.read)
        .await
        .map_err(map_err)?;
        row.as_ref().map(agent_with_token_from).transpose()
    }

    async fn expiring_agent_tokens(&self, before: OffsetDateTime) -> StoreResult<Vec<(Agent, AgentToken)>> {
        let mut c = self.read.acquire().await.map_err(map_err)?;
        expiring_tokens(&mut c, before).await
    }

    async fn rotate_agent_token(&self, new: &AgentToken, old_until: OffsetDateTime) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        rotate_agent_tokens(&mut tx, new, old_until).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn put_grant(&self, g: &Grant) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        upsert_grant(&mut tx, g).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<Option<Grant>> {
        let row = sqlx::query("SELECT * FROM grants WHERE agent_id = ? AND secret_id = ?")
            .bind(agent_id)
            .bind(secret_id)
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(grant_from).transpose()
    }

    async fn list_grants(
        &self,
        org_id: &str,
        agent_id: Option<&str>,
        secret_id: Option<&str>,
    ) -> StoreResult<Vec<Grant>> {
        let rows = sqlx::query(
            "SELECT * FROM grants WHERE org_id = ? AND (? IS NULL OR agent_id = ?) AND (? IS NULL OR secret_id = ?) \
             ORDER BY created_at",
        )
        .bind(org_id)
        .bind(agent_id)
        .bind(agent_id)
        .bind(secret_id)
        .bind(secret_id)
        .fetch_all(&self.read)
        .await
        .map_err(map_err)?;
        rows.iter().map(grant_from).collect()
    }

    async fn delete_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM grants WHERE agent_id = ? AND secret_id = ?")
            .bind(agent_id)
            .bind(secret_id)
            .execute(&self.write)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_user_token(&self, t: &UserToken) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        insert_user_token(&mut tx, t).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn user_token_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<UserToken>> {
        let row = sqlx::query("SELECT * FROM user_tokens WHERE hash = ?")
            .bind(&hash[..])
            .fetch_optional(&self.read)
            .await
            .map_err(map_err)?;
        row.as_ref().map(user_token_from).transpose()
    }

    async fn append_audit(&self, batch: &[AuditDraft]) -> StoreResult<Vec<AuditRecord>> {
        // The single writer connection holds the tail for the whole transaction.
        let mut tx = self.write.begin().await.map_err(map_err)?;
        let tail = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
        let (last_seq, last_hash) = match tail {
            Some(r) => (r.try_get("seq").map_err(corrupt)?, hash32(r.try_get("hash").map_err(corrupt)?)?),
            None => (0, GENESIS_HASH),
        };
        let records = chain_batch(last_seq, last_hash, batch);
        insert_audit(&mut tx, &records).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(records)
    }

    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE \
             (?1 IS NULL OR org_id = ?1) \
             AND (?2 IS NULL OR secret_id = ?2 OR secret_name = ?2) \
             AND (?3 IS NULL OR (actor_kind = 'agent' AND (actor_id = ?3 OR actor_name = ?3))) \
             AND (?4 IS NULL OR action = ?4) \
             AND (?5 IS NULL OR outcome = ?5) \
             AND (?6 IS NULL OR time >= ?6) \
             AND (?7 IS NULL OR seq < ?7) \
             ORDER BY seq DESC LIMIT ?8"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&q.org_id)
            .bind(&q.secret)
            .bind(&q.agent)
            .bind(&q.action)
            .bind(q.outcome.map(Outcome::as_str))
            .bind(opt_micros(q.since))
            .bind(q.before_seq)
            .bind(i64::from(q.limit.max(1)))
            .fetch_all(&self.read)
            .await
            .map_err(map_err)?;
        rows.iter().map(audit_from).collect()
    }

    async fn audit_page(&self, after_seq: i64, limit: u32) -> StoreResult<Vec<AuditRecord>> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await
            .map_err(map_err)?;
        rows.iter().map(audit_from).collect()
    }

    async fn export_state(&self) -> StoreResult<StateSnapshot> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        let s = export_state_from(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(s)
    }

    async fn import_state(&self, snapshot: &StateSnapshot) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        import_state_into(&mut tx, snapshot).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn import_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        let mut tx = self.write.begin().await.map_err(map_err)?;
        insert_audit(&mut tx, records).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn table_counts(&self) -> StoreResult<Vec<(&'static str, i64)>> {
        let mut c = self.write.acquire().await.map_err(map_err)?;
        table_counts(&mut c).await
    }
}
