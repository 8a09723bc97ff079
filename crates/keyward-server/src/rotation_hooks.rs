//! Rotation hooks: executables named in the server config
//! (`[[rotation_hooks]]`), never a path an API caller supplies. keyward runs
//! `COMMAND… issue` or `COMMAND… revoke` with a JSON document on stdin (see
//! `keyward_core::rotation::HookCall`); the issue step prints the new value
//! on stdout (one trailing newline is dropped). The hook runs with a clean
//! environment (PATH plus the config's `env`), a time limit, and its stderr
//! discarded: whatever it prints there could hold a key.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::model::{Secret, parse_probe};
use keyward_core::rotation::{HookCall, RotationDriver};
use keyward_core::vault::{MAX_VALUE_BYTES, SecretValue};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::proxy::Upstreams;

const DEFAULT_TIMEOUT_SECS: u64 = 60;
const HOOK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// What secrets refer to (`secret policy --rotation-hook NAME`).
    pub name: String,
    /// The executable (an absolute path) and fixed arguments; keyward
    /// appends the step, `issue` or `revoke`.
    pub command: Vec<String>,
    /// Seconds a step may take before it is killed and counts as failed.
    pub timeout_secs: Option<u64>,
    /// Environment for the hook (e.g. the provider admin key's file path);
    /// nothing else from keyward's environment is passed on but PATH.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HookConfigError {
    #[error("rotation hook `{name}`: {message}")]
    Invalid { name: String, message: String },
}

/// Runs the configured hooks; sends verify probes through the proxy's client.
pub struct HookRunner {
    hooks: HashMap<String, HookConfig>,
    upstreams: Arc<Upstreams>,
}

impl HookRunner {
    /// Checks every hook: a valid unique name, an absolute path to an
    /// executable regular file that only its owner may write.
    pub fn new(configs: Vec<HookConfig>, upstreams: Arc<Upstreams>) -> Result<Self, HookConfigError> {
        let mut hooks = HashMap::new();
        for cfg in configs {
            let invalid = |message: String| HookConfigError::Invalid { name: cfg.name.clone(), message };
            keyward_core::model::validate_name("rotation hook name", &cfg.name).map_err(|e| invalid(e.to_string()))?;
            let exe = cfg.command.first().ok_or_else(|| invalid("`command` is empty".into()))?;
            check_executable(Path::new(exe)).map_err(invalid)?;
            if hooks.contains_key(&cfg.name) {
                return Err(invalid("defined twice".into()));
            }
            hooks.insert(cfg.name.clone(), cfg);
        }
        Ok(Self { hooks, upstreams })
    }

    /// Runs one step and returns its stdout (at most `MAX_VALUE_BYTES`).
    async fn run(&self, hook: &str, call: &HookCall<'_>) -> Result<Zeroizing<Vec<u8>>, String> {
        let cfg = self.hooks.get(hook).ok_or_else(|| format!("no rotation hook `{hook}` is configured"))?;
        let step = call.action.as_str();
        let mut child = tokio::process::Command::new(&cfg.command[0])
            .args(&cfg.command[1..])
            .arg(step)
            .env_clear()
            .env("PATH", HOOK_PATH)
            .envs(&cfg.env)
            .env("KEYWARD_HOOK_STEP", step)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("hook `{hook}` {step}: cannot start: {e}"))?;
        let input = call.to_json();
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let limit = Duration::from_secs(cfg.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1));
        let work = async {
            // A hook that ignores stdin closes the pipe: not an error.
            let _ = stdin.write_all(&input).await;
            drop(stdin);
            let mut out = Zeroizing::new(Vec::new());
            (&mut stdout).take(MAX_VALUE_BYTES as u64 + 2).read_to_end(&mut out).await.map_err(|e| e.to_string())?;
            let status = child.wait().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, out))
        };
        let (status, out) = match tokio::time::timeout(limit, work).await {
            Ok(r) => r.map_err(|e| format!("hook `{hook}` {step}: {e}"))?,
            Err(_) => return Err(format!("hook `{hook}` {step} timed out after {}s", limit.as_secs())),
        };
        if !status.success() {
            return Err(format!("hook `{hook}` {step} failed ({status})"));
        }
        Ok(out)
    }
}

fn check_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if !meta.is_file() || mode & 0o111 == 0 {
        return Err(format!("{} is not an executable file", path.display()));
    }
    if mode & 0o022 != 0 {
        return Err(format!("{} is writable by group or others: anyone who can edit it gets new keys", path.display()));
    }
    Ok(())
}

/// The value a hook printed: one trailing newline (LF or CRLF) dropped.
fn value_from_stdout(mut out: Zeroizing<Vec<u8>>) -> Result<SecretValue, String> {
    if out.ends_with(b"\n") {
        out.pop();
        if out.ends_with(b"\r") {
            out.pop();
        }
    }
    if out.is_empty() {
        return Err("the hook printed no value".into());
    }
    if out.len() > MAX_VALUE_BYTES {
        return Err(format!("the hook printed more than {MAX_VALUE_BYTES} bytes"));
    }
    SecretValue::new(std::mem::take(&mut *out)).map_err(|e| e.to_string())
}

#[async_trait]
impl RotationDriver for HookRunner {
    fn has_hook(&self, name: &str) -> bool {
        self.hooks.contains_key(name)
    }

    async fn issue(&self, hook: &str, call: &HookCall<'_>) -> Result<SecretValue, String> {
        value_from_stdout(self.run(hook, call).await?)
    }

    async fn revoke(&self, hook: &str, call: &HookCall<'_>) -> Result<(), String> {
        self.run(hook, call).await.map(drop)
    }

    async fn verify(&self, secret: &Secret, probe: &str, value: &SecretValue) -> Result<(), String> {
        let (method, path) = parse_probe(probe).map_err(|e| e.to_string())?;
        let value = value.expose_str().ok_or("the new value is not UTF-8")?;
        let status = self.upstreams.probe(secret, method, path, value).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("verify probe `{method} {path}` answered {}", status.as_u16()))
        }
    }
}

/// Runs due automated rotations every `every` (see `Vault::rotate_due`).
pub fn start_schedule(vault: &Arc<keyward_core::Vault>, every: Duration) {
    let weak = Arc::downgrade(vault);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(v) = weak.upgrade() else { break };
            match v.rotate_due().await {
                Ok(attempts) => {
                    for (secret, result) in attempts {
                        match result {
                            Ok(version) => {
                                tracing::info!(%secret, version, "scheduled rotation promoted a new version")
                            }
                            Err(error) => tracing::warn!(%secret, %error, "scheduled rotation failed"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "scheduled rotation scan failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_loses_one_trailing_newline_only() {
        let v = value_from_stdout(Zeroizing::new(b"sk-abc\r\n".to_vec())).unwrap();
        assert_eq!(v.expose_bytes(), b"sk-abc");
        let v = value_from_stdout(Zeroizing::new(b"two\n\n".to_vec())).unwrap();
        assert_eq!(v.expose_bytes(), b"two\n");
        assert!(value_from_stdout(Zeroizing::new(b"\n".to_vec())).is_err());
        assert!(value_from_stdout(Zeroizing::new(vec![b'a'; MAX_VALUE_BYTES + 1])).is_err());
    }

    #[test]
    fn hook_executables_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("hook");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_executable(&exe).unwrap_err().contains("not an executable"));
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_executable(&exe).unwrap_err().contains("writable by group or others"));
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_executable(&exe).unwrap();
        assert!(check_executable(Path::new("relative/hook")).unwrap_err().contains("absolute"));
    }
}
