//! Notifications about lifetimes and rotations (webhooks). The core says
//! what happened; delivery (signing, retries) belongs to the server. Sending
//! never blocks and never carries a value.

use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    /// `secret.expiring`, `secret.expired`, `secret.rotation_overdue`,
    /// `secret.rotated`, `agent.token_expiring`.
    pub event: String,
    pub org_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub data: serde_json::Value,
}

pub trait Notifier: Send + Sync + 'static {
    /// Queues a notification; must return at once.
    fn send(&self, n: Notification);
}

/// Whether accesses may proceed given the state of the required audit sinks
/// (see the server's sink module): `Some(reason)` refuses every use of a
/// secret, fail closed, until the sinks can take events again.
pub trait AccessGate: Send + Sync {
    fn refusal(&self) -> Option<&'static str>;
}
