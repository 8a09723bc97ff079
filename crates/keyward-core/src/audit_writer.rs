//! Group commit for the audit trail. Callers hand an event to one writer
//! task and wait for its commit; the task drains everything queued while the
//! previous batch was committing and writes it in one transaction. Under
//! load many accesses share one commit; at rest each commits alone. Nothing
//! is ever dropped: the queue is bounded and senders wait (backpressure), and
//! a caller whose event did not commit gets an error, never a silent success.
//!
//! Events that record what already happened (a proxied call's outcome) are
//! [`AuditWriter::append_detached`] (or [`AuditWriter::append_soon`] for a
//! caller that wants the result): nobody is held up by their commit, so they
//! ride along with the next access's commit, or commit alone after
//! [`LINGER`]. At moderate load that halves the commits, and an access's
//! record no longer queues behind an outcome's fsync.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditDraft, AuditRecord};
use crate::store::{Store, StoreError};

const QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;
/// How long a caller waits for its commit before the access is refused.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an `append_soon` event waits for a commit to ride along with.
pub const LINGER: Duration = Duration::from_millis(20);

type Reply = oneshot::Sender<Result<i64, String>>;

// Events are the hot path (no boxing, no extra allocation); flushes are rare.
#[allow(clippy::large_enum_variant)]
enum Queued {
    Event {
        draft: AuditDraft,
        /// `None`: nobody asks how it went (the writer logs a failure).
        reply: Option<Reply>,
        /// Someone is waiting for this commit to go on (an access).
        urgent: bool,
    },
    /// Commit whatever is queued now; answered once it is.
    Flush(oneshot::Sender<()>),
}

pub struct AuditWriter {
    tx: mpsc::Sender<Queued>,
}

impl AuditWriter {
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        Self::spawn_with_linger(store, LINGER)
    }

    /// [`spawn`](Self::spawn) with another linger (tests).
    pub fn spawn_with_linger(store: Arc<dyn Store>, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx, linger));
        Self { tx }
    }

    /// Returns the event's sequence number once it is committed.
    pub async fn append(&self, draft: AuditDraft) -> Result<i64, StoreError> {
        self.queue(draft, true).await
    }

    /// Like [`append`](Self::append), for an event nothing waits on: it may
    /// wait up to [`LINGER`] to share the next commit.
    pub async fn append_soon(&self, draft: AuditDraft) -> Result<i64, StoreError> {
        self.queue(draft, false).await
    }

    /// Queues an event that nothing waits on and whose failure can only be
    /// logged (the writer logs it): a proxied call's outcome, recorded as
    /// its answer goes out. It lingers like [`append_soon`](Self::append_soon)
    /// but costs no task, timer or reply channel, and it is queued before
    /// this returns, so a reader that flushes afterwards sees it. Never
    /// dropped while the writer runs: with the queue full, a task waits for
    /// room.
    pub fn append_detached(&self, draft: AuditDraft) {
        match self.tx.try_send(Queued::Event { draft, reply: None, urgent: false }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(queued)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if tx.send(queued).await.is_err() {
                        tracing::error!("audit writer stopped: an outcome event was not recorded");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer stopped: an outcome event was not recorded");
            }
        }
    }

    /// Returns once every event queued before the call is committed (or
    /// failed): a reader of the trail then sees all of them.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Queued::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(COMMIT_TIMEOUT, wait).await;
        }
    }

    async fn queue(&self, draft: AuditDraft, urgent: bool) -> Result<i64, StoreError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Queued::Event { draft, reply: Some(reply), urgent })
            .await
            .map_err(|_| StoreError::Unavailable("audit writer stopped".into()))?;
        match tokio::time::timeout(COMMIT_TIMEOUT, wait).await {
            Ok(Ok(Ok(seq))) => Ok(seq),
            Ok(Ok(Err(msg))) => Err(StoreError::Unavailable(msg)),
            Ok(Err(_)) => Err(StoreError::Unavailable("audit writer stopped".into())),
            Err(_) => Err(StoreError::Unavailable("audit commit timed out".into())),
        }
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Queued>, linger: Duration) {
    let mut batch = Batch::default();
    while let Some(first) = rx.recv().await {
        let mut urgent = batch.take(first);
        while batch.drafts.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(q) => urgent |= batch.take(q),
                Err(_) => break,
            }
        }
        // Only events nothing waits on: wait a little for one that is.
        if !urgent {
            let deadline = tokio::time::Instant::now() + linger;
            while batch.drafts.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(q)) => {
                        if batch.take(q) {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        batch.commit(store.as_ref()).await;
    }
}

#[derive(Default)]
struct Batch {
    drafts: Vec<AuditDraft>,
    replies: Vec<Option<Reply>>,
    flushes: Vec<oneshot::Sender<()>>,
}

impl Batch {
    /// Adds one queued item; whether someone waits on it.
    fn take(&mut self, q: Queued) -> bool {
        match q {
            Queued::Event { draft, reply, urgent } => {
                self.drafts.push(draft);
                self.replies.push(reply);
                urgent
            }
            Queued::Flush(done) => {
                self.flushes.push(done);
                true
            }
        }
    }

    async fn commit(&mut self, store: &dyn Store) {
        let events = self.drafts.len();
        if events > 0 {
            match store.append_audit(std::mem::take(&mut self.drafts)).await {
                Ok(records) => {
                    for (r, rec) in self.replies.drain(..).zip(records.iter().map(|r: &AuditRecord| r.seq)) {
                        if let Some(r) = r {
                            let _ = r.send(Ok(rec));
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, events, "audit append failed; refusing the accesses");
                    let msg = e.to_string();
                    for r in self.replies.drain(..).flatten() {
                        let _ = r.send(Err(msg.clone()));
                    }
                }
            }
        }
        for done in self.flushes.drain(..) {
            let _ = done.send(());
        }
    }
}
