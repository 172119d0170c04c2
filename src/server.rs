//! The HTTP/1.1 accept loop: one hyper connection task per client, stopped
//! gracefully on shutdown.
//!
//! `axum::serve` would do, but it gives no access to hyper's connection
//! settings and detects the protocol on every connection for HTTP/2, which
//! the gateway does not speak. Here the connection is configured for what
//! clients of an embedding API do: many small keep-alive requests, sometimes
//! pipelined.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// A client gets this long to send a request's headers (hyper's default,
/// which applies only once a timer is set).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on every connection `listener` accepts until `shutdown`
/// resolves, then stops accepting and waits for the open connections to
/// finish the requests they have started.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Answers to pipelined requests leave in one write, not one each.
        .pipeline_flush(true);
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        // `Listener::accept` retries (and logs) failed accepts itself.
        let (io, _remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client that went away mid-request: nothing to answer.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
