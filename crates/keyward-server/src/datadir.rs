//! The data directory: master key file, TLS material, SQLite database and
//! the endpoint file the CLI reads to find a local server.
//!
//! ```text
//! .keyward/            0700
//!   master.key         0600  (key-file seal)
//!   keyward.db         0600  (+ -wal, -shm)
//!   tls/ca.pem ca.key server.pem server.key
//!   endpoint.json      {"addr": "https://127.0.0.1:8443", "ca_cert": ".../ca.pem"}
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyward_core::CoreError;
use keyward_core::clock::{Clock, SystemClock};
use keyward_core::seal::{self, Argon2Params, SealError};
use keyward_core::token::Token;
use keyward_core::vault::{InitSeal, Vault};
use zeroize::Zeroizing;

use crate::config::{ConfigError, ServeConfig};
use crate::tls::{self, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("{0}")]
    Core(#[from] CoreError),
    #[error("database: {0}")]
    Store(#[from] keyward_core::store::StoreError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }
    pub fn endpoint_file(&self) -> PathBuf {
        self.root.join("endpoint.json")
    }

    fn ensure_dirs(&self) -> Result<(), SetupError> {
        for d in [self.root.clone(), self.tls_dir()] {
            let io = |source| SetupError::Io { path: d.display().to_string(), source };
            std::fs::create_dir_all(&d).map_err(io)?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(())
    }

    /// Writes where a local server listens, for CLI discovery.
    pub fn write_endpoint(&self, addr: &str, ca_cert: Option<&Path>) -> Result<(), SetupError> {
        let ca = ca_cert.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
        let body = serde_json::json!({ "addr": addr, "ca_cert": ca });
        let path = self.endpoint_file();
        std::fs::write(&path, body.to_string())
            .map_err(|source| SetupError::Io { path: path.display().to_string(), source })
    }
}

pub enum SealChoice {
    KeyFile,
    Passphrase(Zeroizing<String>),
}

/// What initialisation reports once.
pub struct InitReport {
    pub data_dir: PathBuf,
    pub database: String,
    pub ca_cert: Option<PathBuf>,
    pub seal: &'static str,
    pub admin_token: Token,
}

impl InitReport {
    /// `keyward init --json` output. The only place the operator token is printed.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "data_dir": self.data_dir,
            "database": self.database,
            "ca_cert": self.ca_cert,
            "seal": self.seal,
            "admin_token": self.admin_token.expose(),
        })
    }
}

/// Argon2id parameters; `KEYWARD_INSECURE_FAST_KDF=1` lowers them for tests.
pub fn argon2_params() -> Argon2Params {
    if std::env::var("KEYWARD_INSECURE_FAST_KDF").as_deref() == Ok("1") {
        Argon2Params { m_cost_kib: 1024, t_cost: 1, p_cost: 1 }
    } else {
        Argon2Params::default()
    }
}

fn uses_generated_tls(cfg: &ServeConfig) -> bool {
    cfg.tls_cert.is_none()
}

/// Initialises an empty data dir and database. Refuses an initialised one.
pub async fn initialize(cfg: &ServeConfig, choice: SealChoice) -> Result<InitReport, SetupError> {
    cfg.validate()?;
    let dir = DataDir::new(cfg.data_dir());
    dir.ensure_dirs()?;
    let store = keyward_store::open(&cfg.database_url()).await?;
    if Vault::is_initialized(store.as_ref()).await? {
        return Err(SetupError::Other(format!(
            "{} is already initialised (database {})",
            dir.root().display(),
            redact_url(&cfg.database_url())
        )));
    }
    let (seal, seal_name) = match choice {
        SealChoice::KeyFile => {
            let path = dir.master_key();
            // A key file left by an interrupted init is reused, never replaced.
            let key = if path.exists() { seal::load_key_file(&path)? } else { seal::create_key_file(&path)? };
            (InitSeal::KeyFile(key), "keyfile")
        }
        SealChoice::Passphrase(p) => (InitSeal::Passphrase { passphrase: p, params: argon2_params() }, "passphrase"),
    };
    let ca_cert = if uses_generated_tls(cfg) {
        if !dir.ca_cert().exists() {
            tls::generate(&dir.tls_dir())?;
        }
        Some(dir.ca_cert())
    } else {
        None
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let done = Vault::initialize(store, clock, seal).await?;
    Ok(InitReport {
        data_dir: dir.root().to_path_buf(),
        database: redact_url(&cfg.database_url()),
        ca_cert,
        seal: seal_name,
        admin_token: done.admin_token,
    })
}

/// Generates the local CA and server certificate if they are missing (a
/// restored or migrated instance, a replica on a new machine).
pub fn ensure_tls(cfg: &ServeConfig) -> Result<(), SetupError> {
    if uses_generated_tls(cfg) {
        let dir = DataDir::new(cfg.data_dir());
        if !dir.tls_dir().join("server.pem").exists() {
            dir.ensure_dirs()?;
            if !dir.ca_cert().exists() {
                tls::generate(&dir.tls_dir())?;
            }
        }
    }
    Ok(())
}

/// Loads a backup file into the (empty) store of `cfg`.
pub async fn restore(cfg: &ServeConfig, backup: &Path) -> Result<keyward_store::CopyReport, SetupError> {
    if !backup.is_file() {
        return Err(SetupError::Other(format!("{}: no such backup file", backup.display())));
    }
    DataDir::new(cfg.data_dir()).ensure_dirs()?;
    copy_between(&format!("sqlite://{}", backup.display()), &cfg.database_url()).await
}

/// Copies one store into another, empty one.
pub async fn copy_between(from: &str, to: &str) -> Result<keyward_store::CopyReport, SetupError> {
    if let Some(path) = from.strip_prefix("sqlite://")
        && !Path::new(path).is_file()
    {
        return Err(SetupError::Other(format!("{path}: no such database")));
    }
    let source = keyward_store::open(from).await?;
    if !Vault::is_initialized(source.as_ref()).await? {
        return Err(SetupError::Other(format!("{} holds no initialised keyward store", redact_url(from))));
    }
    let target = keyward_store::open(to).await?;
    Ok(keyward_store::copy_store(source.as_ref(), target.as_ref()).await?)
}

/// Opens an initialised instance for serving.
pub async fn open_vault(cfg: &ServeConfig) -> Result<Arc<Vault>, SetupError> {
    let dir = DataDir::new(cfg.data_dir());
    let durability = cfg.durability().map_err(|e| SetupError::Other(e.to_string()))?;
    let store = keyward_store::open_with(&cfg.database_url(), durability).await?;
    if durability != keyward_store::Durability::Fsync {
        tracing::info!(
            durability = durability.as_str(),
            "commits reach the disk within about a second, not one by one"
        );
    }
    if !Vault::is_initialized(store.as_ref()).await? {
        return Err(SetupError::Other("not initialised; run `keyward init`".into()));
    }
    let key = if dir.master_key().exists() { Some(seal::load_key_file(&dir.master_key())?) } else { None };
    Ok(Vault::open(store, Arc::new(SystemClock), key).await?)
}

/// Whether `serve` should initialise first.
pub async fn needs_init(cfg: &ServeConfig) -> Result<bool, SetupError> {
    let store = keyward_store::open(&cfg.database_url()).await?;
    Ok(!Vault::is_initialized(store.as_ref()).await?)
}

/// Drops credentials from a database URL before it is shown or logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Paths of the TLS pair to serve with.
pub fn tls_paths(cfg: &ServeConfig) -> (PathBuf, PathBuf) {
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let d = DataDir::new(cfg.data_dir()).tls_dir();
            (d.join("server.pem"), d.join("server.key"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_urls_lose_their_password() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://***@h/db");
        assert_eq!(redact_url("sqlite:///x/y.db"), "sqlite:///x/y.db");
    }
}
