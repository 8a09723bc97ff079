//! Copying a whole store into an empty one (restore, `migrate-store`):
//! every id, version, grant, token hash, audit event, signed checkpoint and alert,
//! verbatim, so the same master key decrypts the copy and the audit chain
//! and its checkpoints still verify.

use keyward_core::audit::{ChainVerifier, VerifyReport};
use keyward_core::store::{Store, StoreError, StoreResult};
use serde::Serialize;

const PAGE: u32 = 5000;

#[derive(Debug, Serialize)]
pub struct CopyReport {
    /// Rows per table, equal in source and target.
    pub counts: Vec<(&'static str, i64)>,
    /// The copied chain, verified while copying.
    pub audit: VerifyReport,
}

/// Copies `from` into `to`, which must be empty. Stop writers to `from`
/// first (or copy from a backup): the counts are compared at the end and a
/// source that changed meanwhile makes the copy fail.
pub async fn copy_store(from: &dyn Store, to: &dyn Store) -> StoreResult<CopyReport> {
    let snapshot = from.export_state().await?;
    if snapshot.orgs.is_empty() {
        return Err(StoreError::Other("the source store holds no keyward data".into()));
    }
    to.import_state(&snapshot).await?;
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = from.audit_page(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            verifier.feed(r);
        }
        to.import_audit(&page).await?;
    }
    for cp in from.list_checkpoints().await? {
        to.add_checkpoint(&cp).await?;
    }
    for user in from.list_users().await? {
        to.create_user(&user).await?;
    }
    for org in &snapshot.orgs {
        for alert in from.list_alerts(&org.org.id, true, u32::MAX).await? {
            to.add_alert(&alert).await?;
        }
    }
    let audit = verifier.finish();
    let (source, target) = (from.table_counts().await?, to.table_counts().await?);
    if source != target {
        return Err(StoreError::Other(format!(
            "row counts differ after the copy (source {source:?}, target {target:?}); was the source written to meanwhile?"
        )));
    }
    Ok(CopyReport { counts: target, audit })
}
