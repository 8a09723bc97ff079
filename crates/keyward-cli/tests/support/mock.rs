//! A local HTTPS mock of the providers' APIs (its own test CA), recording
//! every request it receives, for proxy tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub authority: String,
}

impl Seen {
    /// Everything the upstream received, as text (for "never saw X" checks).
    pub fn all_text(&self) -> String {
        let mut s = format!("{} {} {:?}\n", self.method, self.path, self.query);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
    }
}

#[derive(Clone)]
struct MockState {
    seen: Arc<Mutex<Vec<Seen>>>,
    release: Arc<tokio::sync::Notify>,
    keys: Keys,
}

/// A provider's key registry, for automated rotation tests: when set,
/// `POST /admin/keys` issues a key, `DELETE /admin/keys/{key}` revokes it,
/// and every other request needs `Bearer` + a live key (else 401).
pub type Keys = Arc<Mutex<Option<std::collections::BTreeSet<String>>>>;

pub struct Mock {
    pub port: u16,
    /// A WebSocket echo server (same certificate): records the handshake's
    /// credential; answers `send-key` with that credential, echoes the rest.
    pub ws_port: u16,
    pub ws_auth: Arc<Mutex<Vec<String>>>,
    pub ca: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Lets a streaming answer send its last chunk.
    pub release: Arc<tokio::sync::Notify>,
    pub keys: Keys,
    handle: axum_server::Handle<std::net::SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

impl Mock {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf whose subject equals its issuer's looks
        // self-signed to OpenSSL (curl in the rotation hooks).
        ca.distinguished_name.push(rcgen::DnType::CommonName, "keyward mock provider CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let mut leaf =
            CertificateParams::new(vec!["mock.test".into(), "localhost".into(), "127.0.0.1".into()]).unwrap();
        leaf.distinguished_name.push(rcgen::DnType::CommonName, "mock.test");
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &Issuer::new(ca, ca_key)).unwrap();
        let ca_path = dir.path().join("mock-ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let cfg = axum_server::tls_rustls::RustlsConfig::from_pem(
            leaf_cert.pem().into_bytes(),
            leaf_key.serialize_pem().into_bytes(),
        )
        .await
        .unwrap();
        let ws_auth: Arc<Mutex<Vec<String>>> = Arc::default();
        let ws_port = start_ws_echo(cfg.get_inner(), ws_auth.clone()).await;
        let state =
            MockState { seen: Arc::default(), release: Arc::new(tokio::sync::Notify::new()), keys: Arc::default() };
        let app = axum::Router::new().fallback(answer).with_state(state.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(listener, cfg).unwrap().handle(handle.clone());
        tokio::spawn(async move { server.serve(app.into_make_service()).await });
        Mock {
            port,
            ws_port,
            ws_auth,
            ca: ca_path,
            seen: state.seen,
            release: state.release,
            keys: state.keys,
            handle,
            _dir: dir,
        }
    }

    pub fn origin(&self) -> String {
        format!("https://mock.test:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Turns the key registry on with one live key, which it returns.
    pub fn start_key_registry(&self) -> String {
        let first = issue_key();
        *self.keys.lock().unwrap() = Some([first.clone()].into());
        first
    }

    pub fn live_keys(&self) -> Vec<String> {
        self.keys.lock().unwrap().clone().unwrap_or_default().into_iter().collect()
    }

    pub fn last(&self) -> Seen {
        self.requests().pop().expect("the mock received a request")
    }
}

async fn start_ws_echo(tls: Arc<rustls::ServerConfig>, auth: Arc<Mutex<Vec<String>>>) -> u16 {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, auth) = (acceptor.clone(), auth.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let seen = Arc::new(Mutex::new(String::new()));
                let seen2 = seen.clone();
                #[allow(clippy::result_large_err)] // the signature is tungstenite's
                let callback = move |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    let a =
                        req.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                    *seen2.lock().unwrap() = a;
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else { return };
                let credential = seen.lock().unwrap().clone();
                auth.lock().unwrap().push(credential.clone());
                while let Some(Ok(msg)) = ws.next().await {
                    let reply = match msg {
                        Message::Text(t) if t.as_str() == "send-key" => {
                            Message::text(format!("your key: {credential}"))
                        }
                        Message::Text(t) => Message::Text(t),
                        Message::Binary(b) => Message::Binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// The credential the request carried, in whichever slot.
fn credential(h: &HeaderMap, query: Option<&str>) -> String {
    for name in ["authorization", "x-api-key", "x-goog-api-key"] {
        if let Some(v) = h.get(name) {
            return v.to_str().unwrap().to_owned();
        }
    }
    query.unwrap_or("").to_owned()
}

fn json(v: serde_json::Value) -> Response {
    ([("content-type", "application/json")], v.to_string()).into_response()
}

fn sse(chunks: Vec<Result<Bytes, std::io::Error>>, release: Option<Arc<tokio::sync::Notify>>) -> Response {
    let stream = async_stream(chunks, release);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Sends chunks with small pauses; with `release`, waits for it before the last.
fn async_stream(
    chunks: Vec<Result<Bytes, std::io::Error>>,
    release: Option<Arc<tokio::sync::Notify>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let n = chunks.len();
    futures_util::stream::unfold((chunks.into_iter().enumerate(), release), move |(mut it, release)| async move {
        let (i, c) = it.next()?;
        if i + 1 == n {
            if let Some(r) = &release {
                let _ = tokio::time::timeout(Duration::from_secs(10), r.notified()).await;
            }
        } else if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if c.is_err() {
            // Long after the headers: the reset is unambiguously mid-stream.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Some((c, (it, release)))
    })
}

fn chat_chunk(content: &str) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-x",
            "choices":[{"index":0,"delta":{"content":content},"finish_reason":null}]})
    )
}

fn issue_key() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    format!("sk-mock-issued-{:06}-{}", N.fetch_add(1, Ordering::SeqCst), std::process::id())
}

/// The key registry's answer, if the registry is on and the request is
/// for it or lacks a live key.
fn registry(keys: &Keys, method: &str, path: &str, cred: &str) -> Option<Response> {
    let mut guard = keys.lock().unwrap();
    let live = guard.as_mut()?;
    if method == "POST" && path == "/admin/keys" {
        let k = issue_key();
        live.insert(k.clone());
        return Some(k.into_response());
    }
    if let Some(k) = path.strip_prefix("/admin/keys/")
        && method == "DELETE"
    {
        let found = live.remove(k);
        return Some(if found { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND }.into_response());
    }
    let ok = cred.strip_prefix("Bearer ").is_some_and(|k| live.contains(k));
    (!ok).then(|| {
        (StatusCode::UNAUTHORIZED, json(serde_json::json!({"error": {"message": "invalid key"}}))).into_response()
    })
}

async fn answer(State(st): State<MockState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 10 << 20).await.unwrap().to_vec();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: body.clone(),
        authority: parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| parts.headers.get("host").map(|h| h.to_str().unwrap().to_owned()))
            .unwrap_or_default(),
    };
    st.seen.lock().unwrap().push(seen);
    let cred = credential(&parts.headers, parts.uri.query());
    if let Some(r) = registry(&st.keys, parts.method.as_str(), parts.uri.path(), &cred) {
        return r;
    }
    let streaming = String::from_utf8_lossy(&body).replace(' ', "").contains("\"stream\":true");
    match parts.uri.path() {
        "/v1/chat/completions" if streaming => {
            let mut chunks: Vec<Result<Bytes, std::io::Error>> =
                ["Hel", "lo", " world"].iter().map(|c| Ok(Bytes::from(chat_chunk(c)))).collect();
            chunks.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
            sse(chunks, Some(st.release.clone()))
        }
        "/v1/chat/completions" => json(serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        })),
        "/v1/embeddings" => json(serde_json::json!({
            "object": "list", "model": "emb-x", "usage": {"prompt_tokens": 1, "total_tokens": 1},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}]
        })),
        "/v1/messages" if streaming => {
            let ev = |name: &str, data: serde_json::Value| Ok(Bytes::from(format!("event: {name}\ndata: {data}\n\n")));
            sse(
                vec![
                    ev(
                        "message_start",
                        serde_json::json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":0}}}),
                    ),
                    ev(
                        "content_block_start",
                        serde_json::json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                    ),
                    ev(
                        "content_block_delta",
                        serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}),
                    ),
                    ev(
                        "content_block_delta",
                        serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}),
                    ),
                    ev("content_block_stop", serde_json::json!({"type":"content_block_stop","index":0})),
                    ev(
                        "message_delta",
                        serde_json::json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}),
                    ),
                    ev("message_stop", serde_json::json!({"type":"message_stop"})),
                ],
                None,
            )
        }
        "/v1/messages" => json(serde_json::json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hello from the mock"}],
            "stop_reason": "end_turn", "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 4}
        })),
        "/v1/customers" => json(serde_json::json!({
            "object": "list", "url": "/v1/customers", "has_more": false,
            "data": [{"id": "cus_1", "object": "customer", "email": "a@example.com"}]
        })),
        "/api/chat.postMessage" => json(serde_json::json!({
            "ok": true, "channel": "C123", "ts": "1700000000.000100",
            "message": {"type": "message", "text": "hi", "ts": "1700000000.000100"}
        })),
        "/echo/header" => ([("x-echo", cred.as_str())], "{\"ok\":true}").into_response(),
        "/echo/json" => json(serde_json::json!({"you_sent": cred})),
        "/echo/base64" => {
            let b = base64::engine::general_purpose::STANDARD.encode(format!("x:{cred}:y"));
            json(serde_json::json!({"b64": b}))
        }
        "/echo/sse-split" => {
            let c = cred.as_bytes().to_vec();
            let (a, b) = (c.len() / 3, 2 * c.len() / 3);
            sse(
                vec![
                    Ok(Bytes::from([b"data: ".as_slice(), &c[..a]].concat())),
                    Ok(Bytes::from(c[a..b].to_vec())),
                    Ok(Bytes::from([&c[b..], b"\n\n".as_slice()].concat())),
                ],
                None,
            )
        }
        "/release" => {
            st.release.notify_one();
            json(serde_json::json!({"released": true}))
        }
        "/echo/url" => json(
            serde_json::json!({"error": format!("no route for {}?{}", parts.uri.path(), parts.uri.query().unwrap_or(""))}),
        ),
        "/gzip" => ([("content-encoding", "gzip"), ("content-type", "application/json")], vec![0x1f, 0x8b, 0x08, 0])
            .into_response(),
        // A second Content-Encoding line behind an innocent first one.
        "/gzip-hidden" => {
            let mut r = vec![0x1fu8, 0x8b, 0x08, 0].into_response();
            for coding in ["identity", "gzip"] {
                r.headers_mut().append("content-encoding", axum::http::HeaderValue::from_static(coding));
            }
            r
        }
        // Streams for ever, as fast as it is read.
        "/endless" => Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(futures_util::stream::repeat_with(|| {
                Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 16 * 1024]))
            })))
            .unwrap(),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            json(serde_json::json!({"late": true}))
        }
        "/redirect" => (StatusCode::FOUND, [("location", "https://evil.example/steal")]).into_response(),
        "/reset" => {
            let chunks = vec![
                Ok(Bytes::from_static(b"data: partial\n\n")),
                Ok(Bytes::from_static(b"data: more\n\n")),
                Err(std::io::Error::other("boom")),
            ];
            sse(chunks, None)
        }
        _ => json(serde_json::json!({"ok": true, "path": parts.uri.path()})),
    }
}
