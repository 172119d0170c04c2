//! Periodic work kept off the request path: writing the savings ledger to
//! Redis and refreshing the store gauges (entries, memory).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::store::Store;

/// Runs until `stop` is cancelled, then flushes the ledger one last time.
pub async fn run(
    ledger: Arc<Ledger>,
    store: Store,
    metrics: Arc<Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tick(&ledger, &store, &metrics).await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => break,
        }
    }
    if let Err(e) = ledger.flush().await {
        tracing::warn!(error = %e, "final ledger flush failed; this run's savings since the last flush are not in the ledger");
    }
}

async fn tick(ledger: &Ledger, store: &Store, metrics: &Metrics) {
    if let Err(e) = ledger.sync().await {
        metrics.store_errors.with_label_values(&["ledger"]).inc();
        tracing::debug!(error = %e, "ledger sync failed; will retry");
    }
    match store.size().await {
        Ok((entries, memory)) => {
            metrics
                .store_entries
                .set(i64::try_from(entries).unwrap_or(i64::MAX));
            metrics
                .store_memory_bytes
                .set(i64::try_from(memory).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::debug!(error = %e, "store size unavailable"),
    }
}
