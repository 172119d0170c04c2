//! embgate: an OpenAI-compatible gateway that caches embeddings in Redis, so
//! the same input is paid for once.
//!
//! A request flows `routes` -> `protocol` (parse) -> `pipeline` (`key`,
//! `l1`, `store`, `inflight`, `upstream`, `entry`) -> `body` (rendered by
//! `protocol`).

pub mod auth;
pub mod body;
pub mod config;
pub mod entry;
pub mod error;
pub mod housekeeping;
pub mod inflight;
pub mod key;
pub mod l1;
pub mod ledger;
pub mod metrics;
pub mod migrate;
#[path = "../migrations/mod.rs"]
pub mod migrations;
pub mod passthrough;
pub mod pipeline;
pub mod protocol;
pub mod routes;
pub mod server;
pub mod signal;
pub mod stats;
pub mod store;
pub mod tokens;
pub mod upstream;
pub mod warm;

use std::sync::Arc;

use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::Settings;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pipeline::Embedder;
use crate::routes::AppState;
use crate::store::Store;
use crate::upstream::Upstreams;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("auth: {0}")]
    Auth(String),
    #[error(transparent)]
    Keyspace(migrate::MigrateError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A configured gateway, ready to serve.
pub struct Gateway {
    pub router: axum::Router,
    pub embedder: Arc<Embedder>,
    pub metrics: Arc<Metrics>,
    pub ledger: Arc<Ledger>,
    sync_every: Duration,
}

impl Gateway {
    pub fn new(settings: &Settings) -> Result<Gateway, StartupError> {
        let metrics = Arc::new(Metrics::new()?);
        let store = Store::connect_lazy(&settings.store)?;
        let upstreams = Upstreams::new(settings, &metrics).map_err(StartupError::Upstream)?;
        let auth = Arc::new(Auth::new(settings, Arc::clone(&metrics)).map_err(StartupError::Auth)?);
        let ledger = Arc::new(Ledger::new(
            store.clone(),
            &settings.store.key_prefix,
            Arc::clone(&metrics),
        ));
        let embedder = Arc::new(Embedder::new(
            settings,
            store,
            upstreams,
            Arc::clone(&metrics),
            Arc::clone(&ledger),
        ));
        let state = AppState {
            auth,
            embedder: Arc::clone(&embedder),
            metrics: Arc::clone(&metrics),
            limits: settings.limits.request(),
            max_body_bytes: settings.limits.max_body_bytes,
        };
        Ok(Gateway {
            router: routes::router(state),
            embedder,
            metrics,
            ledger,
            sync_every: Duration::from_secs(settings.ledger.sync_secs),
        })
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests
    /// and the cache writes they started.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let stop = CancellationToken::new();
        let housekeeping = tokio::spawn(housekeeping::run(
            Arc::clone(&self.ledger),
            self.embedder.store().clone(),
            Arc::clone(&self.metrics),
            self.sync_every,
            stop.clone(),
        ));
        // Without TCP_NODELAY a response written in more than one piece (a
        // streamed body, or pipelined answers) waits out the client's
        // delayed ACK, 40 ms on Linux.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        server::serve(listener, self.router, shutdown).await;
        // In-flight fetches finish and store before the ledger's last flush.
        self.embedder.drain().await;
        stop.cancel();
        let _ = housekeeping.await;
    }
}

/// Binds `settings.listen` and serves until `shutdown`.
pub async fn run(
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let gateway = Gateway::new(settings)?;
    match migrate::check(gateway.embedder.store(), &settings.store.key_prefix).await {
        Ok(()) => {}
        Err(e @ (migrate::MigrateError::Newer { .. } | migrate::MigrateError::Older { .. })) => {
            return Err(StartupError::Keyspace(e));
        }
        // Redis unreachable: serve from the vendor; the check runs next start.
        Err(e) => tracing::warn!(error = %e, "keyspace version not checked"),
    }
    let listener = TcpListener::bind(&settings.listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: settings.listen.clone(),
            source,
        })?;
    tracing::info!(
        listen = %settings.listen,
        upstream = %gateway.embedder.upstreams().default().base_url(),
        auth = ?settings.auth_mode(),
        "embgate serving"
    );
    gateway.serve(listener, shutdown).await;
    Ok(())
}
