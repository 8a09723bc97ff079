//! Signed checkpoints of the audit chain. Every N events or T seconds the
//! server signs (sequence, chain hash at that sequence, time) with an
//! Ed25519 key that is stored wrapped by the master key. A verifier holding
//! only the public key can then tell that the trail up to each checkpoint
//! is the one the server wrote: rewriting events (even with recomputed
//! hashes), dropping the tail up to a checkpoint, or forging a checkpoint
//! needs the private key.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::audit::{from_micros, time_micros};

const DOMAIN: &[u8] = b"keyward-audit-checkpoint-v1";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// One signed checkpoint: the chain's hash after event `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
}

/// What is signed: a domain tag, then fixed-width fields.
fn signed_bytes(seq: i64, hash: &[u8; 32], time: OffsetDateTime) -> Vec<u8> {
    let mut b = Vec::with_capacity(DOMAIN.len() + 48);
    b.extend_from_slice(DOMAIN);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(hash);
    b.extend_from_slice(&time_micros(time).to_be_bytes());
    b
}

impl Checkpoint {
    /// Whether `public_key` signed this checkpoint.
    pub fn verify(&self, public_key: &[u8; 32]) -> bool {
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&signed_bytes(self.seq, &self.hash, self.time), &self.signature)
            .is_ok()
    }
}

/// The private half. No Debug; the PKCS#8 bytes it is loaded from are
/// zeroized by the caller.
pub struct CheckpointSigner(Ed25519KeyPair);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointKeyError {
    #[error("the audit signing key does not load")]
    Rejected,
    #[error("not an Ed25519 public key in PEM (SubjectPublicKeyInfo, \"PUBLIC KEY\")")]
    BadPem,
}

impl CheckpointSigner {
    /// A new key, with its PKCS#8 encoding for storage (wrapped).
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), CheckpointKeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| CheckpointKeyError::Rejected)?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CheckpointKeyError> {
        Ed25519KeyPair::from_pkcs8(pkcs8).map(Self).map_err(|_| CheckpointKeyError::Rejected)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.0.public_key().as_ref().try_into().expect("Ed25519 public keys are 32 bytes")
    }

    pub fn sign(&self, seq: i64, hash: [u8; 32], time: OffsetDateTime) -> Checkpoint {
        let time = from_micros(time_micros(time));
        let signature = self.0.sign(&signed_bytes(seq, &hash, time)).as_ref().to_vec();
        Checkpoint { seq, hash, time, signature }
    }
}

/// PEM (`PUBLIC KEY`, SubjectPublicKeyInfo) of an Ed25519 public key, the
/// form `openssl pkey -pubin` reads.
pub fn public_key_pem(key: &[u8; 32]) -> String {
    let der = [&SPKI_PREFIX[..], key].concat();
    let b64 = STANDARD.encode(der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

pub fn public_key_from_pem(pem: &str) -> Result<[u8; 32], CheckpointKeyError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN PUBLIC KEY-----")
        .skip(1)
        .take_while(|l| *l != "-----END PUBLIC KEY-----")
        .collect();
    let der = STANDARD.decode(body).map_err(|_| CheckpointKeyError::BadPem)?;
    match der.strip_prefix(&SPKI_PREFIX[..]) {
        Some(key) if key.len() == 32 => Ok(key.try_into().expect("checked length")),
        _ => Err(CheckpointKeyError::BadPem),
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::audit::to_hex(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        crate::audit::from_hex32(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// One line of an audit export (`keyward audit export --format jsonl`).
pub fn export_line_checkpoint(cp: &Checkpoint) -> String {
    let mut v = serde_json::to_value(cp).expect("serializable");
    v["type"] = "checkpoint".into();
    v.to_string()
}

pub fn export_line_event(r: &crate::audit::AuditRecord) -> String {
    let mut v = serde_json::to_value(r).expect("serializable");
    v["type"] = "event".into();
    v.to_string()
}

/// Verifies an export offline: its checkpoint lines (which come first)
/// under `public_key`, then its events as one chain. A line that is not a
/// record fails the verification at that line.
pub fn verify_export<R: std::io::BufRead>(
    input: R,
    public_key: [u8; 32],
) -> Result<crate::audit::VerifyReport, String> {
    let mut checkpoints = Vec::new();
    let mut verifier: Option<crate::audit::ChainVerifier> = None;
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("reading the export: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}", n + 1);
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|_| bad("not JSON"))?;
        match v["type"].as_str() {
            Some("checkpoint") if verifier.is_none() => {
                checkpoints.push(serde_json::from_value::<Checkpoint>(v).map_err(|e| bad(&e.to_string()))?);
            }
            Some("checkpoint") => return Err(bad("a checkpoint after the first event (checkpoints come first)")),
            Some("event") => {
                let r: crate::audit::AuditRecord = serde_json::from_value(v).map_err(|e| bad(&e.to_string()))?;
                let v = verifier.get_or_insert_with(|| {
                    crate::audit::ChainVerifier::with_checkpoints(public_key, std::mem::take(&mut checkpoints))
                });
                if !v.feed(&r) {
                    break;
                }
            }
            _ => return Err(bad("neither an event nor a checkpoint")),
        }
    }
    let v = verifier.unwrap_or_else(|| crate::audit::ChainVerifier::with_checkpoints(public_key, checkpoints));
    Ok(v.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_under_their_key_and_content() {
        let (signer, pkcs8) = CheckpointSigner::generate().unwrap();
        let again = CheckpointSigner::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(signer.public_key(), again.public_key());
        let cp = signer.sign(10, [7; 32], OffsetDateTime::now_utc());
        assert!(cp.verify(&signer.public_key()));
        let (other, _) = CheckpointSigner::generate().unwrap();
        assert!(!cp.verify(&other.public_key()), "another key's signature");
        for tampered in [
            Checkpoint { seq: 11, ..cp.clone() },
            Checkpoint { hash: [8; 32], ..cp.clone() },
            Checkpoint { time: cp.time + time::Duration::seconds(1), ..cp.clone() },
        ] {
            assert!(!tampered.verify(&signer.public_key()));
        }
        let json = serde_json::to_string(&cp).unwrap();
        assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), cp);
    }

    #[test]
    fn exports_verify_offline_and_tampering_shows() {
        use crate::audit::{Actor, AuditDraft, GENESIS_HASH, Outcome, chain_batch};
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let drafts: Vec<AuditDraft> = (0..6)
            .map(|i| AuditDraft {
                time: OffsetDateTime::now_utc(),
                org_id: None,
                actor: Actor::system(),
                action: format!("a{i}"),
                secret_id: None,
                secret_name: None,
                secret_version: None,
                purpose: None,
                source_ip: None,
                user_agent: None,
                outcome: Outcome::Allowed,
                reason: None,
                request_id: None,
            })
            .collect();
        let chain = chain_batch(0, GENESIS_HASH, &drafts);
        let cp = signer.sign(5, chain[4].hash, OffsetDateTime::now_utc());
        let mut lines = vec![export_line_checkpoint(&cp)];
        lines.extend(chain.iter().map(export_line_event));
        let check = |ls: &[String]| verify_export(ls.join("\n").as_bytes(), signer.public_key());
        let r = check(&lines).unwrap();
        assert!(r.ok && r.checkpoints_verified == 1 && r.events == 6, "{r:?}");
        let mut modified = lines.clone();
        modified[3] = modified[3].replace("\"a2\"", "\"zz\"");
        assert_eq!(check(&modified).unwrap().broken_at, Some(3));
        let mut truncated = lines.clone();
        truncated.truncate(4);
        assert!(check(&truncated).unwrap().problem.unwrap().contains("truncated"));
        let (other, _) = CheckpointSigner::generate().unwrap();
        assert!(!verify_export(lines.join("\n").as_bytes(), other.public_key()).unwrap().ok);
        assert!(check(&["{}".to_owned()]).unwrap_err().contains("line 1"));
    }

    #[test]
    fn public_key_pem_round_trips_and_rejects_junk() {
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let pem = public_key_pem(&signer.public_key());
        assert_eq!(public_key_from_pem(&pem).unwrap(), signer.public_key());
        assert!(public_key_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
        assert!(public_key_from_pem("hello").is_err());
    }
}
