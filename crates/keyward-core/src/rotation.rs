//! Automated rotation's boundary with the outside world. The vault runs the
//! procedure (`Vault::auto_rotate`: issue → store pending → verify →
//! promote → revoke the old value at the provider); a [`RotationDriver`]
//! supplied by the server runs the configured hook executables and sends the
//! verify probe through the proxy's injection and network guard.

use async_trait::async_trait;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::model::Secret;
use crate::vault::SecretValue;

/// The step a hook is asked to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookAction {
    /// Issue a new value at the provider; print it on stdout.
    Issue,
    /// Revoke an old value at the provider (after the new one is current).
    Revoke,
}

impl HookAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Revoke => "revoke",
        }
    }
}

/// What a hook is told. `value` is the current value (issue) or the old one
/// (revoke), present only when the secret is configured to pass it.
pub struct HookCall<'a> {
    pub action: HookAction,
    pub secret: &'a Secret,
    /// issue: the version being created; revoke: the version being retired.
    pub version: i64,
    /// The version the value below belongs to (issue: current; revoke: old).
    pub subject_version: Option<i64>,
    /// Fingerprint prefix of that version (hex of SHA-256's first 4 bytes),
    /// so a hook can map it to a provider-side key id it recorded.
    pub fingerprint: Option<&'a str>,
    pub value: Option<&'a SecretValue>,
}

#[derive(Serialize)]
struct HookJson<'a> {
    action: HookAction,
    org_id: &'a str,
    secret_id: &'a str,
    secret: &'a str,
    provider: &'a str,
    upstream: Option<&'a str>,
    version: i64,
    subject_version: Option<i64>,
    fingerprint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
}

impl HookCall<'_> {
    /// The hook's stdin document. Zeroized on drop: it may hold a value.
    /// A non-UTF-8 value is sent as absent (hooks speak JSON text).
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let doc = HookJson {
            action: self.action,
            org_id: &self.secret.org_id,
            secret_id: &self.secret.id,
            secret: &self.secret.name,
            provider: &self.secret.provider,
            upstream: self.secret.upstream.as_deref(),
            version: self.version,
            subject_version: self.subject_version,
            fingerprint: self.fingerprint,
            value: self.value.and_then(SecretValue::expose_str),
        };
        let mut out = Zeroizing::new(Vec::with_capacity(512));
        serde_json::to_writer(&mut *out, &doc).expect("serializing to memory");
        out.push(b'\n');
        out
    }
}

/// Runs hooks and probes. Error strings go to the audit trail and to
/// notifications, so they must never contain a value (exit status, HTTP
/// status, a timeout: that kind of thing).
#[async_trait]
pub trait RotationDriver: Send + Sync {
    /// Whether the server config names this hook.
    fn has_hook(&self, name: &str) -> bool;
    /// Runs the hook's issue step and returns the new value.
    async fn issue(&self, hook: &str, call: &HookCall<'_>) -> Result<SecretValue, String>;
    /// Runs the hook's revoke step for an old value.
    async fn revoke(&self, hook: &str, call: &HookCall<'_>) -> Result<(), String>;
    /// Sends `probe` (`METHOD /path`) to the secret's bound origin with
    /// `value` injected as the proxy would; `Ok` on a 2xx answer.
    async fn verify(&self, secret: &Secret, probe: &str, value: &SecretValue) -> Result<(), String>;
}
