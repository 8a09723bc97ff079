//! Page models for the askama templates (`templates/`). Everything shown is
//! metadata: names, states, fingerprints' first bytes, counts, audit
//! fields. askama escapes every field; the only raw HTML is the chart,
//! built here from numbers and dates alone.

use askama::Template;
use axum::response::Html;
use time::OffsetDateTime;

pub fn html(t: &impl Template) -> Html<String> {
    Html(t.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "template failed");
        "<!doctype html><title>keyward</title><p>internal error".to_owned()
    }))
}

pub fn when(t: Option<OffsetDateTime>) -> String {
    t.map(|t| {
        format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute())
    })
    .unwrap_or_else(|| "—".into())
}

/// Who is logged in, for the layout.
pub struct Nav {
    pub user: String,
    pub role: &'static str,
    pub csrf: String,
    pub can_change: bool,
}

/// An inline SVG bar chart of uses per day (no script, CSP-safe).
pub fn chart(days: &[(OffsetDateTime, i64)]) -> String {
    let (w, h) = (600.0_f64, 100.0_f64);
    let peak = days.iter().map(|d| d.1).max().unwrap_or(0);
    let max = peak.max(1) as f64;
    let bar = w / days.len().max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"uses per day, last {} days\">",
        h + 14.0,
        days.len()
    );
    for (i, (day, n)) in days.iter().enumerate() {
        let bh = (*n as f64 / max) * h;
        let x = i as f64 * bar;
        svg.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\"><title>{:04}-{:02}-{:02}: {n}</title></rect>",
            h - bh,
            (bar - 2.0).max(1.0),
            day.year(),
            u8::from(day.month()),
            day.day()
        ));
    }
    let total: i64 = days.iter().map(|d| d.1).sum();
    svg.push_str(&format!("<text x=\"0\" y=\"{}\">{total} uses, peak {peak} a day</text></svg>", h + 12.0));
    svg
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub status: u16,
    pub message: String,
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct LoginPage {
    pub csrf: String,
    pub error: Option<String>,
    pub setup: bool,
}

#[derive(Template)]
#[template(path = "setup.html")]
pub struct SetupPage {
    pub csrf: String,
    pub error: Option<String>,
}

pub struct SecretRow {
    pub name: String,
    pub id: String,
    pub provider: String,
    pub status: &'static str,
    pub version: String,
    pub expires: String,
    pub last_used: String,
    pub grants: usize,
}

pub struct AlertRow {
    pub id: String,
    pub time: String,
    pub rule: String,
    pub agent: String,
    pub detail: String,
    pub acked: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct Overview {
    pub nav: Nav,
    pub secrets: usize,
    pub agents: usize,
    pub open_alerts: usize,
    pub expiring: Vec<SecretRow>,
    pub overdue: Vec<SecretRow>,
    pub alerts: Vec<AlertRow>,
    pub chart: String,
}

#[derive(Template)]
#[template(path = "secrets.html")]
pub struct Secrets {
    pub nav: Nav,
    pub q: String,
    pub rows: Vec<SecretRow>,
}

pub struct VersionRow {
    pub version: i64,
    pub state: &'static str,
    pub fingerprint: String,
    pub created: String,
    pub grace_until: String,
    pub expires: String,
    pub revoked: String,
}

pub struct GrantRow {
    pub agent: String,
    pub secret: String,
    pub modes: String,
    pub expires: String,
}

pub struct EventRow {
    pub seq: i64,
    pub time: String,
    pub outcome: &'static str,
    pub action: String,
    pub actor: String,
    pub secret: String,
    pub purpose: String,
    pub source: String,
    pub reason: String,
}

#[derive(Template)]
#[template(path = "secret.html")]
pub struct SecretDetail {
    pub nav: Nav,
    pub row: SecretRow,
    pub upstream: String,
    pub description: String,
    pub tags: String,
    pub rotate_every: String,
    pub hook: String,
    pub versions: Vec<VersionRow>,
    pub grants: Vec<GrantRow>,
    pub agents: Vec<String>,
    pub events: Vec<EventRow>,
    pub chart: String,
}

pub struct AgentRow {
    pub name: String,
    pub token_expires: String,
    pub disabled: bool,
    pub allow_from: String,
    pub created: String,
    pub grants: usize,
}

#[derive(Template)]
#[template(path = "agents.html")]
pub struct Agents {
    pub nav: Nav,
    pub rows: Vec<AgentRow>,
    /// Shown once, right after creation (the only time keyward shows it).
    pub new_token: Option<(String, String)>,
}

#[derive(Template)]
#[template(path = "audit.html")]
pub struct Audit {
    pub nav: Nav,
    pub agent: String,
    pub secret: String,
    pub action: String,
    pub outcome: String,
    pub events: Vec<EventRow>,
    pub next_before: Option<i64>,
    pub query: String,
    pub chain: String,
    pub chain_ok: bool,
}

#[derive(Template)]
#[template(path = "alerts.html")]
pub struct Alerts {
    pub nav: Nav,
    pub all: bool,
    pub rows: Vec<AlertRow>,
}
