//! SQLite's audit appends, on a connection of their own driven directly
//! (rusqlite) instead of through sqlx's worker thread.
//!
//! Every access waits for its audit record's commit, so this is the one
//! write on a proxied request's path. Through sqlx each commit was a round
//! trip to SQLite's thread and back; here it is a function call: with
//! `buffered` durability (a commit is a write into the OS cache, tens of
//! microseconds) the INSERT runs on the caller's thread, and only when it
//! would wait (another writer holds the lock) or fsync (`fsync` durability,
//! batches over one statement) does it move to a blocking thread, and so do
//! the WAL checkpoints that SQLite would otherwise run inside a commit.
//!
//! The connection only ever runs single autocommit INSERTs or explicit
//! `BEGIN IMMEDIATE` transactions, and the pool's transactions begin
//! IMMEDIATE too, so the two writers serialise on SQLite's write lock
//! without one invalidating the other's snapshot.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use keyward_core::audit::AuditRecord;
use keyward_core::store::{StoreError, StoreResult};
use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::rows::{AUDIT_COLUMNS, AUDIT_STATEMENT_MAX_ROWS, micros};
use crate::{Durability, sqlite_cannot_write_now};

/// How long an append waits for the write lock on a blocking thread, the
/// same as the pool's connections.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// The INSERT for each batch size, `INSERTS[n - 1]` for n rows.
static INSERTS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let row = format!("({})", vec!["?"; AUDIT_COLUMNS.split(',').count()].join(", "));
    (1..=AUDIT_STATEMENT_MAX_ROWS)
        .map(|n| format!("INSERT INTO audit_events ({AUDIT_COLUMNS}) VALUES {}", vec![row.as_str(); n].join(", ")))
        .collect()
});

pub(crate) struct AuditConnection {
    conn: Arc<Mutex<Connection>>,
    /// Try the INSERT on the caller's thread first (`buffered` only: a
    /// commit that fsyncs must not hold an async worker).
    inline: bool,
    /// Frames in the WAL after this connection's last commit.
    wal_frames: Arc<AtomicI32>,
    /// A checkpoint is running on a blocking thread.
    checkpointing: Arc<AtomicBool>,
    /// Copies the WAL into the database while appends go on.
    checkpointer: Arc<Mutex<Connection>>,
}

/// WAL frames (pages) after which a checkpoint starts: SQLite's default
/// autocheckpoint threshold, which keeps the WAL at about 4 MB.
const CHECKPOINT_FRAMES: i32 = 1000;
/// Frames left for the catch-up pass, which holds appends up: the copying
/// passes that run beside the appends go on until at most this many are.
const CATCH_UP_FRAMES: i32 = 64;
/// Copying passes before the catch-up runs whatever is left.
const COPY_PASSES: usize = 4;

impl AuditConnection {
    /// Opens the (already created and migrated) database at `path`.
    pub(crate) fn open(path: &Path, durability: Durability) -> StoreResult<Self> {
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(sqlite_err)?;
        let synchronous = match durability {
            Durability::Fsync => "FULL",
            Durability::Buffered => "NORMAL",
        };
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sqlite_err)?;
        conn.pragma_update(None, "synchronous", synchronous).map_err(sqlite_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sqlite_err)?;
        // A checkpoint fsyncs and copies up to CHECKPOINT_FRAMES pages, so it
        // must neither run inside a commit on an async worker nor hold the
        // appends up while it copies (what SQLite's autocheckpoint would do):
        // this hook replaces it and only counts; `insert` starts the
        // checkpoint (see `checkpoint_if_due`).
        let wal_frames = Arc::new(AtomicI32::new(0));
        let frames = wal_frames.clone();
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, n: std::ffi::c_int| {
            frames.store(n, Ordering::Relaxed);
            Ok(())
        }))
        .map_err(sqlite_err)?;
        conn.busy_timeout(BUSY_WAIT).map_err(sqlite_err)?;
        let checkpointer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(sqlite_err)?;
        checkpointer.pragma_update(None, "synchronous", synchronous).map_err(sqlite_err)?;
        checkpointer.busy_timeout(BUSY_WAIT).map_err(sqlite_err)?;
        // Every batch size, plus the transaction statements.
        conn.set_prepared_statement_cache_capacity(AUDIT_STATEMENT_MAX_ROWS + 8);
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            inline: durability == Durability::Buffered,
            wal_frames,
            checkpointing: Arc::new(AtomicBool::new(false)),
            checkpointer: Arc::new(Mutex::new(checkpointer)),
        })
    }

    /// `PRAGMA synchronous` of this connection (2 = FULL, 1 = NORMAL).
    pub(crate) fn sync_setting(&self) -> StoreResult<i64> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.pragma_query_value(None, "synchronous", |r| r.get(0)).map_err(sqlite_err)
    }

    /// Inserts `records` atomically: all or none. Hands them back with the
    /// result (a blocking thread had to own them).
    pub(crate) async fn insert(&self, records: Vec<AuditRecord>) -> (Vec<AuditRecord>, StoreResult<()>) {
        if self.inline
            && records.len() <= AUDIT_STATEMENT_MAX_ROWS
            && let Ok(conn) = self.conn.try_lock()
        {
            // Never wait on this thread: a busy database goes to a blocking thread.
            let tried = conn.busy_timeout(Duration::ZERO).and_then(|()| insert_statement(&conn, &records));
            if let Err(e) = conn.busy_timeout(BUSY_WAIT) {
                // Only API misuse fails here. The records' fate is `tried`'s;
                // later appends that meet a busy database then fail (closed).
                tracing::warn!(error = %e, "could not restore the audit connection's busy timeout");
            }
            match tried {
                Ok(()) => {
                    drop(conn);
                    self.checkpoint_if_due();
                    return (records, Ok(()));
                }
                Err(e) if !is_busy(&e) => return (records, Err(sqlite_err(e))),
                // Busy: nothing was written; wait for the lock below.
                Err(_) => {}
            }
        }
        let conn = self.conn.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let written = insert_all(&conn, &records);
            (records, written)
        })
        .await;
        match joined {
            Ok((records, written)) => {
                if written.is_ok() {
                    self.checkpoint_if_due();
                }
                (records, written.map_err(sqlite_err))
            }
            // The closure does not panic short of a bug; the records went with it.
            Err(e) => (Vec::new(), Err(StoreError::Unavailable(format!("audit append task failed: {e}")))),
        }
    }

    /// Moves the WAL into the database once it holds
    /// [`CHECKPOINT_FRAMES`], on a blocking thread. The copying runs on a
    /// connection of its own while appends go on (a checkpoint of 1000
    /// frames held them up for milliseconds: the p99 of a proxied request);
    /// each pass copies what was committed during the one before, until at
    /// most [`CATCH_UP_FRAMES`] are left. A last pass on the audit
    /// connection, which appends wait for, copies those, so the WAL is
    /// complete and the next commit starts it over: under a steady stream
    /// of appends the copying passes alone would never catch up. A
    /// checkpoint that fails or cannot finish is tried again after the
    /// next commit.
    fn checkpoint_if_due(&self) {
        if self.wal_frames.load(Ordering::Relaxed) < CHECKPOINT_FRAMES
            || self.checkpointing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (conn, copier) = (self.conn.clone(), self.checkpointer.clone());
        let (frames, running) = (self.wal_frames.clone(), self.checkpointing.clone());
        tokio::task::spawn_blocking(move || {
            let passive = |c: &Connection| c.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE);
            let mut copied = Ok(());
            {
                let copier = copier.lock().unwrap_or_else(PoisonError::into_inner);
                for _ in 0..COPY_PASSES {
                    match passive(&copier) {
                        Ok((log, done)) if log - done > CATCH_UP_FRAMES => {}
                        Ok(_) => break,
                        Err(e) => {
                            copied = Err(e);
                            break;
                        }
                    }
                }
            }
            let caught_up = copied.and_then(|()| {
                let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                passive(&conn)
            });
            match caught_up {
                Ok((log, done)) if log == done => frames.store(0, Ordering::Relaxed),
                Ok(_) => {}
                // Another connection's checkpoint (the pool's writer runs
                // SQLite's own after its rare commits): try again after the
                // next commit.
                Err(e) if is_busy(&e) => tracing::debug!(error = %e, "WAL checkpoint deferred: another one runs"),
                Err(e) => tracing::warn!(error = %e, "could not checkpoint the SQLite WAL"),
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// One statement when the batch fits one, else a transaction of chunks.
fn insert_all(conn: &Connection, records: &[AuditRecord]) -> rusqlite::Result<()> {
    if records.len() <= AUDIT_STATEMENT_MAX_ROWS {
        return insert_statement(conn, records);
    }
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let written = records.chunks(AUDIT_STATEMENT_MAX_ROWS).try_for_each(|chunk| insert_statement(conn, chunk));
    let ended = match written {
        Ok(()) => conn.prepare_cached("COMMIT").and_then(|mut s| s.execute([])),
        Err(_) => conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([])),
    };
    written?;
    if ended.is_err() && !conn.is_autocommit() {
        // A failed COMMIT leaves the transaction open: end it, so the next
        // append does not run inside it.
        let _ = conn.execute_batch("ROLLBACK");
    }
    ended.map(drop)
}

/// One INSERT of 1..=[`AUDIT_STATEMENT_MAX_ROWS`] rows.
fn insert_statement(conn: &Connection, records: &[AuditRecord]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(&INSERTS[records.len() - 1])?;
    let mut i = 0;
    let mut bind = |v: &dyn rusqlite::ToSql| {
        i += 1;
        stmt.raw_bind_parameter(i, v)
    };
    for r in records {
        let e = &r.event;
        bind(&r.seq)?;
        bind(&micros(e.time))?;
        bind(&e.org_id)?;
        bind(&e.actor.kind.as_str())?;
        bind(&e.actor.id)?;
        bind(&e.actor.name)?;
        bind(&e.actor.token_id)?;
        bind(&e.action)?;
        bind(&e.secret_id)?;
        bind(&e.secret_name)?;
        bind(&e.secret_version)?;
        bind(&e.purpose)?;
        bind(&e.source_ip)?;
        bind(&e.user_agent)?;
        bind(&e.outcome.as_str())?;
        bind(&e.reason)?;
        bind(&e.request_id)?;
        bind(&&r.prev_hash[..])?;
        bind(&&r.hash[..])?;
    }
    stmt.raw_execute().map(drop)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// The same classes as [`crate::map_err`]: a taken sequence number is a
/// duplicate (the chain moved: chain again), "cannot write now" is
/// unavailable, anything else is an error.
fn sqlite_err(e: rusqlite::Error) -> StoreError {
    let code = e.sqlite_error().map(|s| s.extended_code);
    match code {
        Some(rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE) => {
            StoreError::Duplicate { what: "record" }
        }
        Some(c) if sqlite_cannot_write_now(c) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::audit::AuditDraft;
    use keyward_core::store::Store;

    fn draft(n: usize) -> AuditDraft {
        crate::testing::audit_draft(&format!("e{n}"))
    }

    /// A checkpoint copies the WAL beside the appends, not in their way: with
    /// its copying connection held (a copy that takes as long as the test
    /// likes), appends still commit; once it is let go, the catch-up pass
    /// completes the checkpoint and the next commit starts the WAL over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // Holding the copier's lock across the appends is the point of the test.
    #[allow(clippy::await_holding_lock)]
    async fn appends_go_on_while_a_checkpoint_copies() {
        for durability in [Durability::Buffered, Durability::Fsync] {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::SqliteStore::open_with(&dir.path().join("t.db"), durability).await.unwrap();
            let audit = &store.audit_conn;
            let copying = audit.checkpointer.lock().unwrap();
            // Each commit adds at least two frames: 600 pass the threshold.
            for n in 0..600 {
                let appended = tokio::time::timeout(Duration::from_secs(5), store.append_audit(vec![draft(n)])).await;
                appended.expect("an append waited for the checkpoint's copy").unwrap();
            }
            assert!(audit.checkpointing.load(Ordering::Acquire), "{durability:?}: no checkpoint started");
            assert!(audit.wal_frames.load(Ordering::Relaxed) >= CHECKPOINT_FRAMES);
            drop(copying);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while audit.checkpointing.load(Ordering::Acquire) {
                assert!(std::time::Instant::now() < deadline, "{durability:?}: the checkpoint did not finish");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            store.append_audit(vec![draft(600)]).await.unwrap();
            let frames = audit.wal_frames.load(Ordering::Relaxed);
            assert!(frames < 16, "{durability:?}: the WAL did not start over ({frames} frames)");
            let mut verifier = keyward_core::audit::ChainVerifier::default();
            store.audit_page(0, 1000).await.unwrap().iter().for_each(|r| {
                verifier.feed(r);
            });
            let report = verifier.finish();
            assert!(report.ok && report.events == 601, "{durability:?}: {report:?}");
        }
    }

    #[test]
    fn one_statement_per_size_with_19_parameters_a_row() {
        assert_eq!(INSERTS.len(), AUDIT_STATEMENT_MAX_ROWS);
        for (i, sql) in INSERTS.iter().enumerate() {
            assert_eq!(sql.matches('?').count(), 19 * (i + 1));
        }
    }
}
