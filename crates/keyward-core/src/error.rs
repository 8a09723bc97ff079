//! The core's error type. Each variant carries enough context to explain the
//! failure to a human and maps to one stable machine-readable code; none ever
//! carries a secret value or a token.

use crate::crypto::CryptoError;
use crate::store::StoreError;

/// Coarse class of an error, which adapters map to a transport status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    InvalidInput,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    RateLimited,
    Unavailable,
    /// Something keyward depends on (a rotation hook, a provider) failed.
    Dependency,
    Internal,
}

impl ErrorKind {
    /// The HTTP status adapters answer with (the API and the dashboard).
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidInput => 400,
            Self::Unauthenticated => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::Dependency => 502,
            Self::Internal => 500,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error("invalid {field}: {message}")]
    InvalidInput { field: &'static str, message: String },
    #[error("authentication failed: {reason}")]
    Unauthenticated { reason: &'static str },
    #[error("not allowed: {reason}")]
    Forbidden { code: &'static str, reason: String },
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("{message}")]
    Conflict { message: String },
    #[error("the vault is sealed; run `keyward unseal`")]
    Sealed,
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("too many failed attempts from this address; slow down")]
    RateLimited,
    #[error("automated rotation failed at {stage}: {message}; the current version is unchanged")]
    RotationFailed { stage: &'static str, message: String },
    #[error("a required audit sink cannot take events ({0}), so the request was refused")]
    AuditSinkDown(&'static str),
    #[error("the audit trail cannot be written, so the request was refused: {0}")]
    AuditUnavailable(#[source] StoreError),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("cryptographic failure: {0}")]
    Crypto(#[from] CryptoError),
}

impl CoreError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput { field, message: message.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidInput { .. } => ErrorKind::InvalidInput,
            Self::Unauthenticated { .. } | Self::WrongPassphrase => ErrorKind::Unauthenticated,
            Self::Forbidden { .. } => ErrorKind::Forbidden,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Conflict { .. } => ErrorKind::Conflict,
            Self::RateLimited => ErrorKind::RateLimited,
            Self::RotationFailed { .. } => ErrorKind::Dependency,
            Self::Sealed | Self::AuditUnavailable(_) | Self::AuditSinkDown(_) => ErrorKind::Unavailable,
            Self::Store(StoreError::Unavailable(_)) => ErrorKind::Unavailable,
            Self::Store(_) | Self::Crypto(_) => ErrorKind::Internal,
        }
    }

    /// Stable code for clients (`{"error":{"code": ...}}`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidInput { .. } => "invalid_input",
            Self::Unauthenticated { reason } => reason,
            Self::Forbidden { code, .. } => code,
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::Sealed => "sealed",
            Self::WrongPassphrase => "wrong_passphrase",
            Self::RateLimited => "rate_limited",
            Self::RotationFailed { .. } => "rotation_failed",
            Self::AuditUnavailable(_) => "audit_unavailable",
            Self::AuditSinkDown(_) => "audit_sink_unavailable",
            Self::Store(StoreError::Unavailable(_)) => "store_unavailable",
            Self::Store(_) => "store_error",
            Self::Crypto(CryptoError::Integrity) => "integrity_error",
            Self::Crypto(_) => "crypto_error",
        }
    }

    /// Message safe to show a client: internal details stay in the log.
    pub fn public_message(&self) -> String {
        match self.kind() {
            ErrorKind::Internal => "internal error; see the server log".to_owned(),
            ErrorKind::Unavailable if !matches!(self, Self::Sealed) => match self {
                Self::AuditUnavailable(_) => "the audit trail cannot be written, so the request was refused".to_owned(),
                Self::AuditSinkDown(_) => self.to_string(),
                _ => "storage is unavailable; try again".to_owned(),
            },
            _ => self.to_string(),
        }
    }
}
