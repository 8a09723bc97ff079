//! keyward-server: the HTTPS server (admin API, agent resolve endpoint) and
//! the data-directory set-up it needs (key file, TLS, database). It holds no
//! crypto of its own: every operation is a call into `keyward_core::Vault`.
#![forbid(unsafe_code)]

pub mod app;
pub mod checkpointer;
pub mod config;
pub mod datadir;
mod error;
mod handlers;
pub mod openapi;
pub mod proxy;
pub mod rotation_hooks;
pub mod serve;
pub mod sinks;
pub mod tls;
pub mod webhooks;

pub use config::ServeConfig;
pub use datadir::{DataDir, InitReport, SealChoice};
