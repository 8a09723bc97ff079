//! Domain records. None of these holds a plaintext value: versions carry only
//! ciphertext, tokens only their hash.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::CoreError;

/// `[a-z0-9][a-z0-9._-]{0,62}`: the rule for secret, agent and org names.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), CoreError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..].iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CoreError::invalid(
            field,
            "must match [a-z0-9][a-z0-9._-]{0,62} (lowercase letters, digits, '.', '_', '-'; at most 63)",
        ))
    }
}

/// A new stable identifier with a type prefix, e.g. `sec_0192…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Auditor,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "auditor" => Ok(Role::Auditor),
            _ => Err(CoreError::invalid("role", "must be owner, admin or auditor")),
        }
    }
}

/// How a grant lets an agent use a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Modes {
    pub proxy: bool,
    pub reveal: bool,
}

impl Modes {
    pub fn parse_list(items: &[String]) -> Result<Self, CoreError> {
        let mut m = Modes::default();
        for it in items {
            for part in it.split(',') {
                match part.trim() {
                    "proxy" => m.proxy = true,
                    "reveal" => m.reveal = true,
                    other => {
                        return Err(CoreError::invalid(
                            "mode",
                            format!("`{other}` is not a mode; use proxy or reveal"),
                        ));
                    }
                }
            }
        }
        if !m.proxy && !m.reveal {
            return Err(CoreError::invalid("mode", "at least one of proxy, reveal"));
        }
        Ok(m)
    }
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.proxy {
            v.push("proxy");
        }
        if self.reveal {
            v.push("reveal");
        }
        v
    }
}

/// Provider presets: where a key is sent by default. How it is injected is
/// the proxy's business; the core only keeps the binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Openai,
    Anthropic,
    Stripe,
    Slack,
    Github,
    Google,
    Twilio,
    Generic,
}

impl Provider {
    pub const ALL: [Provider; 8] = [
        Provider::Openai,
        Provider::Anthropic,
        Provider::Stripe,
        Provider::Slack,
        Provider::Github,
        Provider::Google,
        Provider::Twilio,
        Provider::Generic,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Stripe => "stripe",
            Provider::Slack => "slack",
            Provider::Github => "github",
            Provider::Google => "google",
            Provider::Twilio => "twilio",
            Provider::Generic => "generic",
        }
    }
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        Self::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            CoreError::invalid(
                "provider",
                "must be one of openai, anthropic, stripe, slack, github, google, twilio, generic",
            )
        })
    }
    pub fn default_upstream(self) -> Option<&'static str> {
        match self {
            Provider::Openai => Some("https://api.openai.com"),
            Provider::Anthropic => Some("https://api.anthropic.com"),
            Provider::Stripe => Some("https://api.stripe.com"),
            Provider::Slack => Some("https://slack.com"),
            Provider::Github => Some("https://api.github.com"),
            Provider::Google => Some("https://generativelanguage.googleapis.com"),
            Provider::Twilio => Some("https://api.twilio.com"),
            Provider::Generic => None,
        }
    }
}

/// An upstream origin: `https://host[:port]`, nothing else (no path, query,
/// user info or fragment), so a key can be bound to exactly one place.
pub fn validate_origin(s: &str) -> Result<String, CoreError> {
    let err = |m: &str| CoreError::invalid("upstream", m.to_owned());
    let rest = if let Some(r) = s.strip_prefix("https://") {
        r
    } else if let Some(r) = s.strip_prefix("http://") {
        r
    } else {
        return Err(err("must start with https:// (or http:// for a loopback service)"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', '\\', ' ']) || rest.chars().any(|c| c.is_control()) {
        return Err(err("must be an origin: scheme://host[:port] with no path, query or user info"));
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (h, tail) = v6.split_once(']').ok_or_else(|| err("unclosed [IPv6] host"))?;
            h.parse::<std::net::Ipv6Addr>().map_err(|_| err("not an IPv6 address in [ ]"))?;
            (h, tail.strip_prefix(':'))
        }
        None => match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    if let Some(p) = port
        && p.parse::<u16>().ok().filter(|p| *p > 0).is_none()
    {
        return Err(err("the port must be 1-65535"));
    }
    // An IPv4 literal only in its one canonical dotted form; a name must end
    // in a label with a letter that is not a hex number. URL parsers read
    // `127.1`, `2130706433`, `0x7f.0.0.1` or `10.0.0x` (a last label of `0x`
    // and zero or more hex digits is a number to them) as addresses, which
    // must not slip past the network guard as "names".
    if !rest.starts_with('[') && host.parse::<std::net::Ipv4Addr>().is_err() {
        let last = host.rsplit('.').next().unwrap_or("");
        let name_ok = !host.is_empty()
            && !host.ends_with('.')
            && host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            && last.bytes().any(|b| b.is_ascii_alphabetic())
            && !(last.len() >= 2
                && last[..2].eq_ignore_ascii_case("0x")
                && last[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        if !name_ok {
            return Err(err("the host must be a DNS name or a canonical IP address"));
        }
    }
    Ok(s.strip_suffix('/').unwrap_or(s).to_ascii_lowercase())
}

#[derive(Debug, Clone, Serialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A human account for the dashboard. The password is kept only as an
/// Argon2id hash, never serialized.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub password_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A dashboard session: only the SHA-256 of its cookie is stored.
#[derive(Debug, Clone)]
pub struct Session {
    pub hash: [u8; 32],
    pub user_id: String,
    /// The anti-CSRF token every state-changing form must echo.
    pub csrf: String,
    pub created_at: OffsetDateTime,
    pub last_seen: OffsetDateTime,
    /// Absolute end, whatever the activity.
    pub expires_at: OffsetDateTime,
}

/// An organization as stored: with its data key, wrapped by the master key.
#[derive(Clone)]
pub struct OrgRecord {
    pub org: Org,
    pub wrapped_key: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Secret {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub provider: String,
    pub upstream: Option<String>,
    /// The admin allowed this secret's upstream to resolve to private,
    /// loopback or link-local addresses (never cloud metadata ones).
    pub allow_internal: bool,
    /// `generic` secrets: where the proxy puts the value
    /// (`header:NAME:TEMPLATE` or `query:NAME:TEMPLATE`, `{value}` inside).
    pub inject: Option<String>,
    /// Rotation policy: the current version should be replaced this often.
    pub rotate_every_secs: Option<i64>,
    /// Automated rotation through a hook named in the server config.
    pub auto_rotation: Option<AutoRotation>,
    pub description: Option<String>,
    pub tags: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// How a secret rotates by itself: the rotation hook (an executable named in
/// the server config, never a path an API caller supplies) that issues and
/// revokes values, whether that hook receives the current value (for
/// providers whose API needs it), and a probe that must answer 2xx with the
/// new value before it becomes current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRotation {
    pub hook: String,
    #[serde(default)]
    pub pass_value: bool,
    /// `METHOD /path[?query]`, sent through the proxy's injection and
    /// network guard to the secret's bound origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
}

impl AutoRotation {
    pub fn validate(&self) -> Result<(), CoreError> {
        validate_name("rotation hook", &self.hook)?;
        if let Some(p) = &self.verify {
            parse_probe(p)?;
        }
        Ok(())
    }
}

/// Splits a verify probe `METHOD /path` into its method and path.
pub fn parse_probe(probe: &str) -> Result<(&str, &str), CoreError> {
    let bad = |m: &str| CoreError::invalid("verify", format!("{m} (expected e.g. `GET /v1/models`)"));
    let (method, path) = probe.trim().split_once(' ').ok_or_else(|| bad("no path"))?;
    if !matches!(method, "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") {
        return Err(bad("unknown method"));
    }
    let path = path.trim();
    if !path.starts_with('/') || path.starts_with("//") || path.len() > 512 {
        return Err(bad("the path must start with one /"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'#' || b == b'\\') {
        return Err(bad("the path holds a space, a control character, # or \\"));
    }
    if path.split(['/', '?']).any(|seg| seg == ".." || seg == ".") {
        return Err(bad("the path holds a dot segment"));
    }
    Ok((method, path))
}

/// Where a `generic` secret's value is injected by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    Header { name: String, template: String },
    Query { name: String, template: String },
}

impl Injection {
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let err = |m: &str| {
            CoreError::invalid("inject", format!("{m} (expected header:NAME:TEMPLATE or query:NAME:TEMPLATE)"))
        };
        let mut parts = s.splitn(3, ':');
        let (kind, name, template) = match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(n), Some(t)) => (k, n.trim(), t.trim_start()),
            _ => return Err(err("malformed")),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(err("the name must be letters, digits, '-', '_' or '.'"));
        }
        const RESERVED: [&str; 11] = [
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "expect",
        ];
        if kind == "header" && RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            return Err(err("that header frames or routes the request; choose another"));
        }
        if template.matches("{value}").count() != 1 || template.chars().any(|c| c.is_control()) {
            return Err(err("the template must contain {value} exactly once and no control characters"));
        }
        let (name, template) = (name.to_owned(), template.to_owned());
        match kind {
            "header" => Ok(Injection::Header { name, template }),
            "query" => Ok(Injection::Query { name, template }),
            _ => Err(err("the kind must be header or query")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Stored, not yet in use (automated rotation verifies it first).
    Pending,
    Current,
    /// The version before the current one, usable by reveal-mode consumers
    /// until its grace period ends.
    Previous,
    Revoked,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Pending => "pending",
            VersionState::Current => "current",
            VersionState::Previous => "previous",
            VersionState::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "current" => Some(Self::Current),
            "previous" => Some(Self::Previous),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// One version of a secret. `ciphertext` is sealed under the org's data key
/// with [`crate::crypto::value_aad`]; never serialized.
#[derive(Clone)]
pub struct SecretVersion {
    pub secret_id: String,
    pub version: i64,
    pub state: VersionState,
    pub ciphertext: Vec<u8>,
    pub fingerprint: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// A previous version stays usable (reveal only) until then.
    pub grace_until: Option<OffsetDateTime>,
    /// After this, every use of this version is denied (`secret_expired`).
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub description: Option<String>,
    pub disabled: bool,
    /// Source networks the agent's token is accepted from; empty: anywhere.
    pub allow_from: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// `ADDRESS/PREFIX` (or a bare address): a source network an agent may
/// call from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let err =
            || CoreError::invalid("allow_from", format!("`{s}` is not a network like 10.0.0.0/8 or 2001:db8::/32"));
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().map_err(|_| err())?,
        };
        if prefix > max {
            return Err(err());
        }
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map(V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (V4(net), V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (V6(net), V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An agent credential as stored: only the SHA-256 of the token.
#[derive(Clone)]
pub struct AgentToken {
    pub id: String,
    pub agent_id: String,
    pub hash: [u8; 32],
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub id: String,
    pub org_id: String,
    pub agent_id: String,
    pub secret_id: String,
    pub modes: Modes,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A human/admin credential: a role in one organization, or in all of them
/// (`org_id: None`, the operator token created at initialisation).
#[derive(Clone)]
pub struct UserToken {
    pub id: String,
    pub org_id: Option<String>,
    pub name: String,
    pub role: Role,
    pub hash: [u8; 32],
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "openai-prod", "0", "a.b_c-d", &"a".repeat(63)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "-a", ".a", "a b", "a/b", "é", &"a".repeat(64), "a\n"] {
            assert!(validate_name("name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn origins() {
        assert_eq!(validate_origin("https://API.openai.com/").unwrap(), "https://api.openai.com");
        assert!(validate_origin("https://a.example:8443").is_ok());
        assert!(validate_origin("https://127.0.0.1:8443").is_ok());
        assert!(validate_origin("https://[::1]:8443").is_ok());
        // Names whose last label merely starts like a hex number stay names.
        assert!(validate_origin("https://api.0xyz").is_ok());
        assert!(validate_origin("https://0x.example").is_ok());
        for bad in [
            "ftp://x",
            "https://",
            "https://a/b",
            "https://u@a",
            "https://a?x",
            "api.openai.com",
            "https://127.1",
            "https://2130706433",
            "https://0x7f.0.0.1",
            "https://127.0.0.1.",
            "https://a.b.",
            "https://x:0",
            "https://x:99999",
            "https://0x7f",
            "https://0x",
            "https://0X:8443",
            "https://10.0.0x",
            "https://192.168.1.0X",
            "https://a..b",
            "https://[::1",
            "https://[nope]",
        ] {
            assert!(validate_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains("127.0.0.2".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn injections() {
        assert_eq!(
            Injection::parse("header:X-Api-Key:{value}").unwrap(),
            Injection::Header { name: "X-Api-Key".into(), template: "{value}".into() }
        );
        assert!(matches!(Injection::parse("query:api_key:{value}").unwrap(), Injection::Query { .. }));
        for bad in ["header:X:", "header::{value}", "cookie:x:{value}", "header:X:{value}{value}", "header:X Y:{value}"]
        {
            assert!(Injection::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn modes() {
        let m = Modes::parse_list(&["proxy,reveal".into()]).unwrap();
        assert!(m.proxy && m.reveal);
        assert!(Modes::parse_list(&[]).is_err());
        assert!(Modes::parse_list(&["read".into()]).is_err());
    }
}
