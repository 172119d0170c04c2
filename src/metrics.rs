//! Prometheus metrics. Each gateway owns its registry (no globals), so
//! several gateways in one process (tests) never mix their counts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The counters every embeddings request moves, for one tenant and model.
pub struct RequestCounters {
    pub tenant_requests: IntCounter,
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub saved_tokens: IntCounter,
    pub saved_usd: Counter,
    pub tenant_saved_tokens: IntCounter,
    pub tenant_saved_usd: Counter,
}

/// The `embgate_http_*` series of one route, resolved once: a request
/// answered 200 moves them without hashing a label or taking a lock.
pub struct RouteMetrics {
    route: &'static str,
    duration: Histogram,
    ok: IntCounter,
    requests: IntCounterVec,
}

impl RouteMetrics {
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        if status == StatusCode::OK {
            self.ok.inc();
        } else {
            self.requests
                .with_label_values(&[self.route, status.as_str()])
                .inc();
        }
    }
}

/// (tenant, model) pairs whose counters stay resolved. Callers name the
/// model, so the set is bounded; past it, pairs are resolved per request.
const RESOLVED_PAIRS: usize = 1024;

/// Resolved counters by tenant, then model (looked up by `&str`).
type Resolved = HashMap<String, HashMap<String, Arc<RequestCounters>>>;

pub struct Metrics {
    registry: Registry,
    pub cache_lookups: IntCounterVec,
    pub cache_directives: IntCounterVec,
    pub cache_saved_tokens: IntCounterVec,
    pub cache_saved_usd: CounterVec,
    pub upstream_tokens: IntCounterVec,
    pub upstream_spent_usd: CounterVec,
    pub upstream_batch_spent_usd: CounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: Histogram,
    pub upstream_inputs: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub store_up: IntGauge,
    pub store_reads_up: IntGauge,
    pub store_writes_up: IntGauge,
    pub store_breaker_open: IntGaugeVec,
    pub store_skipped: IntCounterVec,
    pub store_timeouts: IntCounter,
    pub store_pending_write_bytes: IntGauge,
    pub store_evictions: IntCounter,
    pub coalesced_inputs: IntCounterVec,
    pub tenant_requests: IntCounterVec,
    pub tenant_saved_tokens: IntCounterVec,
    pub tenant_saved_usd: CounterVec,
    pub tenant_spent_usd: CounterVec,
    pub auth_verifications: IntCounterVec,
    pub ledger_saved_tokens: GaugeVec,
    pub ledger_saved_usd: GaugeVec,
    pub ledger_spent_tokens: GaugeVec,
    pub ledger_spent_usd: GaugeVec,
    pub ledger_batch_spent_usd: GaugeVec,
    pub store_entries: IntGauge,
    pub store_memory_bytes: IntGauge,
    pub l1_hits: prometheus::IntCounter,
    resolved: RwLock<Resolved>,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Adds metrics kept elsewhere (a store backend's own).
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let int_counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = CounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "embgate_upstream_duration_seconds",
                "Time of each upstream embeddings call (each attempt).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(upstream_duration.clone()))?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "embgate_http_request_duration_seconds",
                "Time to answer an HTTP request, by route.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        registry.register(Box::new(http_duration.clone()))?;
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["model", "tenant"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let store_up = int_gauge(
            "embgate_store_up",
            "1 while the store both reads and writes, 0 while either fails (served from the vendor).",
        )?;
        let store_breaker_open = IntGaugeVec::new(
            Opts::new(
                "embgate_store_breaker_open",
                "1 while the store's circuit breaker is open for reads or writes (the store is not asked).",
            ),
            &["side"],
        )?;
        registry.register(Box::new(store_breaker_open.clone()))?;

        Ok(Metrics {
            cache_lookups: int_counter(
                "embgate_cache_lookups_total",
                "Distinct inputs looked up in the cache, by model and result (hit|miss).",
                &["model", "result"],
            )?,
            cache_directives: int_counter(
                "embgate_cache_directives_total",
                "Cache directives requests carried (Cache-Control or x-embgate-cache-control), by directive (no-cache|no-store|max-age|ignored).",
                &["directive"],
            )?,
            cache_saved_tokens: int_counter(
                "embgate_cache_saved_tokens_total",
                "Input tokens answered without paying the vendor, by model.",
                &["model"],
            )?,
            cache_saved_usd: counter(
                "embgate_cache_saved_usd_total",
                "US dollars not spent thanks to the cache, by model (prices.<model>).",
                &["model"],
            )?,
            upstream_tokens: int_counter(
                "embgate_upstream_tokens_total",
                "Input tokens billed by the vendor, by model.",
                &["model"],
            )?,
            upstream_spent_usd: counter(
                "embgate_upstream_spent_usd_total",
                "US dollars spent at the vendor, by model (prices.<model>).",
                &["model"],
            )?,
            upstream_batch_spent_usd: counter(
                "embgate_upstream_batch_spent_usd_total",
                "Of embgate_upstream_spent_usd_total, US dollars spent through the vendor's Batch API, by model (batch_prices.<model>, or prices.<model> times prices.batch_discount).",
                &["model"],
            )?,
            upstream_requests: int_counter(
                "embgate_upstream_requests_total",
                "Upstream embeddings calls (each attempt), by HTTP status, or timeout|error.",
                &["status"],
            )?,
            upstream_duration,
            upstream_inputs: int_counter(
                "embgate_upstream_inputs_total",
                "Inputs sent to the vendor, by model.",
                &["model"],
            )?,
            http_requests: int_counter(
                "embgate_http_requests_total",
                "HTTP requests answered, by route and status.",
                &["route", "status"],
            )?,
            http_duration,
            store_errors: int_counter(
                "embgate_store_errors_total",
                "Store failures, by operation (get|set|set_skipped|ping|write_probe|decode|lease|ledger|ledger_field|meta); each one is served from the vendor.",
                &["op"],
            )?,
            store_up,
            store_reads_up: int_gauge(
                "embgate_store_reads_up",
                "1 while lookups in the store succeed, 0 while they fail.",
            )?,
            store_writes_up: int_gauge(
                "embgate_store_writes_up",
                "1 while writes to the store succeed, 0 while they fail (e.g. a full Redis).",
            )?,
            store_breaker_open,
            store_skipped: int_counter(
                "embgate_store_skipped_total",
                "Store operations skipped while the circuit breaker was open, by side (read|write).",
                &["side"],
            )?,
            store_pending_write_bytes: int_gauge(
                "embgate_store_pending_write_bytes",
                "Bytes of fetched entries answered but not yet written to the store.",
            )?,
            store_evictions: {
                let c = IntCounter::new(
                    "embgate_store_evictions_total",
                    "Entries the store dropped to make room (Redis: evicted_keys under a maxmemory policy; embedded: least recently used past store.max_bytes): vectors that will be paid for again.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            store_timeouts: {
                let c = IntCounter::new(
                    "embgate_store_timeouts_total",
                    "Inputs whose lookup outlasted its wait and were treated as misses (fetched again unless another request had them).",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            coalesced_inputs: int_counter(
                "embgate_coalesced_inputs_total",
                "Missed inputs served by another request's in-flight upstream fetch, by model.",
                &["model"],
            )?,
            tenant_requests: int_counter(
                "embgate_tenant_requests_total",
                "Embeddings requests, by tenant (the gateway key's name; `default` otherwise).",
                &["tenant"],
            )?,
            tenant_saved_tokens: int_counter(
                "embgate_tenant_saved_tokens_total",
                "Input tokens answered without paying the vendor, by tenant and model.",
                &["tenant", "model"],
            )?,
            tenant_saved_usd: counter(
                "embgate_tenant_saved_usd_total",
                "US dollars not spent thanks to the cache, by tenant and model.",
                &["tenant", "model"],
            )?,
            tenant_spent_usd: counter(
                "embgate_tenant_spent_usd_total",
                "US dollars spent at the vendor, by tenant and model.",
                &["tenant", "model"],
            )?,
            auth_verifications: int_counter(
                "embgate_auth_verifications_total",
                "Caller keys checked with the vendor (forward mode), by result (accepted|rejected|error).",
                &["result"],
            )?,
            ledger_saved_tokens: gauge(
                "embgate_ledger_saved_tokens",
                "All-time tokens saved (ledger kept in the store; survives restarts), by model and tenant.",
            )?,
            ledger_saved_usd: gauge(
                "embgate_ledger_saved_usd",
                "All-time US dollars saved (ledger kept in the store), by model and tenant.",
            )?,
            ledger_spent_tokens: gauge(
                "embgate_ledger_spent_tokens",
                "All-time tokens paid to the vendor (ledger kept in the store), by model and tenant.",
            )?,
            ledger_spent_usd: gauge(
                "embgate_ledger_spent_usd",
                "All-time US dollars paid to the vendor (ledger kept in the store), by model and tenant.",
            )?,
            ledger_batch_spent_usd: gauge(
                "embgate_ledger_batch_spent_usd",
                "All-time US dollars spent through the vendor's Batch API (part of embgate_ledger_spent_usd), by model and tenant.",
            )?,
            store_entries: int_gauge(
                "embgate_store_entries",
                "Entries in the store (embedded: entries; Redis: keys in the database, DBSIZE), refreshed periodically.",
            )?,
            store_memory_bytes: int_gauge(
                "embgate_store_memory_bytes",
                "Bytes the store uses (embedded: keys and values of entries, as store.max_bytes counts them; Redis: INFO used_memory), refreshed periodically.",
            )?,
            l1_hits: {
                let c = prometheus::IntCounter::new(
                    "embgate_l1_hits_total",
                    "Lookups answered by the in-process L1 cache without asking the store.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            resolved: RwLock::new(HashMap::new()),
            registry,
        })
    }

    /// The counters of `tenant` and `model`, resolved once and kept: each
    /// `with_label_values` hashes its labels and takes a lock, which a
    /// cached hit would otherwise pay seven times.
    pub fn request_counters(&self, tenant: &str, model: &str) -> Arc<RequestCounters> {
        if let Ok(resolved) = self.resolved.read()
            && let Some(counters) = resolved.get(tenant).and_then(|m| m.get(model))
        {
            return Arc::clone(counters);
        }
        let counters = Arc::new(RequestCounters {
            tenant_requests: self.tenant_requests.with_label_values(&[tenant]),
            hits: self.cache_lookups.with_label_values(&[model, "hit"]),
            misses: self.cache_lookups.with_label_values(&[model, "miss"]),
            saved_tokens: self.cache_saved_tokens.with_label_values(&[model]),
            saved_usd: self.cache_saved_usd.with_label_values(&[model]),
            tenant_saved_tokens: self.tenant_saved_tokens.with_label_values(&[tenant, model]),
            tenant_saved_usd: self.tenant_saved_usd.with_label_values(&[tenant, model]),
        });
        if let Ok(mut resolved) = self.resolved.write()
            && resolved.values().map(HashMap::len).sum::<usize>() < RESOLVED_PAIRS
        {
            resolved
                .entry(tenant.to_owned())
                .or_default()
                .insert(model.to_owned(), Arc::clone(&counters));
        }
        counters
    }

    /// The HTTP series of `route`, for [`RouteMetrics::record`].
    pub fn route(&self, route: &'static str) -> RouteMetrics {
        RouteMetrics {
            route,
            duration: self.http_duration.with_label_values(&[route]),
            ok: self.http_requests.with_label_values(&[route, "200"]),
            requests: self.http_requests.clone(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_counters_are_the_labelled_series() {
        let metrics = Metrics::new().expect("metrics");
        metrics.request_counters("t", "m").hits.inc_by(2);
        // Served from the kept set the second time: still the same series.
        metrics.request_counters("t", "m").hits.inc_by(3);
        metrics.request_counters("t", "m").tenant_requests.inc();
        assert_eq!(
            metrics.cache_lookups.with_label_values(&["m", "hit"]).get(),
            5
        );
        assert_eq!(metrics.tenant_requests.with_label_values(&["t"]).get(), 1);
        // Past the bound, pairs are resolved per request and still count.
        for i in 0..RESOLVED_PAIRS + 10 {
            metrics
                .request_counters("t", &format!("model-{i}"))
                .misses
                .inc();
        }
        let last = format!("model-{}", RESOLVED_PAIRS + 9);
        metrics.request_counters("t", &last).misses.inc();
        assert_eq!(
            metrics
                .cache_lookups
                .with_label_values(&[&last, "miss"])
                .get(),
            2
        );
        let kept: usize = metrics
            .resolved
            .read()
            .map(|r| r.values().map(HashMap::len).sum())
            .unwrap_or(0);
        assert_eq!(kept, RESOLVED_PAIRS);
    }
}
