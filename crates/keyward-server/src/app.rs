//! The router and its middleware: request ids, seal gate, limits, timeouts
//! and access logs that carry no values and no tokens.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use tower_http::timeout::TimeoutLayer;

use crate::error::ApiError;
use crate::handlers::{self as h, AppState, RequestId};

/// Largest request body: a 64 KiB value JSON-escaped fits with room to spare.
pub const MAX_BODY_BYTES: usize = 512 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub fn router(state: AppState) -> Router {
    // Proxied requests stream for as long as the upstream does (LLM answers
    // take minutes): they have the upstream client's own timeouts instead.
    let proxy = Router::new()
        .route("/proxy/{secret}", any(crate::proxy::handle))
        .route("/proxy/{secret}/{*path}", any(crate::proxy::handle))
        // A live audit feed lasts as long as its reader wants.
        .route("/v1/orgs/{org}/audit/follow", get(h::follow_audit));
    let api = Router::new()
        .route("/healthz", get(h::healthz))
        .route("/openapi.json", get(h::openapi))
        .route("/v1/sys/status", get(h::status))
        .route("/v1/sys/unseal", post(h::unseal))
        .route("/v1/resolve/{secret}", get(h::resolve))
        .route("/v1/orgs", get(h::list_orgs).post(h::create_org))
        .route("/v1/orgs/{org}/tokens", post(h::create_token))
        .route("/v1/orgs/{org}/users", get(h::list_users).post(h::create_user))
        .route("/v1/orgs/{org}/secrets", get(h::list_secrets).post(h::put_secret))
        .route("/v1/orgs/{org}/secrets/{secret}", get(h::show_secret).delete(h::delete_secret))
        .route("/v1/orgs/{org}/secrets/{secret}/rotate", post(h::rotate_secret))
        .route("/v1/orgs/{org}/secrets/{secret}/revoke", post(h::revoke_secret))
        .route("/v1/orgs/{org}/secrets/{secret}/rollback", post(h::rollback_secret))
        .route("/v1/orgs/{org}/secrets/{secret}/policy", axum::routing::put(h::set_policy))
        .route("/metrics", get(h::metrics))
        .route("/v1/orgs/{org}/agents", get(h::list_agents).post(h::create_agent))
        .route("/v1/orgs/{org}/agents/{agent}", get(h::show_agent))
        .route("/v1/orgs/{org}/agents/{agent}/disable", post(h::disable_agent))
        .route("/v1/orgs/{org}/agents/{agent}/enable", post(h::enable_agent))
        .route("/v1/orgs/{org}/agents/{agent}/token", post(h::rotate_agent_token))
        .route("/v1/orgs/{org}/grants", get(h::list_grants).post(h::add_grant))
        .route("/v1/orgs/{org}/grants/{agent}/{secret}", axum::routing::delete(h::remove_grant))
        .route("/v1/orgs/{org}/audit", get(h::query_audit))
        .route("/v1/orgs/{org}/audit/verify", get(h::verify_audit))
        .route("/v1/orgs/{org}/audit/pubkey", get(h::audit_pubkey))
        .route("/v1/audit/export", get(h::export_audit))
        .route("/v1/audit/checkpoints", get(h::audit_checkpoints))
        .route("/v1/audit/prune", post(h::prune_audit))
        .route("/v1/orgs/{org}/alerts", get(h::list_alerts))
        .route("/v1/orgs/{org}/alerts/{id}/ack", post(h::ack_alert))
        .route("/v1/orgs/{org}/anomaly-policy", get(h::anomaly_policy).put(h::set_anomaly_policy))
        // The dashboard (server-rendered pages; see keyward-dashboard).
        .nest_service("/ui", keyward_dashboard::router(state.vault.clone()))
        .route("/", get(|| async { axum::response::Redirect::to("/ui/") }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT));
    proxy
        .merge(api)
        .layer(middleware::from_fn_with_state(state.clone(), seal_gate))
        .layer(middleware::from_fn(request_id_and_log))
        .with_state(state)
}

/// A sealed server answers 503 `sealed` to everything but status and unseal.
async fn seal_gate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/healthz" | "/v1/sys/status" | "/v1/sys/unseal");
    if !open && s.vault.is_sealed() {
        // People get a page (with the dashboard's headers), programs JSON.
        if req.uri().path().starts_with("/ui") {
            return keyward_dashboard::sealed_page();
        }
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sealed", "the vault is sealed; run `keyward unseal`")
            .into_response();
    }
    next.run(req).await
}

/// Gives every request an id (echoed in `x-request-id` and the audit record)
/// and logs method, path, status and latency — never headers, query or body.
async fn request_id_and_log(mut req: Request, next: Next) -> Response {
    let id = uuid::Uuid::now_v7().simple().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let status = resp.status().as_u16();
    let micros = started.elapsed().as_micros() as u64;
    if status < 400 && quiet_when_ok(&path) {
        tracing::debug!(target: "keyward::access", request_id = %id, method = %method, path = %path, status, micros);
    } else {
        tracing::info!(target: "keyward::access", request_id = %id, method = %method, path = %path, status, micros);
    }
    resp
}

/// Paths whose successful requests log their access line at debug level,
/// not info: a credential use is in the audit trail already (with its
/// request id), and its line was the hot path's biggest logging cost; a
/// liveness probe every few seconds would bury everything else. Failures
/// stay visible at info.
fn quiet_when_ok(path: &str) -> bool {
    path.starts_with("/proxy/") || path.starts_with("/v1/resolve/") || path == "/healthz"
}

#[cfg(test)]
mod tests {
    use crate::openapi::ROUTES;

    #[test]
    fn routine_successes_log_at_debug_and_the_rest_at_info() {
        for quiet in ["/proxy/openai/v1/chat/completions", "/v1/resolve/openai", "/healthz"] {
            assert!(super::quiet_when_ok(quiet), "{quiet}");
        }
        for loud in ["/v1/secrets", "/v1/agents", "/ui/", "/v1/sys/unseal", "/healthz/x", "/v1/audit"] {
            assert!(!super::quiet_when_ok(loud), "{loud}");
        }
    }

    /// Every documented route exists in the router and vice versa.
    #[test]
    fn openapi_matches_router_source() {
        let src = include_str!("app.rs").replace("{*", "{");
        for (_, path, _, _) in ROUTES {
            assert!(src.contains(&format!("\"{path}\"")), "{path} documented but not routed");
        }
        let routed = src.matches(".route(\"").count();
        let documented: std::collections::BTreeSet<_> = ROUTES.iter().map(|r| r.1).collect();
        assert_eq!(routed, documented.len(), "a routed path is missing from the OpenAPI document");
    }
}
