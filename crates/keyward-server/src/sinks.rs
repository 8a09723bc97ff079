//! Audit export sinks (`[[audit_sinks]]`): a JSONL file with size-based
//! rotation, syslog (RFC 5424) over UDP, TCP or a Unix socket, and an HTTP
//! endpoint receiving batches. Each sink follows the trail from a cursor
//! kept in the store (`meta`), so after an outage it catches up and loses
//! nothing: delivery is at least once, and every event carries its
//! sequence number for de-duplication. Requests never wait on a sink: every
//! delivery has a time bound, after which it counts as failed.
//!
//! A sink may be `required`: while every required sink is failing, uses of
//! secrets are refused (fail closed, as Vault does with audit devices).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keyward_core::Vault;
use keyward_core::audit::{AuditRecord, MAX_FREE_TEXT};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// Events read from the trail per delivery.
const BATCH: u32 = 500;
const DEFAULT_TIMEOUT_MS: u64 = 2000;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    File {
        name: String,
        path: PathBuf,
        /// Rotate when the file would grow past this (default 100 MiB).
        max_bytes: Option<u64>,
        /// Rotated files kept: PATH.1 … PATH.N (default 5).
        keep: Option<u32>,
        #[serde(default)]
        required: bool,
    },
    Syslog {
        name: String,
        /// `udp`, `tcp` or `unix` (a datagram socket such as /dev/log).
        transport: String,
        /// HOST:PORT, or a socket path for `unix`.
        address: String,
        /// Facility number (default 10, authpriv).
        facility: Option<u8>,
        timeout_ms: Option<u64>,
        #[serde(default)]
        required: bool,
    },
    Http {
        name: String,
        url: String,
        /// Events per POST (default 100).
        batch: Option<u32>,
        timeout_ms: Option<u64>,
        #[serde(default)]
        required: bool,
    },
}

impl SinkConfig {
    fn name(&self) -> &str {
        match self {
            Self::File { name, .. } | Self::Syslog { name, .. } | Self::Http { name, .. } => name,
        }
    }
    fn required(&self) -> bool {
        match self {
            Self::File { required, .. } | Self::Syslog { required, .. } | Self::Http { required, .. } => *required,
        }
    }
    fn timeout(&self) -> Duration {
        let ms = match self {
            Self::File { .. } => None,
            Self::Syslog { timeout_ms, .. } | Self::Http { timeout_ms, .. } => *timeout_ms,
        };
        Duration::from_millis(ms.unwrap_or(DEFAULT_TIMEOUT_MS).max(1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkSetupError {
    #[error("audit sink `{name}`: {message}")]
    Invalid { name: String, message: String },
}

/// Per-sink health, shared with the access gate.
struct Health {
    name: String,
    required: bool,
    up: AtomicBool,
}

/// Refuses accesses while no required sink can take events.
pub struct RequiredSinks(Vec<Arc<Health>>);

impl keyward_core::notify::AccessGate for RequiredSinks {
    fn refusal(&self) -> Option<&'static str> {
        let required: Vec<_> = self.0.iter().filter(|h| h.required).collect();
        if !required.is_empty() && required.iter().all(|h| !h.up.load(Ordering::Relaxed)) {
            Some("required audit sink down")
        } else {
            None
        }
    }
}

/// Starts one delivery task per sink and installs the access gate.
pub fn start(vault: &Arc<Vault>, configs: Vec<SinkConfig>) -> Result<(), SinkSetupError> {
    let mut names = std::collections::HashSet::new();
    let mut healths = Vec::new();
    for cfg in configs {
        let invalid = |message: &str| SinkSetupError::Invalid { name: cfg.name().to_owned(), message: message.into() };
        keyward_core::model::validate_name("sink name", cfg.name()).map_err(|e| invalid(&e.to_string()))?;
        if !names.insert(cfg.name().to_owned()) {
            return Err(invalid("defined twice"));
        }
        if let SinkConfig::Syslog { transport, .. } = &cfg
            && !matches!(transport.as_str(), "udp" | "tcp" | "unix")
        {
            return Err(invalid("transport must be udp, tcp or unix"));
        }
        if let SinkConfig::Http { url, .. } = &cfg
            && reqwest::Url::parse(url).is_err()
        {
            return Err(invalid("url does not parse"));
        }
        // A required sink counts as down until it has proved itself.
        let health = Arc::new(Health {
            name: cfg.name().to_owned(),
            required: cfg.required(),
            up: AtomicBool::new(!cfg.required()),
        });
        healths.push(health.clone());
        tokio::spawn(deliver(Arc::downgrade(vault), cfg, health));
    }
    if healths.iter().any(|h| h.required) {
        vault.set_access_gate(Arc::new(RequiredSinks(healths)));
    }
    Ok(())
}

fn cursor_key(name: &str) -> String {
    format!("audit_sink_cursor:{name}")
}

async fn deliver(vault: std::sync::Weak<Vault>, cfg: SinkConfig, health: Arc<Health>) {
    let mut out = Output::new(&cfg);
    let mut backoff = Duration::from_millis(100);
    let mut cursor: Option<i64> = None;
    loop {
        let Some(v) = vault.upgrade() else { break };
        let store = v.store().clone();
        drop(v);
        let result: Result<bool, String> = async {
            let after = match cursor {
                Some(c) => c,
                None => store
                    .get_meta(&cursor_key(&health.name))
                    .await
                    .map_err(|e| e.to_string())?
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            };
            cursor = Some(after);
            let page = store.audit_page(after, BATCH).await.map_err(|e| e.to_string())?;
            let Some(last) = page.last().map(|r| r.seq) else { return Ok(false) };
            match tokio::time::timeout(cfg.timeout(), out.send(&cfg, &page)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(format!("timed out after {} ms", cfg.timeout().as_millis())),
            }
            store.put_meta(&cursor_key(&health.name), &last.to_string()).await.map_err(|e| e.to_string())?;
            cursor = Some(last);
            Ok(page.len() as u32 == BATCH)
        }
        .await;
        match result {
            Ok(more) => {
                if !health.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(sink = %health.name, "audit sink is taking events");
                }
                backoff = Duration::from_millis(100);
                if !more {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(e) => {
                if health.up.swap(false, Ordering::Relaxed) || backoff >= Duration::from_secs(5) {
                    tracing::warn!(sink = %health.name, error = %e, "audit sink failed; retrying");
                }
                out.reset();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A sink's open connection or file, reopened after a failure.
enum Output {
    None,
    File(tokio::fs::File, u64),
    Tcp(tokio::net::TcpStream),
    Udp(tokio::net::UdpSocket),
    Unix(tokio::net::UnixDatagram),
    Http(reqwest::Client),
}

impl Output {
    fn new(cfg: &SinkConfig) -> Self {
        match cfg {
            SinkConfig::Http { .. } => reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .map(Self::Http)
                .unwrap_or(Self::None),
            _ => Self::None,
        }
    }

    fn reset(&mut self) {
        if !matches!(self, Self::Http(_)) {
            *self = Self::None;
        }
    }

    async fn send(&mut self, cfg: &SinkConfig, events: &[AuditRecord]) -> Result<(), String> {
        match cfg {
            SinkConfig::File { path, max_bytes, keep, .. } => {
                let mut buf = Vec::new();
                for e in events {
                    buf.extend_from_slice(json_line(e).as_bytes());
                }
                let limit = max_bytes.unwrap_or(100 << 20).max(1024);
                if let Self::File(_, size) = self
                    && *size + buf.len() as u64 > limit
                    && *size > 0
                {
                    rotate(path, keep.unwrap_or(5)).await.map_err(|e| format!("rotating {}: {e}", path.display()))?;
                    *self = Self::None;
                }
                if matches!(self, Self::None) {
                    let f = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .await
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    let size = f.metadata().await.map_err(|e| e.to_string())?.len();
                    *self = Self::File(f, size);
                }
                let Self::File(f, size) = self else { unreachable!() };
                f.write_all(&buf).await.map_err(|e| e.to_string())?;
                f.sync_data().await.map_err(|e| e.to_string())?;
                *size += buf.len() as u64;
                Ok(())
            }
            SinkConfig::Syslog { transport, address, facility, .. } => {
                let host = hostname();
                let facility = facility.unwrap_or(10).min(23);
                if matches!(self, Self::None) {
                    *self = match transport.as_str() {
                        "tcp" => Self::Tcp(tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?),
                        "udp" => {
                            let s = tokio::net::UdpSocket::bind(if address.starts_with('[') {
                                "[::]:0"
                            } else {
                                "0.0.0.0:0"
                            })
                            .await
                            .map_err(|e| e.to_string())?;
                            s.connect(address).await.map_err(|e| e.to_string())?;
                            Self::Udp(s)
                        }
                        _ => {
                            let s = tokio::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
                            s.connect(address).map_err(|e| e.to_string())?;
                            Self::Unix(s)
                        }
                    };
                }
                for e in events {
                    let msg = rfc5424(e, facility, &host);
                    match self {
                        Self::Tcp(s) => {
                            // RFC 6587 octet counting.
                            let framed = format!("{} {msg}", msg.len());
                            s.write_all(framed.as_bytes()).await.map_err(|e| e.to_string())?;
                        }
                        Self::Udp(s) => {
                            s.send(msg.as_bytes()).await.map_err(|e| e.to_string())?;
                        }
                        Self::Unix(s) => {
                            s.send(msg.as_bytes()).await.map_err(|e| e.to_string())?;
                        }
                        _ => unreachable!(),
                    }
                }
                Ok(())
            }
            SinkConfig::Http { url, batch, .. } => {
                let Self::Http(client) = self else { return Err("HTTP client unavailable".into()) };
                for chunk in events.chunks(batch.unwrap_or(100).max(1) as usize) {
                    let body = serde_json::json!({"events": chunk});
                    let resp = client.post(url).json(&body).send().await.map_err(|e| {
                        // No URL in the message: it could carry credentials.
                        if e.is_timeout() { "timed out".to_owned() } else { "cannot deliver".to_owned() }
                    })?;
                    if !resp.status().is_success() {
                        return Err(format!("receiver answered {}", resp.status().as_u16()));
                    }
                }
                Ok(())
            }
        }
    }
}

/// PATH → PATH.1 → … → PATH.keep (the oldest is dropped).
async fn rotate(path: &std::path::Path, keep: u32) -> std::io::Result<()> {
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    let mut moves: VecDeque<(PathBuf, PathBuf)> = VecDeque::new();
    for n in (1..keep.max(1)).rev() {
        moves.push_back((numbered(n), numbered(n + 1)));
    }
    moves.push_back((path.to_path_buf(), numbered(1)));
    for (from, to) in moves {
        match tokio::fs::rename(&from, &to).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn json_line(e: &AuditRecord) -> String {
    let mut s = serde_json::to_string(e).expect("serializable");
    s.push('\n');
    s
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .map(|h| h.chars().take(255).collect())
        .unwrap_or_else(|| "-".into())
}

/// An RFC 5424 header field: printable US-ASCII without spaces, at most
/// `max` characters, `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let f: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if f.is_empty() { "-".into() } else { f }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped (RFC 5424 §6.3.3), control
/// characters dropped, cut to the free-text limit.
fn sd_value(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() >= MAX_FREE_TEXT {
            break;
        }
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One event as an RFC 5424 message: facility/severity, timestamp, host,
/// app `keyward`, MSGID = the action, structured data with the event's key
/// fields, and the whole event as JSON (UTF-8, with BOM) for the message.
pub fn rfc5424(e: &AuditRecord, facility: u8, host: &str) -> String {
    use keyward_core::audit::Outcome;
    let severity = match e.event.outcome {
        Outcome::Allowed => 6,
        Outcome::Denied => 4,
        Outcome::Error => 3,
    };
    let pri = u16::from(facility) * 8 + severity;
    let time = e.event.time.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "-".into());
    let mut sd = format!("[keyward@32473 seq=\"{}\" outcome=\"{}\"", e.seq, e.event.outcome.as_str());
    let fields = [
        ("org", e.event.org_id.as_deref()),
        ("actor", Some(e.event.actor.kind.as_str())),
        ("actor_name", e.event.actor.name.as_deref()),
        ("secret", e.event.secret_name.as_deref()),
        ("source_ip", e.event.source_ip.as_deref()),
        ("purpose", e.event.purpose.as_deref()),
        ("user_agent", e.event.user_agent.as_deref()),
        ("request_id", e.event.request_id.as_deref()),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            sd.push_str(&format!(" {k}=\"{}\"", sd_value(v)));
        }
    }
    sd.push(']');
    let msg = serde_json::to_string(e).expect("serializable");
    format!(
        "<{pri}>1 {time} {} keyward {} {} {sd} \u{feff}{msg}",
        header_field(host, 255),
        std::process::id(),
        header_field(&e.event.action, 32),
    )
}
