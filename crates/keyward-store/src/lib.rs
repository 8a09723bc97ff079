//! Store implementations for keyward. Each implements
//! [`keyward_core::store::Store`]; they know no policy and never see a
//! plaintext value (only ciphertext and token hashes).
#![forbid(unsafe_code)]

mod copy;
mod migrate;
mod postgres;
mod rows;
mod sqlite;
mod sqlite_audit;
mod store_impl;
#[cfg(feature = "test-support")]
pub mod testing;

use std::sync::Arc;

use keyward_core::store::{Store, StoreError};

pub use copy::{CopyReport, copy_store};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// When a commit counts as written: what an access waits for before it
/// proceeds (its audit record) and an admin change before it is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// On disk (fsync) before keyward goes on: survives a power cut.
    #[default]
    Fsync,
    /// Handed to the operating system before keyward goes on (survives a
    /// crash or kill of keyward), on disk within about a second: an OS crash
    /// or power cut can lose that last second. The database stays
    /// consistent and the audit chain valid; it only ends earlier.
    /// SQLite: `synchronous=NORMAL` plus a flush of the WAL every second;
    /// PostgreSQL: `synchronous_commit=off` (its WAL writer flushes within
    /// three `wal_writer_delay`s, 600 ms by default).
    Buffered,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::Buffered => "buffered",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fsync" => Ok(Self::Fsync),
            "buffered" => Ok(Self::Buffered),
            other => Err(format!("durability `{other}`: expected `fsync` (the default) or `buffered`")),
        }
    }
}

/// Opens the store named by a database URL (`sqlite://PATH`), creating and
/// migrating it if needed, with every commit fsync'd.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(url, Durability::Fsync).await
}

/// [`open`] with a chosen [`Durability`].
pub async fn open_with(url: &str, durability: Durability) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        return Ok(Arc::new(SqliteStore::open_with(std::path::Path::new(path), durability).await?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PgStore::open_with(url, durability).await?));
    }
    Err(StoreError::Other(format!(
        "unsupported database URL scheme in `{}`; use sqlite://PATH or postgres://USER@HOST/DB",
        url.split("://").next().unwrap_or("")
    )))
}

/// An online, consistent copy of a SQLite store (`VACUUM INTO`), mode 0600.
/// PostgreSQL is backed up with its own tools (`pg_dump`).
pub async fn backup_sqlite(url: &str, file: &std::path::Path) -> Result<(), StoreError> {
    let path = url.strip_prefix("sqlite://").ok_or_else(|| {
        StoreError::Other(
            "`keyward backup` writes SQLite stores; back up PostgreSQL with pg_dump (see the README)".into(),
        )
    })?;
    if file.exists() {
        return Err(StoreError::Other(format!("{} already exists; choose a new file", file.display())));
    }
    if !std::path::Path::new(path).exists() {
        return Err(StoreError::Other(format!("no database at {path}")));
    }
    SqliteStore::open(std::path::Path::new(path)).await?.backup_to(file).await
}

pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Duplicate { what: "record" },
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) => {
            // SQLite: busy/locked/read-only/full/IO errors mean "cannot write now".
            let unavailable = db.code().is_some_and(|c| {
                let c: &str = &c;
                // PostgreSQL: connection exception, insufficient resources, operator intervention.
                if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") {
                    return true;
                }
                c.parse::<i32>().is_ok_and(sqlite_cannot_write_now)
            });
            if unavailable { StoreError::Unavailable(e.to_string()) } else { StoreError::Other(e.to_string()) }
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// SQLite result codes, primary or extended (the low byte is the primary),
/// that mean "cannot write now": busy, locked, read-only, I/O error, full,
/// cannot open. Shared by sqlx's errors and the audit connection's.
pub(crate) fn sqlite_cannot_write_now(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14)
}
