//! Page and form handlers. Reads and writes go through `Vault` with the
//! logged-in human's principal; forms carry the session's CSRF token.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use keyward_core::audit::{AuditRecord, Outcome};
use keyward_core::duration::parse_duration;
use keyward_core::model::Modes;
use keyward_core::store::AuditQuery;
use keyward_core::vault::{NewSecret, SecretInfo, SecretValue, Vault};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::views::{self, Nav, html, when};
use crate::{Anonymous, Human, LOGIN_CSRF_COOKIE, SESSION_COOKIE, cookie, core_error, error_page, set_cookie};

type Page = Result<Response, Response>;

fn nav(h: &Human) -> Nav {
    Nav {
        user: h.session.user.name.clone(),
        role: h.session.user.role.as_str(),
        csrf: h.session.csrf.clone(),
        can_change: h.can_change(),
    }
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    keyward_core::crypto::random_bytes(&mut b).expect("system randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn row_of(i: &SecretInfo) -> views::SecretRow {
    views::SecretRow {
        name: i.secret.name.clone(),
        id: i.secret.id.clone(),
        provider: i.secret.provider.clone(),
        status: i.status,
        version: i.current_version.map_or("—".into(), |v| format!("v{v}")),
        expires: when(i.secret.expires_at),
        last_used: when(i.last_used),
        grants: i.grants.len(),
    }
}

fn event_row(r: &AuditRecord) -> views::EventRow {
    let e = &r.event;
    views::EventRow {
        seq: r.seq,
        time: when(Some(e.time)),
        outcome: e.outcome.as_str(),
        action: e.action.clone(),
        actor: format!("{}:{}", e.actor.kind, e.actor.name.as_deref().unwrap_or("-")),
        secret: match (&e.secret_name, e.secret_version) {
            (Some(n), Some(v)) => format!("{n}@v{v}"),
            (Some(n), None) => n.clone(),
            _ => "—".into(),
        },
        purpose: e.purpose.clone().unwrap_or_default(),
        source: e.source_ip.clone().unwrap_or_default(),
        reason: e.reason.clone().unwrap_or_default(),
    }
}

fn alert_row(a: &keyward_core::anomaly::Alert) -> views::AlertRow {
    views::AlertRow {
        id: a.id.clone(),
        time: when(Some(a.time)),
        rule: a.rule.clone(),
        agent: a.agent_name.clone().unwrap_or_default(),
        detail: a.detail.clone(),
        acked: a.acknowledged_by.clone().unwrap_or_else(|| "—".into()),
    }
}

// ---- login, setup, logout ---------------------------------------------

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    csrf: String,
    name: String,
    password: String,
}

/// The login form with a fresh double-submit CSRF cookie.
fn login_page(status: StatusCode, error: Option<String>, setup: bool) -> Response {
    let csrf = random_token();
    let page = views::LoginPage { csrf: csrf.clone(), error, setup };
    (status, [(header::SET_COOKIE, set_cookie(LOGIN_CSRF_COOKIE, &csrf, Some(3600)))], html(&page)).into_response()
}

pub async fn login_form(State(v): State<Arc<Vault>>) -> Response {
    let setup = v.needs_setup().await.unwrap_or(false);
    login_page(StatusCode::OK, None, setup)
}

fn login_csrf_ok(headers: &HeaderMap, presented: &str) -> bool {
    cookie(headers, LOGIN_CSRF_COOKIE).is_some_and(|c| {
        !presented.is_empty() && keyward_core::token::hashes_equal_slices(c.as_bytes(), presented.as_bytes())
    })
}

pub async fn login(
    State(v): State<Arc<Vault>>,
    Anonymous(meta, headers): Anonymous,
    Form(f): Form<LoginForm>,
) -> Response {
    if !login_csrf_ok(&headers, &f.csrf) {
        return error_page(StatusCode::FORBIDDEN, "The form's CSRF token is missing or wrong.");
    }
    let password = Zeroizing::new(f.password);
    match v.login(&f.name, password, &meta).await {
        Ok(login) => {
            let secs = keyward_core::vault::SESSION_MAX.whole_seconds();
            let mut r = see_other("/ui/");
            r.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, &login.cookie, Some(secs)));
            r.headers_mut().append(header::SET_COOKIE, set_cookie(LOGIN_CSRF_COOKIE, "", Some(0)));
            r
        }
        Err(e) if e.code() == "bad_credentials" => {
            login_page(StatusCode::UNAUTHORIZED, Some("Wrong name or password.".into()), false)
        }
        Err(e) => core_error(e),
    }
}

pub async fn logout(State(v): State<Arc<Vault>>, h: Human, headers: HeaderMap, Form(f): Form<CsrfOnly>) -> Page {
    h.check_csrf(&f.csrf)?;
    if let Some(c) = cookie(&headers, SESSION_COOKIE) {
        v.logout(&c, &h.meta).await.map_err(core_error)?;
    }
    let mut r = see_other("/ui/login");
    r.headers_mut().append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", Some(0)));
    Ok(r)
}

pub async fn setup_form(State(v): State<Arc<Vault>>) -> Response {
    if !v.needs_setup().await.unwrap_or(false) {
        return see_other("/ui/login");
    }
    let csrf = random_token();
    let page = views::SetupPage { csrf: csrf.clone(), error: None };
    ([(header::SET_COOKIE, set_cookie(LOGIN_CSRF_COOKIE, &csrf, Some(3600)))], html(&page)).into_response()
}

#[derive(Deserialize)]
pub struct SetupForm {
    #[serde(default)]
    csrf: String,
    token: String,
    name: String,
    password: String,
}

pub async fn setup(
    State(v): State<Arc<Vault>>,
    Anonymous(meta, headers): Anonymous,
    Form(f): Form<SetupForm>,
) -> Response {
    if !login_csrf_ok(&headers, &f.csrf) {
        return error_page(StatusCode::FORBIDDEN, "The form's CSRF token is missing or wrong.");
    }
    let token = Zeroizing::new(f.token);
    match v.setup_first_user(&token, &f.name, Zeroizing::new(f.password), &meta).await {
        Ok(_) => see_other("/ui/login"),
        Err(e) => core_error(e),
    }
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

// ---- pages ---------------------------------------------------------------

pub async fn overview(State(v): State<Arc<Vault>>, h: Human) -> Page {
    let (p, org) = (h.p(), h.org());
    let secrets = v.list_secrets(p, org).await.map_err(core_error)?;
    let agents = v.list_agents(p, org).await.map_err(core_error)?;
    let alerts = v.list_alerts(p, org, false).await.map_err(core_error)?;
    let usage = v.usage_per_day(p, org, None, 30).await.map_err(core_error)?;
    let page = views::Overview {
        secrets: secrets.len(),
        agents: agents.len(),
        open_alerts: alerts.len(),
        expiring: secrets.iter().filter(|s| matches!(s.status, "expiring" | "expired")).map(row_of).collect(),
        overdue: secrets.iter().filter(|s| s.status == "rotation_overdue").map(row_of).collect(),
        alerts: alerts.iter().take(5).map(alert_row).collect(),
        chart: views::chart(&usage),
        nav: nav(&h),
    };
    Ok(html(&page).into_response())
}

#[derive(Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
}

pub async fn secrets(State(v): State<Arc<Vault>>, h: Human, Query(s): Query<SearchQuery>) -> Page {
    let all = v.list_secrets(h.p(), h.org()).await.map_err(core_error)?;
    let q = s.q.trim().to_lowercase();
    let rows = all
        .iter()
        .filter(|i| {
            q.is_empty()
                || i.secret.name.contains(&q)
                || i.secret.provider.contains(&q)
                || i.secret.tags.iter().any(|t| t.to_lowercase().contains(&q))
        })
        .map(row_of)
        .collect();
    Ok(html(&views::Secrets { nav: nav(&h), q: s.q, rows }).into_response())
}

pub async fn secret(State(v): State<Arc<Vault>>, h: Human, Path(name): Path<String>) -> Page {
    let (p, org) = (h.p(), h.org());
    let info = v.show_secret(p, org, &name).await.map_err(core_error)?;
    let agents = v.list_agents(p, org).await.map_err(core_error)?;
    let agent_name = |id: &str| agents.iter().find(|a| a.id == id).map_or(id.to_owned(), |a| a.name.clone());
    let q = AuditQuery { secret: Some(info.secret.id.clone()), limit: 20, ..AuditQuery::default() };
    let events = v.query_audit(p, org, q).await.map_err(core_error)?;
    let usage = v.usage_per_day(p, org, Some(&info.secret.id), 30).await.map_err(core_error)?;
    let page = views::SecretDetail {
        upstream: info.secret.upstream.clone().unwrap_or_else(|| "—".into()),
        description: info.secret.description.clone().unwrap_or_default(),
        tags: info.secret.tags.join(", "),
        rotate_every: info.secret.rotate_every_secs.map_or("—".into(), |s| format!("{} days", s / 86_400)),
        hook: info.secret.auto_rotation.as_ref().map_or("—".into(), |a| a.hook.clone()),
        versions: info
            .versions
            .iter()
            .rev()
            .map(|x| views::VersionRow {
                version: x.version,
                state: x.state,
                fingerprint: x.fingerprint.clone(),
                created: when(Some(x.created_at)),
                grace_until: when(x.grace_until),
                expires: when(x.expires_at),
                revoked: when(x.revoked_at),
            })
            .collect(),
        grants: info
            .grants
            .iter()
            .map(|g| views::GrantRow {
                agent: agent_name(&g.agent_id),
                secret: info.secret.name.clone(),
                modes: [("proxy", g.modes.proxy), ("reveal", g.modes.reveal)]
                    .iter()
                    .filter(|m| m.1)
                    .map(|m| m.0)
                    .collect::<Vec<_>>()
                    .join(", "),
                expires: when(g.expires_at),
            })
            .collect(),
        agents: agents.iter().filter(|a| !a.disabled).map(|a| a.name.clone()).collect(),
        events: events.iter().map(event_row).collect(),
        chart: views::chart(&usage),
        row: row_of(&info),
        nav: nav(&h),
    };
    Ok(html(&page).into_response())
}

#[derive(Deserialize)]
pub struct NewSecretForm {
    #[serde(default)]
    csrf: String,
    name: String,
    provider: String,
    value: String,
    #[serde(default)]
    description: String,
}

pub async fn create_secret(State(v): State<Arc<Vault>>, h: Human, Form(f): Form<NewSecretForm>) -> Page {
    h.check_csrf(&f.csrf)?;
    let value = SecretValue::new(Zeroizing::new(f.value).as_bytes().to_vec()).map_err(core_error)?;
    let new = NewSecret {
        name: f.name.trim().to_owned(),
        provider: Some(f.provider),
        upstream: None,
        allow_internal: false,
        inject: None,
        rotate_every: None,
        auto_rotation: None,
        description: Some(f.description).filter(|d| !d.trim().is_empty()),
        tags: Vec::new(),
        expires_at: None,
    };
    let info = v.put_secret(h.p(), h.org(), new, value, &h.meta).await.map_err(core_error)?;
    Ok(see_other(&format!("/ui/secrets/{}", info.secret.name)))
}

#[derive(Deserialize)]
pub struct RotateForm {
    #[serde(default)]
    csrf: String,
    value: String,
    #[serde(default)]
    grace: String,
    #[serde(default)]
    confirm: String,
}

pub async fn rotate(
    State(v): State<Arc<Vault>>,
    h: Human,
    Path(name): Path<String>,
    Form(f): Form<RotateForm>,
) -> Page {
    h.check_csrf(&f.csrf)?;
    let value = SecretValue::new(Zeroizing::new(f.value).as_bytes().to_vec()).map_err(core_error)?;
    if f.confirm != "yes" {
        return Err(error_page(
            StatusCode::BAD_REQUEST,
            "Confirm the rotation: agents switch to the new value at once.",
        ));
    }
    let grace = match f.grace.trim() {
        "" => None,
        g => Some(parse_duration(g).map_err(|m| error_page(StatusCode::BAD_REQUEST, &format!("grace: {m}")))?),
    };
    v.rotate_secret(h.p(), h.org(), &name, value, grace, None, &h.meta).await.map_err(core_error)?;
    Ok(see_other(&format!("/ui/secrets/{name}")))
}

pub async fn revoke(State(v): State<Arc<Vault>>, h: Human, Path(name): Path<String>, Form(f): Form<CsrfOnly>) -> Page {
    h.check_csrf(&f.csrf)?;
    v.revoke_secret(h.p(), h.org(), &name, None, &h.meta).await.map_err(core_error)?;
    Ok(see_other(&format!("/ui/secrets/{name}")))
}

pub async fn rollback(
    State(v): State<Arc<Vault>>,
    h: Human,
    Path(name): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Page {
    h.check_csrf(&f.csrf)?;
    v.rollback_secret(h.p(), h.org(), &name, &h.meta).await.map_err(core_error)?;
    Ok(see_other(&format!("/ui/secrets/{name}")))
}

async fn agents_page(v: &Vault, h: &Human, new_token: Option<(String, String)>) -> Page {
    let (p, org) = (h.p(), h.org());
    let agents = v.list_agents(p, org).await.map_err(core_error)?;
    let grants = v.list_grants(p, org, None, None).await.map_err(core_error)?;
    let expiry = v.agent_token_expiry(p, org).await.map_err(core_error)?;
    let rows = agents
        .iter()
        .map(|a| views::AgentRow {
            name: a.name.clone(),
            token_expires: expiry.get(&a.id).map_or("never".into(), |t| when(Some(*t))),
            disabled: a.disabled,
            allow_from: if a.allow_from.is_empty() { "anywhere".into() } else { a.allow_from.join(", ") },
            created: when(Some(a.created_at)),
            grants: grants.iter().filter(|g| g.agent_id == a.id).count(),
        })
        .collect();
    Ok(html(&views::Agents { nav: nav(h), rows, new_token }).into_response())
}

pub async fn agents(State(v): State<Arc<Vault>>, h: Human) -> Page {
    agents_page(&v, &h, None).await
}

#[derive(Deserialize)]
pub struct NewAgentForm {
    #[serde(default)]
    csrf: String,
    name: String,
    #[serde(default)]
    ttl: String,
}

/// Creates an agent and shows its token this once (the page is not cached).
pub async fn create_agent(State(v): State<Arc<Vault>>, h: Human, Form(f): Form<NewAgentForm>) -> Page {
    h.check_csrf(&f.csrf)?;
    let ttl = match f.ttl.trim() {
        "" => None,
        t => Some(parse_duration(t).map_err(|m| error_page(StatusCode::BAD_REQUEST, &format!("ttl: {m}")))?),
    };
    let (agent, token) =
        v.create_agent(h.p(), h.org(), f.name.trim(), None, ttl, Vec::new(), &h.meta).await.map_err(core_error)?;
    agents_page(&v, &h, Some((agent.name, token.expose().to_owned()))).await
}

async fn set_disabled(v: &Vault, h: Human, name: &str, csrf: &str, disabled: bool) -> Page {
    h.check_csrf(csrf)?;
    v.set_agent_disabled(h.p(), h.org(), name, disabled, &h.meta).await.map_err(core_error)?;
    Ok(see_other("/ui/agents"))
}

pub async fn disable_agent(
    State(v): State<Arc<Vault>>,
    h: Human,
    Path(name): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Page {
    set_disabled(&v, h, &name, &f.csrf, true).await
}

pub async fn enable_agent(
    State(v): State<Arc<Vault>>,
    h: Human,
    Path(name): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Page {
    set_disabled(&v, h, &name, &f.csrf, false).await
}

#[derive(Deserialize)]
pub struct GrantForm {
    #[serde(default)]
    csrf: String,
    agent: String,
    secret: String,
    #[serde(default)]
    proxy: String,
    #[serde(default)]
    reveal: String,
}

pub async fn add_grant(State(v): State<Arc<Vault>>, h: Human, Form(f): Form<GrantForm>) -> Page {
    h.check_csrf(&f.csrf)?;
    let modes = Modes { proxy: f.proxy == "yes", reveal: f.reveal == "yes" };
    if !modes.proxy && !modes.reveal {
        return Err(error_page(StatusCode::BAD_REQUEST, "Choose proxy, reveal or both."));
    }
    v.add_grant(h.p(), h.org(), &f.agent, &f.secret, modes, None, &h.meta).await.map_err(core_error)?;
    Ok(see_other(&format!("/ui/secrets/{}", f.secret)))
}

pub async fn remove_grant(State(v): State<Arc<Vault>>, h: Human, Form(f): Form<GrantForm>) -> Page {
    h.check_csrf(&f.csrf)?;
    v.remove_grant(h.p(), h.org(), &f.agent, &f.secret, &h.meta).await.map_err(core_error)?;
    Ok(see_other(&format!("/ui/secrets/{}", f.secret)))
}

#[derive(Deserialize, Default)]
pub struct AuditFilter {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    outcome: String,
    before: Option<i64>,
}

fn audit_query(f: &AuditFilter, limit: u32) -> Result<AuditQuery, Response> {
    let opt = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    let outcome = match f.outcome.as_str() {
        "" => None,
        o => Some(
            Outcome::parse(o)
                .ok_or_else(|| error_page(StatusCode::BAD_REQUEST, "outcome: allowed, denied or error"))?,
        ),
    };
    Ok(AuditQuery {
        agent: opt(&f.agent),
        secret: opt(&f.secret),
        action: opt(&f.action),
        outcome,
        before_seq: f.before,
        limit,
        ..AuditQuery::default()
    })
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const AUDIT_VERIFY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn audit(State(v): State<Arc<Vault>>, h: Human, Query(f): Query<AuditFilter>) -> Page {
    const PAGE: u32 = 50;
    let (p, org) = (h.p(), h.org());
    let events = v.query_audit(p, org, audit_query(&f, PAGE)?).await.map_err(core_error)?;
    // The chain spans every organization: its counts and where it breaks
    // are the operator's (`keyward audit verify`), not each org's. Walked
    // at most once a minute, however often the page is viewed.
    let report = v.verify_audit_recent(p, org, AUDIT_VERIFY_MAX_AGE).await.map_err(core_error)?;
    let chain = if report.ok {
        "Chain verified (as of the last minute).".to_owned()
    } else {
        "Chain BROKEN: ask the operator to run `keyward audit verify`.".to_owned()
    };
    // Plain `&`: the template escapes it (escaping it here too broke the
    // Export and Older links, which then lost every filter).
    let query = format!(
        "agent={}&secret={}&action={}&outcome={}",
        encode(&f.agent),
        encode(&f.secret),
        encode(&f.action),
        encode(&f.outcome)
    );
    let page = views::Audit {
        next_before: (events.len() as u32 == PAGE).then(|| events.last().map(|e| e.seq)).flatten(),
        events: events.iter().map(event_row).collect(),
        agent: f.agent,
        secret: f.secret,
        action: f.action,
        outcome: f.outcome,
        query,
        chain,
        chain_ok: report.ok,
        nav: nav(&h),
    };
    Ok(html(&page).into_response())
}

/// The org's events matching the filters, as JSON lines (newest first).
pub async fn audit_export(State(v): State<Arc<Vault>>, h: Human, Query(f): Query<AuditFilter>) -> Page {
    let events = v.query_audit(h.p(), h.org(), audit_query(&f, 1000)?).await.map_err(core_error)?;
    let mut body = String::new();
    for e in &events {
        body.push_str(&serde_json::to_string(e).unwrap_or_default());
        body.push('\n');
    }
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl; charset=utf-8"),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"keyward-audit.jsonl\""),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

pub async fn alerts(State(v): State<Arc<Vault>>, h: Human, Query(q): Query<AlertsQuery>) -> Page {
    let rows = v.list_alerts(h.p(), h.org(), q.all).await.map_err(core_error)?.iter().map(alert_row).collect();
    Ok(html(&views::Alerts { nav: nav(&h), all: q.all, rows }).into_response())
}

pub async fn ack_alert(State(v): State<Arc<Vault>>, h: Human, Path(id): Path<String>, Form(f): Form<CsrfOnly>) -> Page {
    h.check_csrf(&f.csrf)?;
    v.ack_alert(h.p(), h.org(), &id, &h.meta).await.map_err(core_error)?;
    Ok(see_other("/ui/alerts"))
}
