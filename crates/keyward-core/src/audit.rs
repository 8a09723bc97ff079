//! The audit trail: events and their SHA-256 hash chain.
//!
//! Each event's hash covers a canonical, length-prefixed encoding of all its
//! fields and the previous event's hash, so changing, removing or reordering
//! any stored event breaks verification from that sequence number on.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::checkpoint::Checkpoint;

pub const GENESIS_HASH: [u8; 32] = [0u8; 32];
const DOMAIN: &[u8] = b"keyward-audit-v1";
/// Agent-controlled strings (purpose, user agent) are cut to this many bytes.
pub const MAX_FREE_TEXT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allowed,
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allowed" => Some(Outcome::Allowed),
            "denied" => Some(Outcome::Denied),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

/// Who acted. `token_id` names the credential used, never the credential.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    /// `agent`, `user`, `anonymous` or `system`.
    pub kind: String,
    pub id: Option<String>,
    pub name: Option<String>,
    pub token_id: Option<String>,
}

impl Actor {
    pub fn anonymous() -> Self {
        Self { kind: "anonymous".into(), ..Self::default() }
    }
    pub fn system() -> Self {
        Self { kind: "system".into(), ..Self::default() }
    }
}

/// An event before it has a place in the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditDraft {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub org_id: Option<String>,
    pub actor: Actor,
    pub action: String,
    pub secret_id: Option<String>,
    pub secret_name: Option<String>,
    pub secret_version: Option<i64>,
    pub purpose: Option<String>,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub request_id: Option<String>,
}

/// An event in the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditDraft,
    #[serde(serialize_with = "hex32", deserialize_with = "de_hex32")]
    pub prev_hash: [u8; 32],
    #[serde(serialize_with = "hex32", deserialize_with = "de_hex32")]
    pub hash: [u8; 32],
}

fn hex32<S: serde::Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(h))
}

fn de_hex32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
    let s = String::deserialize(d)?;
    from_hex32(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
}

/// Parses 64 hex digits.
pub fn from_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cuts a string an agent controls to [`MAX_FREE_TEXT`] bytes on a char
/// boundary and drops control characters, so it cannot forge log lines.
pub fn clean_free_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_FREE_TEXT));
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_FREE_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

/// Time is hashed as microseconds since the epoch: the precision the stores keep.
pub fn time_micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

pub fn from_micros(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Truncates the time to microseconds so that what is hashed is what is stored.
pub fn normalise_time(t: OffsetDateTime) -> OffsetDateTime {
    from_micros(time_micros(t))
}

fn s(o: &Option<String>) -> Option<&[u8]> {
    o.as_deref().map(str::as_bytes)
}

fn put(buf: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        Some(b) => {
            buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
            buf.extend_from_slice(b);
        }
        None => buf.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

/// Canonical encoding of (seq, event): fixed field order, length-prefixed.
pub fn canonical_bytes(seq: i64, e: &AuditDraft) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&time_micros(e.time).to_be_bytes());
    put(&mut b, s(&e.org_id));
    put(&mut b, Some(e.actor.kind.as_bytes()));
    put(&mut b, s(&e.actor.id));
    put(&mut b, s(&e.actor.name));
    put(&mut b, s(&e.actor.token_id));
    put(&mut b, Some(e.action.as_bytes()));
    put(&mut b, s(&e.secret_id));
    put(&mut b, s(&e.secret_name));
    let version = e.secret_version.map(i64::to_be_bytes);
    put(&mut b, version.as_ref().map(|v| &v[..]));
    put(&mut b, s(&e.purpose));
    put(&mut b, s(&e.source_ip));
    put(&mut b, s(&e.user_agent));
    put(&mut b, Some(e.outcome.as_str().as_bytes()));
    put(&mut b, s(&e.reason));
    put(&mut b, s(&e.request_id));
    b
}

/// The hash of event `seq` given the previous event's hash.
pub fn link(prev: &[u8; 32], seq: i64, e: &AuditDraft) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(canonical_bytes(seq, e));
    h.finalize().into()
}

/// Places a batch of drafts after `(last_seq, last_hash)`. Stores call this
/// inside the transaction that holds the chain's tail.
pub fn chain_batch(last_seq: i64, last_hash: [u8; 32], drafts: &[AuditDraft]) -> Vec<AuditRecord> {
    chain_owned(last_seq, last_hash, drafts.to_vec())
}

/// [`chain_batch`] taking the drafts by value (the writer's hot path: no copy).
pub fn chain_owned(mut last_seq: i64, mut last_hash: [u8; 32], drafts: Vec<AuditDraft>) -> Vec<AuditRecord> {
    drafts
        .into_iter()
        .map(|mut event| {
            event.time = normalise_time(event.time);
            last_seq += 1;
            let hash = link(&last_hash, last_seq, &event);
            let rec = AuditRecord { seq: last_seq, event, prev_hash: last_hash, hash };
            last_hash = hash;
            rec
        })
        .collect()
}

/// Result of walking the chain.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub events: u64,
    pub last_seq: i64,
    #[serde(serialize_with = "hex32")]
    pub head_hash: [u8; 32],
    /// First sequence number at which the chain does not hold.
    pub broken_at: Option<i64>,
    pub problem: Option<String>,
    /// Signed checkpoints whose signature and hash matched.
    pub checkpoints_verified: u64,
    pub last_checkpoint_seq: Option<i64>,
    /// Events after the last checkpoint: the window in which the tail could
    /// still be dropped or rewritten without the signing key noticing.
    pub unsigned_tail: i64,
}

/// Incremental verifier, fed records in sequence order page by page; with
/// [`ChainVerifier::with_checkpoints`] it also checks every signed
/// checkpoint against the chain.
pub struct ChainVerifier {
    expected_seq: i64,
    prev: [u8; 32],
    events: u64,
    failure: Option<(i64, String)>,
    public_key: Option<[u8; 32]>,
    /// Not yet reached, in sequence order.
    checkpoints: VecDeque<Checkpoint>,
    checkpoints_verified: u64,
    last_checkpoint_seq: Option<i64>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev: GENESIS_HASH,
            events: 0,
            failure: None,
            public_key: None,
            checkpoints: VecDeque::new(),
            checkpoints_verified: 0,
            last_checkpoint_seq: None,
        }
    }
}

impl ChainVerifier {
    pub fn with_checkpoints(public_key: [u8; 32], mut checkpoints: Vec<Checkpoint>) -> Self {
        checkpoints.sort_by_key(|c| c.seq);
        Self { public_key: Some(public_key), checkpoints: checkpoints.into(), ..Self::default() }
    }

    fn fail(&mut self, seq: i64, problem: String) -> bool {
        self.failure = Some((seq, problem));
        false
    }

    /// Returns false once the chain is broken (no need to feed more).
    pub fn feed(&mut self, r: &AuditRecord) -> bool {
        if self.failure.is_some() {
            return false;
        }
        // A pruned trail starts later: a signed checkpoint at the sequence
        // just before its first event anchors it.
        if self.events == 0 && self.expected_seq == 1 && r.seq > 1 {
            let anchor = self.checkpoints.iter().position(|c| c.seq == r.seq - 1);
            let Some(i) = anchor else {
                return self.fail(
                    1,
                    format!(
                        "the trail starts at sequence {} with no signed checkpoint anchoring it (events removed from its start)",
                        r.seq
                    ),
                );
            };
            let cp = self.checkpoints.remove(i).expect("found");
            if !self.public_key.is_some_and(|k| cp.verify(&k)) {
                return self.fail(
                    cp.seq,
                    format!("the checkpoint at sequence {} has an invalid signature (forged or altered)", cp.seq),
                );
            }
            // Checkpoints before the anchor belong to the pruned part.
            self.checkpoints.retain(|c| c.seq > cp.seq);
            self.prev = cp.hash;
            self.expected_seq = r.seq;
            self.checkpoints_verified += 1;
            self.last_checkpoint_seq = Some(cp.seq);
        }
        let problem = if r.seq != self.expected_seq {
            Some(format!("expected sequence {}, found {} (event missing or reordered)", self.expected_seq, r.seq))
        } else if r.prev_hash != self.prev {
            Some("previous-hash link does not match the preceding event (removed, inserted or reordered)".to_owned())
        } else if link(&self.prev, r.seq, &r.event) != r.hash {
            Some("event content does not match its hash (modified)".to_owned())
        } else {
            None
        };
        if let Some(p) = problem {
            return self.fail(self.expected_seq.min(r.seq), p);
        }
        while self.checkpoints.front().is_some_and(|c| c.seq <= r.seq) {
            let cp = self.checkpoints.pop_front().expect("checked");
            if !self.public_key.is_some_and(|k| cp.verify(&k)) {
                return self.fail(
                    cp.seq,
                    format!("the checkpoint at sequence {} has an invalid signature (forged or altered)", cp.seq),
                );
            }
            if cp.hash != r.hash || cp.seq != r.seq {
                return self.fail(
                    cp.seq.min(r.seq),
                    format!("the events up to sequence {} do not match their signed checkpoint (rewritten)", cp.seq),
                );
            }
            self.checkpoints_verified += 1;
            self.last_checkpoint_seq = Some(cp.seq);
        }
        self.prev = r.hash;
        self.expected_seq += 1;
        self.events += 1;
        true
    }

    pub fn finish(mut self) -> VerifyReport {
        let last_seq = self.expected_seq - 1;
        if self.failure.is_none()
            && let Some(cp) = self.checkpoints.pop_front()
        {
            let problem = if self.public_key.is_some_and(|k| cp.verify(&k)) {
                format!(
                    "the trail ends at sequence {last_seq} but a signed checkpoint covers up to {}: events were removed from its end (truncated)",
                    cp.seq
                )
            } else {
                format!("the checkpoint at sequence {} has an invalid signature (forged or altered)", cp.seq)
            };
            self.failure = Some((last_seq + 1, problem));
        }
        let (broken_at, problem) = match self.failure {
            Some((s, p)) => (Some(s), Some(p)),
            None => (None, None),
        };
        VerifyReport {
            ok: broken_at.is_none(),
            events: self.events,
            last_seq,
            head_hash: self.prev,
            broken_at,
            problem,
            checkpoints_verified: self.checkpoints_verified,
            last_checkpoint_seq: self.last_checkpoint_seq,
            unsigned_tail: last_seq - self.last_checkpoint_seq.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(action: &str) -> AuditDraft {
        AuditDraft {
            time: OffsetDateTime::now_utc(),
            org_id: Some("org_1".into()),
            actor: Actor { kind: "agent".into(), id: Some("agt_1".into()), name: Some("bot".into()), token_id: None },
            action: action.into(),
            secret_id: None,
            secret_name: Some("openai".into()),
            secret_version: Some(1),
            purpose: None,
            source_ip: None,
            user_agent: None,
            outcome: Outcome::Allowed,
            reason: None,
            request_id: None,
        }
    }

    fn verify(rs: &[AuditRecord]) -> VerifyReport {
        let mut v = ChainVerifier::default();
        for r in rs {
            if !v.feed(r) {
                break;
            }
        }
        v.finish()
    }

    #[test]
    fn chain_verifies_and_detects_tampering() {
        let drafts: Vec<_> = (0..5).map(|i| draft(&format!("a{i}"))).collect();
        let chain = chain_batch(0, GENESIS_HASH, &drafts);
        assert!(verify(&chain).ok);
        assert_eq!(verify(&chain).events, 5);

        let mut modified = chain.clone();
        modified[2].event.outcome = Outcome::Denied;
        assert_eq!(verify(&modified).broken_at, Some(3));

        let mut deleted = chain.clone();
        deleted.remove(1);
        assert_eq!(verify(&deleted).broken_at, Some(2));

        let mut reordered = chain.clone();
        reordered.swap(3, 4);
        assert_eq!(verify(&reordered).broken_at, Some(4));
    }

    fn verify_signed(rs: &[AuditRecord], key: [u8; 32], cps: &[Checkpoint]) -> VerifyReport {
        let mut v = ChainVerifier::with_checkpoints(key, cps.to_vec());
        for r in rs {
            if !v.feed(r) {
                break;
            }
        }
        v.finish()
    }

    #[test]
    fn checkpoints_catch_rewrites_truncation_and_forgery() {
        use crate::checkpoint::CheckpointSigner;
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let key = signer.public_key();
        let drafts: Vec<_> = (0..10).map(|i| draft(&format!("a{i}"))).collect();
        let chain = chain_batch(0, GENESIS_HASH, &drafts);
        let now = OffsetDateTime::now_utc();
        let cps = vec![signer.sign(4, chain[3].hash, now), signer.sign(8, chain[7].hash, now)];

        let clean = verify_signed(&chain, key, &cps);
        assert!(clean.ok, "{clean:?}");
        assert_eq!((clean.checkpoints_verified, clean.last_checkpoint_seq, clean.unsigned_tail), (2, Some(8), 2));

        // Someone without the key rewrites event 3 and recomputes every hash
        // after it: the chain alone holds, the checkpoint does not.
        let mut forged_drafts = drafts.clone();
        forged_drafts[2].outcome = Outcome::Denied;
        let forged = chain_batch(0, GENESIS_HASH, &forged_drafts);
        assert!(verify(&forged).ok, "a recomputed chain is self-consistent");
        let r = verify_signed(&forged, key, &cps);
        assert_eq!(r.broken_at, Some(4));
        assert!(r.problem.unwrap().contains("rewritten"));

        // Dropping the tail back past a checkpoint is seen; within the
        // unsigned window (after the last checkpoint) it is not.
        let r = verify_signed(&chain[..6], key, &cps);
        assert_eq!(r.broken_at, Some(7));
        assert!(r.problem.unwrap().contains("truncated"));
        assert!(verify_signed(&chain[..8], key, &cps).ok);

        // A checkpoint signed by another key, or altered, is refused.
        let (other, _) = CheckpointSigner::generate().unwrap();
        let fake = vec![other.sign(4, chain[3].hash, now)];
        assert!(verify_signed(&chain, key, &fake).problem.unwrap().contains("invalid signature"));
        let altered = vec![Checkpoint { seq: 5, ..cps[0].clone() }];
        assert!(!verify_signed(&chain, key, &altered).ok);

        // A pruned trail verifies from its signed anchor, and only from it.
        assert!(verify_signed(&chain[4..], key, &cps).ok, "anchored at 4");
        assert!(verify_signed(&chain[4..], key, &cps[1..]).problem.unwrap().contains("no signed checkpoint"));
        let wrong_anchor = vec![signer.sign(4, chain[2].hash, now), cps[1].clone()];
        assert!(!verify_signed(&chain[4..], key, &wrong_anchor).ok);
        assert!(!verify(&chain[4..]).ok, "without checkpoints a cut start is a break");

        // Modified, deleted and reordered events still fail as before.
        let mut modified = chain.clone();
        modified[5].event.reason = Some("x".into());
        assert_eq!(verify_signed(&modified, key, &cps).broken_at, Some(6));
        let mut deleted = chain.clone();
        deleted.remove(2);
        assert_eq!(verify_signed(&deleted, key, &cps).broken_at, Some(3));
        let mut reordered = chain.clone();
        reordered.swap(5, 6);
        assert_eq!(verify_signed(&reordered, key, &cps).broken_at, Some(6));

        // Records survive a JSON round trip (the export format).
        let line = serde_json::to_string(&chain[1]).unwrap();
        assert_eq!(serde_json::from_str::<AuditRecord>(&line).unwrap(), chain[1]);
    }

    #[test]
    fn batches_continue_the_chain() {
        let a = chain_batch(0, GENESIS_HASH, &[draft("x"), draft("y")]);
        let b = chain_batch(2, a[1].hash, &[draft("z")]);
        let all: Vec<_> = a.into_iter().chain(b).collect();
        assert!(verify(&all).ok);
    }

    #[test]
    fn encoding_is_unambiguous() {
        let mut a = draft("x");
        a.purpose = Some("ab".into());
        a.user_agent = Some("c".into());
        let mut b = draft("x");
        b.purpose = Some("a".into());
        b.user_agent = Some("bc".into());
        assert_ne!(canonical_bytes(1, &a), canonical_bytes(1, &b));
        let mut c = draft("x");
        c.purpose = Some(String::new());
        assert_ne!(canonical_bytes(1, &c), canonical_bytes(1, &draft("x")));
    }

    #[test]
    fn free_text_is_cleaned() {
        assert_eq!(clean_free_text("a\r\nb\u{1b}[31m"), "ab[31m");
        assert_eq!(clean_free_text(&"é".repeat(300)).len(), 256);
    }
}
