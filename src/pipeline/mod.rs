//! The embedding pipeline: key every input, look all keys up in one round
//! trip, fetch only the distinct misses (coalesced with concurrent requests,
//! chunked to the vendor's limits), store what the vendor returned, and
//! hand back one entry per input in the caller's order.

use std::collections::hash_map;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod fetch;
mod fleet;

use fleet::FleetSettings;

use crate::auth::Caller;
use crate::config::Settings;
use crate::entry::Entry;
use crate::inflight::{self, Claim, Inflight, Promise};
use crate::key::{KeyHash, KeyHashMap, KeyHashState, KeyScope};
use crate::l1::L1;
use crate::ledger::Ledger;
use crate::metrics::{Metrics, RequestCounters};
use crate::protocol::EmbeddingRequest;
use crate::store::{Store, StoreError};
use crate::upstream::{CallerAuth, Upstream, UpstreamError, Upstreams};

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

/// Who a request is for, and where its misses go.
#[derive(Clone)]
pub struct CallContext {
    pub upstream: Arc<Upstream>,
    pub auth: CallerAuth,
    pub tenant: Arc<str>,
    /// Cache-key namespace: the upstream's, plus the tenant's when isolated.
    pub namespace: String,
}

impl CallContext {
    pub fn new(upstream: Arc<Upstream>, caller: Caller, model: &str, headers: &HeaderMap) -> Self {
        let mut namespace = upstream.namespace(model);
        if caller.isolated {
            namespace.push_str("\0tenant:");
            namespace.push_str(&caller.tenant);
        }
        CallContext {
            auth: CallerAuth::new(caller.key, headers),
            upstream,
            tenant: caller.tenant,
            namespace,
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
    upstreams: Upstreams,
    metrics: Arc<Metrics>,
    ledger: Arc<Ledger>,
    l1: Option<L1>,
    /// Looked up on every request that saved tokens.
    prices: foldhash::HashMap<String, f64>,
    key_prefix: String,
    batch: BatchLimits,
    inflight: Arc<Inflight>,
    fleet: Option<FleetSettings>,
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

/// What resolving misses produced, by slot.
#[derive(Default)]
struct Fetched {
    /// Fetched from the vendor by this request, and paid for.
    entries: Vec<(usize, Entry)>,
    /// Fetched by someone else (another request or gateway) meanwhile.
    shared: Vec<(usize, Entry)>,
    billed_tokens: u64,
}

impl Fetched {
    fn absorb(&mut self, other: Fetched) {
        self.entries.extend(other.entries);
        self.shared.extend(other.shared);
        self.billed_tokens += other.billed_tokens;
    }
}

impl Embedder {
    pub fn new(
        settings: &Settings,
        store: Store,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        ledger: Arc<Ledger>,
    ) -> Self {
        Embedder {
            store,
            upstreams,
            metrics,
            ledger,
            l1: L1::new(settings.l1.max_bytes),
            prices: settings.prices.clone().into_iter().collect(),
            key_prefix: settings.store.key_prefix.clone(),
            batch: BatchLimits {
                max_inputs: settings.upstream.max_inputs_per_call,
                max_tokens: settings.upstream.max_tokens_per_call,
                concurrency: settings.upstream.max_concurrency,
            },
            inflight: Arc::new(Inflight::default()),
            fleet: settings.coalesce.distributed.then(|| FleetSettings {
                token: format!("{:032x}", rand::random::<u128>()),
                lease: Duration::from_millis(settings.coalesce.lease_ms),
                poll: Duration::from_millis(settings.coalesce.poll_ms),
            }),
            tasks: TaskTracker::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
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
        ctx: CallContext,
    ) -> Result<Embedded, EmbedError> {
        let counters = self.metrics.request_counters(&ctx.tenant, &req.model);
        counters.tenant_requests.inc();
        // Key every input; duplicates share one slot.
        let hasher = KeyScope::of(&ctx.namespace, &req).hasher();
        let mut slot_of: KeyHashMap<usize> =
            KeyHashMap::with_capacity_and_hasher(req.inputs.len(), KeyHashState::default());
        let mut hashes: Vec<KeyHash> = Vec::with_capacity(req.inputs.len());
        let mut first_input: Vec<usize> = Vec::with_capacity(req.inputs.len());
        let input_slots: Vec<usize> = req
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| match slot_of.entry(hasher.key(input)) {
                hash_map::Entry::Occupied(o) => *o.get(),
                hash_map::Entry::Vacant(v) => {
                    hashes.push(*v.key());
                    first_input.push(i);
                    *v.insert(hashes.len() - 1)
                }
            })
            .collect();

        let mut found = self.lookup(&hashes, req.dimensions, false).await;
        let misses: Vec<Miss> = found
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(slot, _)| Miss {
                slot,
                hash: hashes[slot],
                input: first_input[slot],
            })
            .collect();
        let model = req.model.as_str();
        counters.hits.inc_by((hashes.len() - misses.len()) as u64);
        counters.misses.inc_by(misses.len() as u64);

        let mut fetched = Fetched::default();
        if !misses.is_empty() {
            fetched = self.resolve_misses(&req, &ctx, misses).await?;
            if !fetched.shared.is_empty() {
                self.metrics
                    .coalesced_inputs
                    .with_label_values(&[model])
                    .inc_by(fetched.shared.len() as u64);
            }
        }
        let fetched_slots = fetched.entries.len();
        let mut sent_tokens = 0u64;
        for (slot, entry) in fetched.entries {
            sent_tokens += u64::from(entry.tokens());
            found[slot] = Some(entry);
        }
        for (slot, entry) in fetched.shared {
            found[slot] = Some(entry);
        }

        let mut entries = Vec::with_capacity(input_slots.len());
        for slot in input_slots {
            match &found[slot] {
                Some(entry) => entries.push(entry.clone()),
                None => return Err(EmbedError::Internal("an input was left unresolved".into())),
            }
        }
        let prompt_tokens: u64 = entries.iter().map(|e| u64::from(e.tokens())).sum();
        self.record_saved(
            &counters,
            &ctx.tenant,
            model,
            prompt_tokens.saturating_sub(sent_tokens),
        );
        let cache = match fetched_slots {
            0 => CacheStatus::Hit,
            n if n == hashes.len() => CacheStatus::Miss,
            _ => CacheStatus::Partial,
        };
        Ok(Embedded {
            entries,
            prompt_tokens,
            upstream_tokens: fetched.billed_tokens,
            cache,
        })
    }

    /// The L1, then MGETs for the rest (`Store::get_chunks`). The keys of a
    /// failing MGET are misses, and an entry that does not verify is a miss
    /// (and gets overwritten). Repeated lookups (`again`) do not count the
    /// same corrupt entry twice.
    async fn lookup(
        &self,
        hashes: &[KeyHash],
        dimensions: Option<u32>,
        again: bool,
    ) -> Vec<Option<Entry>> {
        let mut found = vec![None; hashes.len()];
        // Slots still to look up in Redis.
        let mut wanted: Vec<usize> = Vec::with_capacity(hashes.len());
        match &self.l1 {
            Some(l1) => {
                for (slot, hash) in hashes.iter().enumerate() {
                    match l1.get(hash) {
                        Some(entry) => found[slot] = Some(entry),
                        None => wanted.push(slot),
                    }
                }
                let hits = (hashes.len() - wanted.len()) as u64;
                if hits > 0 {
                    self.metrics.l1_hits.inc_by(hits);
                }
                if wanted.is_empty() {
                    return found;
                }
            }
            None => wanted.extend(0..hashes.len()),
        }
        let keys: Vec<String> = wanted
            .iter()
            .map(|slot| hashes[*slot].redis_key(&self.key_prefix))
            .collect();
        let mut chunks = std::pin::pin!(self.store.get_chunks(&keys));
        let mut failed = None;
        // Each chunk is checked as it arrives, while later ones are in transfer.
        while let Some((range, values)) = chunks.next().await {
            let values = match values {
                Ok(values) => values,
                // Its keys stay misses; the other chunks still count.
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            for (i, value) in range.zip(values) {
                let Some(bytes) = value else { continue };
                let slot = wanted[i];
                let hash = &hashes[slot];
                match Entry::decode(hash, bytes, dimensions) {
                    Ok(entry) => {
                        if let Some(l1) = &self.l1 {
                            l1.insert(*hash, entry.clone());
                        }
                        found[slot] = Some(entry);
                    }
                    Err(_) if again => {}
                    Err(e) => {
                        self.metrics
                            .store_errors
                            .with_label_values(&["decode"])
                            .inc();
                        tracing::warn!(key = %keys[i], error = %e, "discarding undecodable entry");
                    }
                }
            }
        }
        match failed {
            Some(e) => self.store_failed("get", &e),
            None => self.metrics.store_up.set(1),
        }
        found
    }

    fn store_failed(&self, op: &str, e: &StoreError) {
        self.metrics.store_errors.with_label_values(&[op]).inc();
        self.metrics.store_up.set(0);
        tracing::warn!(op, error = %e, "store failed; serving from the vendor");
    }

    /// Fetches the misses this request leads, and waits for the ones other
    /// requests are already fetching.
    async fn resolve_misses(
        self: &Arc<Self>,
        req: &Arc<EmbeddingRequest>,
        ctx: &CallContext,
        misses: Vec<Miss>,
    ) -> Result<Fetched, EmbedError> {
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
            let ctx = ctx.clone();
            // The request's span goes along, so the fetch's log lines name it.
            self.tasks
                .spawn(async move { this.lead(&req, &ctx, lead).await }.in_current_span())
        });
        let followed = follow
            .into_iter()
            .map(|(miss, slot)| async move { (miss, inflight::wait(slot).await) })
            .collect::<FuturesUnordered<_>>()
            .collect::<Vec<_>>();

        let (mut fetched, followed) = match leader {
            Some(handle) => {
                let (led, followed) = tokio::join!(handle, followed);
                let led = led.map_err(|e| EmbedError::Internal(format!("fetch task: {e}")))??;
                (led, followed)
            }
            None => (Fetched::default(), followed.await),
        };

        let mut orphans = Vec::new();
        for (miss, entry) in followed {
            match entry {
                Some(entry) => fetched.shared.push((miss.slot, entry)),
                None => orphans.push((miss, None)),
            }
        }
        if !orphans.is_empty() {
            // The leader failed or went away: fetch these ourselves.
            let own = self.fetch(req, ctx, orphans).await?;
            fetched.absorb(own);
        }
        Ok(fetched)
    }

    /// Leads the fetch of keys nobody in this process is fetching.
    async fn lead(
        &self,
        req: &EmbeddingRequest,
        ctx: &CallContext,
        lead: Vec<(Miss, Promise)>,
    ) -> Result<Fetched, UpstreamError> {
        // Another request may have stored some of these between our lookup
        // and our claim; looking again closes that window.
        let hashes: Vec<KeyHash> = lead.iter().map(|(m, _)| m.hash).collect();
        let late = self.lookup(&hashes, req.dimensions, true).await;
        let mut shared = Vec::new();
        let mut pending = Vec::with_capacity(lead.len());
        for ((miss, promise), entry) in lead.into_iter().zip(late) {
            match entry {
                Some(entry) => {
                    promise.fulfil(entry.clone());
                    shared.push((miss.slot, entry));
                }
                None => pending.push((miss, promise)),
            }
        }

        let mut leases = Vec::new();
        if let Some(fleet) = &self.fleet {
            let (ours, from_fleet) = self.wait_for_fleet(fleet, req.dimensions, pending).await;
            shared.extend(from_fleet);
            leases = ours.leases;
            pending = ours.items;
        }

        let items = pending.into_iter().map(|(m, p)| (m, Some(p))).collect();
        let result = self.fetch(req, ctx, items).await;
        if let Some(fleet) = &self.fleet
            && !leases.is_empty()
            && let Err(e) = self.store.release_leases(&leases, &fleet.token).await
        {
            self.store_failed("lease", &e);
        }
        let mut fetched = result?;
        fetched.shared.extend(shared);
        Ok(fetched)
    }

    /// Tokens a request did not pay for: what it would have been billed
    /// minus what it sent upstream.
    fn record_saved(&self, counters: &RequestCounters, tenant: &str, model: &str, saved: u64) {
        if saved == 0 {
            return;
        }
        let price = self.price(model);
        let usd = saved as f64 * price / 1e6;
        counters.saved_tokens.inc_by(saved);
        counters.saved_usd.inc_by(usd);
        counters.tenant_saved_tokens.inc_by(saved);
        counters.tenant_saved_usd.inc_by(usd);
        self.ledger.record(tenant, model, saved, 0, price);
    }
}
