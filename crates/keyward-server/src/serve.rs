//! Runs the server over TLS with graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use keyward_core::Vault;

use crate::app;
use crate::handlers::AppState;

/// How long a new connection may take to send its first complete request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds, then calls `on_listening` with the bound address (port 0 picks a
/// free one), then serves until SIGINT/SIGTERM.
pub async fn run(
    vault: Arc<Vault>,
    upstreams: Arc<crate::proxy::Upstreams>,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    on_listening: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight requests (10 s at most)");
        shutdown.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    // TCP_NODELAY: small answers (a resolve, a proxied SSE event) must not
    // wait for Nagle's algorithm and the peer's delayed ACK (~40 ms).
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(RustlsConfig::from_config(tls))
        .handshake_timeout(Duration::from_secs(10))
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    // A connection that sends no complete first request in time is closed:
    // otherwise one that stays silent after the TLS handshake (or after the
    // HTTP/2 preface) holds a socket forever, and enough of them, no token
    // needed, exhaust the server's file descriptors.
    let mut server =
        axum_server::from_tcp(listener)?.acceptor(acceptor).handle(handle).first_request_timeout(FIRST_REQUEST_TIMEOUT);
    server
        .http_builder()
        .http1()
        .max_buf_size(64 * 1024)
        .header_read_timeout(Duration::from_secs(10))
        .timer(hyper_util::rt::TokioTimer::new());
    // Pings find HTTP/2 peers that vanished without closing.
    server
        .http_builder()
        .http2()
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    // Grace periods end on time even when nobody uses the secret.
    let sweeper = Arc::downgrade(&vault);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(v) = sweeper.upgrade() else { break };
            if !v.is_sealed()
                && let Err(e) = v.sweep().await
            {
                tracing::warn!(error = %e, "grace-period sweep failed");
            }
        }
    });
    on_listening(addr);
    let app = app::router(AppState { vault, upstreams });
    server.serve(app.into_make_service_with_connect_info::<SocketAddr>()).await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
