//! The HTTP/1.1 accept loop: one hyper connection task per client, stopped
//! gracefully on shutdown.
//!
//! `axum::serve` would do, but it reads the first bytes of every connection
//! to tell HTTP/2 from HTTP/1.1, and the gateway speaks only HTTP/1.1: going
//! straight to hyper's HTTP/1.1 connection saves about 3% of the instructions
//! of a small request (`bench/instructions.sh`).
//!
//! Answers to pipelined requests leave together through [`cork`] (in one
//! benchmark round, 8 pipelined 1-input requests per connection cost the
//! gateway 8 µs of CPU each instead of 12). hyper's
//! own `pipeline_flush` would do that too, but it buffers a whole response
//! body however large (a 2048-input answer is 16 MB or more) and the
//! connection keeps that buffer for its life. hyper's header read timeout
//! starts a timer on every request and also closes keep-alive connections
//! idle for that long, which pooled clients race against.

mod cork;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use self::cork::{Cork, Corked};

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
        let cork = Arc::new(Cork::default());
        let io = TokioIo::new(Corked::new(io, Arc::clone(&cork)));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = cork.flush_when_idle(connection).await {
                // A client that went away mid-request: nothing to answer.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
