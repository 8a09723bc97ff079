//! Seals: where the master key comes from.
//!
//! - key file: 32 random bytes in a file created 0600; a file readable by
//!   group or others is refused.
//! - passphrase: a random master key wrapped under an Argon2id-derived key;
//!   the parameters, salt and wrapped key are stored, the passphrase never.
//!
//! The seal configuration lives in the store's metadata as JSON.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, KEY_LEN, KeyMaterial, random_bytes};

const MASTER_AAD: &[u8] = b"keyward/v1/master-key";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    #[error("master key file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("master key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("master key file {path} must hold exactly 32 bytes")]
    BadLength { path: String },
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("passphrase must be at least 12 characters")]
    WeakPassphrase,
    #[error("seal configuration is invalid: {0}")]
    Config(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Argon2Params {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for Argon2Params {
    /// OWASP's Argon2id recommendation tier: 64 MiB, 3 passes, 1 lane.
    fn default() -> Self {
        Self { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SealConfig {
    Keyfile,
    Passphrase { argon2id: Argon2Params, salt: String, wrapped_master: String },
}

impl SealConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SealConfig::Keyfile => "keyfile",
            SealConfig::Passphrase { .. } => "passphrase",
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializable")
    }

    pub fn from_json(s: &str) -> Result<Self, SealError> {
        serde_json::from_str(s).map_err(|e| SealError::Config(e.to_string()))
    }

    /// A new random master key protected by `passphrase`.
    pub fn new_passphrase(passphrase: &str, params: Argon2Params) -> Result<(Self, KeyMaterial), SealError> {
        if passphrase.chars().count() < 12 {
            return Err(SealError::WeakPassphrase);
        }
        let mut salt = [0u8; 16];
        random_bytes(&mut salt)?;
        let kek = derive(passphrase, &salt, params)?;
        let master = KeyMaterial::generate()?;
        let wrapped = kek.seal(master.expose(), MASTER_AAD)?;
        let cfg =
            SealConfig::Passphrase { argon2id: params, salt: B64.encode(salt), wrapped_master: B64.encode(wrapped) };
        Ok((cfg, master))
    }

    /// Recovers the master key from the passphrase (passphrase seal only).
    pub fn unseal_with_passphrase(&self, passphrase: &str) -> Result<KeyMaterial, SealError> {
        let SealConfig::Passphrase { argon2id, salt, wrapped_master } = self else {
            return Err(SealError::Config("this vault is not passphrase-sealed".into()));
        };
        let salt = B64.decode(salt).map_err(|e| SealError::Config(e.to_string()))?;
        let wrapped = B64.decode(wrapped_master).map_err(|e| SealError::Config(e.to_string()))?;
        let kek = derive(passphrase, &salt, *argon2id)?;
        let master = kek.open(&wrapped, MASTER_AAD).map_err(|e| match e {
            CryptoError::Integrity => SealError::WrongPassphrase,
            other => SealError::Crypto(other),
        })?;
        KeyMaterial::from_slice(&master).ok_or(SealError::Config("wrapped master key length".into()))
    }
}

fn derive(passphrase: &str, salt: &[u8], p: Argon2Params) -> Result<KeyMaterial, SealError> {
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(KEY_LEN))
        .map_err(|e| SealError::Config(format!("argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, out.as_mut())
        .map_err(|e| SealError::Config(format!("argon2: {e}")))?;
    Ok(KeyMaterial::from_slice(out.as_ref()).expect("32 bytes"))
}

/// Creates a new key file (mode 0600, never overwriting) with a fresh key.
pub fn create_key_file(path: &Path) -> Result<KeyMaterial, SealError> {
    let io = |source| SealError::Io { path: path.display().to_string(), source };
    let key = KeyMaterial::generate()?;
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(key.expose()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(key)
}

/// Loads a key file, refusing one that group or others can read or write.
pub fn load_key_file(path: &Path) -> Result<KeyMaterial, SealError> {
    let name = path.display().to_string();
    let io = |source| SealError::Io { path: name.clone(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mode = f.metadata().map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SealError::Permissions { path: name, mode: mode & 0o777 });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
    Read::by_ref(&mut f).take(KEY_LEN as u64 + 1).read_to_end(&mut buf).map_err(io)?;
    KeyMaterial::from_slice(&buf).ok_or(SealError::BadLength { path: name })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> Argon2Params {
        Argon2Params { m_cost_kib: 256, t_cost: 1, p_cost: 1 }
    }

    #[test]
    fn passphrase_roundtrip_and_wrong_passphrase() {
        let (cfg, master) = SealConfig::new_passphrase("correct horse battery", fast()).unwrap();
        let cfg = SealConfig::from_json(&cfg.to_json()).unwrap();
        let again = cfg.unseal_with_passphrase("correct horse battery").unwrap();
        assert_eq!(master.expose(), again.expose());
        assert!(matches!(cfg.unseal_with_passphrase("wrong horse battery"), Err(SealError::WrongPassphrase)));
        assert!(!cfg.to_json().contains("correct horse"));
    }

    #[test]
    fn short_passphrase_refused() {
        assert!(matches!(SealConfig::new_passphrase("short", fast()), Err(SealError::WeakPassphrase)));
    }

    #[test]
    fn key_file_mode_is_enforced() {
        let dir = std::env::temp_dir().join(format!("kw-seal-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("master.key");
        let k = create_key_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_key_file(&path).unwrap().expose(), k.expose());
        assert!(create_key_file(&path).is_err(), "never overwrites");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(load_key_file(&path), Err(SealError::Permissions { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(load_key_file(&path), Err(SealError::BadLength { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
