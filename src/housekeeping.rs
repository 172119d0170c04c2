//! Periodic work kept off the request path: writing the savings ledger to
//! the store, refreshing the store gauges (entries, bytes) and evictions
//! counter, and stamping
//! the keyspace version again if the store lost it (a Redis restarted
//! without persistence).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::accounting::ledger::Ledger;
use crate::cache::store::Store;
use crate::metrics::Metrics;
use crate::migrate;

/// Runs until `stop` is cancelled.
pub async fn run(
    ledger: Arc<Ledger>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tick(&ledger, store.as_ref(), &metrics).await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => break,
        }
    }
}

async fn tick(ledger: &Ledger, store: &dyn Store, metrics: &Metrics) {
    if let Err(e) = ledger.sync().await {
        metrics.store_errors.with_label_values(&["ledger"]).inc();
        tracing::debug!(error = %e, "ledger sync failed; will retry");
    }
    match store.size().await {
        Ok(size) => {
            metrics
                .store_entries
                .set(i64::try_from(size.entries).unwrap_or(i64::MAX));
            metrics
                .store_memory_bytes
                .set(i64::try_from(size.bytes).unwrap_or(i64::MAX));
            // The store counts its evictions since it opened, as this
            // process's counter does.
            let counted = metrics.store_evictions.get();
            if size.evicted > counted {
                metrics.store_evictions.inc_by(size.evicted - counted);
            }
        }
        Err(e) => tracing::debug!(error = %e, "store size unavailable"),
    }
    match migrate::stamp_if_missing(store).await {
        Ok(true) => tracing::info!("keyspace version was missing from the store; stamped again"),
        Ok(false) => {}
        Err(e) => {
            metrics.store_errors.with_label_values(&["meta"]).inc();
            tracing::debug!(error = %e, "keyspace version not checked");
        }
    }
}
