//! The audit trail's signed checkpoints: the signing key (Ed25519, stored
//! wrapped by the master key, created on first use), writing checkpoints,
//! and verification of the chain against them.

use super::*;
use crate::checkpoint::{Checkpoint, CheckpointSigner};

const META_SIGNING_KEY: &str = "audit_signing_key";
const SIGNING_KEY_AAD: &[u8] = b"keyward-audit-signing-key-v1";

/// When a checkpoint is due: after this many new events, or this long
/// after the last one if any event came since.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_events: i64,
    pub every: time::Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self { every_events: 1000, every: time::Duration::seconds(60) }
    }
}

/// The chain's events in sequence order and its checkpoints, for export.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditExportPage {
    pub events: Vec<AuditRecord>,
    /// The last sequence in `events` (the cursor for the next page).
    pub next_after: Option<i64>,
}

/// What `keyward audit prune` did (or would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneReport {
    pub pruned: u64,
    /// The last pruned sequence: the signed checkpoint there anchors the trail.
    pub through_seq: Option<i64>,
    pub dry_run: bool,
}

impl Vault {
    /// The checkpoint signing key, loaded (or created, once per instance)
    /// with the master key.
    async fn signer(&self) -> Result<Arc<CheckpointSigner>, CoreError> {
        if let Some(s) = self.signer.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(s);
        }
        let master = self.master()?;
        let wrapped = match self.store.get_meta(META_SIGNING_KEY).await? {
            Some(w) => w,
            None => {
                let (_, pkcs8) =
                    CheckpointSigner::generate().map_err(|e| CoreError::invalid("audit key", e.to_string()))?;
                let sealed = master.seal(&pkcs8, SIGNING_KEY_AAD)?;
                let encoded = crate::audit::to_hex(&sealed);
                match self.store.insert_meta(META_SIGNING_KEY, &encoded).await {
                    // Another replica created it first: use theirs.
                    Ok(()) | Err(StoreError::Duplicate { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.store.get_meta(META_SIGNING_KEY).await?.ok_or_else(|| not_found("audit signing key"))?
            }
        };
        let sealed = hex_decode(&wrapped).ok_or_else(|| StoreError::Corrupt("audit signing key is not hex".into()))?;
        let pkcs8 = master.open(&sealed, SIGNING_KEY_AAD)?;
        let signer = Arc::new(
            CheckpointSigner::from_pkcs8(&pkcs8).map_err(|e| StoreError::Corrupt(format!("audit signing key: {e}")))?,
        );
        *self.signer.write().unwrap_or_else(|e| e.into_inner()) = Some(signer.clone());
        Ok(signer)
    }

    /// The chain's newest sequence number (where a live feed starts).
    pub async fn audit_head(&self, p: &Principal, org: &str) -> Result<i64, CoreError> {
        self.ensure_unsealed()?;
        self.org_for(p, org).await?;
        self.audit.flush().await;
        Ok(self.store.audit_tail().await?.0)
    }

    /// The public half of the checkpoint key (`keyward audit pubkey`).
    pub async fn audit_public_key(&self, p: &Principal, org: &str) -> Result<[u8; 32], CoreError> {
        self.ensure_unsealed()?;
        self.org_for(p, org).await?;
        Ok(self.signer().await?.public_key())
    }

    /// Signs the chain's current tail if `policy` says a checkpoint is due
    /// (or always, with `force`). Returns the checkpoint written, if any.
    pub async fn checkpoint_if_due(
        &self,
        policy: CheckpointPolicy,
        force: bool,
    ) -> Result<Option<Checkpoint>, CoreError> {
        self.ensure_unsealed()?;
        let (seq, hash) = self.store.audit_tail().await?;
        let last = self.store.list_checkpoints().await?.pop();
        let since = seq - last.as_ref().map_or(0, |c| c.seq);
        let now = self.now();
        let aged = last.as_ref().is_none_or(|c| now - c.time >= policy.every);
        if since <= 0 || !(force || since >= policy.every_events || aged) {
            return Ok(None);
        }
        let cp = self.signer().await?.sign(seq, hash, now);
        Ok(self.store.add_checkpoint(&cp).await?.then_some(cp))
    }

    /// Walks the whole chain (every org: there is one chain per instance)
    /// and checks every signed checkpoint against it.
    pub async fn verify_audit(&self, p: &Principal, org: &str) -> Result<VerifyReport, CoreError> {
        self.verify_audit_recent(p, org, std::time::Duration::ZERO).await
    }

    /// [`verify_audit`](Self::verify_audit) as of at most `max_age` ago: a
    /// page that shows it on every view must not walk the whole trail (every
    /// organization's) on every view; one walk at a time.
    pub async fn verify_audit_recent(
        &self,
        p: &Principal,
        org: &str,
        max_age: std::time::Duration,
    ) -> Result<VerifyReport, CoreError> {
        self.ensure_unsealed()?;
        self.org_for(p, org).await?;
        let fresh = || {
            let last = self.recent_verify.lock().unwrap_or_else(|e| e.into_inner());
            last.as_ref().filter(|(at, _)| at.elapsed() < max_age).map(|(_, r)| r.clone())
        };
        if let Some(r) = fresh() {
            return Ok(r);
        }
        let _one_walk = self.verify_walk.lock().await;
        if let Some(r) = fresh() {
            return Ok(r); // walked while this one waited
        }
        self.audit.flush().await;
        let report = self.walk_chain().await?;
        *self.recent_verify.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), report.clone()));
        Ok(report)
    }

    async fn walk_chain(&self) -> Result<VerifyReport, CoreError> {
        let key = self.signer().await?.public_key();
        let mut v = ChainVerifier::with_checkpoints(key, self.store.list_checkpoints().await?);
        let mut after = 0;
        loop {
            let page = self.store.audit_page(after, 2000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            if !page.iter().all(|r| v.feed(r)) {
                break;
            }
        }
        Ok(v.finish())
    }

    /// The chain itself, for `keyward audit export`. It spans every
    /// organization, so only the operator token may read it whole.
    pub async fn export_audit(&self, p: &Principal, after: i64, limit: u32) -> Result<AuditExportPage, CoreError> {
        self.ensure_unsealed()?;
        self.require_operator(p, "audit.export").await?;
        self.audit.flush().await;
        let events = self.store.audit_page(after.max(0), limit.clamp(1, 5000)).await?;
        let next_after = events.last().map(|r| r.seq);
        Ok(AuditExportPage { events, next_after })
    }

    pub async fn export_checkpoints(&self, p: &Principal) -> Result<Vec<Checkpoint>, CoreError> {
        self.ensure_unsealed()?;
        self.require_operator(p, "audit.export").await?;
        Ok(self.store.list_checkpoints().await?)
    }

    /// Deletes the events older than `before` (retention), keeping the rest
    /// verifiable: the last deleted event's chain hash is signed as a
    /// checkpoint that anchors the new start. Operator and owner only; the
    /// prune itself is audited first. `dry_run` only counts.
    pub async fn prune_audit(
        &self,
        p: &Principal,
        before: OffsetDateTime,
        dry_run: bool,
        meta: &RequestMeta,
    ) -> Result<PruneReport, CoreError> {
        self.ensure_unsealed()?;
        self.require_operator(p, "audit.prune").await?;
        let Some((through, hash)) = self.store.audit_last_before(before).await? else {
            return Ok(PruneReport { pruned: 0, through_seq: None, dry_run });
        };
        if dry_run {
            let first = self.store.audit_page(0, 1).await?.first().map_or(through + 1, |r| r.seq);
            return Ok(PruneReport {
                pruned: (through - first + 1).max(0) as u64,
                through_seq: Some(through),
                dry_run,
            });
        }
        // Never sign an anchor over a trail that does not verify: that
        // would launder tampering into the new start.
        let report = self.walk_chain().await?;
        if !report.ok {
            return Err(CoreError::Conflict {
                message: format!(
                    "the audit trail does not verify (sequence {}: {}); prune refused",
                    report.broken_at.unwrap_or(-1),
                    report.problem.unwrap_or_default()
                ),
            });
        }
        let at = before.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        self.audit_now(AuditDraft {
            actor: p.actor(),
            action: "audit.prune".into(),
            reason: Some(format!("before={at} through_seq={through}")),
            ..draft_base(self.now(), Outcome::Allowed, meta)
        })
        .await?;
        let anchor = self.signer().await?.sign(through, hash, self.now());
        self.store.add_checkpoint(&anchor).await?;
        let pruned = self.store.prune_audit(through).await?;
        Ok(PruneReport { pruned, through_seq: Some(through), dry_run })
    }

    async fn require_operator(&self, p: &Principal, action: &str) -> Result<(), CoreError> {
        if p.org_id.is_none() {
            return Ok(());
        }
        self.audit_now(AuditDraft {
            org_id: p.org_id.clone(),
            actor: p.actor(),
            action: action.into(),
            reason: Some("operator_only".into()),
            ..draft_base(self.now(), Outcome::Denied, &RequestMeta::default())
        })
        .await?;
        Err(forbidden("operator_only", "the audit chain spans every organization: export it with the operator token"))
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}
