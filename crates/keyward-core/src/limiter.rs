//! Rate limit for failed authentication, per source address. Each failure
//! is audited — which costs a durable write — so an unauthenticated client
//! could otherwise fill the disk and, the trail being fail-closed, stop every
//! access. Past the limit, failures are refused with 429 and summarised in
//! one audit event per burst instead of one each.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const BURST: f64 = 30.0;
const PER_SECOND: f64 = 10.0;
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

#[derive(Default)]
pub(crate) struct FailureLimiter(Mutex<HashMap<String, Bucket>>);

impl FailureLimiter {
    pub(crate) fn failure(&self, source: Option<&str>) -> Verdict {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_SOURCES {
            map.retain(|_, b| b.at.elapsed().as_secs() < 60);
            if map.len() >= MAX_SOURCES {
                map.clear();
            }
        }
        let now = Instant::now();
        let b = map.entry(source.unwrap_or("unknown").to_owned()).or_insert(Bucket {
            tokens: BURST,
            at: now,
            limited: false,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * PER_SECOND).min(BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.limited = false;
            Verdict::Allow
        } else {
            let first = !b.limited;
            b.limited = true;
            Verdict::Limited { first }
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
}
