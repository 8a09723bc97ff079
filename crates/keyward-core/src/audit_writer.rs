//! Group commit for the audit trail. Callers hand an event to one writer
//! task and wait for its commit; the task drains everything queued while the
//! previous batch was committing and writes it in one transaction. Under
//! load many accesses share one commit; at rest each commits alone. Nothing
//! is ever dropped: the queue is bounded and senders wait (backpressure), and
//! a caller whose event did not commit gets an error, never a silent success.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditDraft, AuditRecord};
use crate::store::{Store, StoreError};

const QUEUE: usize = 8192;
const MAX_BATCH: usize = 1024;
/// How long a caller waits for its commit before the access is refused.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = oneshot::Sender<Result<i64, String>>;

pub struct AuditWriter {
    tx: mpsc::Sender<(AuditDraft, Reply)>,
}

impl AuditWriter {
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    /// Returns the event's sequence number once it is committed.
    pub async fn append(&self, draft: AuditDraft) -> Result<i64, StoreError> {
        let (reply, wait) = oneshot::channel();
        self.tx.send((draft, reply)).await.map_err(|_| StoreError::Unavailable("audit writer stopped".into()))?;
        match tokio::time::timeout(COMMIT_TIMEOUT, wait).await {
            Ok(Ok(Ok(seq))) => Ok(seq),
            Ok(Ok(Err(msg))) => Err(StoreError::Unavailable(msg)),
            Ok(Err(_)) => Err(StoreError::Unavailable("audit writer stopped".into())),
            Err(_) => Err(StoreError::Unavailable("audit commit timed out".into())),
        }
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(AuditDraft, Reply)>) {
    let mut drafts = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some((d, r)) = rx.recv().await {
        drafts.push(d);
        replies.push(r);
        while drafts.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((d, r)) => {
                    drafts.push(d);
                    replies.push(r);
                }
                Err(_) => break,
            }
        }
        let events = drafts.len();
        match store.append_audit(std::mem::take(&mut drafts)).await {
            Ok(records) => {
                for (r, rec) in replies.drain(..).zip(records.iter().map(|r: &AuditRecord| r.seq)) {
                    let _ = r.send(Ok(rec));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events, "audit append failed; refusing the accesses");
                let msg = e.to_string();
                for r in replies.drain(..) {
                    let _ = r.send(Err(msg.clone()));
                }
            }
        }
    }
}
