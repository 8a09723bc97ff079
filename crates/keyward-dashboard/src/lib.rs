//! keyward's dashboard: server-rendered pages under `/ui` (askama templates,
//! plain HTML forms, one small script served from here). It never shows a
//! stored value — values go in through password inputs and are never
//! echoed — and every action is a call into the same `Vault` methods as
//! the API and the CLI, audited with the human as actor.
//!
//! Sessions: a random cookie (`__Host-kw_session`, HttpOnly, Secure,
//! SameSite=Strict) of which the server keeps only the SHA-256; idle and
//! absolute timeouts; a CSRF token in every state-changing form; a strict
//! Content-Security-Policy (no inline script) and `X-Frame-Options: DENY`
//! on every response.
#![forbid(unsafe_code)]
// Handlers use axum's Response as their error type, as axum does itself.
#![allow(clippy::result_large_err)]

mod pages;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use keyward_core::CoreError;
use keyward_core::vault::{Principal, RequestMeta, SessionInfo, Vault};

pub const SESSION_COOKIE: &str = "__Host-kw_session";
pub const LOGIN_CSRF_COOKIE: &str = "__Host-kw_login";
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes, to be mounted at `/ui`.
pub fn router(vault: Arc<Vault>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/setup", get(pages::setup_form).post(pages::setup))
        .route("/secrets", get(pages::secrets).post(pages::create_secret))
        .route("/secrets/{name}", get(pages::secret))
        .route("/secrets/{name}/rotate", post(pages::rotate))
        .route("/secrets/{name}/revoke", post(pages::revoke))
        .route("/secrets/{name}/rollback", post(pages::rollback))
        .route("/agents", get(pages::agents).post(pages::create_agent))
        .route("/agents/{name}/disable", post(pages::disable_agent))
        .route("/agents/{name}/enable", post(pages::enable_agent))
        .route("/grants", post(pages::add_grant))
        .route("/grants/remove", post(pages::remove_grant))
        .route("/audit", get(pages::audit))
        .route("/audit/export.jsonl", get(pages::audit_export))
        .route("/alerts", get(pages::alerts))
        .route("/alerts/{id}/ack", post(pages::ack_alert))
        .route("/static/app.css", get(|| async { static_file("text/css", include_str!("../static/app.css")) }))
        .route("/static/app.js", get(|| async { static_file("text/javascript", include_str!("../static/app.js")) }))
        .fallback(|| async { error_page(StatusCode::NOT_FOUND, "No such page.") })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(vault)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=300")], body).into_response()
}

/// On every response: no framing, no inline script, no sniffing, no
/// caching of pages, no referrer.
async fn security_headers(mut r: Response) -> Response {
    add_security_headers(&mut r);
    r
}

fn add_security_headers(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

use axum::http::HeaderName;

/// The value of a cookie in the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// `Set-Cookie` for a session-scoped cookie with every protective flag.
fn set_cookie(name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
    let age = max_age.map(|s| format!("; Max-Age={s}")).unwrap_or_default();
    HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}"))
        .expect("cookie values are base64")
}

fn meta_of(parts: &Parts) -> RequestMeta {
    RequestMeta {
        source_ip: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string()),
        user_agent: parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned),
        ..RequestMeta::default()
    }
}

/// A logged-in human: the session, its principal and request metadata.
pub struct Human {
    pub session: SessionInfo,
    pub meta: RequestMeta,
}

impl Human {
    fn p(&self) -> &Principal {
        &self.session.principal
    }
    fn org(&self) -> &str {
        &self.session.user.org_id
    }
    fn can_change(&self) -> bool {
        self.session.user.role >= keyward_core::model::Role::Admin
    }
    /// Refuses a form whose CSRF token is not this session's.
    fn check_csrf(&self, presented: &str) -> Result<(), Response> {
        let ok = keyward_core::token::hashes_equal_slices(presented.as_bytes(), self.session.csrf.as_bytes());
        if ok { Ok(()) } else { Err(error_page(StatusCode::FORBIDDEN, "The form's CSRF token is missing or wrong.")) }
    }
}

impl FromRequestParts<Arc<Vault>> for Human {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, vault: &Arc<Vault>) -> Result<Self, Response> {
        let Some(c) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(Redirect::to("/ui/login").into_response());
        };
        match vault.session(&c).await {
            Ok(Some(session)) => Ok(Human { session, meta: meta_of(parts) }),
            Ok(None) => Err(Redirect::to("/ui/login").into_response()),
            Err(e) => Err(core_error(e)),
        }
    }
}

/// Request metadata without a session (login, setup).
pub struct Anonymous(pub RequestMeta, pub HeaderMap);

impl FromRequestParts<Arc<Vault>> for Anonymous {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<Vault>) -> Result<Self, Response> {
        Ok(Anonymous(meta_of(parts), parts.headers.clone()))
    }
}

/// What a sealed server shows a browser instead of the dashboard, with the
/// dashboard's security headers.
pub fn sealed_page() -> Response {
    let mut page = error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "keyward is sealed: an operator must run `keyward unseal` before anyone can log in.",
    );
    add_security_headers(&mut page);
    page
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let page = views::ErrorPage { status: status.as_u16(), message: message.to_owned() };
    (status, views::html(&page)).into_response()
}

fn core_error(e: CoreError) -> Response {
    let status = StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(error = %e, "dashboard request failed");
    }
    error_page(status, &e.public_message())
}
