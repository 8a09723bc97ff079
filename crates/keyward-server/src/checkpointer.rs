//! Writes signed audit checkpoints in the background: every second it asks
//! the vault whether one is due (N events or T seconds since the last).
//! Several replicas may all run it: a checkpoint at a sequence that another
//! replica already signed is simply not stored twice.

use std::sync::Arc;
use std::time::Duration;

use keyward_core::Vault;
use keyward_core::vault::CheckpointPolicy;

pub fn start(vault: &Arc<Vault>, policy: CheckpointPolicy) {
    let weak = Arc::downgrade(vault);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(v) = weak.upgrade() else { break };
            if v.is_sealed() {
                continue;
            }
            match v.checkpoint_if_due(policy, false).await {
                Ok(Some(cp)) => tracing::debug!(seq = cp.seq, "signed an audit checkpoint"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not write an audit checkpoint"),
            }
        }
    });
}
