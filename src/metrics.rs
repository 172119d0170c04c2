//! Prometheus metrics. Each gateway owns its registry (no globals), so
//! several gateways in one process (tests) never mix their counts.

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub cache_lookups: IntCounterVec,
    pub cache_saved_tokens: IntCounterVec,
    pub cache_saved_usd: CounterVec,
    pub upstream_tokens: IntCounterVec,
    pub upstream_spent_usd: CounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: Histogram,
    pub upstream_inputs: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub store_up: IntGauge,
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
    pub store_entries: IntGauge,
    pub store_memory_bytes: IntGauge,
    pub l1_hits: prometheus::IntCounter,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
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
        let store_up = IntGauge::new(
            "embgate_store_up",
            "1 while the last store operation succeeded, 0 while Redis is failing (serving from the vendor).",
        )?;
        registry.register(Box::new(store_up.clone()))?;

        Ok(Metrics {
            cache_lookups: int_counter(
                "embgate_cache_lookups_total",
                "Distinct inputs looked up in the cache, by model and result (hit|miss).",
                &["model", "result"],
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
                "Store failures, by operation (get|set|ping|decode); each one is served from the vendor.",
                &["op"],
            )?,
            store_up,
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
                "All-time tokens saved (ledger kept in Redis; survives restarts), by model and tenant.",
            )?,
            ledger_saved_usd: gauge(
                "embgate_ledger_saved_usd",
                "All-time US dollars saved (ledger kept in Redis), by model and tenant.",
            )?,
            ledger_spent_tokens: gauge(
                "embgate_ledger_spent_tokens",
                "All-time tokens paid to the vendor (ledger kept in Redis), by model and tenant.",
            )?,
            ledger_spent_usd: gauge(
                "embgate_ledger_spent_usd",
                "All-time US dollars paid to the vendor (ledger kept in Redis), by model and tenant.",
            )?,
            store_entries: int_gauge(
                "embgate_store_entries",
                "Keys in the Redis database (DBSIZE), refreshed periodically.",
            )?,
            store_memory_bytes: int_gauge(
                "embgate_store_memory_bytes",
                "Memory Redis uses (INFO used_memory), refreshed periodically.",
            )?,
            l1_hits: {
                let c = prometheus::IntCounter::new(
                    "embgate_l1_hits_total",
                    "Lookups answered by the in-process L1 cache without asking Redis.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}
