//! Anomaly detection wired to the vault: committed uses of secrets go to a
//! detector task (never on the request path); what it finds becomes an
//! alert (stored), an `alert.<rule>` audit event, a notification, and — if
//! the agent's policy says so — the agent's quarantine (disabled until a
//! human enables it). Detection sees the events of this process: with
//! several replicas each watches its own traffic (documented).

use std::collections::{HashMap, HashSet};

use super::*;
use crate::anomaly::{Alert, AnomalyPolicy, Detector, History};

const QUEUE: usize = 16_384;
/// How long a policy read from the store is reused.
const POLICY_TTL: time::Duration = time::Duration::seconds(10);

/// Each agent's effective policy (its own over its org's over the
/// defaults) as read at a time: (org id, read at, policy) by agent id. One
/// lookup per event; the two stored policies are read again after
/// [`POLICY_TTL`].
type PolicyCache = HashMap<String, (String, OffsetDateTime, AnomalyPolicy)>;

pub(super) enum Msg {
    Event(Box<AuditRecord>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Default)]
pub(super) struct AnomalyState {
    pub(super) tx: std::sync::OnceLock<tokio::sync::mpsc::Sender<Msg>>,
}

fn policy_key(org_id: &str, agent_id: Option<&str>) -> String {
    match agent_id {
        Some(a) => format!("anomaly_policy:{org_id}:{a}"),
        None => format!("anomaly_policy:{org_id}"),
    }
}

impl Vault {
    /// Starts the detector task (the server does at start-up).
    pub fn start_anomaly_detection(self: &Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
        if self.anomalies.tx.set(tx).is_err() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut detector = Detector::default();
            let mut policies = PolicyCache::new();
            while let Some(msg) = rx.recv().await {
                let Some(v) = weak.upgrade() else { break };
                match msg {
                    Msg::Flush(done) => {
                        let _ = done.send(());
                    }
                    Msg::Event(r) => {
                        if let Err(e) = v.examine(&mut detector, &mut policies, &r).await {
                            tracing::warn!(error = %e, seq = r.seq, "anomaly detection failed for an event");
                        }
                    }
                }
            }
        });
    }

    /// Hands a committed use to the detector; never waits (a full queue
    /// drops the event from detection, logged; the trail has it).
    pub(super) fn feed_detector(&self, draft: AuditDraft, seq: i64) {
        let Some(tx) = self.anomalies.tx.get() else { return };
        if !matches!(draft.action.as_str(), "secret.resolve" | "secret.proxy") || draft.actor.kind != "agent" {
            return;
        }
        let r = AuditRecord { seq, event: draft, prev_hash: [0; 32], hash: [0; 32] };
        if tx.try_send(Msg::Event(Box::new(r))).is_err() {
            tracing::warn!(seq, "anomaly detection queue full; event not examined");
        }
    }

    /// Waits until every event fed so far has been examined (tests).
    pub async fn flush_anomaly_detection(&self) {
        if let Some(tx) = self.anomalies.tx.get() {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
    }

    async fn stored_policy(&self, org_id: &str, agent_id: Option<&str>) -> Result<AnomalyPolicy, CoreError> {
        match self.store.get_meta(&policy_key(org_id, agent_id)).await? {
            Some(j) => serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(format!("anomaly policy: {e}")).into()),
            None => Ok(AnomalyPolicy::default()),
        }
    }

    async fn examine(
        &self,
        detector: &mut Detector,
        policies: &mut PolicyCache,
        r: &AuditRecord,
    ) -> Result<(), CoreError> {
        let (Some(org_id), Some(agent_id)) = (r.event.org_id.as_deref(), r.event.actor.id.as_deref()) else {
            return Ok(());
        };
        if !detector.knows(agent_id) {
            detector.seed(agent_id, self.history(org_id, agent_id, r.seq).await?);
        }
        let now = self.now();
        let cached = policies.get(agent_id).filter(|(org, at, _)| org == org_id && now - *at < POLICY_TTL);
        let policy = match cached {
            Some((_, _, p)) => p.clone(),
            None => {
                let own = self.stored_policy(org_id, Some(agent_id)).await?;
                let p = own.over(&self.stored_policy(org_id, None).await?).effective();
                policies.insert(agent_id.to_owned(), (org_id.to_owned(), now, p.clone()));
                p
            }
        };
        for (rule, detail) in detector.observe(r, &policy) {
            self.raise(r, rule, detail, policy.quarantine == Some(true)).await?;
        }
        Ok(())
    }

    /// What an agent did before `seq`: its source addresses and secrets.
    async fn history(&self, org_id: &str, agent_id: &str, seq: i64) -> Result<History, CoreError> {
        let q = AuditQuery {
            org_id: Some(org_id.into()),
            agent: Some(agent_id.into()),
            outcome: Some(Outcome::Allowed),
            before_seq: Some(seq),
            limit: 2000,
            ..AuditQuery::default()
        };
        let mut h = History { source_ips: HashSet::new(), secrets: HashSet::new() };
        for e in self.store.query_audit(&q).await? {
            if matches!(e.event.action.as_str(), "secret.resolve" | "secret.proxy") {
                h.source_ips.extend(e.event.source_ip);
                h.secrets.extend(e.event.secret_id);
            }
        }
        Ok(h)
    }

    async fn raise(&self, r: &AuditRecord, rule: &str, detail: String, quarantine: bool) -> Result<(), CoreError> {
        let e = &r.event;
        let org_id = e.org_id.clone().unwrap_or_default();
        let alert = Alert {
            id: new_id("alr"),
            org_id: org_id.clone(),
            rule: rule.into(),
            agent_id: e.actor.id.clone(),
            agent_name: e.actor.name.clone(),
            event_seq: r.seq,
            time: self.now(),
            detail: clean_free_text(&detail),
            acknowledged_at: None,
            acknowledged_by: None,
        };
        // Quarantine first, so that once an alert is visible its effect has
        // happened. Only an enabled agent; a disabled agent's token in use
        // says nothing new about the agent.
        let already_off = rule == "dead_token" && e.reason.as_deref() == Some("agent_disabled");
        let enabled = match e.actor.id.as_deref() {
            Some(id) => self.store.find_agent(&org_id, id).await?.is_some_and(|a| !a.disabled),
            None => false,
        };
        if quarantine
            && enabled
            && !already_off
            && let Some(agent_id) = e.actor.id.as_deref()
            && self.store.set_agent_disabled(agent_id, true).await?
        {
            self.policy_changed();
            self.audit_now(AuditDraft {
                org_id: Some(org_id.clone()),
                actor: Actor::system(),
                action: "agent.quarantined".into(),
                reason: Some(format!(
                    "agent={} alert={} rule={rule}",
                    e.actor.name.as_deref().unwrap_or("-"),
                    alert.id
                )),
                ..draft_base(self.now(), Outcome::Allowed, &RequestMeta::default())
            })
            .await?;
            self.emit(
                "agent.quarantined",
                &org_id,
                serde_json::json!({"agent": alert.agent_name,
                "agent_id": agent_id, "alert": alert.id, "rule": rule}),
            );
        }
        self.store.add_alert(&alert).await?;
        self.audit_now(AuditDraft {
            org_id: Some(org_id.clone()),
            actor: Actor::system(),
            action: format!("alert.{rule}"),
            secret_id: e.secret_id.clone(),
            secret_name: e.secret_name.clone(),
            source_ip: e.source_ip.clone(),
            reason: Some(format!("{} agent={} event={}", alert.detail, e.actor.name.as_deref().unwrap_or("-"), r.seq)),
            ..draft_base(self.now(), Outcome::Allowed, &RequestMeta::default())
        })
        .await?;
        self.emit(
            &format!("alert.{rule}"),
            &org_id,
            serde_json::json!({"alert": alert.id, "rule": rule,
            "agent": alert.agent_name, "agent_id": alert.agent_id, "detail": alert.detail, "event_seq": r.seq,
            "secret": e.secret_name, "source_ip": e.source_ip}),
        );
        Ok(())
    }

    /// Alerts of an org, newest first (`all`: acknowledged ones too).
    pub async fn list_alerts(&self, p: &Principal, org: &str, all: bool) -> Result<Vec<Alert>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        Ok(self.store.list_alerts(&org.id, all, 500).await?)
    }

    pub async fn ack_alert(&self, p: &Principal, org: &str, id: &str, meta: &RequestMeta) -> Result<(), CoreError> {
        let draft = AuditDraft {
            reason: Some(format!("alert={}", clean_free_text(id))),
            ..self.admin_draft("alert.ack", None, meta)
        };
        let org_rec = self.authorize(p, org, Role::Admin, draft).await?;
        if self.store.ack_alert(&org_rec.id, id, &p.name, self.now()).await? {
            Ok(())
        } else {
            Err(not_found("unacknowledged alert"))
        }
    }

    /// The stored policy (org-wide, or one agent's overrides) and the
    /// effective one for that scope.
    pub async fn anomaly_policy(
        &self,
        p: &Principal,
        org: &str,
        agent: Option<&str>,
    ) -> Result<(AnomalyPolicy, AnomalyPolicy), CoreError> {
        self.ensure_unsealed()?;
        let org_rec = self.org_for(p, org).await?;
        let agent_id = match agent {
            Some(a) => Some(self.store.find_agent(&org_rec.id, a).await?.ok_or_else(|| not_found("agent"))?.id),
            None => None,
        };
        let org_policy = self.stored_policy(&org_rec.id, None).await?;
        let stored = match &agent_id {
            Some(a) => self.stored_policy(&org_rec.id, Some(a)).await?,
            None => org_policy.clone(),
        };
        let effective = if agent_id.is_some() { stored.over(&org_policy) } else { stored.clone() }.effective();
        Ok((stored, effective))
    }

    /// Merges `patch` into the stored policy of the org or of one agent.
    pub async fn set_anomaly_policy(
        &self,
        p: &Principal,
        org: &str,
        agent: Option<&str>,
        patch: AnomalyPolicy,
        meta: &RequestMeta,
    ) -> Result<(AnomalyPolicy, AnomalyPolicy), CoreError> {
        patch.validate()?;
        let detail = serde_json::to_string(&patch).unwrap_or_default();
        let draft = AuditDraft {
            reason: Some(format!("agent={} {detail}", agent.unwrap_or("*"))),
            ..self.admin_draft("anomaly.policy", None, meta)
        };
        let org_rec = self.authorize(p, org, Role::Admin, draft).await?;
        let agent_id = match agent {
            Some(a) => Some(self.store.find_agent(&org_rec.id, a).await?.ok_or_else(|| not_found("agent"))?.id),
            None => None,
        };
        let merged = patch.over(&self.stored_policy(&org_rec.id, agent_id.as_deref()).await?);
        let json = serde_json::to_string(&merged).expect("serializable");
        self.store.put_meta(&policy_key(&org_rec.id, agent_id.as_deref()), &json).await?;
        self.anomaly_policy(p, org, agent).await
    }
}
