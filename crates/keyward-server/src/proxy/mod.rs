//! The credential-injecting proxy: `ANY /proxy/{secret}/{path}`.
//!
//! authenticate the agent from its SDK's credential slot → `Vault::use_secret`
//! (grant check + audit record, fail closed) → strip the agent's credential,
//! inject the real key → forward to the secret's bound origin only (checked
//! addresses, no redirects) → stream the answer back with any echo of the key
//! redacted → audit the outcome (status, bytes, latency).

mod guard;
mod presets;
mod redact;
mod websocket;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use keyward_core::vault::{RequestMeta, UseMode};

use crate::error::ApiError;
use crate::handlers::{AppState, Meta};
pub use guard::{AddrClass, Lookup, classify};

/// Answers up to this size with a Content-Length are forwarded in one piece.
const SMALL_ANSWER: u64 = 256 * 1024;

/// Upstream HTTP clients: one that refuses internal addresses, one for
/// secrets allowed an internal upstream. Both refuse metadata addresses,
/// follow no redirects and use no system proxy.
pub struct Upstreams {
    strict: reqwest::Client,
    internal: reqwest::Client,
    /// HTTP/1.1-only twins for WebSocket handshakes (upgrades need HTTP/1.1).
    strict_h1: reqwest::Client,
    internal_h1: reqwest::Client,
    /// Bound origins, parsed: parsing a URL (IDNA included) on every
    /// request showed in profiles. Origins are metadata, never secret.
    origins: std::sync::Mutex<HashMap<String, reqwest::Url>>,
    /// How long an upstream may send nothing, and an agent may take
    /// nothing, before a streamed answer is cut off.
    idle_timeout: Duration,
}

/// Parsed origins kept at most (a cache, emptied when full).
const ORIGIN_CACHE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("--upstream-ca {path}: {message}")]
    Ca { path: String, message: String },
    #[error("--resolve {0}: expected HOST=ADDRESS")]
    Pin(String),
    #[error("building the upstream client: {0}")]
    Client(String),
}

impl Upstreams {
    pub fn new(
        upstream_ca: Option<&Path>,
        pins: &[String],
        idle_timeout: Duration,
    ) -> Result<Self, UpstreamSetupError> {
        let mut pinned: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for p in pins {
            let (host, addr) = p.split_once('=').ok_or_else(|| UpstreamSetupError::Pin(p.clone()))?;
            let ip: IpAddr = addr.parse().map_err(|_| UpstreamSetupError::Pin(p.clone()))?;
            pinned.entry(host.to_ascii_lowercase()).or_default().push(ip);
        }
        let lookup = Lookup { pinned: Arc::new(pinned) };
        let roots = match upstream_ca {
            Some(path) => {
                let err = |message: String| UpstreamSetupError::Ca { path: path.display().to_string(), message };
                let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?
            }
            None => Vec::new(),
        };
        let build = |allow_internal: bool, h1: bool| {
            let b = reqwest::Client::builder();
            let b = if h1 { b.http1_only() } else { b };
            b.no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .retry(reqwest::retry::never())
                .referer(false)
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(idle_timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                .tls_certs_merge(roots.clone())
                .dns_resolver(Arc::new(guard::GuardedResolver { lookup: lookup.clone(), allow_internal }))
                .build()
                .map_err(|e| UpstreamSetupError::Client(e.to_string()))
        };
        Ok(Self {
            strict: build(false, false)?,
            internal: build(true, false)?,
            strict_h1: build(false, true)?,
            internal_h1: build(true, true)?,
            origins: std::sync::Mutex::new(HashMap::new()),
            idle_timeout,
        })
    }

    /// The origin as the client reads it, parsed once.
    fn parsed_origin(&self, origin: &str) -> Result<reqwest::Url, ApiError> {
        let cached = self.origins.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(origin).cloned();
        if let Some(u) = cached {
            return Ok(u);
        }
        let u = reqwest::Url::parse(origin).map_err(|_| {
            ApiError::new(StatusCode::BAD_GATEWAY, "upstream_invalid", "the secret's upstream is not a valid origin")
        })?;
        let mut origins = self.origins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if origins.len() >= ORIGIN_CACHE {
            origins.clear();
        }
        origins.insert(origin.to_owned(), u.clone());
        Ok(u)
    }

    /// `origin` + `path` + `query` as a URL, the origin parsed once.
    #[cfg(test)]
    fn url(&self, origin: &str, path: &str, query: &[String]) -> Result<reqwest::Url, ApiError> {
        Ok(join(self.parsed_origin(origin)?, path, query))
    }

    /// The secret's bound origin, if the network policy lets a key go there.
    /// A literal address is checked here, as the client's URL parser reads
    /// it: that parser takes `0x` or `10.0.0x` for IPv4 addresses, so an
    /// origin stored by an older, laxer validation cannot slip past as a
    /// "name". Names are checked when they resolve.
    fn checked_origin(&self, secret: &keyward_core::model::Secret) -> Result<reqwest::Url, ApiError> {
        let origin = secret.upstream.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "no_upstream",
                "this secret is bound to no upstream (secret put --upstream)",
            )
        })?;
        let parsed = self.parsed_origin(origin)?;
        let literal = literal_host(&parsed);
        if let Some(ip) = literal {
            guard::check(ip, secret.allow_internal).map_err(|e| {
                tracing::warn!(detail = %e, "upstream address refused");
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "upstream_forbidden",
                    "the upstream is an address this secret may not reach",
                )
            })?;
        }
        if parsed.scheme() == "http" {
            // `localhost` always resolves to loopback (guard::Lookup).
            let loopback = parsed.host_str() == Some("localhost") || literal.is_some_and(|ip| ip.is_loopback());
            if !(loopback && secret.allow_internal) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "plaintext_upstream",
                    "http:// upstreams are allowed only on loopback, for secrets allowed an internal upstream",
                ));
            }
        }
        Ok(parsed)
    }
}

/// The origin with a request's path and query.
fn join(mut origin: reqwest::Url, path: &str, query: &[String]) -> reqwest::Url {
    origin.set_path(path);
    origin.set_query((!query.is_empty()).then(|| query.join("&")).as_deref());
    origin
}

/// The address a parsed URL's host is, if it is one (not a name).
fn literal_host(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).parse().ok()
}

impl Upstreams {
    /// Automated rotation's verify probe: `method path` to the secret's
    /// bound origin with `value` injected as a proxied request would carry
    /// it, through the same network guard; the answer's status. Errors name
    /// no value (reqwest's messages can hold the URL, which can hold a
    /// query-injected key, so they are not passed on).
    pub async fn probe(
        &self,
        secret: &keyward_core::model::Secret,
        method: &str,
        path: &str,
        value: &str,
    ) -> Result<StatusCode, String> {
        self.checked_origin(secret).map_err(|e| e.message)?;
        let origin = secret.upstream.as_deref().unwrap_or_default();
        let (path, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
        let mut headers = HeaderMap::new();
        let mut query = presets::forward_query(query);
        presets::inject(&secret.provider, secret.inject.as_deref(), value, &mut headers, &mut query)
            .map_err(|e| e.message)?;
        let url = zeroize::Zeroizing::new(if query.is_empty() {
            format!("{origin}{path}")
        } else {
            format!("{origin}{path}?{}", query.join("&"))
        });
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| "invalid method".to_owned())?;
        let client = if secret.allow_internal { &self.internal } else { &self.strict };
        let resp = client
            .request(method, url.as_str())
            .headers(headers)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| format!("probe failed: {}", upstream_error(&e).message))?;
        Ok(resp.status())
    }
}

/// Splits the raw (still percent-encoded) request path into the secret
/// reference and the path to forward. Dot segments, encoded slashes or
/// backslashes and empty segments are refused, not resolved: what is checked
/// is exactly what is forwarded.
fn split_path(raw: &str) -> Result<(String, String), ApiError> {
    let bad = |m: &str| ApiError::bad_request("invalid_path", m.to_owned());
    let rest = raw.strip_prefix("/proxy/").ok_or_else(|| bad("not a proxy path"))?;
    let (secret, forward) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(bad("the secret must be a name or id"));
    }
    let segments: Vec<&str> = forward[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let decoded = percent_decode(seg).ok_or_else(|| bad("malformed percent-encoding"))?;
        if decoded == "." || decoded == ".." {
            return Err(bad("dot segments are not allowed"));
        }
        if decoded.contains(['/', '\\']) || seg.contains('\\') {
            return Err(bad("encoded slashes and backslashes are not allowed"));
        }
        if seg.is_empty() && i + 1 != segments.len() {
            return Err(bad("empty path segments (//) are not allowed"));
        }
        if decoded.chars().any(|c| c.is_control()) {
            return Err(bad("control characters are not allowed"));
        }
    }
    Ok((secret.to_owned(), forward.to_owned()))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those listed in `Connection`.
fn hop_by_hop(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .map(|n| HeaderName::from_static(n))
    .collect();
    for v in headers.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            names.extend(s.split(',').filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()));
        }
    }
    names
}

/// Whether an answer's body comes in a coding keyward would pass on
/// unread: a content coding other than `identity` on any Content-Encoding
/// line, or a transfer coding other than `chunked` (the only one the client
/// removes).
fn compressed(headers: &HeaderMap) -> bool {
    fn codings(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
        headers
            .get_all(name)
            .into_iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
    }
    codings(headers, header::CONTENT_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"identity"))
        || codings(headers, header::TRANSFER_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"chunked"))
}

fn upstream_error(e: &reqwest::Error) -> ApiError {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        if let Some(refused) = s.downcast_ref::<guard::Refused>() {
            // The agent learns that, not which internal address the name has.
            tracing::warn!(detail = %refused, "upstream address refused");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "upstream_forbidden",
                "the upstream resolves to an address this secret may not reach",
            );
        }
        src = s.source();
    }
    if e.is_timeout() {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "the upstream did not answer in time")
    } else if e.is_connect() {
        ApiError::new(StatusCode::BAD_GATEWAY, "upstream_unreachable", "cannot connect to the upstream")
    } else {
        ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", "the upstream connection failed")
    }
}

pub async fn handle(State(s): State<AppState>, Meta(meta): Meta, req: Request) -> Response {
    // Boxed: the request's whole state machine is several kilobytes, and
    // unboxed it is copied through every layer of the router on each call.
    match Box::pin(forward(s, meta, req)).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(s: AppState, mut meta: RequestMeta, req: Request) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let token = presets::find_agent_token(&parts.headers, parts.uri.query()).map(|(t, _)| t);
    let token = token.as_deref().map_or("", |t| t.as_str());
    let (secret_ref, path, websocket) = match admissible(&mut parts) {
        Ok(found) => found,
        Err(refused) => {
            // Refused before any secret was looked at (a traversal probe,
            // say): still a denied use in the trail, naming the agent.
            meta.target = Some(format!("{} {}", parts.method, parts.uri.path()));
            s.vault.audit_refused_use(token, UseMode::Proxy, refused.code, &meta).await?;
            return Err(refused);
        }
    };
    // No query values in the audit trail: they may carry data.
    meta.target = Some(format!("{} {}", parts.method, path));
    let released = s.vault.use_secret(token, &secret_ref, UseMode::Proxy, None, &meta).await?;
    let outcome = Outcome {
        vault: s.vault.clone(),
        record: released.record.clone(),
        released_seq: released.audit_seq,
        meta: meta.clone(),
        started,
        recorded: false,
    };
    // The use is already audited as allowed: every refusal from here on
    // completes the trail with its reason.
    let prepared = prepare(&s.upstreams, &released, &parts, &path, websocket.is_some());
    let (url, headers, redactor) = match prepared {
        Ok(p) => p,
        Err(err) => {
            outcome.record(err.status.as_u16(), 0, Some(err.code));
            return Err(err);
        }
    };
    let secret = &released.secret;
    let client = match (secret.allow_internal, websocket.is_some()) {
        (false, false) => &s.upstreams.strict,
        (true, false) => &s.upstreams.internal,
        (false, true) => &s.upstreams.strict_h1,
        (true, true) => &s.upstreams.internal_h1,
    };
    let mut upstream_req = client.request(parts.method.clone(), url).headers(headers);
    if websocket.is_none() {
        upstream_req = upstream_req.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let resp = match upstream_req.send().await {
        Ok(r) => r,
        Err(e) => {
            // The URL may carry a query-injected key: never keep it in the error.
            let e = e.without_url();
            let err = upstream_error(&e);
            tracing::warn!(request_id = ?meta.request_id, code = err.code, error = ?e, "proxy upstream failed");
            outcome.record(err.status.as_u16(), 0, Some(err.code));
            return Err(err);
        }
    };

    let status = resp.status();
    // keyward asked for `identity`; a compressed answer could hide an echo
    // of the key from redaction, so it is refused rather than passed on.
    if compressed(resp.headers()) {
        let err = ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_compressed",
            "the upstream sent a compressed answer, which keyward cannot check for echoes of the key",
        );
        outcome.record(err.status.as_u16(), 0, Some(err.code));
        return Err(err);
    }
    if let (Some(agent_side), StatusCode::SWITCHING_PROTOCOLS) = (websocket, status) {
        return websocket_tunnel(resp, agent_side, redactor, outcome, s.upstreams.idle_timeout).await;
    }
    let mut out_headers = HeaderMap::new();
    let hop = hop_by_hop(resp.headers());
    for (name, v) in resp.headers() {
        if hop.contains(name) || name == header::CONTENT_LENGTH {
            continue;
        }
        let v = match redactor.redact_all(v.as_bytes()) {
            Some(clean) => HeaderValue::from_bytes(&clean).unwrap_or(HeaderValue::from_static("[redacted by keyward]")),
            None => v.clone(),
        };
        out_headers.append(name.clone(), v);
    }
    // A small answer of known length (most API calls) is read whole,
    // redacted and sent in one write: no streaming task, no extra writes.
    let small = resp.content_length().is_some_and(|n| n <= SMALL_ANSWER)
        && !resp.headers().get(header::CONTENT_TYPE).is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    if small {
        let (status_code, bytes) = match resp.bytes().await {
            Ok(b) => (status.as_u16(), b),
            Err(e) => {
                let err = upstream_error(&e.without_url());
                outcome.record(err.status.as_u16(), 0, Some(err.code));
                return Err(err);
            }
        };
        let clean = redactor.redact_all(&bytes).map_or(bytes, bytes::Bytes::from);
        let sent = clean.len() as u64;
        outcome.record(status_code, sent, None);
        let mut response = Response::new(Body::from(clean));
        *response.status_mut() = status;
        *response.headers_mut() = out_headers;
        return Ok(response);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
    let mut upstream_body = resp.bytes_stream();
    let mut redactor = redactor;
    let vault = s.vault.clone();
    let mut policy = s.vault.watch_policy();
    let idle = s.upstreams.idle_timeout;
    tokio::spawn(async move {
        let mut sent = 0u64;
        let mut failure = None;
        loop {
            let chunk = tokio::select! {
                c = upstream_body.next() => c,
                // Kill switch: a disabled agent, a removed grant or a revoked
                // version ends an open stream too, not only the next request.
                Ok(()) = policy.changed() => {
                    if vault.still_allowed(&outcome.record).await.unwrap_or(false) {
                        continue;
                    }
                    failure = Some("killed_by_policy_change");
                    let _ = tx.send(Err(std::io::Error::other("access revoked"))).await;
                    break;
                }
            };
            let Some(chunk) = chunk else { break };
            match chunk {
                Ok(c) => {
                    let clean = redactor.push(&c);
                    sent += clean.len() as u64;
                    if clean.is_empty() {
                        continue;
                    }
                    // An agent that takes nothing for the idle timeout is cut
                    // off: a stalled reader must not pin this task and its
                    // upstream connection for ever.
                    match tokio::time::timeout(idle, tx.send(Ok(clean.into()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            failure = Some("client_gone");
                            break;
                        }
                        Err(_) => {
                            failure = Some("agent_stalled");
                            break;
                        }
                    }
                }
                Err(e) => {
                    failure = Some(if e.is_timeout() { "upstream_idle_timeout" } else { "upstream_reset" });
                    let _ = tx.send(Err(std::io::Error::other("upstream stream failed"))).await;
                    break;
                }
            }
        }
        if failure.is_none() {
            let tail = redactor.finish();
            sent += tail.len() as u64;
            if !tail.is_empty() {
                let _ = tx.send(Ok(tail.into())).await;
            }
        }
        drop(tx);
        outcome.record(status.as_u16(), sent, failure);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    *response.headers_mut() = out_headers;
    Ok(response)
}

/// Checks the secret's binding and builds what goes upstream: the URL,
/// the headers (agent credentials out, real key in) and the redactor.
fn prepare(
    upstreams: &Upstreams,
    released: &keyward_core::vault::Released,
    parts: &axum::http::request::Parts,
    path: &str,
    websocket: bool,
) -> Result<(reqwest::Url, HeaderMap, redact::Redactor), ApiError> {
    let secret = &released.secret;
    let origin = upstreams.checked_origin(secret)?;
    let value = released
        .value
        .expose_str()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "not_utf8", "the stored value is not UTF-8"))?;

    let mut headers = parts.headers.clone();
    for h in hop_by_hop(&parts.headers) {
        headers.remove(h);
    }
    if websocket {
        // Nothing follows the handshake's head (`forward` refuses a body).
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::EXPECT);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        // No permessage-deflate: frames must stay plain to be redacted.
        headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    headers.remove(header::HOST);
    headers.remove(crate::handlers::PURPOSE_HEADER);
    // Compressed answers could hide an echoed key from redaction.
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    // So could ranges: pieces of an echo shorter than the key, each passing
    // redaction, that the agent joins again.
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
    presets::strip_agent_credentials(&mut headers);
    let mut query = presets::forward_query(parts.uri.query());
    presets::inject(&secret.provider, secret.inject.as_deref(), value, &mut headers, &mut query)?;
    let url = join(origin, path, &query);
    let redactor = redact::Redactor::new(
        &presets::key_parts(&secret.provider, value).iter().map(|p| p.as_bytes()).collect::<Vec<_>>(),
    );
    Ok((url, headers, redactor))
}

/// What a proxied request must be before its secret is looked at: a clean
/// path (secret, path to forward) and, for a WebSocket handshake, one
/// without a body on HTTP/1.1 (the agent's side of the upgrade).
fn admissible(
    parts: &mut axum::http::request::Parts,
) -> Result<(String, String, Option<hyper::upgrade::OnUpgrade>), ApiError> {
    let (secret_ref, path) = split_path(parts.uri.path())?;
    let websocket = match parts.headers.get(header::UPGRADE) {
        None => None,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"websocket") => {
            // A handshake has no body. One that declares a length would
            // leave the upstream waiting for bytes that never come, on a
            // pooled connection the next agent's request then fills.
            let declares_body = parts.headers.get(header::CONTENT_LENGTH).is_some_and(|l| l.as_bytes() != b"0")
                || parts.headers.contains_key(header::TRANSFER_ENCODING);
            if declares_body {
                return Err(ApiError::bad_request("websocket_body", "a WebSocket handshake carries no body"));
            }
            let on_upgrade = parts
                .extensions
                .remove::<hyper::upgrade::OnUpgrade>()
                .ok_or_else(|| ApiError::bad_request("upgrade_unsupported", "WebSocket upgrades need HTTP/1.1"))?;
            Some(on_upgrade)
        }
        Some(_) => return Err(ApiError::bad_request("upgrade_unsupported", "only WebSocket upgrades are proxied")),
    };
    Ok((secret_ref, path, websocket))
}

/// Answers 101 and joins the agent's and the upstream's connections.
async fn websocket_tunnel(
    resp: reqwest::Response,
    agent_side: hyper::upgrade::OnUpgrade,
    redactor: redact::Redactor,
    outcome: Outcome,
    idle: Duration,
) -> Result<Response, ApiError> {
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for name in [header::UPGRADE, header::CONNECTION, header::SEC_WEBSOCKET_ACCEPT, header::SEC_WEBSOCKET_PROTOCOL] {
        if let Some(v) = resp.headers().get(&name) {
            let v = redactor.redact_all(v.as_bytes()).map_or(Ok(v.clone()), |c| HeaderValue::from_bytes(&c));
            out.headers_mut().insert(name, v.unwrap_or(HeaderValue::from_static("[redacted by keyward]")));
        }
    }
    let upstream = match resp.upgrade().await {
        Ok(u) => u,
        Err(e) => {
            let err = upstream_error(&e.without_url());
            outcome.record(err.status.as_u16(), 0, Some("upstream_upgrade_failed"));
            return Err(err);
        }
    };
    tokio::spawn(async move {
        let agent = match agent_side.await {
            Ok(a) => hyper_util::rt::TokioIo::new(a),
            Err(_) => return outcome.record(101, 0, Some("agent_upgrade_failed")),
        };
        let (mut agent_read, mut agent_write) = tokio::io::split(agent);
        let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
        let from_agent = std::sync::atomic::AtomicU64::new(0);
        let up = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = agent_read.read(&mut buf).await?;
                if n == 0 {
                    return upstream_write.shutdown().await;
                }
                upstream_write.write_all(&buf[..n]).await?;
                from_agent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let counted = std::sync::atomic::AtomicU64::new(0);
        let down = websocket::copy_redacted(&mut upstream_read, &mut agent_write, redactor, &counted);
        // Nothing either way (not even a ping and its pong) for the idle
        // timeout ends the tunnel: an abandoned one held its task and both
        // sockets for ever.
        let quiet = async {
            let moved = || {
                from_agent.load(std::sync::atomic::Ordering::Relaxed)
                    + counted.load(std::sync::atomic::Ordering::Relaxed)
            };
            let mut last = moved();
            loop {
                tokio::time::sleep(idle).await;
                let now = moved();
                if now == last {
                    return;
                }
                last = now;
            }
        };
        let vault = outcome.vault.clone();
        let record = outcome.record.clone();
        let mut policy = vault.watch_policy();
        let killed = async {
            while policy.changed().await.is_ok() {
                if !vault.still_allowed(&record).await.unwrap_or(false) {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        let failure = tokio::select! {
            r = down => r.err().map(|_| "websocket_error"),
            _ = up => None,
            _ = killed => Some("killed_by_policy_change"),
            _ = quiet => Some("websocket_idle"),
        };
        outcome.record(101, counted.into_inner(), failure);
    });
    Ok(out)
}

/// Completes a proxied request's audit record once the answer is over.
/// Dropped unrecorded (the agent went away before the upstream answered,
/// so the handler's future was dropped), it records that: every allowed use
/// gets its outcome event.
struct Outcome {
    vault: Arc<keyward_core::Vault>,
    record: keyward_core::vault::UseRecord,
    released_seq: i64,
    meta: RequestMeta,
    started: Instant,
    recorded: bool,
}

/// The status recorded when the agent went away before any answer (as
/// nginx logs it: "client closed request").
const CLIENT_GONE: u16 = 499;

impl Outcome {
    /// Queues the outcome event; it commits with the next access's record.
    fn record(mut self, status: u16, bytes: u64, failure: Option<&'static str>) {
        self.write(status, bytes, failure);
    }

    fn write(&mut self, status: u16, bytes: u64, failure: Option<&'static str>) {
        self.recorded = true;
        let detail = format!(
            "for seq {}: status {status}, {bytes} bytes, {} ms{}",
            self.released_seq,
            self.started.elapsed().as_millis(),
            failure.map(|f| format!(", {f}")).unwrap_or_default()
        );
        self.vault.record_proxy_outcome(&self.record, &self.meta, failure.is_none(), detail);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded {
            self.write(CLIENT_GONE, 0, Some("client_gone"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            split_path("/proxy/openai/v1/chat/completions").unwrap(),
            ("openai".into(), "/v1/chat/completions".into())
        );
        assert_eq!(split_path("/proxy/openai").unwrap().1, "/");
        assert_eq!(split_path("/proxy/openai/v1/").unwrap().1, "/v1/");
        for bad in [
            "/proxy/openai/../admin",
            "/proxy/openai/v1/%2e%2e/x",
            "/proxy/openai/%2E/x",
            "/proxy/openai//evil.example/x",
            "/proxy/openai/%2F%2Fevil/x",
            "/proxy/openai/a%5cb",
            "/proxy/openai/a\\b",
            "/proxy/open%20ai/x",
            "/proxy//x",
            "/proxy/openai/%zz",
        ] {
            assert!(split_path(bad).is_err(), "{bad}");
        }
    }

    /// The cached origin gives exactly the URL the text would parse to, and
    /// nothing of one request's path or query carries over to the next.
    #[tokio::test]
    async fn urls_join_origin_path_and_query_as_written() {
        let u = Upstreams::new(None, &[], Duration::from_secs(1)).unwrap();
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (origin, path, query, want) in [
            ("https://api.openai.com", "/v1/chat/completions", q(&[]), "https://api.openai.com/v1/chat/completions"),
            (
                "http://127.0.0.1:8080",
                "/v1/a%20b/c",
                q(&["key=k%2B1", "alt=json"]),
                "http://127.0.0.1:8080/v1/a%20b/c?key=k%2B1&alt=json",
            ),
            ("http://127.0.0.1:8080", "/v2", q(&[]), "http://127.0.0.1:8080/v2"),
            ("https://[::1]:8443", "/", q(&[]), "https://[::1]:8443/"),
        ] {
            let url = u.url(origin, path, &query).unwrap();
            assert_eq!(url.as_str(), want);
            let text = if query.is_empty() {
                format!("{origin}{path}")
            } else {
                format!("{origin}{path}?{}", query.join("&"))
            };
            assert_eq!(url, reqwest::Url::parse(&text).unwrap());
        }
    }

    #[test]
    fn compressed_answers_are_found_on_every_header_line() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (n, v) in pairs {
                m.append(*n, HeaderValue::from_static(v));
            }
            m
        };
        for plain in [
            h(&[]),
            h(&[("content-encoding", "identity")]),
            h(&[("content-encoding", "Identity"), ("transfer-encoding", "chunked")]),
        ] {
            assert!(!compressed(&plain), "{plain:?}");
        }
        for packed in [
            h(&[("content-encoding", "gzip")]),
            h(&[("content-encoding", "identity"), ("content-encoding", "gzip")]),
            h(&[("content-encoding", "identity, br")]),
            h(&[("transfer-encoding", "gzip, chunked")]),
            h(&[("transfer-encoding", "chunked"), ("transfer-encoding", "deflate")]),
        ] {
            assert!(compressed(&packed), "{packed:?}");
        }
    }

    /// Literal addresses are checked as the client's URL parser reads them:
    /// to it `0x` is 0.0.0.0 and `10.0.0x` is 10.0.0.0. An origin stored
    /// before validation refused such spellings must still not take a key
    /// to an internal address.
    #[tokio::test]
    async fn origins_are_checked_as_the_client_reads_them() {
        let u = Upstreams::new(None, &[], Duration::from_secs(1)).unwrap();
        let at = time::OffsetDateTime::UNIX_EPOCH;
        let secret = |origin: &str, allow_internal: bool| keyward_core::model::Secret {
            id: "sec_1".into(),
            org_id: "org_1".into(),
            name: "s".into(),
            provider: "openai".into(),
            upstream: Some(origin.into()),
            allow_internal,
            inject: None,
            rotate_every_secs: None,
            auto_rotation: None,
            description: None,
            tags: Vec::new(),
            expires_at: None,
            created_at: at,
            updated_at: at,
        };
        let code = |origin: &str, allow_internal: bool| {
            u.checked_origin(&secret(origin, allow_internal)).map(|_| ()).map_err(|e| e.code)
        };
        for (origin, allow_internal, want) in [
            ("https://0x:8443", false, Err("upstream_forbidden")),
            ("https://0X", false, Err("upstream_forbidden")),
            ("https://10.0.0x", false, Err("upstream_forbidden")),
            ("https://10.0.0x", true, Ok(())),
            ("https://169.254.169.0x", false, Err("upstream_forbidden")),
            ("https://169.254.169.254", true, Err("upstream_forbidden")),
            ("https://[::ffff:169.254.169.254]", true, Err("upstream_forbidden")),
            ("https://[::1]:8443", false, Err("upstream_forbidden")),
            ("https://8.8.8.8", false, Ok(())),
            ("https://api.openai.com", false, Ok(())),
            ("http://localhost:8080", false, Err("plaintext_upstream")),
            ("http://localhost:8080", true, Ok(())),
            ("http://0x7f.0.0.1:8080", true, Ok(())),
            ("http://10.0.0.1", true, Err("plaintext_upstream")),
            ("http://api.openai.com", true, Err("plaintext_upstream")),
        ] {
            assert_eq!(code(origin, allow_internal), want, "{origin} allow_internal={allow_internal}");
        }
    }
}
