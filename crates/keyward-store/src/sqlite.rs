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

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use time::OffsetDateTime;

use keyward_core::audit::{Actor, AuditDraft, AuditRecord, GENESIS_HASH, Outcome, chain_owned, from_micros};
use keyward_core::model::*;
use keyward_core::store::{AuditQuery, StateSnapshot, Store, StoreError, StoreResult};

use crate::map_err;
use crate::migrate::{self, Migration};
use crate::rows::{AUDIT_COLUMNS, AUDIT_STATEMENT_ROWS, TABLE_COUNTS, corrupt, hash32, micros, opt_micros};
use crate::store_impl::{TailCache, cache_tail};

const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "init", sql: include_str!("../migrations/sqlite/0001_init.sql") },
    Migration { version: 2, name: "proxy", sql: include_str!("../migrations/sqlite/0002_proxy.sql") },
    Migration { version: 3, name: "lifecycle", sql: include_str!("../migrations/sqlite/0003_lifecycle.sql") },
    Migration { version: 4, name: "agent_sources", sql: include_str!("../migrations/sqlite/0004_agent_sources.sql") },
    Migration { version: 5, name: "auto_rotation", sql: include_str!("../migrations/sqlite/0005_auto_rotation.sql") },
    Migration {
        version: 6,
        name: "audit_checkpoints",
        sql: include_str!("../migrations/sqlite/0006_audit_checkpoints.sql"),
    },
    Migration { version: 7, name: "alerts", sql: include_str!("../migrations/sqlite/0007_alerts.sql") },
    Migration { version: 8, name: "users", sql: include_str!("../migrations/sqlite/0008_users.sql") },
];

pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    /// The audit chain's tail as this process last wrote it. One process
    /// owns the database, so the next append can skip reading it back; the
    /// INSERT still checks it (see `insert_audit`), so a stale value costs a
    /// retry, never a forked chain.
    audit_tail: TailCache,
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
        // The connections are in-process: nothing can hang up on them, so the
        // pool's ping before each acquire would only add a thread round trip.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.clone())
            .await
            .map_err(map_err)?;
        restrict_permissions(path);
        migrate::run(&write, MIGRATIONS).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.read_only(true))
            .await
            .map_err(map_err)?;
        Ok(Self { read, write, audit_tail: std::sync::Mutex::new(None) })
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

impl SqliteStore {
    fn reader(&self) -> &SqlitePool {
        &self.read
    }

    fn writer(&self) -> &SqlitePool {
        &self.write
    }

    /// One process owns the database: the Vault drops its own caches.
    async fn changed(_tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> StoreResult<()> {
        Ok(())
    }

    /// The single writer connection already serialises appenders.
    async fn lock_audit_tail(_tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> StoreResult<()> {
        Ok(())
    }

    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<()>> {
        None
    }

    fn audit_tail_cache(&self) -> Option<&TailCache> {
        Some(&self.audit_tail)
    }
}

crate::store_impl::store_impl!(SqliteStore, "sqlite");
