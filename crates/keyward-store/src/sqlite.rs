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

use crate::migrate::{self, Migration};
use crate::rows::{
    AUDIT_COLUMNS, AUDIT_STATEMENT_MAX_ROWS, STATEMENT_CACHE, TABLE_COUNTS, corrupt, hash32, micros, opt_micros,
};
use crate::sqlite_audit::AuditConnection;
use crate::store_impl::{TailCache, cache_tail};
use crate::{Durability, map_err};

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
    /// primary key refuses a stale one (see `append_audit_after`), so a
    /// stale value costs a retry, never a forked chain.
    audit_tail: TailCache,
    /// The audit writer's own connection, outside the pool and outside
    /// sqlx (see `sqlite_audit`): the one write on every access's path.
    pub(crate) audit_conn: AuditConnection,
    /// `buffered` durability only: dropping it stops the WAL flusher.
    _wal_flusher: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with(path, Durability::Fsync).await
    }

    pub async fn open_with(path: &Path, durability: Durability) -> StoreResult<Self> {
        let synchronous = match durability {
            Durability::Fsync => SqliteSynchronous::Full,
            // WAL + NORMAL: a commit is written to the WAL, not synced; the
            // flusher below bounds how long it stays off the disk.
            Durability::Buffered => SqliteSynchronous::Normal,
        };
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(map_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .statement_cache_capacity(STATEMENT_CACHE)
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
            .connect_with(opts.clone().read_only(true))
            .await
            .map_err(map_err)?;
        let audit_conn = AuditConnection::open(path, durability)?;
        let wal_flusher = (durability == Durability::Buffered).then(|| spawn_wal_flusher(path));
        Ok(Self { read, write, audit_tail: std::sync::Mutex::new(None), audit_conn, _wal_flusher: wal_flusher })
    }
}

/// How long a `buffered` commit may stay in the OS's cache at most.
pub const BUFFERED_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// `buffered` durability: syncs the WAL file every [`BUFFERED_FLUSH_EVERY`],
/// so what was committed before a flush is on disk after it. The file is
/// opened afresh each time (SQLite may recreate it). Ends when the store
/// drops the returned sender.
fn spawn_wal_flusher(db: &Path) -> tokio::sync::oneshot::Sender<()> {
    let wal = std::path::PathBuf::from(format!("{}-wal", db.display()));
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BUFFERED_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The store going away flushes one last time.
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = &mut stop => true,
            };
            let wal = wal.clone();
            let synced = tokio::task::spawn_blocking(move || std::fs::File::open(&wal)?.sync_data()).await;
            if let Ok(Err(e)) = synced
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, "could not flush the SQLite WAL to disk");
            }
            if last {
                break;
            }
        }
    });
    stop_tx
}

impl SqliteStore {
    /// What the connections that write sync a commit with: `PRAGMA
    /// synchronous` as SQLite reports it (2 = FULL, 1 = NORMAL); an error if
    /// the pool's writer and the audit connection disagree.
    pub async fn commit_sync_setting(&self) -> StoreResult<String> {
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&self.write).await.map_err(map_err)?;
        let audit = self.audit_conn.sync_setting()?;
        if audit != level {
            return Err(StoreError::Other(format!("the audit connection syncs at level {audit}, the pool at {level}")));
        }
        Ok(level.to_string())
    }

    /// Writes a consistent snapshot while the server keeps serving.
    pub async fn backup_to(&self, file: &Path) -> StoreResult<()> {
        let target = file.to_str().ok_or_else(|| StoreError::Other("backup path is not UTF-8".into()))?;
        // Created 0600 and empty before SQLite writes into it (it accepts an
        // empty file): made by VACUUM INTO, it would be readable under the
        // umask until the chmod below.
        let created = {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file) {
                Ok(_) => true,
                // SQLite refuses a file that is not empty; an empty one gets
                // 0600 below.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(StoreError::Other(format!("creating {}: {e}", file.display()))),
            }
        };
        if let Err(e) = sqlx::query("VACUUM INTO ?").bind(target).execute(&self.read).await {
            if created {
                let _ = std::fs::remove_file(file);
            }
            return Err(map_err(e));
        }
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

    /// IMMEDIATE: the write lock is taken at BEGIN, so a transaction that
    /// reads before it writes cannot find its snapshot outdated by the
    /// audit connection's commits (SQLITE_BUSY_SNAPSHOT) halfway through.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.write.begin_with("BEGIN IMMEDIATE").await
    }

    /// Inserts records already chained, atomically; hands them back.
    async fn insert_audit_chained(&self, records: Vec<AuditRecord>) -> (Vec<AuditRecord>, StoreResult<()>) {
        self.audit_conn.insert(records).await
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
