//! HTTP handlers: thin adapters that parse a request, call one Vault method
//! and shape its answer. No crypto and no policy here.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keyward_core::CoreError;
use keyward_core::duration::{parse_duration, parse_instant};
use keyward_core::model::{AutoRotation, Modes, Role};
use keyward_core::store::AuditQuery;
use keyward_core::vault::{NewSecret, Principal, RequestMeta, SecretValue, UseMode, Vault};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub vault: Arc<Vault>,
    pub upstreams: Arc<crate::proxy::Upstreams>,
}

/// Set by the request-id middleware.
#[derive(Clone)]
pub struct RequestId(pub String);

pub const PURPOSE_HEADER: &str = "x-keyward-purpose";

/// Who is asking and why, for the audit record.
pub struct Meta(pub RequestMeta);

impl<S: Send + Sync> FromRequestParts<S> for Meta {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Meta(RequestMeta {
            source_ip: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string()),
            user_agent: header("user-agent"),
            request_id: parts.extensions.get::<RequestId>().map(|r| r.0.clone()),
            purpose: header(PURPOSE_HEADER),
            target: None,
        }))
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// An authenticated human/admin caller.
pub struct Admin(pub Principal, pub RequestMeta);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Meta(meta) = Meta::from_request_parts(parts, state).await?;
        let token = bearer(&parts.headers)
            .ok_or_else(|| ApiError::unauthenticated("missing_token", "send Authorization: Bearer kwu_…"))?;
        let p = state.vault.authenticate_user(token, &meta).await?;
        Ok(Admin(p, meta))
    }
}

/// `Json<T>` whose rejections are keyward's JSON errors.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

/// `Query<T>` whose rejections are keyward's JSON errors.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::bad_request("invalid_query", crate::error::without_quoted_input(&e.body_text())))
    }
}

/// A value arriving in a request: zeroized when dropped, never echoed.
pub struct WriteOnly(Zeroizing<String>);

impl<'de> Deserialize<'de> for WriteOnly {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| WriteOnly(Zeroizing::new(s)))
    }
}

impl WriteOnly {
    fn into_value(mut self) -> Result<SecretValue, CoreError> {
        SecretValue::new(std::mem::take(&mut *self.0).into_bytes())
    }
}

fn instant(field: &'static str, s: Option<&str>, vault: &Vault) -> Result<Option<time::OffsetDateTime>, CoreError> {
    s.map(|s| parse_instant(s, vault.now()).map_err(|m| CoreError::invalid(field, m))).transpose()
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: impl serde::Serialize) -> ApiResult {
    Ok(Json(v).into_response())
}

fn created(v: impl serde::Serialize) -> ApiResult {
    let mut r = Json(v).into_response();
    *r.status_mut() = StatusCode::CREATED;
    // Responses that carry a one-time token must not be cached anywhere.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

// ---- system ---------------------------------------------------------------

pub async fn healthz() -> ApiResult {
    ok(json!({"status": "ok"}))
}

pub async fn openapi() -> ApiResult {
    ok(crate::openapi::document())
}

pub async fn status(State(s): State<AppState>) -> ApiResult {
    ok(s.vault.status().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsealReq {
    passphrase: WriteOnly,
}

pub async fn unseal(State(s): State<AppState>, Meta(meta): Meta, ApiJson(req): ApiJson<UnsealReq>) -> ApiResult {
    let changed = s.vault.unseal(&req.passphrase.0, &meta).await?;
    ok(json!({"sealed": false, "changed": changed}))
}

// ---- agent ----------------------------------------------------------------

#[derive(serde::Serialize)]
struct Resolved<'a> {
    secret: &'a str,
    id: &'a str,
    version: i64,
    value: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveParams {
    /// A previous version, while its grace period lasts.
    version: Option<i64>,
}

/// `GET /v1/resolve/{secret}`: the value of a reveal-mode grant.
pub async fn resolve(
    State(s): State<AppState>,
    Path(secret): Path<String>,
    Meta(meta): Meta,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ResolveParams>,
) -> ApiResult {
    let token = bearer(&headers).unwrap_or("");
    let released = s.vault.use_secret(token, &secret, UseMode::Reveal, q.version, &meta).await?;
    let value = released
        .value
        .expose_str()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "not_utf8", "the stored value is not UTF-8"))?;
    // The body buffer is handed to hyper and freed after sending; it cannot
    // be zeroized, which is why resolve exists only for reveal-mode grants.
    let body = serde_json::to_vec(&Resolved {
        secret: &released.secret.name,
        id: &released.secret.id,
        version: released.version,
        value,
    })
    .expect("serializable");
    Ok(([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response())
}

// ---- organizations and human tokens ------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    name: String,
}

pub async fn list_orgs(State(s): State<AppState>, Admin(p, _): Admin) -> ApiResult {
    ok(json!({"orgs": s.vault.list_orgs(&p).await?}))
}

pub async fn create_org(
    State(s): State<AppState>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<CreateOrg>,
) -> ApiResult {
    created(s.vault.create_org(&p, &req.name, &meta).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    name: String,
    role: String,
    expires: Option<String>,
}

pub async fn create_token(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult {
    let role = Role::parse(&req.role)?;
    let expires = instant("expires", req.expires.as_deref(), &s.vault)?;
    let (id, token) = s.vault.create_user_token(&p, &org, &req.name, role, expires, &meta).await?;
    created(json!({"id": id, "name": req.name, "role": role, "token": token.expose()}))
}

// ---- secrets ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSecret {
    name: String,
    value: WriteOnly,
    provider: Option<String>,
    upstream: Option<String>,
    #[serde(default)]
    allow_internal: bool,
    inject: Option<String>,
    description: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    expires: Option<String>,
    /// Rotation policy, a duration (`30d`).
    rotate_every: Option<String>,
    /// Automated rotation through a configured hook.
    auto_rotation: Option<AutoRotation>,
}

fn rotate_every(raw: Option<&str>) -> Result<Option<time::Duration>, CoreError> {
    raw.map(parse_duration).transpose().map_err(|m| CoreError::invalid("rotate_every", m))
}

pub async fn list_secrets(State(s): State<AppState>, Path(org): Path<String>, Admin(p, _): Admin) -> ApiResult {
    ok(json!({"secrets": s.vault.list_secrets(&p, &org).await?}))
}

pub async fn put_secret(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<PutSecret>,
) -> ApiResult {
    let value = req.value.into_value()?;
    let new = NewSecret {
        name: req.name,
        provider: req.provider,
        upstream: req.upstream,
        allow_internal: req.allow_internal,
        inject: req.inject,
        rotate_every: rotate_every(req.rotate_every.as_deref())?,
        auto_rotation: req.auto_rotation,
        description: req.description,
        tags: req.tags,
        expires_at: instant("expires", req.expires.as_deref(), &s.vault)?,
    };
    created(s.vault.put_secret(&p, &org, new, value, &meta).await?)
}

pub async fn show_secret(
    State(s): State<AppState>,
    Path((org, secret)): Path<(String, String)>,
    Admin(p, _): Admin,
) -> ApiResult {
    ok(s.vault.show_secret(&p, &org, &secret).await?)
}

pub async fn delete_secret(
    State(s): State<AppState>,
    Path((org, secret)): Path<(String, String)>,
    Admin(p, meta): Admin,
) -> ApiResult {
    s.vault.delete_secret(&p, &org, &secret, &meta).await?;
    ok(json!({"deleted": secret}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateReq {
    /// The new value; absent with `auto`.
    value: Option<WriteOnly>,
    /// Rotate through the secret's hook instead of taking a value.
    #[serde(default)]
    auto: bool,
    /// How long the replaced version stays usable for reveal consumers.
    grace: Option<String>,
    /// When the new version expires (date or duration).
    expires: Option<String>,
}

pub async fn rotate_secret(
    State(s): State<AppState>,
    Path((org, secret)): Path<(String, String)>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<RotateReq>,
) -> ApiResult {
    if req.auto {
        if req.value.is_some() || req.grace.is_some() || req.expires.is_some() {
            return Err(
                CoreError::invalid("auto", "takes no value, grace or expires: the hook issues the value").into()
            );
        }
        // On a task of its own: a rotation dropped half-way (the caller hung
        // up, or the API's request timeout fired while a hook ran) could
        // leave a new key issued or the old one unrevoked at the provider.
        // It finishes, audited, whether or not anyone waits for the answer.
        let vault = s.vault.clone();
        let rotation = tokio::spawn(async move { vault.auto_rotate(&p, &org, &secret, &meta).await });
        let rotated = rotation.await.map_err(|e| {
            tracing::error!(error = %e, "automated rotation task ended abnormally");
            CoreError::RotationFailed { stage: "run", message: "the rotation stopped unexpectedly".into() }
        })?;
        return ok(rotated?);
    }
    let value = req.value.ok_or_else(|| CoreError::invalid("value", "missing (or set `auto`)"))?.into_value()?;
    let grace = req.grace.as_deref().map(parse_duration).transpose().map_err(|m| CoreError::invalid("grace", m))?;
    let expires = instant("expires", req.expires.as_deref(), &s.vault)?;
    ok(s.vault.rotate_secret(&p, &org, &secret, value, grace, expires, &meta).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReq {
    /// Replaces the rotation interval (absent: none).
    rotate_every: Option<String>,
    /// Replaces the automated rotation (absent: none).
    auto_rotation: Option<AutoRotation>,
}

pub async fn set_policy(
    State(s): State<AppState>,
    Path((org, secret)): Path<(String, String)>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<PolicyReq>,
) -> ApiResult {
    let every = rotate_every(req.rotate_every.as_deref())?;
    ok(s.vault.set_rotation_policy(&p, &org, &secret, every, req.auto_rotation, &meta).await?)
}

pub async fn rollback_secret(
    State(s): State<AppState>,
    Path((org, secret)): Path<(String, String)>,
    Admin(p, meta): Admin,
) -> ApiResult {
    ok(s.vault.rollback_secret(&p, &org, &secret, &meta).await?)
}

pub async fn metrics(State(s): State<AppState>, Admin(p, _): Admin) -> ApiResult {
    let text = s.vault.metrics(&p).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeReq {
    version: Option<i64>,
}

pub async fn revoke_secret(
    State(s): State<AppState>,
    Path((org, secret)): Path<(String, String)>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<RevokeReq>,
) -> ApiResult {
    ok(s.vault.revoke_secret(&p, &org, &secret, req.version, &meta).await?)
}

// ---- agents ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAgent {
    name: String,
    description: Option<String>,
    ttl: Option<String>,
    /// Source networks (CIDR) the agent may call from; empty: anywhere.
    #[serde(default)]
    allow_from: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateToken {
    /// How long the old token keeps working (e.g. 1h); default: it stops now.
    overlap: Option<String>,
}

pub async fn list_agents(State(s): State<AppState>, Path(org): Path<String>, Admin(p, _): Admin) -> ApiResult {
    ok(json!({"agents": s.vault.list_agents(&p, &org).await?}))
}

pub async fn create_agent(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<CreateAgent>,
) -> ApiResult {
    let ttl = req.ttl.as_deref().map(parse_duration).transpose().map_err(|m| CoreError::invalid("ttl", m))?;
    let (agent, token) = s.vault.create_agent(&p, &org, &req.name, req.description, ttl, req.allow_from, &meta).await?;
    created(json!({"agent": agent, "token": token.expose()}))
}

pub async fn rotate_agent_token(
    State(s): State<AppState>,
    Path((org, agent)): Path<(String, String)>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<RotateToken>,
) -> ApiResult {
    let overlap =
        req.overlap.as_deref().map(parse_duration).transpose().map_err(|m| CoreError::invalid("overlap", m))?;
    let (agent, token) = s.vault.rotate_agent_token(&p, &org, &agent, overlap, &meta).await?;
    created(json!({"agent": agent, "token": token.expose()}))
}

pub async fn show_agent(
    State(s): State<AppState>,
    Path((org, agent)): Path<(String, String)>,
    Admin(p, _): Admin,
) -> ApiResult {
    let (agent, grants) = s.vault.show_agent(&p, &org, &agent).await?;
    ok(json!({"agent": agent, "grants": grants}))
}

pub async fn disable_agent(
    State(s): State<AppState>,
    Path((org, agent)): Path<(String, String)>,
    Admin(p, meta): Admin,
) -> ApiResult {
    ok(s.vault.set_agent_disabled(&p, &org, &agent, true, &meta).await?)
}

pub async fn enable_agent(
    State(s): State<AppState>,
    Path((org, agent)): Path<(String, String)>,
    Admin(p, meta): Admin,
) -> ApiResult {
    ok(s.vault.set_agent_disabled(&p, &org, &agent, false, &meta).await?)
}

// ---- grants ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddGrant {
    agent: String,
    secret: String,
    modes: Vec<String>,
    expires: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFilter {
    agent: Option<String>,
    secret: Option<String>,
}

pub async fn list_grants(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, _): Admin,
    ApiQuery(f): ApiQuery<GrantFilter>,
) -> ApiResult {
    ok(json!({"grants": s.vault.list_grants(&p, &org, f.agent.as_deref(), f.secret.as_deref()).await?}))
}

pub async fn add_grant(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<AddGrant>,
) -> ApiResult {
    let modes = Modes::parse_list(&req.modes)?;
    let expires = instant("expires", req.expires.as_deref(), &s.vault)?;
    created(s.vault.add_grant(&p, &org, &req.agent, &req.secret, modes, expires, &meta).await?)
}

pub async fn remove_grant(
    State(s): State<AppState>,
    Path((org, agent, secret)): Path<(String, String, String)>,
    Admin(p, meta): Admin,
) -> ApiResult {
    s.vault.remove_grant(&p, &org, &agent, &secret, &meta).await?;
    ok(json!({"removed": {"agent": agent, "secret": secret}}))
}

// ---- audit -----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    secret: Option<String>,
    agent: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    /// RFC 3339 time, date, or a duration back from now (`1h`).
    since: Option<String>,
    /// The same forms: only events before it.
    until: Option<String>,
    source_ip: Option<String>,
    before: Option<i64>,
    limit: Option<u32>,
}

fn point_in_time(
    field: &'static str,
    raw: Option<&str>,
    now: time::OffsetDateTime,
) -> Result<Option<time::OffsetDateTime>, CoreError> {
    raw.map(|x| match parse_duration(x) {
        Ok(d) => Ok(now - d),
        Err(_) => parse_instant(x, now).map_err(|m| CoreError::invalid(field, m)),
    })
    .transpose()
}

fn audit_query(vault: &Vault, q: AuditParams) -> Result<AuditQuery, CoreError> {
    let now = vault.now();
    let outcome = q
        .outcome
        .as_deref()
        .map(|o| {
            keyward_core::audit::Outcome::parse(o)
                .ok_or_else(|| CoreError::invalid("outcome", "allowed, denied or error"))
        })
        .transpose()?;
    if let Some(ip) = &q.source_ip
        && ip.parse::<std::net::IpAddr>().is_err()
    {
        return Err(CoreError::invalid("source_ip", "not an IP address"));
    }
    Ok(AuditQuery {
        secret: q.secret,
        agent: q.agent,
        action: q.action,
        outcome,
        since: point_in_time("since", q.since.as_deref(), now)?,
        until: point_in_time("until", q.until.as_deref(), now)?,
        source_ip: q.source_ip,
        before_seq: q.before,
        limit: q.limit.unwrap_or(100),
        ..AuditQuery::default()
    })
}

pub async fn query_audit(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, _): Admin,
    ApiQuery(q): ApiQuery<AuditParams>,
) -> ApiResult {
    let query = audit_query(&s.vault, q)?;
    let limit = query.limit;
    let events = s.vault.query_audit(&p, &org, query).await?;
    let next_before = if events.len() as u32 >= limit.clamp(1, 1000) { events.last().map(|e| e.seq) } else { None };
    ok(json!({"events": events, "next_before": next_before}))
}

/// Server-sent events: every new event matching the filters, oldest first,
/// from the moment of the request on. Polls the store (so it follows every
/// replica's events); the stream ends if the vault is sealed or the store
/// fails, and clients reconnect with `Last-Event-ID` to resume.
pub async fn follow_audit(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, _): Admin,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<AuditParams>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let mut query = audit_query(&s.vault, q)?;
    if query.before_seq.is_some() {
        return Err(CoreError::invalid("before", "following reads forward; use Last-Event-ID to resume").into());
    }
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let start = match resume {
        Some(seq) => seq,
        None => s.vault.audit_head(&p, &org).await?,
    };
    query.after_seq = Some(start);
    query.limit = 500;
    let vault = s.vault.clone();
    let events = futures_util::stream::unfold((vault, p, org, query), |(v, p, org, mut q)| async move {
        loop {
            match v.query_audit(&p, &org, q.clone()).await {
                Ok(batch) if !batch.is_empty() => {
                    q.after_seq = batch.last().map(|e| e.seq);
                    let items: Vec<Result<Event, std::convert::Infallible>> = batch
                        .iter()
                        .filter_map(|e| Event::default().event("audit").id(e.seq.to_string()).json_data(e).ok())
                        .map(Ok)
                        .collect();
                    return Some((futures_util::stream::iter(items), (v, p, org, q)));
                }
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                Err(_) => return None,
            }
        }
    });
    Ok(Sse::new(futures_util::StreamExt::flatten(events)).keep_alive(KeepAlive::default()).into_response())
}

pub async fn verify_audit(State(s): State<AppState>, Path(org): Path<String>, Admin(p, _): Admin) -> ApiResult {
    ok(s.vault.verify_audit(&p, &org).await?)
}

pub async fn audit_pubkey(State(s): State<AppState>, Path(org): Path<String>, Admin(p, _): Admin) -> ApiResult {
    let key = s.vault.audit_public_key(&p, &org).await?;
    ok(json!({"algorithm": "ed25519", "public_key_pem": keyward_core::checkpoint::public_key_pem(&key)}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    #[serde(default)]
    after: i64,
    limit: Option<u32>,
}

pub async fn export_audit(
    State(s): State<AppState>,
    Admin(p, _): Admin,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult {
    ok(s.vault.export_audit(&p, q.after, q.limit.unwrap_or(1000)).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneReq {
    /// RFC 3339 time, date, or how far back (`90d`): events older go.
    before: String,
    #[serde(default)]
    dry_run: bool,
}

pub async fn prune_audit(
    State(s): State<AppState>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<PruneReq>,
) -> ApiResult {
    let before = point_in_time("before", Some(&req.before), s.vault.now())?.expect("given");
    ok(s.vault.prune_audit(&p, before, req.dry_run, &meta).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

pub async fn list_alerts(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, _): Admin,
    ApiQuery(q): ApiQuery<AlertsQuery>,
) -> ApiResult {
    ok(json!({"alerts": s.vault.list_alerts(&p, &org, q.all).await?}))
}

pub async fn ack_alert(
    State(s): State<AppState>,
    Path((org, id)): Path<(String, String)>,
    Admin(p, meta): Admin,
) -> ApiResult {
    s.vault.ack_alert(&p, &org, &id, &meta).await?;
    ok(json!({"acknowledged": id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyScope {
    agent: Option<String>,
}

pub async fn anomaly_policy(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, _): Admin,
    ApiQuery(q): ApiQuery<PolicyScope>,
) -> ApiResult {
    let (stored, effective) = s.vault.anomaly_policy(&p, &org, q.agent.as_deref()).await?;
    ok(json!({"agent": q.agent, "stored": stored, "effective": effective}))
}

pub async fn set_anomaly_policy(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, meta): Admin,
    ApiQuery(q): ApiQuery<PolicyScope>,
    ApiJson(patch): ApiJson<keyward_core::anomaly::AnomalyPolicy>,
) -> ApiResult {
    let (stored, effective) = s.vault.set_anomaly_policy(&p, &org, q.agent.as_deref(), patch, &meta).await?;
    ok(json!({"agent": q.agent, "stored": stored, "effective": effective}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    name: String,
    role: String,
    password: WriteOnly,
}

pub async fn create_user(
    State(s): State<AppState>,
    Path(org): Path<String>,
    Admin(p, meta): Admin,
    ApiJson(req): ApiJson<CreateUser>,
) -> ApiResult {
    let role = Role::parse(&req.role)?;
    created(s.vault.create_user(&p, &org, &req.name, role, req.password.0, &meta).await?)
}

pub async fn list_users(State(s): State<AppState>, Path(org): Path<String>, Admin(p, _): Admin) -> ApiResult {
    ok(json!({"users": s.vault.list_users(&p, &org).await?}))
}

pub async fn audit_checkpoints(State(s): State<AppState>, Admin(p, _): Admin) -> ApiResult {
    ok(json!({"checkpoints": s.vault.export_checkpoints(&p).await?}))
}
