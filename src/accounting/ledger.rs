//! The all-time ledger of tokens and dollars saved and spent, per model and
//! tenant, kept in the store so the totals survive restarts (Prometheus
//! counters start again at zero) and add up across gateways sharing it.
//!
//! Requests only add to an in-memory tally; a background task flushes it
//! as one atomic batch of increments every few seconds (and at shutdown),
//! then reads the whole ledger back into gauges. A failed flush keeps the
//! tally for the next one, so nothing is lost while the store is away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::cache::store::{Increment, Store, StoreError};
use crate::metrics::Metrics;

/// The quantities the ledger tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    SavedTokens,
    SavedUsd,
    SpentTokens,
    SpentUsd,
    /// Of `SpentUsd`, what went through the vendor's Batch API.
    BatchSpentUsd,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::SavedTokens,
        Kind::SavedUsd,
        Kind::SpentTokens,
        Kind::SpentUsd,
        Kind::BatchSpentUsd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SavedTokens => "saved_tokens",
            Kind::SavedUsd => "saved_usd",
            Kind::SpentTokens => "spent_tokens",
            Kind::SpentUsd => "spent_usd",
            Kind::BatchSpentUsd => "batch_spent_usd",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Position in [`Kind::ALL`].
    fn index(self) -> usize {
        match self {
            Kind::SavedTokens => 0,
            Kind::SavedUsd => 1,
            Kind::SpentTokens => 2,
            Kind::SpentUsd => 3,
            Kind::BatchSpentUsd => 4,
        }
    }

    fn is_tokens(self) -> bool {
        matches!(self, Kind::SavedTokens | Kind::SpentTokens)
    }
}

/// One ledger line: a quantity for a tenant and model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Account {
    pub kind: Kind,
    pub tenant: String,
    pub model: String,
}

impl Account {
    /// The ledger field: `kind \t tenant \t model` (the model last, so
    /// any character in it survives).
    fn field(&self) -> String {
        format!("{}\t{}\t{}", self.kind.as_str(), self.tenant, self.model)
    }

    fn parse(field: &str) -> Option<Account> {
        let mut parts = field.splitn(3, '\t');
        Some(Account {
            kind: Kind::parse(parts.next()?)?,
            tenant: parts.next()?.to_owned(),
            model: parts.next()?.to_owned(),
        })
    }
}

/// Amounts not yet flushed, by tenant and model, in [`Kind::ALL`] order.
/// Nested maps so that recording looks up by `&str` and allocates only for
/// a tenant or model it has not seen since the last flush.
type Tally = HashMap<String, HashMap<String, Amounts>>;

/// One amount per [`Kind`], in [`Kind::ALL`] order.
type Amounts = [f64; Kind::ALL.len()];

fn add_to(tally: &mut Tally, tenant: &str, model: &str, amounts: Amounts) {
    let models = match tally.get_mut(tenant) {
        Some(models) => models,
        None => tally.entry(tenant.to_owned()).or_default(),
    };
    let slot = match models.get_mut(model) {
        Some(slot) => slot,
        None => models.entry(model.to_owned()).or_default(),
    };
    for (total, amount) in slot.iter_mut().zip(amounts) {
        *total += amount;
    }
}

pub struct Ledger {
    store: Arc<dyn Store>,
    pending: Mutex<Tally>,
    metrics: Arc<Metrics>,
}

impl Ledger {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Ledger {
        Ledger {
            store,
            pending: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn record(
        &self,
        tenant: &str,
        model: &str,
        saved_tokens: u64,
        spent_tokens: u64,
        price: f64,
    ) {
        let amounts = [
            saved_tokens as f64,
            saved_tokens as f64 * price / 1e6,
            spent_tokens as f64,
            spent_tokens as f64 * price / 1e6,
            0.0,
        ];
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        add_to(&mut pending, tenant, model, amounts);
    }

    /// Of what [`Ledger::record`] counted as spent, `usd` went through the
    /// vendor's Batch API.
    pub fn record_batch(&self, tenant: &str, model: &str, usd: f64) {
        let mut amounts = [0.0; Kind::ALL.len()];
        amounts[Kind::BatchSpentUsd.index()] = usd;
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        add_to(&mut pending, tenant, model, amounts);
    }

    /// Writes the tally to the store; on failure it is kept for the next flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let batch: Vec<(Account, f64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            let mut batch = Vec::new();
            for (tenant, models) in pending.drain() {
                for (model, amounts) in models {
                    for (kind, amount) in Kind::ALL.into_iter().zip(amounts) {
                        if amount > 0.0 {
                            let (tenant, model) = (tenant.clone(), model.clone());
                            batch.push((
                                Account {
                                    kind,
                                    tenant,
                                    model,
                                },
                                amount,
                            ));
                        }
                    }
                }
            }
            batch
        };
        if batch.is_empty() {
            return Ok(());
        }
        let increments = batch
            .iter()
            .map(|(account, amount)| {
                let increment = if account.kind.is_tokens() {
                    Increment::Int(*amount as i64)
                } else {
                    Increment::Float(*amount)
                };
                (account.field(), increment)
            })
            .collect();
        let result =
            match tokio::time::timeout(FLUSH_TIMEOUT, self.store.ledger_add(increments)).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Timeout(FLUSH_TIMEOUT)),
            };
        if result.is_err() {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            for (account, amount) in batch {
                let mut amounts = [0.0; Kind::ALL.len()];
                amounts[account.kind.index()] = amount;
                add_to(&mut pending, &account.tenant, &account.model, amounts);
            }
        }
        result
    }

    /// Reads the whole ledger from the store.
    pub async fn read(&self) -> Result<Vec<(Account, f64)>, StoreError> {
        read_ledger(self.store.as_ref(), Some(&self.metrics)).await
    }

    /// Flushes, then mirrors the ledger into the `embgate_ledger_*` gauges.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.flush().await?;
        for (account, value) in self.read().await? {
            let gauge = match account.kind {
                Kind::SavedTokens => &self.metrics.ledger_saved_tokens,
                Kind::SavedUsd => &self.metrics.ledger_saved_usd,
                Kind::SpentTokens => &self.metrics.ledger_spent_tokens,
                Kind::SpentUsd => &self.metrics.ledger_spent_usd,
                Kind::BatchSpentUsd => &self.metrics.ledger_batch_spent_usd,
            };
            gauge
                .with_label_values(&[account.model.as_str(), account.tenant.as_str()])
                .set(value);
        }
        Ok(())
    }
}

/// How long a flush may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Every ledger line, sorted by model, tenant and kind. A field that does
/// not parse (written by something else, or damaged) is skipped, and
/// counted in `embgate_store_errors_total{op="ledger_field"}` when
/// `metrics` is given: one bad field must not hide the others.
pub async fn read_ledger(
    store: &dyn Store,
    metrics: Option<&Metrics>,
) -> Result<Vec<(Account, f64)>, StoreError> {
    let fields = store.ledger_read().await?;
    let mut lines = Vec::with_capacity(fields.len());
    for (field, value) in fields {
        let parsed =
            Account::parse(&field).zip(value.parse::<f64>().ok().filter(|v| v.is_finite()));
        match parsed {
            Some(line) => lines.push(line),
            None => {
                if let Some(metrics) = metrics {
                    metrics
                        .store_errors
                        .with_label_values(&["ledger_field"])
                        .inc();
                }
                tracing::debug!(field = %field.escape_debug(), "skipping a ledger field that does not parse");
            }
        }
    }
    lines.sort_by(|a, b| {
        (&a.0.model, &a.0.tenant, a.0.kind.as_str()).cmp(&(
            &b.0.model,
            &b.0.tenant,
            b.0.kind.as_str(),
        ))
    });
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_even_with_odd_model_names() {
        let a = Account {
            kind: Kind::SpentUsd,
            tenant: "search".into(),
            model: "org/model\twith:tab".into(),
        };
        assert_eq!(Account::parse(&a.field()), Some(a));
        assert_eq!(Account::parse("nonsense"), None);
    }
}
