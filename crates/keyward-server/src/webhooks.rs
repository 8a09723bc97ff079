//! Webhook delivery for notifications: JSON without values, signed with
//! HMAC-SHA256 (`Keyward-Signature: t=UNIX,v1=HEX` over `"{t}.{body}"`),
//! retried with backoff in order, on a queue of its own per webhook — a
//! receiver that is down delays nothing else and gets its events when it
//! comes back. The queue lives in memory: a restart loses what was pending.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use keyward_core::Vault;
use keyward_core::notify::{Notification, Notifier};
use serde::Deserialize;
use tokio::sync::mpsc;

const QUEUE: usize = 10_000;
const MAX_BACKOFF: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// HMAC key shared with the receiver (keep the config file 0600).
    pub secret: String,
    /// Events to send; empty: all.
    #[serde(default)]
    pub events: Vec<String>,
}

struct Hook {
    events: Vec<String>,
    tx: mpsc::Sender<Notification>,
}

pub struct Webhooks(Vec<Hook>);

impl Notifier for Webhooks {
    fn send(&self, n: Notification) {
        for h in &self.0 {
            if (h.events.is_empty() || h.events.contains(&n.event)) && h.tx.try_send(n.clone()).is_err() {
                tracing::error!(event = %n.event, "webhook queue full; notification dropped");
            }
        }
    }
}

/// `t=UNIX,v1=HEX`: what a receiver recomputes to trust a delivery.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

async fn deliver(cfg: WebhookConfig, mut rx: mpsc::Receiver<Notification>) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("webhook client");
    while let Some(n) = rx.recv().await {
        let body = serde_json::to_vec(&n).expect("serializable");
        let mut backoff = Duration::from_millis(250);
        loop {
            let t = time::OffsetDateTime::now_utc().unix_timestamp();
            let sent = client
                .post(&cfg.url)
                .header("content-type", "application/json")
                .header("keyward-event", &n.event)
                .header("keyward-signature", signature(cfg.secret.as_bytes(), t, &body))
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => tracing::warn!(status = r.status().as_u16(), event = %n.event, "webhook refused; retrying"),
                Err(e) => tracing::warn!(error = %e.without_url(), event = %n.event, "webhook unreachable; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Starts delivery and the lifetime scan that produces reminders.
pub fn start(vault: &Arc<Vault>, configs: Vec<WebhookConfig>, scan_every: Duration) {
    if configs.is_empty() {
        return;
    }
    let hooks = configs
        .into_iter()
        .map(|cfg| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let events = cfg.events.clone();
            tokio::spawn(deliver(cfg, rx));
            Hook { events, tx }
        })
        .collect();
    vault.set_notifier(Arc::new(Webhooks(hooks)));
    let weak = Arc::downgrade(vault);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(scan_every);
        loop {
            tick.tick().await;
            let Some(v) = weak.upgrade() else { break };
            if !v.is_sealed()
                && let Err(e) = v.scan_lifetimes().await
            {
                tracing::warn!(error = %e, "lifetime scan failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_over_timestamp_and_body() {
        // Known answer, computed independently (Python's hmac module).
        assert_eq!(
            super::signature(b"key", 1700000000, b"{}"),
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
        assert_ne!(super::signature(b"other", 1700000000, b"{}"), super::signature(b"key", 1700000000, b"{}"));
    }
}
