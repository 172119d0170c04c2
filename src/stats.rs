//! `embgate stats`: what the cache holds (entries and bytes, by model) and
//! the all-time ledger of what it saved.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::accounting::ledger::{self, Account, Kind};
use crate::cache::entry::{self, HEADER_LEN};
use crate::cache::store::{Cursor, Store, StoreError};
use crate::migrate;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub keyspace_version: Option<String>,
    pub total: Bucket,
    /// By model name (or `unknown` for entries without a model tag, or a
    /// tag no known model has).
    pub by_model: BTreeMap<String, Bucket>,
    pub ledger: Vec<(Account, f64)>,
}

/// Walks every entry of `store`. `models` names the models to recognise
/// by their tag; the ledger's models are added to them.
pub async fn collect<'a>(
    store: &dyn Store,
    models: impl IntoIterator<Item = &'a str>,
) -> Result<Stats, StoreError> {
    let ledger = ledger::read_ledger(store, None).await?;
    let mut names: HashMap<u32, String> = models
        .into_iter()
        .map(|m| (entry::tag(m), m.to_owned()))
        .collect();
    for (account, _) in &ledger {
        names
            .entry(entry::tag(&account.model))
            .or_insert_with(|| account.model.clone());
    }
    let mut stats = Stats {
        keyspace_version: store.meta_get(migrate::VERSION_FIELD).await?,
        ledger,
        ..Stats::default()
    };
    let mut cursor = Cursor::start();
    loop {
        let (next, heads) = store.scan_heads(&cursor, 1000, HEADER_LEN).await?;
        for head in heads {
            let model = entry::read_header(&head.head)
                .and_then(|header| names.get(&header.model_tag).cloned())
                .unwrap_or_else(|| "unknown".to_owned());
            for bucket in [&mut stats.total, stats.by_model.entry(model).or_default()] {
                bucket.entries += 1;
                bucket.bytes += head.len;
            }
        }
        if next.is_start() {
            return Ok(stats);
        }
        cursor = next;
    }
}

impl Stats {
    /// The report as JSON (`GET /admin/stats`).
    pub fn to_json(&self) -> serde_json::Value {
        let bucket = |b: &Bucket| serde_json::json!({"entries": b.entries, "bytes": b.bytes});
        let by_model: serde_json::Map<String, serde_json::Value> = self
            .by_model
            .iter()
            .map(|(model, b)| (model.clone(), bucket(b)))
            .collect();
        let ledger: Vec<serde_json::Value> = self
            .ledger
            .iter()
            .map(|(account, value)| {
                serde_json::json!({
                    "model": account.model,
                    "tenant": account.tenant,
                    "kind": account.kind.as_str(),
                    "value": value,
                })
            })
            .collect();
        serde_json::json!({
            "keyspace_version": self.keyspace_version,
            "total": bucket(&self.total),
            "by_model": by_model,
            "ledger": ledger,
        })
    }

    /// A plain-text report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let version = self.keyspace_version.as_deref().unwrap_or("unversioned");
        let _ = writeln!(out, "keyspace version  {version}");
        let _ = writeln!(
            out,
            "entries           {} ({})",
            self.total.entries,
            human_bytes(self.total.bytes)
        );
        for (model, bucket) in &self.by_model {
            let _ = writeln!(
                out,
                "  {model:<30} {:>10} entries {:>12}",
                bucket.entries,
                human_bytes(bucket.bytes)
            );
        }
        let _ = writeln!(out, "ledger (all time)");
        let mut rows: BTreeMap<(&str, &str), [f64; Kind::ALL.len()]> = BTreeMap::new();
        for (account, value) in &self.ledger {
            let row = rows
                .entry((account.model.as_str(), account.tenant.as_str()))
                .or_default();
            let i = Kind::ALL
                .iter()
                .position(|k| *k == account.kind)
                .unwrap_or(0);
            row[i] = *value;
        }
        let _ = writeln!(
            out,
            "  {:<30} {:<12} {:>14} {:>12} {:>14} {:>12} {:>12}",
            "model",
            "tenant",
            "saved tokens",
            "saved USD",
            "spent tokens",
            "spent USD",
            "of it batch"
        );
        let mut totals = [0f64; Kind::ALL.len()];
        for ((model, tenant), row) in &rows {
            for (t, v) in totals.iter_mut().zip(row) {
                *t += v;
            }
            let _ = writeln!(
                out,
                "  {model:<30} {tenant:<12} {:>14} {:>12.4} {:>14} {:>12.4} {:>12.4}",
                row[0], row[1], row[2], row[3], row[4]
            );
        }
        let _ = writeln!(
            out,
            "  {:<30} {:<12} {:>14} {:>12.4} {:>14} {:>12.4} {:>12.4}",
            "total", "", totals[0], totals[1], totals[2], totals[3], totals[4]
        );
        out
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
