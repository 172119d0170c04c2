//! The embedding pipeline: key every input, look all keys up in one round
//! trip, fetch only the distinct misses (coalesced with concurrent requests,
//! chunked to the vendor's limits), store what the vendor returned, and
//! hand back one entry per input in the caller's order.

use std::collections::HashMap;
use std::collections::hash_map;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::entry::Entry;
use crate::inflight::{self, Claim, Inflight, Promise};
use crate::key::{KeyHash, KeyScope};
use crate::metrics::Metrics;
use crate::protocol::{EmbeddingRequest, Input};
use crate::store::Store;
use crate::tokens;
use crate::upstream::{CallerAuth, EmbedCall, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Nothing was fetched from the vendor for this request.
    Hit,
    /// Every distinct input was fetched from the vendor.
    Miss,
    Partial,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Partial => "partial",
        }
    }
}

/// The result of embedding one request.
pub struct Embedded {
    /// One entry per request input, in the caller's order.
    pub entries: Vec<Entry>,
    /// Tokens of the whole request as the vendor would bill them.
    pub prompt_tokens: u64,
    /// Tokens the vendor actually billed for this request.
    pub upstream_tokens: u64,
    pub cache: CacheStatus,
}

/// Vendor batch limits.
#[derive(Debug, Clone, Copy)]
struct BatchLimits {
    max_inputs: usize,
    max_tokens: u64,
    concurrency: usize,
}

pub struct Embedder {
    store: Store,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    prices: HashMap<String, f64>,
    key_prefix: String,
    batch: BatchLimits,
    inflight: Arc<Inflight>,
    /// Fetches run as tasks so a caller hanging up never wastes a paid
    /// answer: it is still stored and shared with waiters.
    tasks: TaskTracker,
}

/// One distinct missing key, and the input it stands for.
#[derive(Clone)]
struct Miss {
    slot: usize,
    hash: KeyHash,
    input: usize,
}

/// What a fetch produced: entries by slot and the tokens billed.
#[derive(Default)]
struct Fetched {
    entries: Vec<(usize, Entry)>,
    billed_tokens: u64,
}

impl Embedder {
    pub fn new(
        settings: &Settings,
        store: Store,
        upstream: Upstream,
        metrics: Arc<Metrics>,
    ) -> Self {
        Embedder {
            store,
            upstream,
            metrics,
            prices: settings.prices.clone(),
            key_prefix: settings.store.key_prefix.clone(),
            batch: BatchLimits {
                max_inputs: settings.upstream.max_inputs_per_call,
                max_tokens: settings.upstream.max_tokens_per_call,
                concurrency: settings.upstream.max_concurrency,
            },
            inflight: Arc::new(Inflight::default()),
            tasks: TaskTracker::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Waits for fetches still storing their results (graceful shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn price(&self, model: &str) -> f64 {
        self.prices.get(model).copied().unwrap_or(0.0)
    }

    pub async fn embed(
        self: &Arc<Self>,
        req: Arc<EmbeddingRequest>,
        auth: CallerAuth,
    ) -> Result<Embedded, EmbedError> {
        // Key every input; duplicates share one slot.
        let hasher = KeyScope::of(self.upstream.base_url(), &req).hasher();
        let mut slot_of: HashMap<KeyHash, usize> = HashMap::with_capacity(req.inputs.len());
        let mut slots: Vec<(KeyHash, usize)> = Vec::with_capacity(req.inputs.len());
        let input_slots: Vec<usize> = req
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| match slot_of.entry(hasher.key(input)) {
                hash_map::Entry::Occupied(o) => *o.get(),
                hash_map::Entry::Vacant(v) => {
                    slots.push((*v.key(), i));
                    *v.insert(slots.len() - 1)
                }
            })
            .collect();

        let mut found = self.lookup(&slots, req.dimensions).await;
        let misses: Vec<Miss> = found
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(slot, _)| Miss {
                slot,
                hash: slots[slot].0,
                input: slots[slot].1,
            })
            .collect();
        let model = req.model.as_str();
        self.metrics
            .cache_lookups
            .with_label_values(&[model, "hit"])
            .inc_by((slots.len() - misses.len()) as u64);
        self.metrics
            .cache_lookups
            .with_label_values(&[model, "miss"])
            .inc_by(misses.len() as u64);

        let mut fetched_slots = 0usize;
        let mut sent_tokens = 0u64;
        let mut upstream_tokens = 0u64;
        if !misses.is_empty() {
            let (mine, coalesced) = self.resolve_misses(&req, &auth, misses).await?;
            fetched_slots = mine.entries.len();
            upstream_tokens = mine.billed_tokens;
            for (slot, entry) in mine.entries {
                sent_tokens += u64::from(entry.tokens());
                found[slot] = Some(entry);
            }
            if !coalesced.is_empty() {
                self.metrics
                    .coalesced_inputs
                    .with_label_values(&[model])
                    .inc_by(coalesced.len() as u64);
            }
            for (slot, entry) in coalesced {
                found[slot] = Some(entry);
            }
        }

        let mut entries = Vec::with_capacity(input_slots.len());
        for slot in input_slots {
            match &found[slot] {
                Some(entry) => entries.push(entry.clone()),
                None => return Err(EmbedError::Internal("an input was left unresolved".into())),
            }
        }
        let prompt_tokens: u64 = entries.iter().map(|e| u64::from(e.tokens())).sum();
        let saved = prompt_tokens.saturating_sub(sent_tokens);
        if saved > 0 {
            self.metrics
                .cache_saved_tokens
                .with_label_values(&[model])
                .inc_by(saved);
            self.metrics
                .cache_saved_usd
                .with_label_values(&[model])
                .inc_by(saved as f64 * self.price(model) / 1e6);
        }
        let cache = match fetched_slots {
            0 => CacheStatus::Hit,
            n if n == slots.len() => CacheStatus::Miss,
            _ => CacheStatus::Partial,
        };
        Ok(Embedded {
            entries,
            prompt_tokens,
            upstream_tokens,
            cache,
        })
    }

    /// One MGET for every distinct key. A failing store is a miss for all,
    /// and an entry that does not verify is a miss (and gets overwritten).
    async fn lookup(
        &self,
        slots: &[(KeyHash, usize)],
        dimensions: Option<u32>,
    ) -> Vec<Option<Entry>> {
        let keys: Vec<String> = slots
            .iter()
            .map(|(h, _)| h.redis_key(&self.key_prefix))
            .collect();
        let mut found = vec![None; slots.len()];
        match self.store.get_many(&keys).await {
            Ok(values) => {
                self.metrics.store_up.set(1);
                for ((slot, value), (hash, _)) in values.into_iter().enumerate().zip(slots) {
                    let Some(bytes) = value else { continue };
                    match Entry::decode(hash, bytes, dimensions) {
                        Ok(entry) => found[slot] = Some(entry),
                        Err(e) => {
                            self.metrics
                                .store_errors
                                .with_label_values(&["decode"])
                                .inc();
                            tracing::warn!(key = %keys[slot], error = %e, "discarding undecodable entry");
                        }
                    }
                }
            }
            Err(e) => {
                self.metrics.store_errors.with_label_values(&["get"]).inc();
                self.metrics.store_up.set(0);
                tracing::warn!(error = %e, "cache lookup failed; serving from the vendor");
            }
        }
        found
    }

    /// Fetches the misses this request leads, and waits for the ones other
    /// requests are already fetching. Returns (fetched here, coalesced).
    async fn resolve_misses(
        self: &Arc<Self>,
        req: &Arc<EmbeddingRequest>,
        auth: &CallerAuth,
        misses: Vec<Miss>,
    ) -> Result<(Fetched, Vec<(usize, Entry)>), EmbedError> {
        let claims = self.inflight.claim(misses.iter().map(|m| m.hash));
        let mut lead = Vec::new();
        let mut follow = Vec::new();
        for (miss, claim) in misses.into_iter().zip(claims) {
            match claim {
                Claim::Lead(promise) => lead.push((miss, promise)),
                Claim::Follow(slot) => follow.push((miss, slot)),
            }
        }

        let leader = (!lead.is_empty()).then(|| {
            let this = Arc::clone(self);
            let req = Arc::clone(req);
            let auth = auth.clone();
            self.tasks
                .spawn(async move { this.fetch_and_store(&req, &auth, lead).await })
        });
        let followed = follow
            .into_iter()
            .map(|(miss, slot)| async move { (miss, inflight::wait(slot).await) })
            .collect::<FuturesUnordered<_>>()
            .collect::<Vec<_>>();

        let (led, followed) = match leader {
            Some(handle) => {
                let (led, followed) = tokio::join!(handle, followed);
                let led = led.map_err(|e| EmbedError::Internal(format!("fetch task: {e}")))??;
                (led, followed)
            }
            None => (Fetched::default(), followed.await),
        };

        let mut fetched = led;
        let mut coalesced = Vec::new();
        let mut orphans = Vec::new();
        for (miss, entry) in followed {
            match entry {
                Some(entry) => coalesced.push((miss.slot, entry)),
                None => orphans.push(miss),
            }
        }
        if !orphans.is_empty() {
            // The leader failed or went away: fetch these ourselves.
            let own = self.fetch_uncoalesced(req, auth, orphans).await?;
            fetched.billed_tokens += own.billed_tokens;
            fetched.entries.extend(own.entries);
        }
        Ok((fetched, coalesced))
    }

    async fn fetch_uncoalesced(
        self: &Arc<Self>,
        req: &EmbeddingRequest,
        auth: &CallerAuth,
        misses: Vec<Miss>,
    ) -> Result<Fetched, UpstreamError> {
        let items = misses.into_iter().map(|m| (m, None)).collect();
        self.fetch_and_store_inner(req, auth, items).await
    }

    async fn fetch_and_store(
        &self,
        req: &EmbeddingRequest,
        auth: &CallerAuth,
        lead: Vec<(Miss, Promise)>,
    ) -> Result<Fetched, UpstreamError> {
        let items = lead.into_iter().map(|(m, p)| (m, Some(p))).collect();
        self.fetch_and_store_inner(req, auth, items).await
    }

    /// Fetches `items` in vendor-sized chunks, stores every vector that came
    /// back valid (even if another chunk failed: it was paid for), then
    /// fulfils the promises.
    async fn fetch_and_store_inner(
        &self,
        req: &EmbeddingRequest,
        auth: &CallerAuth,
        items: Vec<(Miss, Option<Promise>)>,
    ) -> Result<Fetched, UpstreamError> {
        let model = req.model.as_str();
        let exact = self.exact_counts(req, &items).await;
        let weights: Vec<u64> = items
            .iter()
            .enumerate()
            .map(|(i, (m, _))| match &exact {
                Some(counts) => u64::from(counts[i]),
                None => req.inputs[m.input].byte_len() as u64,
            })
            .collect();
        let chunks = chunk(&weights, self.batch.max_inputs, self.batch.max_tokens);

        let mut results = futures_util::stream::iter(chunks)
            .map(|range| {
                let inputs: Vec<&Input> = items[range.clone()]
                    .iter()
                    .map(|(m, _)| &req.inputs[m.input])
                    .collect();
                let call = EmbedCall {
                    model,
                    inputs,
                    dimensions: req.dimensions,
                    user: req.user.as_deref(),
                    extra: &req.extra,
                    auth,
                };
                async move { (range, self.upstream.embed(&call).await) }
            })
            .buffer_unordered(self.batch.concurrency);

        let mut fetched = Fetched::default();
        let mut writes = Vec::new();
        let mut published = Vec::new();
        let mut first_error = None;
        while let Some((range, result)) = results.next().await {
            let answer = match result {
                Ok(answer) => answer,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let chunk_items = &items[range.clone()];
            let inputs: Vec<&Input> = chunk_items
                .iter()
                .map(|(m, _)| &req.inputs[m.input])
                .collect();
            let counts = match &exact {
                Some(counts) => counts[range].to_vec(),
                None => tokens::counts_for_call(model, &inputs, answer.prompt_tokens),
            };
            let billed = answer
                .prompt_tokens
                .unwrap_or_else(|| counts.iter().map(|c| u64::from(*c)).sum());
            self.record_spend(model, billed, inputs.len());
            fetched.billed_tokens += billed;
            for (((miss, _), vector), tokens) in chunk_items.iter().zip(&answer.vectors).zip(counts)
            {
                let entry = Entry::encode(&miss.hash, vector, tokens);
                writes.push((
                    miss.hash.redis_key(&self.key_prefix),
                    entry.as_bytes().clone(),
                ));
                published.push((miss.hash, entry.clone()));
                fetched.entries.push((miss.slot, entry));
            }
        }
        drop(results);

        if let Err(e) = self.store.put_many(&writes).await {
            self.metrics.store_errors.with_label_values(&["set"]).inc();
            self.metrics.store_up.set(0);
            tracing::warn!(error = %e, entries = writes.len(), "cache write failed");
        }

        // Publish after storing, so a request arriving once a promise is gone
        // finds the entry in Redis.
        let mut promises: HashMap<KeyHash, Promise> = items
            .into_iter()
            .filter_map(|(m, p)| p.map(|p| (m.hash, p)))
            .collect();
        for (hash, entry) in published {
            if let Some(p) = promises.remove(&hash) {
                p.fulfil(entry);
            }
        }
        // Unfulfilled promises drop here: their waiters fetch for themselves.
        drop(promises);

        match first_error {
            Some(e) => Err(e),
            None => Ok(fetched),
        }
    }

    /// Exact token counts for OpenAI models (tokenising off the async
    /// threads), `None` for models whose counts come from the vendor.
    async fn exact_counts(
        &self,
        req: &EmbeddingRequest,
        items: &[(Miss, Option<Promise>)],
    ) -> Option<Vec<u32>> {
        if !tokens::is_cl100k_model(&req.model) {
            return None;
        }
        let inputs: Vec<Input> = items
            .iter()
            .map(|(m, _)| req.inputs[m.input].clone())
            .collect();
        let model = req.model.clone();
        let count = move || {
            inputs
                .iter()
                .map(|i| tokens::exact_count(&model, i).unwrap_or(0))
                .collect::<Vec<u32>>()
        };
        match tokio::task::spawn_blocking(count).await {
            Ok(counts) => Some(counts),
            Err(e) => {
                tracing::error!(error = %e, "token counting failed");
                None
            }
        }
    }

    fn record_spend(&self, model: &str, billed: u64, inputs: usize) {
        self.metrics
            .upstream_tokens
            .with_label_values(&[model])
            .inc_by(billed);
        self.metrics
            .upstream_spent_usd
            .with_label_values(&[model])
            .inc_by(billed as f64 * self.price(model) / 1e6);
        self.metrics
            .upstream_inputs
            .with_label_values(&[model])
            .inc_by(inputs as u64);
    }
}

/// Splits items (by weight = tokens) into consecutive ranges holding at most
/// `max_inputs` items and `max_tokens` tokens; an item heavier than the
/// token limit travels alone and the vendor decides.
fn chunk(weights: &[u64], max_inputs: usize, max_tokens: u64) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut tokens = 0u64;
    for (i, w) in weights.iter().enumerate() {
        let full = i - start >= max_inputs || (i > start && tokens + w > max_tokens);
        if full {
            chunks.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += w;
    }
    if start < weights.len() {
        chunks.push(start..weights.len());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::chunk;

    #[test]
    fn chunks_respect_both_limits() {
        assert_eq!(chunk(&[1; 5], 2, 100), vec![0..2, 2..4, 4..5]);
        assert_eq!(
            chunk(&[60, 50, 10, 200, 1], 10, 100),
            vec![0..1, 1..3, 3..4, 4..5]
        );
        assert_eq!(chunk(&[], 2, 100), Vec::<std::ops::Range<usize>>::new());
    }
}
