//! Rate limit for failed authentication, per source address and in all.
//! Each failure is audited — which costs a durable write — so an
//! unauthenticated client could otherwise fill the disk and, the trail being
//! fail-closed, stop every access. Past a limit, failures are refused with
//! 429 and summarised in one audit event per burst instead of one each. An
//! IPv6 source counts by its /64 (one host can rotate through the rest), and
//! a global budget holds however many sources a client finds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

const BURST: f64 = 30.0;
const PER_SECOND: f64 = 10.0;
/// All sources together.
const GLOBAL_BURST: f64 = 1000.0;
const GLOBAL_PER_SECOND: f64 = 200.0;
const MAX_SOURCES: usize = 10_000;

pub(crate) enum Verdict {
    /// Audit this failure as usual.
    Allow,
    /// Over the limit: refuse; `first` is true for the first refusal of a
    /// burst (audit one summary event then).
    Limited { first: bool },
}

struct Bucket {
    tokens: f64,
    at: Instant,
    limited: bool,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Bucket { tokens: burst, at: now, limited: false }
    }

    /// Takes a token if there is one, after refilling since the last call.
    fn take(&mut self, burst: f64, per_second: f64, now: Instant) -> Verdict {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * per_second).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.limited = false;
            Verdict::Allow
        } else {
            let first = !self.limited;
            self.limited = true;
            Verdict::Limited { first }
        }
    }
}

struct Buckets {
    sources: HashMap<String, Bucket>,
    global: Bucket,
}

pub(crate) struct FailureLimiter(Mutex<Buckets>);

impl Default for FailureLimiter {
    fn default() -> Self {
        let global = Bucket::full(GLOBAL_BURST, Instant::now());
        FailureLimiter(Mutex::new(Buckets { sources: HashMap::new(), global }))
    }
}

/// What a source counts as: an IPv4 address, or an IPv6 address's /64.
fn source_key(source: Option<&str>) -> String {
    match source.and_then(|s| s.parse::<IpAddr>().ok()) {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(|v4| v4.to_string()).unwrap_or_default(),
        Some(IpAddr::V4(v4)) => v4.to_string(),
        None => source.unwrap_or("unknown").to_owned(),
    }
}

impl FailureLimiter {
    /// Whether a failure from `source` would be refused now (its address or
    /// all sources over the limit). A guess is checked against it before it
    /// is tried: past the limit even the right password gets 429 and so
    /// teaches nothing.
    pub(crate) fn over_limit(&self, source: Option<&str>) -> bool {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let left = |b: &Bucket, burst: f64, per_second: f64| {
            (b.tokens + now.duration_since(b.at).as_secs_f64() * per_second).min(burst)
        };
        guard.sources.get(&source_key(source)).is_some_and(|b| left(b, BURST, PER_SECOND) < 1.0)
            || left(&guard.global, GLOBAL_BURST, GLOBAL_PER_SECOND) < 1.0
    }

    pub(crate) fn failure(&self, source: Option<&str>) -> Verdict {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Buckets { sources, global } = &mut *guard;
        if sources.len() >= MAX_SOURCES {
            sources.retain(|_, b| b.at.elapsed().as_secs() < 60);
            if sources.len() >= MAX_SOURCES {
                sources.clear();
            }
        }
        let now = Instant::now();
        let bucket = sources.entry(source_key(source)).or_insert_with(|| Bucket::full(BURST, now));
        match bucket.take(BURST, PER_SECOND, now) {
            Verdict::Allow => global.take(GLOBAL_BURST, GLOBAL_PER_SECOND, now),
            limited => limited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_cut_and_sources_are_separate() {
        let l = FailureLimiter::default();
        for _ in 0..30 {
            assert!(matches!(l.failure(Some("10.0.0.1")), Verdict::Allow));
        }
        assert!(matches!(l.failure(Some("10.0.0.1")), Verdict::Limited { first: true }));
        assert!(matches!(l.failure(Some("10.0.0.1")), Verdict::Limited { first: false }));
        assert!(matches!(l.failure(Some("10.0.0.2")), Verdict::Allow));
    }

    #[test]
    fn over_limit_looks_without_taking() {
        let l = FailureLimiter::default();
        assert!(!l.over_limit(Some("10.0.0.9")));
        for _ in 0..30 {
            assert!(!l.over_limit(Some("10.0.0.9")), "looking takes nothing");
            assert!(matches!(l.failure(Some("10.0.0.9")), Verdict::Allow));
        }
        assert!(l.over_limit(Some("10.0.0.9")));
        assert!(!l.over_limit(Some("10.0.0.10")));
    }

    #[test]
    fn an_ipv6_host_cannot_rotate_out_of_its_limit() {
        let l = FailureLimiter::default();
        for i in 0..30 {
            assert!(matches!(l.failure(Some(&format!("2001:db8:1:2::{i:x}"))), Verdict::Allow));
        }
        assert!(matches!(l.failure(Some("2001:db8:1:2:ffff::1")), Verdict::Limited { first: true }));
        assert!(matches!(l.failure(Some("2001:db8:1:3::1")), Verdict::Allow), "another /64");
    }

    #[test]
    fn many_sources_share_one_budget() {
        let l = FailureLimiter::default();
        let mut allowed = 0;
        let mut summaries = 0;
        for i in 0..2000u32 {
            let source = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            match l.failure(Some(&source)) {
                Verdict::Allow => allowed += 1,
                Verdict::Limited { first } => summaries += usize::from(first),
            }
        }
        // The burst, and what refilled while the loop ran (well under a second).
        assert!((1000..1200).contains(&allowed), "{allowed} allowed");
        assert_eq!(summaries, 1, "one summary for the burst");
    }
}
