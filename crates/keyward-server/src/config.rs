//! Server configuration: command-line flags over an optional TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_DATA_DIR: &str = ".keyward";

/// What `keyward serve` runs with. Fields left `None` take their defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// `sqlite://PATH`; default: `keyward.db` in the data dir.
    pub database: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Extra trust roots for upstreams (used by the proxy).
    pub upstream_ca: Option<PathBuf>,
    /// Pinned upstream addresses, `HOST=ADDRESS` (like curl's --resolve);
    /// still checked by the network guard.
    pub resolve: Option<Vec<String>>,
    /// Seconds an upstream may stay silent (before its headers, or between
    /// two chunks) before the proxy gives up: 504, or a cut stream.
    pub upstream_timeout: Option<u64>,
    /// Notification receivers (`[[webhooks]]` tables).
    pub webhooks: Option<Vec<crate::webhooks::WebhookConfig>>,
    /// Executables that rotate keys at their provider (`[[rotation_hooks]]`).
    pub rotation_hooks: Option<Vec<crate::rotation_hooks::HookConfig>>,
    /// Whether this process runs scheduled automated rotations (default
    /// true; with several replicas, enable it on one).
    pub auto_rotate: Option<bool>,
    /// Sign an audit checkpoint after this many events (default 1000)...
    pub audit_checkpoint_events: Option<i64>,
    /// ...or this many seconds after the last one, if events came since (default 60).
    pub audit_checkpoint_secs: Option<u64>,
    /// Where audit events are exported (`[[audit_sinks]]`).
    pub audit_sinks: Option<Vec<crate::sinks::SinkConfig>>,
    /// How often lifetimes are scanned for reminders (seconds, default 60).
    pub notify_interval_secs: Option<u64>,
    /// How long before expiry a secret counts as `expiring` (days, default 14).
    pub expiring_window_days: Option<i64>,
    /// `text` (default) or `json`.
    pub log_format: Option<String>,
    /// When a commit counts as written: `fsync` (default: on disk before
    /// keyward goes on) or `buffered` (handed to the OS, on disk within
    /// about a second). See `keyward_store::Durability`.
    pub durability: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("--tls-cert and --tls-key go together")]
    TlsPair,
    #[error("{0}")]
    Durability(String),
}

impl ServeConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })
    }

    /// `self` (from flags) wins over `file`.
    pub fn over(self, file: ServeConfig) -> Self {
        Self {
            data_dir: self.data_dir.or(file.data_dir),
            listen: self.listen.or(file.listen),
            database: self.database.or(file.database),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            upstream_ca: self.upstream_ca.or(file.upstream_ca),
            resolve: self.resolve.or(file.resolve),
            upstream_timeout: self.upstream_timeout.or(file.upstream_timeout),
            webhooks: self.webhooks.or(file.webhooks),
            rotation_hooks: self.rotation_hooks.or(file.rotation_hooks),
            auto_rotate: self.auto_rotate.or(file.auto_rotate),
            audit_sinks: self.audit_sinks.or(file.audit_sinks),
            audit_checkpoint_events: self.audit_checkpoint_events.or(file.audit_checkpoint_events),
            audit_checkpoint_secs: self.audit_checkpoint_secs.or(file.audit_checkpoint_secs),
            notify_interval_secs: self.notify_interval_secs.or(file.notify_interval_secs),
            expiring_window_days: self.expiring_window_days.or(file.expiring_window_days),
            log_format: self.log_format.or(file.log_format),
            durability: self.durability.or(file.durability),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"))
    }

    pub fn database_url(&self) -> String {
        self.database.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir().join("keyward.db").display()))
    }

    pub fn checkpoint_policy(&self) -> keyward_core::vault::CheckpointPolicy {
        let d = keyward_core::vault::CheckpointPolicy::default();
        keyward_core::vault::CheckpointPolicy {
            every_events: self.audit_checkpoint_events.unwrap_or(d.every_events).max(1),
            every: self.audit_checkpoint_secs.map_or(d.every, |s| time::Duration::seconds(s.max(1) as i64)),
        }
    }

    pub fn durability(&self) -> Result<keyward_store::Durability, ConfigError> {
        self.durability
            .as_deref()
            .map_or(Ok(keyward_store::Durability::Fsync), |d| d.parse().map_err(ConfigError::Durability))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::TlsPair);
        }
        self.durability()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_unknown_keys_fail() {
        let file: ServeConfig = toml::from_str("listen = \"127.0.0.1:9000\"\ndata_dir = \"/srv/kw\"").unwrap();
        let flags = ServeConfig { listen: Some("127.0.0.1:1".parse().unwrap()), ..Default::default() };
        let merged = flags.over(file);
        assert_eq!(merged.listen().port(), 1);
        assert_eq!(merged.data_dir(), PathBuf::from("/srv/kw"));
        assert!(toml::from_str::<ServeConfig>("lisen = \"x\"").is_err());
    }

    #[test]
    fn durability_defaults_to_fsync_and_refuses_unknown_values() {
        assert_eq!(ServeConfig::default().durability().unwrap(), keyward_store::Durability::Fsync);
        let file: ServeConfig = toml::from_str("durability = \"buffered\"").unwrap();
        assert_eq!(file.durability().unwrap(), keyward_store::Durability::Buffered);
        let bad = ServeConfig { durability: Some("never".into()), ..Default::default() };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("expected `fsync` (the default) or `buffered`"), "{err}");
    }
}
