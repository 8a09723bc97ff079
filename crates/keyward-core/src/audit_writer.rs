//! Group commit for the audit trail, by combining: a caller queues its
//! event, then takes the one commit seat and commits everything queued (its
//! own event and whatever else waits) in one transaction, on its own task.
//! While one caller commits, the others queue behind it and the next one to
//! take the seat commits them all at once: under load many accesses share a
//! commit, at rest each commits alone, and nobody hands its event to another
//! task and waits to be woken (that hand-off cost more than the commit
//! itself with `buffered` durability). Nothing is ever dropped: the queue is
//! bounded and senders wait (backpressure), a commit once begun finishes
//! even if the caller that began it goes away, and a caller whose event did
//! not commit gets an error, never a silent success.
//!
//! Events that record what already happened (a proxied call's outcome) are
//! [`AuditWriter::append_detached`] (or [`AuditWriter::append_soon`] for a
//! caller that wants the result): nobody is held up by their commit, so they
//! ride along with the next access's commit, or a background task commits
//! them after [`LINGER`]. At moderate load that halves the commits, and an
//! access's record never queues behind an outcome's fsync.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, OwnedMutexGuard, mpsc, oneshot};

use crate::audit::{AuditDraft, AuditRecord};
use crate::store::{Store, StoreError};

const QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;
/// How long a caller waits for its commit before the access is refused.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an event nothing waits on waits for a commit to ride along with.
pub const LINGER: Duration = Duration::from_millis(20);

type Reply = oneshot::Sender<Result<i64, String>>;

struct Queued {
    draft: AuditDraft,
    /// `None`: nobody asks how it went (a failure is logged).
    reply: Option<Reply>,
}

/// Whoever holds it commits what is queued.
type Seat = OwnedMutexGuard<mpsc::Receiver<Queued>>;

pub struct AuditWriter {
    tx: mpsc::Sender<Queued>,
    seat: Arc<Mutex<mpsc::Receiver<Queued>>>,
    store: Arc<dyn Store>,
    /// Wakes the background committer: something queued has no combiner.
    lingering: Arc<Notify>,
    /// Set when the writer is dropped: the background task commits what is
    /// left and ends.
    closed: Arc<AtomicBool>,
}

impl AuditWriter {
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        Self::spawn_with_linger(store, LINGER)
    }

    /// [`spawn`](Self::spawn) with another linger (tests).
    pub fn spawn_with_linger(store: Arc<dyn Store>, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Self {
            tx,
            seat: Arc::new(Mutex::new(rx)),
            store,
            lingering: Arc::new(Notify::new()),
            closed: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(background(
            writer.seat.clone(),
            writer.store.clone(),
            writer.lingering.clone(),
            writer.closed.clone(),
            linger,
        ));
        writer
    }

    /// Returns the event's sequence number once it is committed.
    pub async fn append(&self, draft: AuditDraft) -> Result<i64, StoreError> {
        let (reply, mut committed) = oneshot::channel();
        self.tx
            .send(Queued { draft, reply: Some(reply) })
            .await
            .map_err(|_| StoreError::Unavailable("audit writer stopped".into()))?;
        // Dropped before its commit (the access went away): the background
        // task makes sure the queued event is committed anyway.
        let mut orphan = OrphanGuard(Some(&self.lingering));
        let waited = tokio::time::timeout(COMMIT_TIMEOUT, async {
            loop {
                let seat = tokio::select! {
                    biased;
                    // Someone else's commit took it.
                    r = &mut committed => return r,
                    seat = self.seat.clone().lock_owned() => seat,
                };
                // Batches leave the queue in order: this one, or one after
                // it (more than a batch was queued ahead), commits the event.
                CommitToEnd::one_batch(self.store.clone(), seat).await;
            }
        })
        .await;
        if waited.is_ok() {
            orphan.0 = None;
        }
        reply_result(waited)
    }

    /// Like [`append`](Self::append), for an event nothing waits on: it may
    /// wait up to [`LINGER`] to share the next commit.
    pub async fn append_soon(&self, draft: AuditDraft) -> Result<i64, StoreError> {
        let (reply, committed) = oneshot::channel();
        self.tx
            .send(Queued { draft, reply: Some(reply) })
            .await
            .map_err(|_| StoreError::Unavailable("audit writer stopped".into()))?;
        self.lingering.notify_one();
        reply_result(tokio::time::timeout(COMMIT_TIMEOUT, committed).await)
    }

    /// Queues an event that nothing waits on and whose failure can only be
    /// logged: a proxied call's outcome, recorded as its answer goes out. It
    /// lingers like [`append_soon`](Self::append_soon) but costs no task or
    /// reply channel, and it is queued before this returns, so a reader that
    /// flushes afterwards sees it. Never dropped while the writer runs: with
    /// the queue full, a task waits for room.
    pub fn append_detached(&self, draft: AuditDraft) {
        match self.tx.try_send(Queued { draft, reply: None }) {
            Ok(()) => self.lingering.notify_one(),
            Err(mpsc::error::TrySendError::Full(queued)) => {
                let (tx, lingering) = (self.tx.clone(), self.lingering.clone());
                // Called from drops too: outside a runtime there is nothing
                // to wait on, and a panic there would abort.
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    tracing::error!("audit queue full outside a runtime: an outcome event was not recorded");
                    return;
                };
                rt.spawn(async move {
                    match tx.send(queued).await {
                        Ok(()) => lingering.notify_one(),
                        Err(_) => tracing::error!("audit writer stopped: an outcome event was not recorded"),
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer stopped: an outcome event was not recorded");
            }
        }
    }

    /// Returns once every event queued before the call is committed (or
    /// failed): a reader of the trail then sees all of them. Only those:
    /// under a steady stream of accesses the queue is never empty.
    pub async fn flush(&self) {
        let flushed = async {
            let seat = self.seat.clone().lock_owned().await;
            CommitToEnd::queued_now(self.store.clone(), seat).await;
        };
        let _ = tokio::time::timeout(COMMIT_TIMEOUT, flushed).await;
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.lingering.notify_one();
    }
}

fn reply_result(
    waited: Result<Result<Result<i64, String>, oneshot::error::RecvError>, tokio::time::error::Elapsed>,
) -> Result<i64, StoreError> {
    match waited {
        Ok(Ok(Ok(seq))) => Ok(seq),
        Ok(Ok(Err(msg))) => Err(StoreError::Unavailable(msg)),
        Ok(Err(_)) => Err(StoreError::Unavailable("audit writer stopped".into())),
        Err(_) => Err(StoreError::Unavailable("audit commit timed out".into())),
    }
}

/// Wakes the background committer if an `append` is dropped before its
/// event is known to be committed.
struct OrphanGuard<'a>(Option<&'a Notify>);

impl Drop for OrphanGuard<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.notify_one();
        }
    }
}

/// Commits what nobody commits for itself (outcome events, orphans), a
/// linger after it is queued; at the end, whatever is left.
async fn background(
    seat: Arc<Mutex<mpsc::Receiver<Queued>>>,
    store: Arc<dyn Store>,
    lingering: Arc<Notify>,
    closed: Arc<AtomicBool>,
    linger: Duration,
) {
    loop {
        lingering.notified().await;
        let closing = closed.load(Ordering::Acquire);
        if !closing {
            tokio::time::sleep(linger).await;
        }
        let taken = seat.clone().lock_owned().await;
        if closing {
            CommitToEnd::until_empty(store, taken).await;
            return;
        }
        // What came later notified again: it gets its own linger.
        CommitToEnd::queued_now(store.clone(), taken).await;
    }
}

/// Commits from the seat: one batch, what is queued now, or everything
/// until the queue is empty. Boxed so that, if whoever awaits it goes away
/// mid-commit, the rest runs on a task of its own: the commit still
/// finishes and every event in it gets its answer.
struct CommitToEnd(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl CommitToEnd {
    /// One batch: what is queued now, up to [`MAX_BATCH`].
    fn one_batch(store: Arc<dyn Store>, seat: Seat) -> Self {
        Self(Some(Box::pin(commit_from(store, seat, MAX_BATCH))))
    }

    /// Everything queued now, in batches; nothing queued after.
    fn queued_now(store: Arc<dyn Store>, seat: Seat) -> Self {
        let queued = seat.len();
        Self(Some(Box::pin(commit_from(store, seat, queued))))
    }

    /// Batch after batch until the queue is empty (the writer is closing:
    /// nothing new comes).
    fn until_empty(store: Arc<dyn Store>, seat: Seat) -> Self {
        Self(Some(Box::pin(commit_from(store, seat, usize::MAX))))
    }
}

/// Takes up to `limit` events off the queue (fewer if it runs dry), in
/// batches of at most [`MAX_BATCH`], and commits each batch.
async fn commit_from(store: Arc<dyn Store>, mut seat: Seat, mut limit: usize) {
    while limit > 0 {
        let mut batch = Vec::new();
        let mut replies = Vec::new();
        while batch.len() < MAX_BATCH.min(limit) {
            match seat.try_recv() {
                Ok(q) => {
                    batch.push(q.draft);
                    replies.push(q.reply);
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            return;
        }
        limit -= batch.len();
        commit(store.as_ref(), batch, replies).await;
    }
}

async fn commit(store: &dyn Store, batch: Vec<AuditDraft>, replies: Vec<Option<Reply>>) {
    let events = batch.len();
    match store.append_audit(batch).await {
        Ok(records) => {
            for (r, seq) in replies.into_iter().zip(records.iter().map(|r: &AuditRecord| r.seq)) {
                if let Some(r) = r {
                    let _ = r.send(Ok(seq));
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, events, "audit append failed; refusing the accesses");
            let msg = e.to_string();
            for r in replies.into_iter().flatten() {
                let _ = r.send(Err(msg.clone()));
            }
        }
    }
}

impl Future for CommitToEnd {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(f) = self.0.as_mut() else { return Poll::Ready(()) };
        let done = f.as_mut().poll(cx);
        if done.is_ready() {
            self.0 = None;
        }
        done
    }
}

impl Drop for CommitToEnd {
    fn drop(&mut self) {
        if let Some(rest) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(rest);
                }
                // No runtime left to finish it on: the callers see "stopped".
                Err(_) => tracing::error!("audit commit abandoned at shutdown"),
            }
        }
    }
}
