//! keyward-core: the domain, the crypto envelope, the seals, the audit chain,
//! the `Store` trait and the [`Vault`] — the one place where a secret is
//! decrypted. It knows no HTTP and no SQL dialect.
#![forbid(unsafe_code)]

pub mod anomaly;
pub mod audit;
pub mod audit_writer;
mod cache;
pub mod checkpoint;
pub mod clock;
pub mod crypto;
pub mod duration;
pub mod error;
mod limiter;
pub mod model;
pub mod notify;
pub mod rotation;
pub mod seal;
pub mod store;
pub mod token;
pub mod vault;

pub use error::{CoreError, ErrorKind};
pub use vault::Vault;
