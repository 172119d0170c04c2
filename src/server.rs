//! The HTTP/1.1 accept loop: one hyper connection task per client, stopped
//! gracefully on shutdown.
//!
//! `axum::serve` would do, but it reads the first bytes of every connection
//! to tell HTTP/2 from HTTP/1.1, and the gateway speaks only HTTP/1.1: going
//! straight to hyper's HTTP/1.1 connection costs about 3% fewer instructions
//! per small request (`bench/instructions.sh`).
//!
//! hyper's defaults are kept on purpose. `pipeline_flush` would send the
//! answers to pipelined requests in one write, but it buffers a whole
//! response body however large (a 2048-input answer is 16 MB or more) and
//! the connection keeps that buffer for its life. The header read timeout
//! starts a timer on every request and also closes keep-alive connections
//! idle for that long, which pooled clients race against.

use std::future::Future;
use std::pin::pin;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// Serves `router` on every connection `listener` accepts until `shutdown`
/// resolves, then stops accepting and waits for the open connections to
/// finish the requests they have started.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let http = http1::Builder::new();
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
