//! embgate: an OpenAI-compatible gateway that caches embeddings, so the
//! same input is paid for once.
//!
//! A request flows top to bottom through the modules: `server` (HTTP/1.1
//! connections) -> `routes` (`auth`, `protocol` parses) -> `pipeline`
//! (coordinates) -> `cache` (keys, L1, store) or `vendor` (misses) ->
//! `accounting` (tokens and dollars) -> `body` (the response, rendered by
//! `protocol`).

pub mod accounting;
pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod housekeeping;
pub mod metrics;
pub mod migrate;
#[path = "../migrations/mod.rs"]
pub mod migrations;
pub mod passthrough;
pub mod pipeline;
pub mod protocol;
pub mod purge;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod signal;
pub mod stats;
pub mod vendor;
pub mod warm;

use std::sync::Arc;

use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accounting::Accounting;
use crate::accounting::ledger::Ledger;
use crate::auth::Auth;
use crate::cache::Cache;
use crate::cache::store::{self, Store, StoreError};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::routes::AppState;
use crate::server::ServerLimits;
use crate::vendor::Upstreams;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error(transparent)]
    Keyspace(migrate::MigrateError),
    #[error("purge: {0}")]
    Purge(purge::PurgeError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// The cache engine without HTTP: what `serve` and `warm` share.
pub struct Engine {
    pub metrics: Arc<Metrics>,
    pub cache: Arc<Cache>,
    pub upstreams: Arc<Upstreams>,
    pub accounting: Arc<Accounting>,
    pub pipeline: Arc<Pipeline>,
}

impl Engine {
    pub fn new(settings: &Settings) -> Result<Engine, StartupError> {
        let metrics = Arc::new(Metrics::new()?);
        let store = store::open(&settings.store)?;
        Self::with_store(settings, store, metrics)
    }

    /// An engine on a store opened already (tests share one).
    pub fn with_store(
        settings: &Settings,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, StartupError> {
        for collector in store.collectors() {
            metrics.register(collector)?;
        }
        let cache = Arc::new(Cache::new(
            Arc::clone(&store),
            &settings.store,
            settings.l1.max_bytes,
            settings.cache.shortest_ttl(),
            Arc::clone(&metrics),
        ));
        let upstreams =
            Arc::new(Upstreams::new(settings, &metrics).map_err(StartupError::Upstream)?);
        let ledger = Arc::new(Ledger::new(store, Arc::clone(&metrics)));
        let accounting = Arc::new(Accounting::new(
            settings,
            upstreams.exact_models().map(str::to_owned),
            Arc::clone(&metrics),
            ledger,
        ));
        let pipeline = Arc::new(Pipeline::new(
            settings,
            Arc::clone(&cache),
            Arc::clone(&accounting),
        ));
        Ok(Engine {
            metrics,
            cache,
            upstreams,
            accounting,
            pipeline,
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        self.cache.store()
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        self.accounting.ledger()
    }

    /// Waits for fetches and cache writes still running (until `deadline`,
    /// if any), then writes the ledger one last time.
    pub async fn finish(&self, deadline: Option<tokio::time::Instant>) {
        let drain = self.pipeline.drain();
        let drained = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, drain).await.is_ok(),
            None => {
                drain.await;
                true
            }
        };
        if !drained {
            tracing::warn!(
                "drain deadline passed: fetches and writes still running are not stored"
            );
        }
        if let Err(e) = self.ledger().flush().await {
            tracing::warn!(error = %e, "final ledger flush failed; savings since the last flush are not in the ledger");
        }
    }
}

/// A configured gateway, ready to serve.
pub struct Gateway {
    pub router: axum::Router,
    pub engine: Engine,
    sync_every: Duration,
    limits: ServerLimits,
}

impl Gateway {
    pub fn new(settings: &Settings) -> Result<Gateway, StartupError> {
        Self::on(settings, Engine::new(settings)?)
    }

    /// A gateway serving `engine`.
    pub fn on(settings: &Settings, engine: Engine) -> Result<Gateway, StartupError> {
        let auth = Arc::new(Auth::new(settings, Arc::clone(&engine.metrics))?);
        let passthrough =
            passthrough::Allowlist::parse(&settings.passthrough.allow).map_err(|reason| {
                config::ConfigError::Invalid {
                    key: "passthrough.allow",
                    reason,
                }
            })?;
        let state = AppState {
            auth,
            upstreams: Arc::clone(&engine.upstreams),
            pipeline: Arc::clone(&engine.pipeline),
            accounting: Arc::clone(&engine.accounting),
            metrics: Arc::clone(&engine.metrics),
            limits: settings.limits.request(),
            max_body_bytes: settings.limits.max_body_bytes,
            passthrough,
            cache_headers: settings.response.cache_headers,
            purge: purge::Context::new(settings),
        };
        Ok(Gateway {
            router: routes::router(state, settings.server.max_requests_in_flight),
            engine,
            sync_every: Duration::from_secs(settings.ledger.sync_secs),
            limits: ServerLimits {
                header_read_timeout: settings.server.header_read_timeout(),
                max_connections: settings.server.max_connections,
                other_files: server::open_files::besides_connections(settings),
                drain_timeout: settings.server.drain_timeout(),
            },
        })
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests
    /// and the cache writes they started, within `server.drain_timeout_secs`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let stop = CancellationToken::new();
        let housekeeping = tokio::spawn(housekeeping::run(
            Arc::clone(self.engine.ledger()),
            Arc::clone(self.engine.store()),
            Arc::clone(&self.engine.metrics),
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
        let deadline = server::serve(listener, self.router, self.limits, shutdown).await;
        stop.cancel();
        let _ = housekeeping.await;
        // In-flight fetches finish and store before the ledger's last flush.
        self.engine.finish(Some(deadline)).await;
    }
}

/// Binds `settings.listen` and serves until `shutdown`.
pub async fn run(
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    // Refused before anything else: an undecided `auth.mode` serves no one.
    let auth_mode = settings.auth_mode()?;
    let gateway = Gateway::new(settings)?;
    match migrate::check(gateway.engine.store().as_ref()).await {
        Ok(()) => {}
        Err(e @ (migrate::MigrateError::Newer { .. } | migrate::MigrateError::Older { .. })) => {
            return Err(StartupError::Keyspace(e));
        }
        // The store is unreachable: serve from the vendor; the version is
        // stamped once it answers (housekeeping).
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
        store = gateway.engine.store().kind(),
        upstream = %gateway.engine.upstreams.default().base_url(),
        auth = ?auth_mode,
        "embgate serving"
    );
    gateway.serve(listener, shutdown).await;
    Ok(())
}
