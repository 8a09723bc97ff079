//! keyward tokens: `kwa_` (agent) or `kwu_` (human) + 43 base62 characters
//! (256 random bits) + 6 base62 characters of CRC32 over the body. The
//! checksum lets scanners recognise a leaked token without false positives
//! and lets the server reject typos before any lookup. Only SHA-256 of a
//! token is stored; hashes are compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, random_bytes};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BODY_LEN: usize = 43; // ceil(256 / log2(62))
const CHECK_LEN: usize = 6; // 62^6 > 2^32

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Agent,
    User,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Agent => "kwa_",
            TokenKind::User => "kwu_",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a keyward token")]
    Malformed,
    #[error("token checksum does not match (typo or truncated token)")]
    BadChecksum,
}

/// A token as shown to its owner once. No Debug, zeroized on drop.
pub struct Token(Zeroizing<String>);

impl Token {
    pub fn generate(kind: TokenKind) -> Result<Self, CryptoError> {
        let mut raw = Zeroizing::new([0u8; 32]);
        random_bytes(raw.as_mut())?;
        let body = encode_fixed(&raw[..], BODY_LEN);
        let check = encode_fixed(&crc32fast::hash(body.as_bytes()).to_be_bytes(), CHECK_LEN);
        Ok(Self(Zeroizing::new(format!("{}{}{}", kind.prefix(), body.as_str(), check.as_str()))))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn hash(&self) -> [u8; 32] {
        hash_token(&self.0)
    }
}

/// Checks the shape and checksum of a presented token and tells its kind.
pub fn parse(presented: &str) -> Result<TokenKind, TokenError> {
    let kind = if presented.starts_with("kwa_") {
        TokenKind::Agent
    } else if presented.starts_with("kwu_") {
        TokenKind::User
    } else {
        return Err(TokenError::Malformed);
    };
    let rest = &presented[4..];
    if rest.len() != BODY_LEN + CHECK_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(TokenError::Malformed);
    }
    let (body, check) = rest.split_at(BODY_LEN);
    let expected = encode_fixed(&crc32fast::hash(body.as_bytes()).to_be_bytes(), CHECK_LEN);
    if expected.as_bytes().ct_eq(check.as_bytes()).into() { Ok(kind) } else { Err(TokenError::BadChecksum) }
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub fn hashes_equal_slices(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Big-endian base62 of `bytes`, left-padded with '0' to `width`.
fn encode_fixed(bytes: &[u8], width: usize) -> Zeroizing<String> {
    let mut digits = Zeroizing::new(bytes.to_vec());
    let mut out = Zeroizing::new(vec![b'0'; width]);
    for slot in out.iter_mut().rev() {
        let mut rem: u32 = 0;
        for d in digits.iter_mut() {
            let acc = (rem << 8) | u32::from(*d);
            *d = (acc / 62) as u8;
            rem = acc % 62;
        }
        *slot = ALPHABET[rem as usize];
    }
    Zeroizing::new(String::from_utf8(out.to_vec()).expect("ascii"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse() {
        for kind in [TokenKind::Agent, TokenKind::User] {
            let t = Token::generate(kind).unwrap();
            assert!(t.expose().starts_with(kind.prefix()));
            assert_eq!(t.expose().len(), 4 + BODY_LEN + CHECK_LEN);
            assert_eq!(parse(t.expose()), Ok(kind));
        }
    }

    #[test]
    fn body_carries_at_least_190_bits() {
        assert!((BODY_LEN as f64) * 62f64.log2() >= 190.0);
    }

    #[test]
    fn checksum_catches_every_single_char_change() {
        let t = Token::generate(TokenKind::Agent).unwrap();
        let s = t.expose().to_owned();
        for i in 4..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            assert!(parse(std::str::from_utf8(&b).unwrap()).is_err(), "position {i}");
        }
        assert_eq!(parse("sk-abc"), Err(TokenError::Malformed));
        assert_eq!(parse(&s[..s.len() - 1]), Err(TokenError::Malformed));
    }

    #[test]
    fn tokens_differ_and_hashes_compare() {
        let a = Token::generate(TokenKind::Agent).unwrap();
        let b = Token::generate(TokenKind::Agent).unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(hashes_equal(&a.hash(), &hash_token(a.expose())));
        assert!(!hashes_equal(&a.hash(), &b.hash()));
    }
}
