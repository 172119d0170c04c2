//! The embedding pipeline, a thin coordinator: key every input, look the
//! keys up in the [`Cache`], fetch only the distinct misses from the vendor
//! ([`fetch`]; single-flight with concurrent requests, and across gateways
//! with `coalesce.distributed`: [`fleet`]), and hand back one entry per
//! input in the caller's order with an [`Outcome`] saying what happened.

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

use fleet::Fleet;

use crate::accounting::Accounting;
use crate::auth::Caller;
use crate::cache::control::CachePolicy;
use crate::cache::entry::Entry;
use crate::cache::inflight::{self, Claim, Promise};
use crate::cache::key::{KeyHash, KeyHashMap, KeyHashState, KeyScope};
use crate::cache::{Cache, Holds};
use crate::config::{CacheSettings, Settings};
use crate::protocol::EmbeddingRequest;
use crate::vendor::batch::BatchLimits;
use crate::vendor::{CallerAuth, Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheStatus {
    /// Nothing was fetched from the vendor for this request.
    #[default]
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
    /// The tenant whose entries are kept apart, recorded in them.
    pub isolated_tenant: Option<Arc<str>>,
    /// What this request may do with the cache.
    pub policy: CachePolicy,
}

impl CallContext {
    pub fn new(
        upstream: Arc<Upstream>,
        caller: Caller,
        model: &str,
        headers: &HeaderMap,
        policy: CachePolicy,
    ) -> Self {
        let mut namespace = upstream.namespace(model);
        if caller.isolated {
            namespace.push_str("\0tenant:");
            namespace.push_str(&caller.tenant);
        }
        CallContext {
            auth: CallerAuth::new(caller.key, headers),
            upstream,
            isolated_tenant: caller.isolated.then(|| Arc::clone(&caller.tenant)),
            tenant: caller.tenant,
            namespace,
            policy,
        }
    }
}

/// What embedding one request did.
#[derive(Debug)]
pub struct Outcome {
    /// One entry per request input, in the caller's order.
    pub entries: Vec<Entry>,
    /// Distinct inputs (duplicates in a request share one key).
    pub distinct: usize,
    /// Distinct inputs found in the cache.
    pub hits: usize,
    /// Distinct inputs another request (or gateway) fetched meanwhile.
    pub coalesced: usize,
    /// Distinct inputs this request paid the vendor for.
    pub fetched: usize,
    /// Tokens the vendor billed this request.
    pub billed_tokens: u64,
    /// Tokens of the whole request as the vendor bills them.
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those of the inputs this request paid for.
    pub fetched_tokens: u64,
}

impl Outcome {
    pub fn cache_status(&self) -> CacheStatus {
        match self.fetched {
            0 => CacheStatus::Hit,
            n if n == self.distinct => CacheStatus::Miss,
            _ => CacheStatus::Partial,
        }
    }

    /// Tokens this request did not pay for: those of the inputs it did not
    /// send upstream.
    pub fn saved_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_sub(self.fetched_tokens)
    }
}

pub struct Pipeline {
    cache: Arc<Cache>,
    accounting: Arc<Accounting>,
    /// How long entries live (`cache.*`).
    lifetimes: CacheSettings,
    limits: BatchLimits,
    fleet: Option<Fleet>,
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

/// A request's inputs as keys: duplicates share one slot.
struct Keyed {
    /// One key per slot.
    hashes: Vec<KeyHash>,
    /// The first input of each slot.
    first_input: Vec<usize>,
    /// The slot of each input.
    input_slots: Vec<usize>,
}

impl Keyed {
    fn new(req: &EmbeddingRequest, namespace: &str) -> Keyed {
        let hasher = KeyScope::of(namespace, req).hasher();
        let n = req.inputs.len();
        let mut slot_of: KeyHashMap<usize> =
            KeyHashMap::with_capacity_and_hasher(n, KeyHashState::default());
        let mut hashes = Vec::with_capacity(n);
        let mut first_input = Vec::with_capacity(n);
        let input_slots = req
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
        Keyed {
            hashes,
            first_input,
            input_slots,
        }
    }
}

impl Pipeline {
    pub fn new(settings: &Settings, cache: Arc<Cache>, accounting: Arc<Accounting>) -> Self {
        Pipeline {
            cache,
            accounting,
            lifetimes: settings.cache.clone(),
            limits: BatchLimits::of(&settings.upstream),
            fleet: settings.coalesce.distributed.then(|| Fleet {
                token: Arc::from(format!("{:032x}", rand::random::<u128>())),
                lease: Duration::from_millis(settings.coalesce.lease_ms),
                poll: Duration::from_millis(settings.coalesce.poll_ms),
            }),
            tasks: TaskTracker::new(),
        }
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Waits for fetches still running, then for the cache writes they
    /// started (graceful shutdown).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.cache.drain().await;
    }

    /// The keys `req` has in `ctx`'s namespace, one per distinct input.
    pub fn keys(req: &EmbeddingRequest, ctx: &CallContext) -> Vec<KeyHash> {
        Keyed::new(req, &ctx.namespace).hashes
    }

    pub async fn embed(
        self: &Arc<Self>,
        req: Arc<EmbeddingRequest>,
        ctx: CallContext,
    ) -> Result<Outcome, EmbedError> {
        let keyed = Keyed::new(&req, &ctx.namespace);
        let wait = self.cache.lookup_wait(ctx.upstream.typical_latency());
        let mut found = self
            .look_up(
                &keyed.hashes,
                req.stored_dimensions(),
                wait,
                false,
                ctx.policy,
            )
            .await;
        if let Some(ttl) = self.lifetimes.ttl(&req.model)
            && self.lifetimes.refresh_ttl_on_hit
        {
            let hits = keyed.hashes.iter().zip(&found).filter(|(_, e)| e.is_some());
            self.cache.refresh(hits.map(|(hash, _)| *hash), ttl);
        }
        let misses: Vec<Miss> = found
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none())
            .map(|(slot, _)| Miss {
                slot,
                hash: keyed.hashes[slot],
                input: keyed.first_input[slot],
            })
            .collect();
        let hits = keyed.hashes.len() - misses.len();

        let fetched = match misses.is_empty() {
            true => Fetched::default(),
            false => self.resolve_misses(&req, &ctx, misses, wait).await?,
        };
        let paid = fetched.entries.len();
        let coalesced = fetched.shared.len();
        let mut fetched_tokens = 0u64;
        for (slot, entry) in fetched.entries {
            fetched_tokens += u64::from(entry.tokens());
            found[slot] = Some(entry);
        }
        for (slot, entry) in fetched.shared {
            found[slot] = Some(entry);
        }

        let mut entries = Vec::with_capacity(keyed.input_slots.len());
        for slot in keyed.input_slots {
            match &found[slot] {
                Some(entry) => entries.push(entry.clone()),
                None => return Err(EmbedError::Internal("an input was left unresolved".into())),
            }
        }
        let prompt_tokens = entries.iter().map(|e| u64::from(e.tokens())).sum();
        Ok(Outcome {
            entries,
            distinct: keyed.hashes.len(),
            hits,
            coalesced,
            fetched: paid,
            billed_tokens: fetched.billed_tokens,
            prompt_tokens,
            fetched_tokens,
        })
    }

    /// The cache's lookup as `policy` allows: none when the caller wants
    /// every input fresh, and entries older than its `max-age` as misses.
    async fn look_up(
        &self,
        hashes: &[KeyHash],
        dimensions: Option<u32>,
        wait: Duration,
        again: bool,
        policy: CachePolicy,
    ) -> Vec<Option<Entry>> {
        if !policy.read {
            return vec![None; hashes.len()];
        }
        let mut found = self.cache.lookup(hashes, dimensions, wait, again).await;
        if policy.max_age.is_some() {
            for entry in &mut found {
                if entry.as_ref().is_some_and(|e| !policy.accepts(e)) {
                    *entry = None;
                }
            }
        }
        found
    }

    /// Fetches the misses this request leads, and waits for the ones other
    /// requests are already fetching.
    async fn resolve_misses(
        self: &Arc<Self>,
        req: &Arc<EmbeddingRequest>,
        ctx: &CallContext,
        misses: Vec<Miss>,
        wait: Duration,
    ) -> Result<Fetched, EmbedError> {
        if !ctx.policy.read {
            // Fresh means from the vendor now, not handed over by another
            // request's fetch (which may have answered a while ago).
            let this = Arc::clone(self);
            let (req, ctx) = (Arc::clone(req), ctx.clone());
            let items = misses.into_iter().map(|m| (m, None)).collect();
            let fetch = async move { this.fetch(&req, &ctx, items, Holds::default()).await };
            return self
                .tasks
                .spawn(fetch.in_current_span())
                .await
                .map_err(|e| EmbedError::Internal(format!("fetch task: {e}")))?
                .map_err(EmbedError::from);
        }
        let claims = self.cache.claim(misses.iter().map(|m| m.hash));
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
                .spawn(async move { this.lead(&req, &ctx, lead, wait).await }.in_current_span())
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
            let own = self.fetch(req, ctx, orphans, Holds::default()).await?;
            fetched.absorb(own);
        }
        Ok(fetched)
    }

    /// Leads the fetch of keys nobody in this process is fetching.
    async fn lead(
        &self,
        req: &Arc<EmbeddingRequest>,
        ctx: &CallContext,
        lead: Vec<(Miss, Promise)>,
        wait: Duration,
    ) -> Result<Fetched, UpstreamError> {
        // Another request may have stored some of these between our lookup
        // and our claim; looking again closes that window.
        let hashes: Vec<KeyHash> = lead.iter().map(|(m, _)| m.hash).collect();
        let late = self
            .look_up(&hashes, req.stored_dimensions(), wait, true, ctx.policy)
            .await;
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

        // Leases on the keys we fetch are let go once their entries are
        // stored, so another gateway polling for them finds them.
        let mut holds = Holds::default();
        // A caller wanting fresh vectors does not wait for the store to show
        // one: it would show the old one.
        if let Some(fleet) = self.fleet.as_ref().filter(|_| ctx.policy.read) {
            let (ours, from_fleet) = self
                .wait_for_fleet(fleet, req.stored_dimensions(), wait, ctx.policy, pending)
                .await;
            shared.extend(from_fleet);
            holds.leases = ours.leased;
            holds.lease_token = Some(Arc::clone(&fleet.token));
            pending = ours.items;
        }

        let items = pending.into_iter().map(|(m, p)| (m, Some(p))).collect();
        let mut fetched = self.fetch(req, ctx, items, holds).await?;
        fetched.shared.extend(shared);
        Ok(fetched)
    }
}
