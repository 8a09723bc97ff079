//! The scale-out store: PostgreSQL, shared by several stateless replicas.
//!
//! - Every committed change to policy data (secrets, versions, agents,
//!   grants, tokens) sends `NOTIFY keyward_changes` inside its transaction, so
//!   every replica drops its caches as soon as the change is visible.
//! - Audit appends take a transaction-level advisory lock before reading the
//!   chain's tail, so concurrent replicas still form one gap-free chain; each
//!   replica's group commit keeps the lock to one short transaction per batch.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use keyward_core::audit::{Actor, AuditDraft, AuditRecord, GENESIS_HASH, Outcome, chain_batch, from_micros};
use keyward_core::model::*;
use keyward_core::store::{AuditQuery, StateSnapshot, Store, StoreError, StoreResult};

use crate::map_err;
use crate::migrate::{self, Migration};
use crate::rows::{AUDIT_ROWS_PER_STATEMENT, TABLE_COUNTS, corrupt, hash32, micros, opt_micros};

const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../migrations/postgres/0001_init.sql") },
    Migration { version: 2, name: "proxy", sql: include_str!("../migrations/postgres/0002_proxy.sql") },
    Migration { version: 3, name: "lifecycle", sql: include_str!("../migrations/postgres/0003_lifecycle.sql") },
    Migration { version: 4, name: "agent_sources", sql: include_str!("../migrations/postgres/0004_agent_sources.sql") },
];

/// Channel carrying cache invalidations between replicas.
pub const CHANGES_CHANNEL: &str = "keyward_changes";
/// Advisory lock key serialising audit appends ("kw-audit").
const AUDIT_LOCK: i64 = 0x6b77_2d61_7564_6974;

pub struct PgStore {
    pool: PgPool,
    options: PgConnectOptions,
    changes: broadcast::Sender<()>,
}

impl PgStore {
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Other(format!("database URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // Fail fast when the database is gone: the request is refused
            // (503) rather than left waiting.
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options.clone())
            .await
            .map_err(map_err)?;
        // One replica migrates at a time.
        let mut lock = pool.acquire().await.map_err(map_err)?;
        sqlx::query("SELECT pg_advisory_lock(7368528741)").execute(&mut *lock).await.map_err(map_err)?;
        let migrated = migrate::run(&pool, MIGRATIONS).await;
        sqlx::query("SELECT pg_advisory_unlock(7368528741)").execute(&mut *lock).await.map_err(map_err)?;
        drop(lock);
        migrated?;
        let (changes, _) = broadcast::channel(64);
        let store = Self { pool, options, changes };
        store.spawn_listener();
        Ok(store)
    }

    /// Listens for other replicas' changes. A lost connection may have lost
    /// notifications, so on every (re)connect the caches are dropped too.
    fn spawn_listener(&self) {
        let options = self.options.clone();
        let tx = self.changes.clone();
        tokio::spawn(async move {
            loop {
                let mut listener = match PgListener::connect_with(&PgPool::connect_lazy_with(options.clone())).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "change listener cannot connect; retrying");
                        let _ = tx.send(());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(CHANGES_CHANNEL).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                let _ = tx.send(()); // anything missed while disconnected
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => {
                            let _ = tx.send(());
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!("change listener lost its connection; dropping caches and reconnecting");
                            let _ = tx.send(());
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

/// Runs one write statement in a transaction that also notifies replicas.
trait ExecNotify {
    async fn exec_notify(self, pool: &PgPool) -> StoreResult<sqlx::postgres::PgQueryResult>;
}

impl ExecNotify for sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    async fn exec_notify(self, pool: &PgPool) -> StoreResult<sqlx::postgres::PgQueryResult> {
        let mut tx = pool.begin().await.map_err(map_err)?;
        let done = self.execute(&mut *tx).await.map_err(map_err)?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(done)
    }
}

async fn notify(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANGES_CHANNEL).execute(&mut **tx).await.map_err(map_err)?;
    Ok(())
}

crate::rows::row_mappers!(PgRow);
crate::rows::row_writers!(sqlx::PgConnection, PgRow, sqlx::Postgres);

const AUDIT_COLUMNS: &str = "seq, time, org_id, actor_kind, actor_id, actor_name, token_id, action, secret_id, \
     secret_name, secret_version, purpose, source_ip, user_agent, outcome, reason, request_id, prev_hash, hash";

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn watch_changes(&self) -> Option<broadcast::Receiver<()>> {
        Some(self.changes.subscribe())
    }

    async fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.map(|r| r.try_get("value").map_err(corrupt)).transpose()
    }

    async fn insert_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .exec_notify(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_org(&self, org: &OrgRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_org(&mut tx, org).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(org_from).transpose()
    }

    async fn org_by_id(&self, id: &str) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(org_from).transpose()
    }

    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        let rows = sqlx::query("SELECT * FROM orgs ORDER BY name").fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(|r| org_from(r).map(|o| o.org)).collect()
    }

    async fn create_secret(&self, s: &Secret, v: &SecretVersion) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_secret(&mut tx, s).await?;
        insert_version(&mut tx, v).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_secret(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Secret>> {
        let row = sqlx::query("SELECT * FROM secrets WHERE org_id = $1 AND (name = $2 OR id = $3)")
            .bind(org_id)
            .bind(name_or_id)
            .bind(name_or_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(secret_from).transpose()
    }

    async fn list_secrets(&self, org_id: &str) -> StoreResult<Vec<Secret>> {
        let rows = sqlx::query("SELECT * FROM secrets WHERE org_id = $1 ORDER BY name")
            .bind(org_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(secret_from).collect()
    }

    async fn current_version(&self, secret_id: &str) -> StoreResult<Option<SecretVersion>> {
        let row = sqlx::query(
            "SELECT * FROM secret_versions WHERE secret_id = $1 AND state = 'current' ORDER BY version DESC LIMIT 1",
        )
        .bind(secret_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(version_from).transpose()
    }

    async fn list_versions(&self, secret_id: &str) -> StoreResult<Vec<SecretVersion>> {
        let rows = sqlx::query("SELECT * FROM secret_versions WHERE secret_id = $1 ORDER BY version")
            .bind(secret_id)
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        rotate_versions(&mut tx, next, at, grace_until).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn rollback_secret(&self, secret_id: &str, at: OffsetDateTime) -> StoreResult<Option<i64>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let v = rollback_versions(&mut tx, secret_id, at).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(v)
    }

    async fn get_version(&self, secret_id: &str, version: i64) -> StoreResult<Option<SecretVersion>> {
        let row = sqlx::query("SELECT * FROM secret_versions WHERE secret_id = $1 AND version = $2")
            .bind(secret_id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(version_from).transpose()
    }

    async fn expire_grace(&self, now: OffsetDateTime) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let n = expire_grace_in(&mut tx, now).await?;
        if n > 0 {
            notify(&mut tx).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(n)
    }

    async fn revoke_versions(&self, secret_id: &str, version: Option<i64>, at: OffsetDateTime) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE secret_versions SET state = 'revoked', revoked_at = $1 \
             WHERE secret_id = $2 AND state <> 'revoked' AND ($3::BIGINT IS NULL OR version = $4)",
        )
        .bind(micros(at))
        .bind(secret_id)
        .bind(version)
        .bind(version)
        .exec_notify(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn delete_secret(&self, secret_id: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for sql in ["DELETE FROM grants WHERE secret_id = $1", "DELETE FROM secret_versions WHERE secret_id = $1"] {
            sqlx::query(sql).bind(secret_id).execute(&mut *tx).await.map_err(map_err)?;
        }
        let done = sqlx::query("DELETE FROM secrets WHERE id = $1")
            .bind(secret_id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_agent(&self, a: &Agent, t: &AgentToken) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_agent(&mut tx, a).await?;
        insert_agent_token(&mut tx, t).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_agent(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Agent>> {
        let row = sqlx::query("SELECT * FROM agents WHERE org_id = $1 AND (name = $2 OR id = $3)")
            .bind(org_id)
            .bind(name_or_id)
            .bind(name_or_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(agent_from).transpose()
    }

    async fn list_agents(&self, org_id: &str) -> StoreResult<Vec<Agent>> {
        let rows = sqlx::query("SELECT * FROM agents WHERE org_id = $1 ORDER BY name")
            .bind(org_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(agent_from).collect()
    }

    async fn set_agent_disabled(&self, agent_id: &str, disabled: bool) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE agents SET disabled = $1 WHERE id = $2")
            .bind(disabled)
            .bind(agent_id)
            .exec_notify(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn agent_by_token_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<(Agent, AgentToken)>> {
        let row = sqlx::query(
            "SELECT a.*, t.id AS t_id, t.hash AS t_hash, t.created_at AS t_created_at, \
                    t.expires_at AS t_expires_at, t.revoked AS t_revoked \
             FROM agent_tokens t JOIN agents a ON a.id = t.agent_id WHERE t.hash = $1",
        )
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(agent_with_token_from).transpose()
    }

    async fn expiring_agent_tokens(&self, before: OffsetDateTime) -> StoreResult<Vec<(Agent, AgentToken)>> {
        let mut c = self.pool.acquire().await.map_err(map_err)?;
        expiring_tokens(&mut c, before).await
    }

    async fn rotate_agent_token(&self, new: &AgentToken, old_until: OffsetDateTime) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        rotate_agent_tokens(&mut tx, new, old_until).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn put_grant(&self, g: &Grant) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        upsert_grant(&mut tx, g).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<Option<Grant>> {
        let row = sqlx::query("SELECT * FROM grants WHERE agent_id = $1 AND secret_id = $2")
            .bind(agent_id)
            .bind(secret_id)
            .fetch_optional(&self.pool)
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
            "SELECT * FROM grants WHERE org_id = $1 AND ($2::TEXT IS NULL OR agent_id = $3) AND ($4::TEXT IS NULL OR secret_id = $5) \
             ORDER BY created_at",
        )
        .bind(org_id)
        .bind(agent_id)
        .bind(agent_id)
        .bind(secret_id)
        .bind(secret_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(grant_from).collect()
    }

    async fn delete_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM grants WHERE agent_id = $1 AND secret_id = $2")
            .bind(agent_id)
            .bind(secret_id)
            .exec_notify(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_user_token(&self, t: &UserToken) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_user_token(&mut tx, t).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn user_token_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<UserToken>> {
        let row = sqlx::query("SELECT * FROM user_tokens WHERE hash = $1")
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(user_token_from).transpose()
    }

    async fn append_audit(&self, batch: &[AuditDraft]) -> StoreResult<Vec<AuditRecord>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // Held until commit: one appender at a time, across every replica.
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(AUDIT_LOCK).execute(&mut *tx).await.map_err(map_err)?;
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
             ($1::TEXT IS NULL OR org_id = $1) \
             AND ($2::TEXT IS NULL OR secret_id = $2 OR secret_name = $2) \
             AND ($3::TEXT IS NULL OR (actor_kind = 'agent' AND (actor_id = $3 OR actor_name = $3))) \
             AND ($4::TEXT IS NULL OR action = $4) \
             AND ($5::TEXT IS NULL OR outcome = $5) \
             AND ($6::BIGINT IS NULL OR time >= $6) \
             AND ($7::BIGINT IS NULL OR seq < $7) \
             ORDER BY seq DESC LIMIT $8"
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
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(audit_from).collect()
    }

    async fn audit_page(&self, after_seq: i64, limit: u32) -> StoreResult<Vec<AuditRecord>> {
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(audit_from).collect()
    }

    async fn export_state(&self) -> StoreResult<StateSnapshot> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let s = export_state_from(&mut tx).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(s)
    }

    async fn import_state(&self, snapshot: &StateSnapshot) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        import_state_into(&mut tx, snapshot).await?;
        notify(&mut tx).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn import_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_audit(&mut tx, records).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn table_counts(&self) -> StoreResult<Vec<(&'static str, i64)>> {
        let mut c = self.pool.acquire().await.map_err(map_err)?;
        table_counts(&mut c).await
    }
}
