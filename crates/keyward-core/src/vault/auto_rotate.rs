//! Automated rotation (`secret rotate --auto` and the schedule): the hook
//! issues a value → it is stored as a pending version (never served) → the
//! optional probe verifies it → it is promoted to current → the hook revokes
//! the old value at the provider. Until promotion every failure leaves the
//! current version untouched; every step is audited, failures notified.

use std::collections::HashSet;

use super::*;
use crate::rotation::{HookAction, HookCall, RotationDriver};

/// Failed scheduled rotations wait this long before the next attempt.
const RETRY_AFTER: time::Duration = time::Duration::hours(1);

/// An automated rotation that reached promotion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoRotated {
    #[serde(flatten)]
    pub info: SecretInfo,
    pub promoted_version: i64,
    /// The revoke step failed: the new version is current, but the old
    /// value may still work at the provider until someone revokes it there.
    pub revoke_error: Option<String>,
}

/// Marks a secret as being rotated by this process; released on drop.
pub(super) struct RotationClaim<'a> {
    set: &'a std::sync::Mutex<HashSet<String>>,
    id: String,
}

impl Drop for RotationClaim<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl Vault {
    pub fn set_rotation_driver(&self, driver: Arc<dyn RotationDriver>) {
        let _ = self.rotation.driver.set(driver);
    }

    pub(super) fn driver_for(&self, hook: &str) -> Result<Arc<dyn RotationDriver>, CoreError> {
        match self.rotation.driver.get() {
            Some(d) if d.has_hook(hook) => Ok(d.clone()),
            _ => Err(CoreError::invalid(
                "rotation hook",
                format!("the server config names no rotation hook `{hook}` ([[rotation_hooks]])"),
            )),
        }
    }

    /// Sets how often a secret should rotate and whether it rotates by
    /// itself through a hook (`None` clears either).
    #[allow(clippy::too_many_arguments)]
    pub async fn set_rotation_policy(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        every: Option<time::Duration>,
        auto: Option<AutoRotation>,
        meta: &RequestMeta,
    ) -> Result<SecretInfo, CoreError> {
        if every.is_some_and(|d| d <= time::Duration::ZERO) {
            return Err(CoreError::invalid("rotate_every", "must be positive"));
        }
        if let Some(a) = &auto {
            a.validate()?;
            self.driver_for(&a.hook)?;
        }
        let secret = self.secret_action(p, org, reference, "secret.policy", None, meta).await?;
        if let Some(a) = &auto
            && a.verify.is_some()
            && secret.upstream.is_none()
        {
            return Err(CoreError::invalid("verify", "the secret is bound to no upstream to probe"));
        }
        self.store.set_rotation_policy(&secret.id, every.map(|d| d.whole_seconds()), auto.as_ref(), self.now()).await?;
        self.policy_changed();
        let org_rec = self.org_for(p, org).await?;
        let secret = self.find_secret_in(&org_rec, &secret.id).await?;
        self.secret_info_of(secret).await
    }

    /// Rotates a secret now through its hook (`secret rotate NAME --auto`).
    pub async fn auto_rotate(
        &self,
        p: &Principal,
        org: &str,
        reference: &str,
        meta: &RequestMeta,
    ) -> Result<AutoRotated, CoreError> {
        let secret = self.secret_action(p, org, reference, "secret.rotate.auto", None, meta).await?;
        self.run_auto_rotation(secret, p.actor(), p.name.clone(), meta).await
    }

    /// The schedule: rotates every secret with a hook and a `rotate_every`
    /// whose current version is due. A failed secret is retried after an
    /// hour (it stays `rotation_overdue`, which is notified daily). Returns
    /// (secret name, promoted version or error) per attempt.
    pub async fn rotate_due(&self) -> Result<Vec<(String, Result<i64, String>)>, CoreError> {
        if self.is_sealed() || self.rotation.driver.get().is_none() {
            return Ok(Vec::new());
        }
        let mut attempts = Vec::new();
        for org in self.store.list_orgs().await? {
            for secret in self.store.list_secrets(&org.id).await? {
                let (Some(_), Some(every)) = (&secret.auto_rotation, secret.rotate_every_secs) else { continue };
                let now = self.now();
                let current = self.store.current_version(&secret.id).await?;
                if current.is_some_and(|c| c.created_at + time::Duration::seconds(every) > now) {
                    continue;
                }
                let not_before =
                    self.rotation.retry_at.lock().unwrap_or_else(|e| e.into_inner()).get(&secret.id).copied();
                if not_before.is_some_and(|t| t > now) {
                    continue;
                }
                let meta = RequestMeta::default();
                self.audit_now(AuditDraft {
                    org_id: Some(secret.org_id.clone()),
                    actor: Actor::system(),
                    secret_id: Some(secret.id.clone()),
                    reason: Some("scheduled (rotate_every)".into()),
                    ..self.admin_draft("secret.rotate.auto", Some(&secret.name), &meta)
                })
                .await?;
                let name = secret.name.clone();
                let id = secret.id.clone();
                let result = self.run_auto_rotation(secret, Actor::system(), "schedule".into(), &meta).await;
                let mut retry = self.rotation.retry_at.lock().unwrap_or_else(|e| e.into_inner());
                match &result {
                    Ok(_) => retry.remove(&id),
                    Err(_) => retry.insert(id, now + RETRY_AFTER),
                };
                attempts.push((name, result.map(|r| r.promoted_version).map_err(|e| e.to_string())));
            }
        }
        Ok(attempts)
    }

    /// One rotation of a secret at a time in this process, automated or by
    /// hand (across replicas, run automated rotation on one only).
    pub(super) fn claim_rotation(&self, secret_id: &str) -> Result<RotationClaim<'_>, CoreError> {
        let mut busy = self.rotation.running.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(secret_id.to_owned()) {
            return Err(CoreError::Conflict { message: "a rotation of this secret is already running".into() });
        }
        Ok(RotationClaim { set: &self.rotation.running, id: secret_id.to_owned() })
    }

    /// One step's audit event of an automated rotation.
    #[allow(clippy::too_many_arguments)]
    async fn rotation_event(
        &self,
        secret: &Secret,
        actor: &Actor,
        action: &str,
        outcome: Outcome,
        version: Option<i64>,
        reason: String,
        meta: &RequestMeta,
    ) -> Result<(), CoreError> {
        self.audit_now(AuditDraft {
            org_id: Some(secret.org_id.clone()),
            actor: actor.clone(),
            secret_id: Some(secret.id.clone()),
            secret_version: version,
            outcome,
            reason: Some(clean_free_text(&reason)),
            ..self.admin_draft(action, Some(&secret.name), meta)
        })
        .await
        .map(|_| ())
    }

    /// Audits and notifies a failure before promotion; the current version
    /// is as it was.
    #[allow(clippy::too_many_arguments)]
    async fn rotation_failed(
        &self,
        secret: &Secret,
        actor: &Actor,
        by: &str,
        stage: &'static str,
        version: i64,
        message: String,
        meta: &RequestMeta,
    ) -> CoreError {
        let reason = format!("{stage}: {message}");
        if let Err(e) = self
            .rotation_event(secret, actor, "secret.rotate.failed", Outcome::Error, Some(version), reason, meta)
            .await
        {
            return e;
        }
        self.emit(
            "secret.rotation_failed",
            &secret.org_id,
            serde_json::json!({"secret": secret.name, "id": secret.id, "stage": stage, "error": message,
                "version": version, "current_unchanged": true, "by": by}),
        );
        CoreError::RotationFailed { stage, message }
    }

    async fn run_auto_rotation(
        &self,
        secret: Secret,
        actor: Actor,
        by: String,
        meta: &RequestMeta,
    ) -> Result<AutoRotated, CoreError> {
        let auto = secret.auto_rotation.clone().ok_or_else(|| {
            CoreError::invalid("rotation hook", "this secret has no rotation hook (secret policy --rotation-hook)")
        })?;
        let driver = self.driver_for(&auto.hook)?;
        let _claim = self.claim_rotation(&secret.id)?;
        let current = self.store.current_version(&secret.id).await?;
        let current_value = match (&current, auto.pass_value) {
            (Some(v), true) => Some(self.decrypt_version(&secret, v).await?),
            _ => None,
        };
        let next = self.store.list_versions(&secret.id).await?.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let fail = |stage, message| self.rotation_failed(&secret, &actor, &by, stage, next, message, meta);

        let issue = HookCall {
            action: HookAction::Issue,
            secret: &secret,
            version: next,
            subject_version: current.as_ref().map(|v| v.version),
            fingerprint: current.as_ref().map(|v| v.fingerprint.as_str()),
            value: current_value.as_ref(),
        };
        let value = match driver.issue(&auto.hook, &issue).await {
            Ok(v) => v,
            Err(m) => return Err(fail("issue", m).await),
        };
        if let Err(e) = check_injectable(&secret, &value) {
            return Err(fail("issue", format!("the hook printed an unusable value: {e}")).await);
        }
        if current.as_ref().is_some_and(|c| c.fingerprint == fingerprint_prefix(value.expose_bytes()))
            && current_value.as_ref().is_none_or(|c| c.expose_bytes() == value.expose_bytes())
        {
            return Err(fail("issue", "the hook printed the current value again".into()).await);
        }

        let pending = self.encrypt_version(&secret, next, &value, None).await?;
        self.store.add_pending_version(&pending).await.map_err(dup("version"))?;
        self.rotation_event(
            &secret,
            &actor,
            "secret.rotate.pending",
            Outcome::Allowed,
            Some(next),
            format!("hook={}", auto.hook),
            meta,
        )
        .await?;
        if let Some(probe) = &auto.verify
            && let Err(m) = driver.verify(&secret, probe, &value).await
        {
            self.store.revoke_versions(&secret.id, Some(next), self.now()).await?;
            return Err(fail("verify", m).await);
        }
        drop(value);
        if !self.store.promote_pending(&secret.id, next, self.now()).await? {
            return Err(fail("promote", "the pending version was revoked meanwhile".into()).await);
        }
        self.policy_changed();
        self.rotation_event(
            &secret,
            &actor,
            "secret.rotate.promoted",
            Outcome::Allowed,
            Some(next),
            format!("hook={}", auto.hook),
            meta,
        )
        .await?;
        self.emit(
            "secret.rotated",
            &secret.org_id,
            serde_json::json!({"secret": secret.name, "id": secret.id, "version": next, "auto": true, "by": by}),
        );

        let mut revoke_error = None;
        if let Some(old) = &current {
            let call = HookCall {
                action: HookAction::Revoke,
                secret: &secret,
                version: old.version,
                subject_version: Some(old.version),
                fingerprint: Some(&old.fingerprint),
                value: current_value.as_ref(),
            };
            let (outcome, reason) = match driver.revoke(&auto.hook, &call).await {
                Ok(()) => (Outcome::Allowed, format!("hook={}", auto.hook)),
                Err(m) => {
                    self.emit(
                        "secret.rotation_failed",
                        &secret.org_id,
                        serde_json::json!({"secret": secret.name, "id": secret.id, "stage": "revoke", "error": m,
                            "version": old.version, "current_unchanged": false, "by": by}),
                    );
                    revoke_error = Some(m.clone());
                    (Outcome::Error, format!("revoke: {m}"))
                }
            };
            self.rotation_event(&secret, &actor, "secret.rotate.revoke_old", outcome, Some(old.version), reason, meta)
                .await?;
        }
        let info = self.secret_info_of(secret).await?;
        Ok(AutoRotated { info, promoted_version: next, revoke_error })
    }
}
