//! HTTP errors: `{"error": {"code": "...", "message": "..."}}` with the
//! right status. Internal details go to the log, not to the client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyward_core::CoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = StatusCode::from_u16(e.kind().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %e, code = e.code(), "request failed");
        }
        Self { status, code: e.code(), message: e.public_message() }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection::*;
        match r {
            JsonDataError(e) => Self::bad_request(
                "invalid_json",
                format!("request body does not match: {}", without_quoted_input(&e.body_text())),
            ),
            JsonSyntaxError(_) => Self::bad_request("invalid_json", "request body is not valid JSON"),
            MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_content_type",
                "expected Content-Type: application/json",
            ),
            BytesRejection(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "request body is too large")
            }
            other => Self::bad_request("invalid_json", without_quoted_input(&other.body_text())),
        }
    }
}

/// A deserializer's message without the input it quotes: serde names the
/// offending input in backticks (`` integer `12345678` ``) or double quotes
/// (`string "sk-…"`), and that input can be a value sent as the wrong type
/// or in the wrong field. The field path and what was expected stay.
pub(crate) fn without_quoted_input(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    open = Some(c);
                }
            }
        }
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializer_messages_lose_the_input_they_quote() {
        for (message, want) in [
            (
                "value: invalid type: integer `12345678`, expected a string at line 1 column 30",
                "value: invalid type: integer `…`, expected a string at line 1 column 30",
            ),
            (
                "name: invalid type: string \"sk-live-abc\", expected u64",
                "name: invalid type: string \"…\", expected u64",
            ),
            ("missing field `name`", "missing field `…`"),
            ("no quotes at all", "no quotes at all"),
            ("unclosed `sk-live-abc", "unclosed `"),
        ] {
            assert_eq!(without_quoted_input(message), want);
        }
    }
}
