//! AES-256-GCM envelope encryption.
//!
//! master key ──wraps──▶ one data key per organization ──seals──▶ secret versions
//!
//! Every ciphertext carries a random 96-bit nonce and is bound by its
//! associated data to where it belongs (the org for a data key; org, secret
//! and version for a value), so a ciphertext copied to another row fails to
//! open with an integrity error instead of yielding garbage.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Why a crypto operation failed. Never carries key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("integrity check failed: the ciphertext was modified or does not belong here")]
    Integrity,
    #[error("ciphertext is malformed ({0})")]
    Malformed(&'static str),
    #[error("system random number generator failed")]
    Rng,
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new().fill(buf).map_err(|_| CryptoError::Rng)
}

/// 32 bytes of key material, zeroized on drop, with no Debug/Display.
pub struct KeyMaterial(Zeroizing<[u8; KEY_LEN]>);

impl KeyMaterial {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        random_bytes(k.as_mut())?;
        Ok(Self(k))
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        let k = Self(Zeroizing::new(arr));
        let mut arr = arr;
        arr.zeroize();
        Some(k)
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn aead(&self) -> LessSafeKey {
        // Only fails on a wrong key length, which the type rules out.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.0.as_ref()).expect("32-byte AES key"))
    }

    /// nonce ‖ ciphertext ‖ tag
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead()
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[NONCE_LEN..])
            .map_err(|_| CryptoError::Integrity)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed("too short"));
        }
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("length checked");
        let mut buf = Zeroizing::new(sealed[NONCE_LEN..].to_vec());
        let len = self
            .aead()
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::Integrity)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// Associated data of an organization's wrapped data key.
pub fn data_key_aad(org_id: &str) -> Vec<u8> {
    format!("keyward/v1/data-key/{org_id}").into_bytes()
}

/// Associated data of one secret version's ciphertext.
pub fn value_aad(org_id: &str, secret_id: &str, version: i64) -> Vec<u8> {
    format!("keyward/v1/value/{org_id}/{secret_id}/{version}").into_bytes()
}

/// First hex characters of SHA-256 over a value, shown to humans so that they
/// can tell two versions apart without seeing either. 8 hex chars = 32 bits:
/// enough to compare, far too little to help guess a high-entropy key.
pub fn fingerprint_prefix(value: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(value);
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_integrity() {
        let k = KeyMaterial::generate().unwrap();
        let aad = value_aad("org_a", "sec_a", 1);
        let sealed = k.seal(b"sk-test", &aad).unwrap();
        assert_eq!(&k.open(&sealed, &aad).unwrap()[..], b"sk-test");

        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(k.open(&t, &aad).unwrap_err(), CryptoError::Integrity, "byte {i}");
        }
        // Same bytes under another row's associated data: refused.
        assert_eq!(k.open(&sealed, &value_aad("org_a", "sec_b", 1)).unwrap_err(), CryptoError::Integrity);
        assert_eq!(k.open(&sealed, &value_aad("org_b", "sec_a", 1)).unwrap_err(), CryptoError::Integrity);
        assert_eq!(k.open(&sealed, &value_aad("org_a", "sec_a", 2)).unwrap_err(), CryptoError::Integrity);
        // Another key: refused.
        let other = KeyMaterial::generate().unwrap();
        assert_eq!(other.open(&sealed, &aad).unwrap_err(), CryptoError::Integrity);
    }

    #[test]
    fn nonces_are_fresh() {
        let k = KeyMaterial::generate().unwrap();
        let a = k.seal(b"x", b"ad").unwrap();
        let b = k.seal(b"x", b"ad").unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
    }

    #[test]
    fn malformed_is_not_integrity() {
        let k = KeyMaterial::generate().unwrap();
        assert_eq!(k.open(&[0u8; 5], b"").unwrap_err(), CryptoError::Malformed("too short"));
    }
}
