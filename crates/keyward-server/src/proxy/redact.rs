//! Keeps the real key from reaching the agent even when the upstream echoes
//! it: every occurrence of the value — as is, JSON-escaped the ways common
//! encoders escape, percent-encoded, or base64-encoded (standard or URL-safe
//! alphabet, at any byte alignment) — in response headers and body is
//! replaced, also when it is split across streamed chunks.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

pub const REPLACEMENT: &[u8] = b"[redacted by keyward]";
/// Shorter forms would match innocent text; keys are far longer.
const MIN_FORM: usize = 8;

pub struct Redactor {
    forms: Vec<Zeroizing<Vec<u8>>>,
    longest: usize,
    /// Bytes some form starts with: every other position is skipped
    /// without comparing (most of a body).
    starts: [bool; 256],
    carry: Zeroizing<Vec<u8>>,
}

fn percent_encoded(value: &[u8], upper: bool, plus_for_space: bool, keep_slash: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b);
        } else if b == b' ' && plus_for_space {
            out.push(b'+');
        } else if upper {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
    }
    out
}

/// A JSON string's escaping of `value`: `"` and `\` always (every
/// encoder), `/` as `\/` if `slash` (PHP, some Java), and `<`, `>`, `&` as
/// `\u003c`… if `html` (Go's default).
fn json_escaped(value: &[u8], slash: bool, html: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 8);
    for &b in value {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'/' if slash => out.extend_from_slice(b"\\/"),
            b'<' | b'>' | b'&' if html => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

/// The forms a value can be echoed in: as is, JSON-escaped,
/// percent-encoded (a query-injected key echoed in a URL; `/` encoded or
/// kept, as Python's `quote` keeps it), and base64.
fn forms_of(value: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = vec![Zeroizing::new(value.to_vec())];
    // Unreserved bytes only (most API keys): every JSON and percent form is
    // the value itself, so they are not built on each request.
    let plain = value.iter().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b));
    if !plain {
        for (slash, html) in [(false, false), (true, false), (false, true), (true, true)] {
            forms.push(Zeroizing::new(json_escaped(value, slash, html)));
        }
        for upper in [true, false] {
            for plus in [false, true] {
                for keep_slash in [false, true] {
                    forms.push(Zeroizing::new(percent_encoded(value, upper, plus, keep_slash)));
                }
            }
        }
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for offset in 0..3usize {
            let mut input = Zeroizing::new(vec![0u8; offset]);
            input.extend_from_slice(value);
            let encoded = Zeroizing::new(engine.encode(&*input).into_bytes());
            // Characters that mix in bits of the bytes around the value
            // depend on its neighbours: keep only the ones it alone decides.
            let skip_start = (offset * 4).div_ceil(3);
            let skip_end = usize::from(input.len() % 3 != 0);
            if encoded.len() > skip_start + skip_end {
                forms.push(Zeroizing::new(encoded[skip_start..encoded.len() - skip_end].to_vec()));
            }
        }
    }
    forms.retain(|f| f.len() >= MIN_FORM);
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup_by(|a, b| a[..] == b[..]);
    forms
}

impl Redactor {
    /// `values`: the secret value and any part of it that is a key on its
    /// own (a twilio value's auth token).
    pub fn new(values: &[&[u8]]) -> Self {
        let forms: Vec<_> = values.iter().flat_map(|v| forms_of(v)).collect();
        let longest = forms.iter().map(|f| f.len()).max().unwrap_or(0);
        let mut starts = [false; 256];
        for f in &forms {
            starts[usize::from(f[0])] = true;
        }
        Self { forms, longest, starts, carry: Zeroizing::new(Vec::new()) }
    }

    fn match_at(&self, buf: &[u8], i: usize) -> Option<usize> {
        if !self.starts[usize::from(buf[i])] {
            return None;
        }
        self.forms.iter().find(|f| buf[i..].starts_with(f)).map(|f| f.len())
    }

    /// Copies `buf[..end]` to `out` with every form replaced, in runs rather
    /// than byte by byte. A match starting before `end` may run past it;
    /// returns where copying stopped (`>= end`) and whether anything matched.
    fn replace_into(&self, buf: &[u8], end: usize, out: &mut Vec<u8>) -> (usize, bool) {
        let (mut i, mut copied, mut hit) = (0, 0, false);
        while i < end {
            match self.match_at(buf, i) {
                Some(n) => {
                    out.extend_from_slice(&buf[copied..i]);
                    out.extend_from_slice(REPLACEMENT);
                    i += n;
                    copied = i;
                    hit = true;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&buf[copied..i]);
        (i, hit)
    }

    /// Redacts a complete value (a header, a whole answer); `None` when it
    /// holds no form of the key (nothing is copied then).
    pub fn redact_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        let first = (0..input.len()).find(|&i| self.match_at(input, i).is_some())?;
        let mut out = Vec::with_capacity(input.len());
        out.extend_from_slice(&input[..first]);
        self.replace_into(&input[first..], input.len() - first, &mut out);
        Some(out)
    }

    /// How many trailing bytes of `buf` could be the start of a form (and
    /// must wait for the next chunk). Usually none: an SSE event ending in
    /// a blank line is sent whole, at once.
    fn held_back(&self, buf: &[u8]) -> usize {
        let max = buf.len().min(self.longest.saturating_sub(1));
        (1..=max).rev().find(|&k| self.forms.iter().any(|f| f.starts_with(&buf[buf.len() - k..]))).unwrap_or(0)
    }

    /// Feeds one chunk; returns what can be sent now. Only a tail that
    /// could begin an echo of the key is held back for the next chunk.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.forms.is_empty() {
            return chunk.to_vec();
        }
        self.carry.extend_from_slice(chunk);
        let buf = std::mem::take(&mut *self.carry);
        let keep_from = buf.len() - self.held_back(&buf);
        let mut out = Vec::with_capacity(buf.len());
        let (i, _) = self.replace_into(&buf, keep_from, &mut out);
        // A match that started before `keep_from` may have consumed past it.
        self.carry.extend_from_slice(&buf[i..]);
        let _ = Zeroizing::new(buf);
        out
    }

    /// End of stream: releases the held-back tail, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let tail = std::mem::take(&mut *self.carry);
        let out = self.redact_all(&tail).unwrap_or_else(|| tail.clone());
        let _ = Zeroizing::new(tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";

    fn run(r: &mut Redactor, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.push(c));
        }
        out.extend(r.finish());
        out
    }

    fn contains(h: &[u8], n: &[u8]) -> bool {
        h.windows(n.len()).any(|w| w == n)
    }

    #[test]
    fn plain_echo_is_replaced_whatever_the_chunking() {
        let body = [b"{\"echo\":\"".as_slice(), KEY, b"\",\"n\":1}"].concat();
        for split in 0..body.len() {
            for split2 in split..body.len() {
                let mut r = Redactor::new(&[KEY]);
                let out = run(&mut r, &[&body[..split], &body[split..split2], &body[split2..]]);
                assert!(!contains(&out, KEY), "split {split}/{split2}");
                assert_eq!(out, [b"{\"echo\":\"".as_slice(), REPLACEMENT, b"\",\"n\":1}"].concat());
            }
        }
    }

    #[test]
    fn base64_echo_at_any_alignment_is_replaced() {
        for prefix in ["", "a", "ab", "Bearer:"] {
            for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE] {
                let input = [prefix.as_bytes(), KEY, b"tail"].concat();
                let encoded = engine.encode(&input);
                let mut r = Redactor::new(&[KEY]);
                let out = run(&mut r, &[encoded.as_bytes()]);
                assert!(contains(&out, REPLACEMENT), "prefix {prefix:?}: {}", String::from_utf8_lossy(&out));
                // What is left cannot be decoded back into the key.
                let left = String::from_utf8_lossy(&out).replace("[redacted by keyward]", "");
                assert!(left.len() < encoded.len() / 2, "prefix {prefix:?}");
            }
        }
    }

    #[test]
    fn innocent_bodies_pass_unchanged() {
        let mut r = Redactor::new(&[KEY]);
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n".repeat(50);
        let out = run(&mut r, &body.chunks(7).collect::<Vec<_>>());
        assert_eq!(out, body);
    }

    #[test]
    fn percent_encoded_and_json_escaped_echoes_are_replaced() {
        let value = b"gen+KEY/with=chars 1234567890";
        let r = Redactor::new(&[value]);
        for echo in [
            "api_key=gen%2BKEY%2Fwith%3Dchars%201234567890",
            "api_key=gen%2bKEY%2fwith%3dchars%201234567890",
            "api_key=gen%2BKEY%2Fwith%3Dchars+1234567890",
            "{\"k\":\"gen+KEY\\/with=chars 1234567890\"}",
            // Python's quote() keeps `/`.
            "api_key=gen%2BKEY/with%3Dchars%201234567890",
        ] {
            let out = r.redact_all(echo.as_bytes()).unwrap_or_else(|| panic!("missed {echo}"));
            assert!(String::from_utf8_lossy(&out).contains("[redacted by keyward]"), "{echo}");
        }
    }

    #[test]
    fn json_escapes_of_every_common_encoder_are_replaced() {
        let value = br#"k3y"with\back/slash&<amp>"#;
        let r = Redactor::new(&[value]);
        for echo in [
            r#"{"k":"k3y\"with\\back/slash&<amp>"}"#,                // serde, Python
            r#"{"k":"k3y\"with\\back\/slash&<amp>"}"#,               // PHP
            r#"{"k":"k3y\"with\\back/slash\u0026\u003camp\u003e"}"#, // Go
        ] {
            let out = r.redact_all(echo.as_bytes()).unwrap_or_else(|| panic!("missed {echo}"));
            assert_eq!(out, br#"{"k":"[redacted by keyward]"}"#, "{echo}");
        }
    }

    #[test]
    fn complete_events_are_not_held_back() {
        let mut r = Redactor::new(&[KEY]);
        let event = b"data: {\"delta\":\"hi\"}\n\n";
        assert_eq!(r.push(event), event.to_vec(), "nothing held back after a blank line");
        // A tail that could start the key waits for the next chunk.
        let out = r.push(b"data: sk-pro");
        assert_eq!(out, b"data: ".to_vec());
        let out = r.push(b"ject");
        assert_eq!(out, b"sk-project".to_vec());
    }

    #[test]
    fn headers() {
        let r = Redactor::new(&[KEY]);
        assert!(r.redact_all(b"no key here").is_none());
        let h = r.redact_all(&[b"Bearer ".as_slice(), KEY].concat()).unwrap();
        assert_eq!(h, [b"Bearer ".as_slice(), REPLACEMENT].concat());
    }
}
