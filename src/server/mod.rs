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
//! connection keeps that buffer for its life.
//!
//! What a client can hold is bounded: hyper's header read timeout (a clock
//! read and a timer per request head) closes a connection that sends no
//! complete request head in time, idle keep-alive ones included (a pooled
//! client must let go of idle connections sooner, or race the close); at most [`ServerLimits::max_connections`] are open,
//! more wait in the listen backlog (the cap is fitted to the open-file
//! limit by [`open_files`]); and shutdown waits at most
//! [`ServerLimits::drain_timeout`] for open requests.

mod cork;
pub mod open_files;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::cork::{Cork, Corked};

/// What the accept loop allows clients.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Open files the rest of the gateway may need
    /// ([`open_files::besides_connections`]).
    pub other_files: u64,
    pub drain_timeout: Duration,
}

/// Serves `router` on every connection `listener` accepts until `shutdown`
/// resolves, then stops accepting and waits for the open connections to
/// finish the requests they have started, until the drain deadline, which
/// it returns; connections still open then are dropped.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> Instant {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let max_connections = open_files::connection_cap(limits.max_connections, limits.other_files);
    let slots = Arc::new(Semaphore::new(
        max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        // A connection is accepted only once it has a slot, as in tokio's
        // mini-redis; the slot is freed when its task ends.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        // `Listener::accept` retries failed accepts itself, pausing a
        // second after any but a connection's own error.
        let (io, _remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let cork = Arc::new(Cork::default());
        let io = TokioIo::new(Corked::new(io, Arc::clone(&cork)));
        let connection = graceful.watch(http.serve_connection(io, service));
        connections.spawn(async move {
            if let Err(e) = cork.flush_when_idle(connection).await {
                // A client that went away mid-request, or sent no request
                // in time: nothing to answer.
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
        // Forget the finished ones, so the set stays the size of the open.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let deadline = Instant::now() + limits.drain_timeout;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        while connections.try_join_next().is_some() {}
        tracing::warn!(
            open = connections.len(),
            "drain deadline passed: dropping the connections still open"
        );
    }
    connections.shutdown().await;
    deadline
}
