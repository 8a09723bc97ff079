//! The admin API client. Finds a local dev server through the data dir's
//! `endpoint.json` when `KEYWARD_ADDR` is not set.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::args::Conn;
use crate::commands::CliError;

pub struct Client {
    http: reqwest::Client,
    pub base: String,
    /// The CA file the client trusts for the server, if any.
    pub cacert: Option<PathBuf>,
    token: Option<Zeroizing<String>>,
    pub org: String,
}

/// Percent-encodes one path segment (names are validated server-side, but a
/// typo must not turn into another path).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    pub fn new(conn: &Conn) -> Result<Self, CliError> {
        let (addr, discovered_ca) = match &conn.addr {
            Some(a) => (a.trim_end_matches('/').to_owned(), None),
            None => discover(conn)?,
        };
        let cacert = conn.cacert.clone().or(discovered_ca);
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .https_only(!addr.starts_with("http://"));
        if let Some(path) = &cacert {
            let pem =
                std::fs::read(path).map_err(|e| CliError::Usage(format!("CA certificate {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| CliError::Usage(format!("CA certificate {}: {e}", path.display())))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().map_err(|e| CliError::Connect(format!("HTTP client: {e}")))?;
        let token = std::env::var("KEYWARD_TOKEN").ok().filter(|t| !t.is_empty()).map(Zeroizing::new);
        Ok(Self { http, base: addr, cacert, token, org: conn.org.clone() })
    }

    pub fn org_path(&self, rest: &str) -> String {
        format!("/v1/orgs/{}{rest}", seg(&self.org))
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Value, CliError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.as_str());
        }
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| CliError::Connect(format!("{}: {}", self.base, root_cause(&e))))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| CliError::Connect(e.to_string()))?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(v);
        }
        let code = v["error"]["code"].as_str().unwrap_or("http_error").to_owned();
        let message = v["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| format!("HTTP {status}"));
        if code == "missing_token" && self.token.is_none() {
            return Err(CliError::Usage("no token: set KEYWARD_TOKEN to your kwu_… token".into()));
        }
        Err(CliError::Api { status: status.as_u16(), code, message })
    }

    /// Follows a server-sent event stream, calling `each` with every event's
    /// JSON data; resumes with `Last-Event-ID` when the server ends it.
    pub async fn follow(&self, path: &str, mut each: impl FnMut(Value)) -> Result<(), CliError> {
        let mut last_id: Option<String> = None;
        loop {
            // A live feed has no end: no total timeout (idle keep-alives come every 15 s).
            let mut req = self.http.get(format!("{}{path}", self.base)).timeout(Duration::from_secs(365 * 86_400));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t.as_str());
            }
            if let Some(id) = &last_id {
                req = req.header("last-event-id", id.as_str());
            }
            let mut resp =
                req.send().await.map_err(|e| CliError::Connect(format!("{}: {}", self.base, root_cause(&e))))?;
            let status = resp.status();
            if !status.is_success() {
                let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
                let code = v["error"]["code"].as_str().unwrap_or("http_error").to_owned();
                let message =
                    v["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| format!("HTTP {status}"));
                return Err(CliError::Api { status: status.as_u16(), code, message });
            }
            let mut buf = String::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| CliError::Connect(root_cause(&e)))? {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(d) = line.strip_prefix("data:") {
                            data.push_str(d.trim_start());
                        } else if let Some(id) = line.strip_prefix("id:") {
                            last_id = Some(id.trim().to_owned());
                        }
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(&data) {
                        each(v);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: &impl serde::Serialize) -> Result<Value, CliError> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body).expect("serializable"))).await
    }
    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        self.call(Method::DELETE, path, None).await
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg = format!("{msg}: {s}");
        cur = s.source();
    }
    msg
}

fn discover(conn: &Conn) -> Result<(String, Option<PathBuf>), CliError> {
    let dir = conn.data_dir.clone().unwrap_or_else(|| PathBuf::from(keyward_server::config::DEFAULT_DATA_DIR));
    let file = dir.join("endpoint.json");
    let text = std::fs::read_to_string(&file).map_err(|_| {
        CliError::Usage(format!("no server address: set KEYWARD_ADDR (no local server found at {})", file.display()))
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    let addr = v["addr"].as_str().ok_or_else(|| CliError::Usage(format!("{}: no addr", file.display())))?;
    Ok((addr.to_owned(), v["ca_cert"].as_str().map(PathBuf::from)))
}
