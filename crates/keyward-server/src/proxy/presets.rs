//! Provider presets: where an agent's SDK puts its (keyward) token, and where
//! and how the real key goes on the way out.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_core::model::{Injection, Provider};
use zeroize::Zeroizing;

use crate::error::ApiError;

/// Headers that carry an agent's credential in some SDK. All are removed
/// before forwarding, whichever held the token.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "x-goog-api-key"];

fn is_agent_token(s: &str) -> bool {
    s.starts_with("kwa_")
}

/// Finds the agent token in the slot its SDK uses: `Authorization: Bearer`,
/// `x-api-key`, `x-goog-api-key`, HTTP Basic (either field), or `?key=`.
/// Returns the token and whether it came from the query.
pub fn find_agent_token(headers: &HeaderMap, query: Option<&str>) -> Option<(Zeroizing<String>, bool)> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(v) = get("authorization")
        && let Some((scheme, rest)) = v.split_once(' ')
    {
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && is_agent_token(rest) {
            return Some((Zeroizing::new(rest.to_owned()), false));
        }
        if scheme.eq_ignore_ascii_case("basic")
            && let Ok(decoded) = STANDARD.decode(rest)
        {
            let decoded = Zeroizing::new(decoded);
            if let Ok(text) = std::str::from_utf8(&decoded)
                && let Some((user, pass)) = text.split_once(':')
            {
                for part in [pass, user] {
                    if is_agent_token(part) {
                        return Some((Zeroizing::new(part.to_owned()), false));
                    }
                }
            }
        }
    }
    for h in ["x-api-key", "x-goog-api-key"] {
        if let Some(v) = get(h).filter(|v| is_agent_token(v)) {
            return Some((Zeroizing::new(v.to_owned()), false));
        }
    }
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "key" && is_agent_token(v)).then(|| (Zeroizing::new(v.to_owned()), true))
    })
}

pub fn strip_agent_credentials(headers: &mut HeaderMap) {
    for h in CREDENTIAL_HEADERS {
        headers.remove(h);
    }
}

/// The query to forward: the agent's `key=kwa_…` pair dropped, every other
/// pair byte for byte.
pub fn forward_query(query: Option<&str>) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| !p.split_once('=').is_some_and(|(k, v)| k == "key" && is_agent_token(v)))
        .map(str::to_owned)
        .collect()
}

fn header_value(s: &str) -> Result<HeaderValue, ApiError> {
    let mut v = HeaderValue::from_str(s).map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "bad_value",
            "the stored value cannot be sent in a header",
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Puts the real key where the provider expects it. `query` receives an
/// extra pair for query-injected generic secrets.
pub fn inject(
    provider: &str,
    rule: Option<&str>,
    value: &str,
    headers: &mut HeaderMap,
    query: &mut Vec<String>,
) -> Result<(), ApiError> {
    let provider = Provider::parse(provider).map_err(ApiError::from)?;
    match provider {
        Provider::Openai | Provider::Stripe | Provider::Slack | Provider::Github => {
            headers.insert(header::AUTHORIZATION, header_value(&format!("Bearer {value}"))?);
        }
        Provider::Anthropic => {
            headers.insert(HeaderName::from_static("x-api-key"), header_value(value)?);
        }
        Provider::Google => {
            headers.insert(HeaderName::from_static("x-goog-api-key"), header_value(value)?);
        }
        Provider::Twilio => {
            let basic = Zeroizing::new(STANDARD.encode(value.as_bytes()));
            headers.insert(header::AUTHORIZATION, header_value(&format!("Basic {}", basic.as_str()))?);
        }
        Provider::Generic => {
            let rule = rule.ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "not_injectable",
                    "this generic secret has no injection rule (secret put --inject)",
                )
            })?;
            match Injection::parse(rule).map_err(ApiError::from)? {
                Injection::Header { name, template } => {
                    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                        ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "bad_rule", "invalid header name")
                    })?;
                    headers.insert(name, header_value(&template.replace("{value}", value))?);
                }
                Injection::Query { name, template } => {
                    let rendered = Zeroizing::new(template.replace("{value}", value));
                    query.push(format!("{}={}", percent_encode(&name), percent_encode(&rendered)));
                }
            }
        }
    }
    Ok(())
}

/// The parts of a value that are keys on their own, for redaction.
pub fn key_parts(provider: &str, value: &str) -> Vec<String> {
    let mut parts = vec![value.to_owned()];
    if provider == Provider::Twilio.as_str()
        && let Some((_, token)) = value.split_once(':')
    {
        parts.push(token.to_owned());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "kwa_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefgAAAAAA";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn finds_the_token_in_every_sdk_slot() {
        let basic = STANDARD.encode(format!("ACxxxx:{T}"));
        for (h, q) in [
            (headers(&[("authorization", &format!("Bearer {T}"))]), None),
            (headers(&[("x-api-key", T)]), None),
            (headers(&[("x-goog-api-key", T)]), None),
            (headers(&[("authorization", &format!("Basic {basic}"))]), None),
            (headers(&[]), Some(format!("alt=sse&key={T}"))),
        ] {
            let (tok, from_query) = find_agent_token(&h, q.as_deref()).expect("found");
            assert_eq!(tok.as_str(), T);
            assert_eq!(from_query, q.is_some());
        }
        assert!(find_agent_token(&headers(&[("authorization", "Bearer sk-real")]), None).is_none());
    }

    #[test]
    fn query_keeps_everything_but_the_agent_key() {
        assert_eq!(forward_query(Some(&format!("alt=sse&key={T}&x=%2F"))), vec!["alt=sse", "x=%2F"]);
        assert_eq!(forward_query(Some("key=AIzaReal")), vec!["key=AIzaReal"]);
    }

    #[test]
    fn injection_per_preset() {
        let mut h = HeaderMap::new();
        let mut q = Vec::new();
        inject("openai", None, "sk-1", &mut h, &mut q).unwrap();
        assert_eq!(h["authorization"], "Bearer sk-1");
        inject("anthropic", None, "sk-ant", &mut h, &mut q).unwrap();
        assert_eq!(h["x-api-key"], "sk-ant");
        inject("twilio", None, "AC1:tok", &mut h, &mut q).unwrap();
        assert_eq!(h["authorization"], format!("Basic {}", STANDARD.encode("AC1:tok")));
        inject("generic", Some("query:api_key:{value}"), "a b", &mut h, &mut q).unwrap();
        assert_eq!(q, vec!["api_key=a%20b"]);
        assert!(inject("generic", None, "v", &mut h, &mut q).is_err());
    }
}
