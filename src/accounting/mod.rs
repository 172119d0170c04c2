//! What the cache saved and what the vendor cost, in tokens and dollars, by
//! model and tenant: Prometheus counters ([`crate::metrics`]) for rates, and
//! the all-time [`ledger`] kept in the store.
//!
//! The pipeline reports each vendor call as it is paid ([`Accounting::paid`]:
//! money spent stays spent even if the request then fails or its caller
//! hangs up), and each answered request's outcome
//! ([`Accounting::served`]).
//!
//! Callers choose model names, so a model becomes a label (and a ledger
//! line) only once it is known to be real: configured, priced, or answered
//! by the vendor (a cache hit proves that too: the entry was paid for).
//! Their number is bounded by `metrics.max_models`; past it, and before a
//! model is known, it counts as [`OTHER`].

pub mod ledger;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pipeline::Outcome;

use self::ledger::Ledger;

/// The label of models not (yet) known, and of those past the bound.
pub const OTHER: &str = "other";

/// List prices of the native vendors' embedding models, USD per 1M tokens;
/// `prices.<model>` overrides any of them. (OpenAI's are configuration
/// defaults; these names hold dots, which `EMBGATE__PRICES__*` variables
/// cannot carry, so they are kept here.)
pub const VENDOR_PRICES: &[(&str, f64)] = &[
    ("embed-v4.0", 0.12),
    ("embed-english-v3.0", 0.10),
    ("embed-multilingual-v3.0", 0.10),
    ("voyage-3.5", 0.06),
    ("voyage-3.5-lite", 0.02),
    ("voyage-3-large", 0.18),
    ("voyage-code-3", 0.18),
    ("gemini-embedding-001", 0.15),
    ("amazon.titan-embed-text-v2:0", 0.02),
    ("cohere.embed-english-v3", 0.10),
    ("cohere.embed-multilingual-v3", 0.10),
];

pub struct Accounting {
    metrics: Arc<Metrics>,
    ledger: Arc<Ledger>,
    /// USD per 1M tokens; looked up on every request that saved tokens.
    prices: foldhash::HashMap<String, f64>,
    /// Through the Batch API ([`Settings::batch_price`]), by priced model.
    batch_prices: foldhash::HashMap<String, f64>,
    labels: ModelLabels,
}

impl Accounting {
    pub fn new(
        settings: &Settings,
        configured_models: impl IntoIterator<Item = String>,
        metrics: Arc<Metrics>,
        ledger: Arc<Ledger>,
    ) -> Accounting {
        let prices: foldhash::HashMap<String, f64> = VENDOR_PRICES
            .iter()
            .map(|(model, price)| ((*model).to_owned(), *price))
            .chain(settings.prices.models.clone())
            .collect();
        let known = prices.keys().cloned().chain(configured_models).collect();
        Accounting {
            metrics,
            ledger,
            prices,
            // Only OpenAI's and Azure's upstreams have a Batch API.
            batch_prices: settings
                .prices
                .keys()
                .chain(settings.batch_prices.keys())
                .map(|m| (m.clone(), settings.batch_price(m)))
                .collect(),
            labels: ModelLabels::new(known, settings.metrics.max_models),
        }
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// USD per 1M tokens of `model` (0 when unpriced).
    pub fn price(&self, model: &str) -> f64 {
        self.prices.get(model).copied().unwrap_or(0.0)
    }

    /// USD per 1M tokens of `model` through the Batch API (0 when unpriced).
    pub fn batch_price(&self, model: &str) -> f64 {
        self.batch_prices.get(model).copied().unwrap_or(0.0)
    }

    /// The vendor billed `tokens` for embedding `inputs` inputs of `model`.
    pub fn paid(&self, tenant: &str, model: &str, tokens: u64, inputs: usize) {
        self.spent(tenant, model, tokens, inputs, self.price(model));
    }

    /// As [`Accounting::paid`], through the Batch API at its price: counted
    /// in the spend like any other, and apart in
    /// `embgate_upstream_batch_spent_usd_total` and the ledger's `batch_spent_usd`.
    pub fn paid_batch(&self, tenant: &str, model: &str, tokens: u64, inputs: usize) {
        let price = self.batch_price(model);
        let label = self.spent(tenant, model, tokens, inputs, price);
        let usd = tokens as f64 * price / 1e6;
        self.metrics
            .upstream_batch_spent_usd
            .with_label_values(&[label.as_ref()])
            .inc_by(usd);
        self.ledger.record_batch(tenant, &label, usd);
    }

    fn spent(&self, tenant: &str, model: &str, tokens: u64, inputs: usize, price: f64) -> Arc<str> {
        let label = self.labels.learn(model);
        let usd = tokens as f64 * price / 1e6;
        let m = &self.metrics;
        m.upstream_tokens
            .with_label_values(&[&label])
            .inc_by(tokens);
        m.upstream_spent_usd
            .with_label_values(&[&label])
            .inc_by(usd);
        m.upstream_inputs
            .with_label_values(&[&label])
            .inc_by(inputs as u64);
        m.tenant_spent_usd
            .with_label_values(&[tenant, &label])
            .inc_by(usd);
        self.ledger.record(tenant, &label, 0, tokens, price);
        label
    }

    /// A request for `model` was answered with `outcome`.
    pub fn served(&self, tenant: &str, model: &str, outcome: &Outcome) {
        let label = self.looked_up(
            tenant,
            model,
            outcome.hits,
            outcome.distinct - outcome.hits,
            outcome.saved_tokens(),
        );
        if outcome.coalesced > 0 {
            self.metrics
                .coalesced_inputs
                .with_label_values(&[&label])
                .inc_by(outcome.coalesced as u64);
        }
    }

    /// A request's (or a warm batch's) distinct inputs of `model` were
    /// looked up: `hits` found, `misses` not, `saved` tokens not paid for.
    pub fn looked_up(
        &self,
        tenant: &str,
        model: &str,
        hits: usize,
        misses: usize,
        saved: u64,
    ) -> Arc<str> {
        let label = self.labels.learn(model);
        let counters = self.metrics.request_counters(tenant, &label);
        counters.tenant_requests.inc();
        counters.hits.inc_by(hits as u64);
        counters.misses.inc_by(misses as u64);
        if saved > 0 {
            let price = self.price(model);
            let usd = saved as f64 * price / 1e6;
            counters.saved_tokens.inc_by(saved);
            counters.saved_usd.inc_by(usd);
            counters.tenant_saved_tokens.inc_by(saved);
            counters.tenant_saved_usd.inc_by(usd);
            self.ledger.record(tenant, &label, saved, 0, price);
        }
        label
    }

    /// A request for `model` failed before it could be answered.
    pub fn failed(&self, tenant: &str, model: &str) {
        let label = self.labels.label(model);
        self.metrics
            .request_counters(tenant, &label)
            .tenant_requests
            .inc();
    }
}

/// Which model names may be labels.
struct ModelLabels {
    known: HashMap<String, Arc<str>>,
    learned: RwLock<HashSet<Arc<str>>>,
    max_learned: usize,
    other: Arc<str>,
}

impl ModelLabels {
    fn new(known: HashSet<String>, max_learned: usize) -> ModelLabels {
        ModelLabels {
            known: known
                .into_iter()
                .map(|m| {
                    let label = Arc::from(m.as_str());
                    (m, label)
                })
                .collect(),
            learned: RwLock::new(HashSet::new()),
            max_learned,
            other: Arc::from(OTHER),
        }
    }

    /// The label of `model`: itself when known, else [`OTHER`].
    fn label(&self, model: &str) -> Arc<str> {
        if let Some(label) = self.known.get(model) {
            return Arc::clone(label);
        }
        let learned = self
            .learned
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        learned
            .get(model)
            .map_or_else(|| Arc::clone(&self.other), Arc::clone)
    }

    /// `model` is real: it becomes its own label while there is room.
    fn learn(&self, model: &str) -> Arc<str> {
        let label = self.label(model);
        if !Arc::ptr_eq(&label, &self.other) || model == OTHER {
            return label;
        }
        let mut learned = self
            .learned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(label) = learned.get(model) {
            return Arc::clone(label);
        }
        if learned.len() >= self.max_learned {
            return label;
        }
        let label: Arc<str> = Arc::from(model);
        learned.insert(Arc::clone(&label));
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_only_for_real_models() {
        let labels = ModelLabels::new(HashSet::from(["priced".to_owned()]), 2);
        assert_eq!(&*labels.label("priced"), "priced");
        assert_eq!(
            &*labels.label("invented"),
            OTHER,
            "not known before success"
        );
        assert_eq!(&*labels.learn("a"), "a");
        assert_eq!(&*labels.label("a"), "a");
        assert_eq!(&*labels.learn("b"), "b");
        assert_eq!(&*labels.learn("c"), OTHER, "past the bound");
        assert_eq!(&*labels.learn("a"), "a");
        assert_eq!(
            &*labels.learn("priced"),
            "priced",
            "known models never count"
        );
    }
}
