//! Anomaly detection on the audit stream. Rules, each configurable per org
//! and per agent ([`AnomalyPolicy`]): an agent used from a source address it
//! never used; a request rate above K× its trailing baseline; N denials
//! within M minutes; use outside the agent's allowed hours; use of a
//! disabled, expired or rotated-away token; a secret used by an agent for
//! the first time. The [`Detector`] is pure bookkeeping over committed
//! events (their own timestamps, so a controllable clock drives it); the
//! vault feeds it and acts on what it reports.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::audit::{AuditRecord, Outcome};

/// Rule settings; `None` inherits (agent → org → default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyPolicy {
    /// Alert when an agent is used from an address it never used (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_source_ip: Option<bool>,
    /// Alert when a minute's uses exceed this multiple of the trailing
    /// hour's per-minute average (default 5; 0 turns it off)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_factor: Option<f64>,
    /// ...and are at least this many (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_min_per_minute: Option<u32>,
    /// Alert after this many denials (default 5; 0 turns it off)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<u32>,
    /// ...within this many minutes (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials_window_minutes: Option<u32>,
    /// `HH-HH` in UTC (start inclusive, end exclusive; `22-06` wraps): use
    /// outside alerts. Default: any hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_hours: Option<String>,
    /// Alert on use of a disabled agent's, expired or revoked token (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_token: Option<bool>,
    /// Alert when an agent uses a secret for the first time (default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_use: Option<bool>,
    /// Disable the agent when any alert fires for it, until a human
    /// enables it again (default off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<bool>,
}

impl AnomalyPolicy {
    /// `self` over `base`: fields set here win.
    pub fn over(&self, base: &AnomalyPolicy) -> AnomalyPolicy {
        AnomalyPolicy {
            new_source_ip: self.new_source_ip.or(base.new_source_ip),
            rate_factor: self.rate_factor.or(base.rate_factor),
            rate_min_per_minute: self.rate_min_per_minute.or(base.rate_min_per_minute),
            denials: self.denials.or(base.denials),
            denials_window_minutes: self.denials_window_minutes.or(base.denials_window_minutes),
            allowed_hours: self.allowed_hours.clone().or_else(|| base.allowed_hours.clone()),
            dead_token: self.dead_token.or(base.dead_token),
            first_use: self.first_use.or(base.first_use),
            quarantine: self.quarantine.or(base.quarantine),
        }
    }

    /// Every field set: the defaults under `self`.
    pub fn effective(&self) -> AnomalyPolicy {
        self.over(&AnomalyPolicy {
            new_source_ip: Some(true),
            rate_factor: Some(5.0),
            rate_min_per_minute: Some(30),
            denials: Some(5),
            denials_window_minutes: Some(10),
            allowed_hours: None,
            dead_token: Some(true),
            first_use: Some(true),
            quarantine: Some(false),
        })
    }

    pub fn validate(&self) -> Result<(), crate::CoreError> {
        if let Some(h) = &self.allowed_hours {
            parse_hours(h)?;
        }
        if self.rate_factor.is_some_and(|f| !(0.0..=1e6).contains(&f) || f.is_nan()) {
            return Err(crate::CoreError::invalid("rate_factor", "must be between 0 and 1e6"));
        }
        Ok(())
    }
}

/// `HH-HH` → (start, end) hours.
pub fn parse_hours(s: &str) -> Result<(u8, u8), crate::CoreError> {
    let bad = || crate::CoreError::invalid("allowed_hours", "expected HH-HH in UTC, e.g. 08-18");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u8, u8) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a > 23 || b > 24 || a == b {
        return Err(bad());
    }
    Ok((a, b))
}

fn within_hours(hour: u8, (start, end): (u8, u8)) -> bool {
    if start < end { (start..end).contains(&hour) } else { hour >= start || hour < end }
}

/// An alert as stored and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub org_id: String,
    /// `new_source_ip`, `rate_spike`, `denial_burst`, `outside_hours`,
    /// `dead_token` or `first_use`.
    pub rule: String,
    pub agent_id: Option<String>,
    pub agent_name: Option<String>,
    /// The audit event that set it off.
    pub event_seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub acknowledged_at: Option<OffsetDateTime>,
    pub acknowledged_by: Option<String>,
}

/// What an agent did before, as far as the rules need it.
#[derive(Debug, Default, Clone)]
pub struct History {
    pub source_ips: HashSet<String>,
    pub secrets: HashSet<String>,
}

#[derive(Default)]
struct AgentState {
    ips: HashSet<String>,
    secrets: HashSet<String>,
    /// (unix minute, uses) for the last hour and a bit.
    minutes: VecDeque<(i64, u32)>,
    first_minute: Option<i64>,
    denials: VecDeque<OffsetDateTime>,
    /// Rule → last time it fired, so a condition that lasts alerts once
    /// per cool-down rather than on every event.
    fired: HashMap<&'static str, OffsetDateTime>,
    /// When the last `new_source_ip` alerts fired: at most
    /// [`NEW_IP_ALERTS`] per cool-down, so an agent rotating addresses
    /// cannot flood the alerts, the trail and the webhooks.
    new_ip_alerts: VecDeque<OffsetDateTime>,
}

/// Addresses remembered per agent; past it new ones still alert (within
/// [`NEW_IP_ALERTS`]) but are not kept, so memory stays bounded.
const MAX_IPS: usize = 4096;
const NEW_IP_ALERTS: usize = 5;

/// A rule that fired: (rule, detail).
pub type Finding = (&'static str, String);

const COOLDOWN: time::Duration = time::Duration::minutes(10);
const USES: [&str; 2] = ["secret.resolve", "secret.proxy"];

#[derive(Default)]
pub struct Detector {
    agents: HashMap<String, AgentState>,
}

impl Detector {
    /// Whether the detector has seen this agent (else seed it with
    /// [`Detector::seed`] from the trail before observing).
    pub fn knows(&self, agent_id: &str) -> bool {
        self.agents.contains_key(agent_id)
    }

    pub fn seed(&mut self, agent_id: &str, history: History) {
        let st = self.agents.entry(agent_id.to_owned()).or_default();
        st.ips.extend(history.source_ips);
        st.secrets.extend(history.secrets);
    }

    /// Looks at one committed event; returns the rules it sets off.
    pub fn observe(&mut self, r: &AuditRecord, policy: &AnomalyPolicy) -> Vec<Finding> {
        let e = &r.event;
        let Some(agent_id) = e.actor.id.as_deref().filter(|_| e.actor.kind == "agent") else { return Vec::new() };
        if !USES.contains(&e.action.as_str()) {
            return Vec::new();
        }
        let p = policy.effective();
        // Known agents, addresses and secrets cost no allocation: this runs
        // for every use.
        if !self.agents.contains_key(agent_id) {
            self.agents.insert(agent_id.to_owned(), AgentState::default());
        }
        let Some(st) = self.agents.get_mut(agent_id) else { return Vec::new() };
        let now = e.time;
        let mut found: Vec<Finding> = Vec::new();
        let reason = e.reason.as_deref().unwrap_or("");

        if e.outcome == Outcome::Denied {
            if matches!(reason, "token_revoked" | "token_expired" | "agent_disabled") && p.dead_token == Some(true) {
                found.push(("dead_token", format!("a {} token was presented", reason.replace('_', " "))));
            }
            let n = p.denials.unwrap_or(0);
            if n > 0 {
                let window = time::Duration::minutes(i64::from(p.denials_window_minutes.unwrap_or(10).max(1)));
                st.denials.push_back(now);
                while st.denials.front().is_some_and(|t| *t <= now - window) {
                    st.denials.pop_front();
                }
                if st.denials.len() as u32 >= n {
                    found.push((
                        "denial_burst",
                        format!("{} denials within {} minutes", st.denials.len(), window.whole_minutes()),
                    ));
                    st.denials.clear();
                }
            }
        } else if e.outcome == Outcome::Allowed {
            if let Some(ip) = e.source_ip.as_deref()
                && !st.ips.contains(ip)
            {
                while st.new_ip_alerts.front().is_some_and(|t| now - *t >= COOLDOWN) {
                    st.new_ip_alerts.pop_front();
                }
                if !st.ips.is_empty() && p.new_source_ip == Some(true) && st.new_ip_alerts.len() < NEW_IP_ALERTS {
                    st.new_ip_alerts.push_back(now);
                    found.push(("new_source_ip", format!("first use from {ip}")));
                }
                if st.ips.len() < MAX_IPS {
                    st.ips.insert(ip.to_owned());
                }
            }
            if let Some(secret) = e.secret_id.as_deref()
                && !st.secrets.contains(secret)
                && st.secrets.insert(secret.to_owned())
                && p.first_use == Some(true)
            {
                let name = e.secret_name.as_deref().unwrap_or(secret);
                found.push(("first_use", format!("first use of secret {name}")));
            }
            if let Some(h) = p.allowed_hours.as_deref().and_then(|h| parse_hours(h).ok())
                && !within_hours(now.hour(), h)
            {
                found.push((
                    "outside_hours",
                    format!("use at {:02}:{:02} UTC, allowed {:02}-{:02}", now.hour(), now.minute(), h.0, h.1),
                ));
            }
            // Rate: this minute against the trailing hour's average.
            let minute = now.unix_timestamp().div_euclid(60);
            st.first_minute.get_or_insert(minute);
            match st.minutes.back_mut() {
                Some((m, n)) if *m == minute => *n += 1,
                _ => st.minutes.push_back((minute, 1)),
            }
            while st.minutes.front().is_some_and(|(m, _)| *m < minute - 60) {
                st.minutes.pop_front();
            }
            let factor = p.rate_factor.unwrap_or(0.0);
            let observed = (minute - st.first_minute.unwrap_or(minute)).min(60);
            if factor > 0.0 && observed >= 5 {
                let current = st.minutes.back().map_or(0, |(_, n)| *n);
                let before: u32 = st.minutes.iter().filter(|(m, _)| *m < minute).map(|(_, n)| n).sum();
                let baseline = f64::from(before) / observed as f64;
                if current >= p.rate_min_per_minute.unwrap_or(30) && f64::from(current) > factor * baseline.max(1.0) {
                    found.push((
                        "rate_spike",
                        format!("{current} uses this minute against a trailing average of {baseline:.1}"),
                    ));
                }
            }
        }
        // Conditions that last fire once per cool-down; first uses and new
        // addresses are one-off by nature.
        found.retain(|(rule, _)| {
            if matches!(*rule, "first_use" | "new_source_ip") {
                return true;
            }
            let due = st.fired.get(rule).is_none_or(|t| now - *t >= COOLDOWN);
            if due {
                st.fired.insert(rule, now);
            }
            due
        });
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, AuditDraft, GENESIS_HASH};

    fn use_at(t: OffsetDateTime, ip: &str, secret: &str, outcome: Outcome, reason: Option<&str>) -> AuditRecord {
        let event = AuditDraft {
            time: t,
            org_id: Some("org_1".into()),
            actor: Actor { kind: "agent".into(), id: Some("agt_1".into()), name: Some("bot".into()), token_id: None },
            action: "secret.resolve".into(),
            secret_id: Some(secret.into()),
            secret_name: Some(secret.into()),
            secret_version: Some(1),
            purpose: None,
            source_ip: Some(ip.into()),
            user_agent: None,
            outcome,
            reason: reason.map(str::to_owned),
            request_id: None,
        };
        AuditRecord { seq: 1, event, prev_hash: GENESIS_HASH, hash: GENESIS_HASH }
    }

    #[test]
    fn steady_traffic_is_quiet_and_each_rule_fires_on_its_pattern() {
        let mut d = Detector::default();
        let p = AnomalyPolicy::default();
        let t0 = OffsetDateTime::now_utc().replace_second(0).unwrap();
        let mut all = Vec::new();
        // 40 minutes of 10 uses a minute from one address, one secret.
        for m in 0..40 {
            for i in 0..10 {
                let t = t0 + time::Duration::minutes(m) + time::Duration::seconds(i * 5);
                all.extend(d.observe(&use_at(t, "10.0.0.1", "sec_a", Outcome::Allowed, None), &p));
            }
        }
        assert_eq!(all.iter().map(|f| f.0).collect::<Vec<_>>(), vec!["first_use"], "steady traffic: {all:?}");
        let t = t0 + time::Duration::minutes(41);
        let rules = |f: Vec<Finding>| f.into_iter().map(|f| f.0).collect::<Vec<_>>();
        assert_eq!(
            rules(d.observe(&use_at(t, "10.9.9.9", "sec_a", Outcome::Allowed, None), &p)),
            vec!["new_source_ip"]
        );
        assert_eq!(rules(d.observe(&use_at(t, "10.0.0.1", "sec_b", Outcome::Allowed, None), &p)), vec!["first_use"]);
        let mut spike = Vec::new();
        for i in 0..100 {
            let t = t0 + time::Duration::minutes(42) + time::Duration::milliseconds(i * 100);
            spike.extend(rules(d.observe(&use_at(t, "10.0.0.1", "sec_a", Outcome::Allowed, None), &p)));
        }
        assert_eq!(spike, vec!["rate_spike"], "once per cool-down");
        let mut denied = Vec::new();
        for i in 0..5 {
            let t = t0 + time::Duration::minutes(43) + time::Duration::seconds(i);
            denied.extend(rules(d.observe(&use_at(t, "10.0.0.1", "sec_x", Outcome::Denied, Some("no_grant")), &p)));
        }
        assert_eq!(denied, vec!["denial_burst"]);
        let dead = d.observe(&use_at(t, "10.0.0.1", "sec_a", Outcome::Denied, Some("token_revoked")), &p);
        assert_eq!(rules(dead), vec!["dead_token"]);
        let hours = AnomalyPolicy {
            allowed_hours: Some(format!("{:02}-{:02}", (t.hour() + 1) % 24, (t.hour() + 2) % 24)),
            ..p
        };
        assert_eq!(
            rules(d.observe(&use_at(t, "10.0.0.1", "sec_a", Outcome::Allowed, None), &hours)),
            vec!["outside_hours"]
        );
        let off = AnomalyPolicy { first_use: Some(false), ..AnomalyPolicy::default() };
        assert!(d.observe(&use_at(t, "10.0.0.1", "sec_c", Outcome::Allowed, None), &off).is_empty());
    }

    /// An agent rotating through addresses raises a few `new_source_ip`
    /// alerts per cool-down, not one per address, and the detector keeps a
    /// bounded number of addresses.
    #[test]
    fn rotating_addresses_cannot_flood_alerts_or_memory() {
        let mut d = Detector::default();
        let p = AnomalyPolicy::default();
        let t0 = OffsetDateTime::now_utc();
        d.observe(&use_at(t0, "10.0.0.1", "sec_a", Outcome::Allowed, None), &p);
        let mut alerts = 0;
        for i in 0..(MAX_IPS as u32 + 500) {
            let ip = std::net::Ipv4Addr::from(0x0a01_0000 + i).to_string();
            let t = t0 + time::Duration::milliseconds(i64::from(i));
            alerts += d.observe(&use_at(t, &ip, "sec_a", Outcome::Allowed, None), &p).len();
        }
        assert_eq!(alerts, NEW_IP_ALERTS, "within one cool-down");
        assert_eq!(d.agents["agt_1"].ips.len(), MAX_IPS);
        // After the cool-down, a new address alerts again.
        let later = t0 + COOLDOWN + time::Duration::minutes(1);
        let f = d.observe(&use_at(later, "192.0.2.1", "sec_a", Outcome::Allowed, None), &p);
        assert_eq!(f.iter().map(|f| f.0).collect::<Vec<_>>(), vec!["new_source_ip"]);
    }

    #[test]
    fn policies_layer_and_validate() {
        let org = AnomalyPolicy { rate_factor: Some(3.0), quarantine: Some(true), ..Default::default() };
        let agent = AnomalyPolicy { quarantine: Some(false), ..Default::default() };
        let eff = agent.over(&org).effective();
        assert_eq!((eff.rate_factor, eff.quarantine, eff.denials), (Some(3.0), Some(false), Some(5)));
        assert!(parse_hours("22-06").is_ok() && parse_hours("8").is_err() && parse_hours("25-3").is_err());
        assert!(within_hours(23, (22, 6)) && within_hours(3, (22, 6)) && !within_hours(12, (22, 6)));
    }
}
