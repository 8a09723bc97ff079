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

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use keyward_core::audit::{Actor, AuditDraft, AuditRecord, GENESIS_HASH, Outcome, chain_owned, from_micros};
use keyward_core::model::*;
use keyward_core::store::{AuditQuery, StateSnapshot, Store, StoreError, StoreResult};

use crate::migrate::{self, Migration};
use crate::rows::{
    AUDIT_COLUMNS, AUDIT_STATEMENT_MAX_ROWS, STATEMENT_CACHE, TABLE_COUNTS, corrupt, hash32, micros, opt_micros,
};
use crate::store_impl::{TailCache, cache_tail};
use crate::{Durability, map_err};

const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../migrations/postgres/0001_init.sql") },
    Migration { version: 2, name: "proxy", sql: include_str!("../migrations/postgres/0002_proxy.sql") },
    Migration { version: 3, name: "lifecycle", sql: include_str!("../migrations/postgres/0003_lifecycle.sql") },
    Migration { version: 4, name: "agent_sources", sql: include_str!("../migrations/postgres/0004_agent_sources.sql") },
    Migration { version: 5, name: "auto_rotation", sql: include_str!("../migrations/postgres/0005_auto_rotation.sql") },
    Migration {
        version: 6,
        name: "audit_checkpoints",
        sql: include_str!("../migrations/postgres/0006_audit_checkpoints.sql"),
    },
    Migration { version: 7, name: "alerts", sql: include_str!("../migrations/postgres/0007_alerts.sql") },
    Migration { version: 8, name: "users", sql: include_str!("../migrations/postgres/0008_users.sql") },
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
        Self::open_with(url, Durability::Fsync).await
    }

    pub async fn open_with(url: &str, durability: Durability) -> StoreResult<Self> {
        let mut options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Other(format!("database URL: {e}")))?;
        options = options.statement_cache_capacity(STATEMENT_CACHE);
        if durability == Durability::Buffered {
            options = options.options([("synchronous_commit", "off")]);
        }
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

    /// `SHOW synchronous_commit` on one of the pool's connections.
    pub async fn commit_sync_setting(&self) -> StoreResult<String> {
        sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&self.pool).await.map_err(map_err)
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

async fn notify(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> StoreResult<()> {
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANGES_CHANNEL).execute(&mut **tx).await.map_err(map_err)?;
    Ok(())
}

crate::rows::row_mappers!(PgRow);
crate::rows::row_writers!(sqlx::PgConnection, PgRow, sqlx::Postgres);

impl PgStore {
    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Inserts records already chained, atomically; hands them back. Not
    /// on PostgreSQL's path (it has no tail cache: replicas read the tail
    /// under their lock), so it is kept to the plainest correct form.
    async fn insert_audit_chained(&self, records: Vec<AuditRecord>) -> (Vec<AuditRecord>, StoreResult<()>) {
        let written = async {
            let mut tx = self.begin_write().await.map_err(map_err)?;
            insert_audit(&mut tx, &records).await?; // dropping `tx` rolls back
            tx.commit().await.map_err(map_err)
        }
        .await;
        (records, written)
    }

    /// Tells every replica, inside the change's own transaction.
    async fn changed(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> StoreResult<()> {
        notify(tx).await
    }

    /// Held until commit: one appender at a time, across every replica.
    async fn lock_audit_tail(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(AUDIT_LOCK).execute(&mut **tx).await.map_err(map_err)?;
        Ok(())
    }

    /// Several replicas append: the tail is read under the lock every time.
    fn audit_tail_cache(&self) -> Option<&TailCache> {
        None
    }

    fn watch(&self) -> Option<broadcast::Receiver<()>> {
        Some(self.changes.subscribe())
    }
}

crate::store_impl::store_impl!(PgStore, "postgres");
