//! The cache: keys ([`key`]), the stored format ([`entry`]), the in-process
//! L1 in front ([`l1`]), the store behind it ([`store`], Redis or embedded),
//! single-flight for concurrent misses ([`inflight`]), and how the store is
//! doing ([`health`]).
//!
//! The cache never fails a request: a lookup the store cannot answer in
//! time is a miss, and a write it cannot take is skipped, both counted.

pub mod control;
pub mod entry;
pub mod health;
pub mod inflight;
pub mod key;
pub mod l1;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use self::entry::Entry;
use self::health::{Health, Side, SideState};
use self::inflight::{Claim, Inflight, Promise};
use self::key::{KeyHash, KeyHashState};
use self::l1::L1;
use self::store::{NodeHealth, Store};
use crate::config::StoreSettings;
use crate::metrics::Metrics;

pub struct Cache {
    store: Arc<dyn Store>,
    l1: Option<L1>,
    /// The store evicts by recency and must hear of the L1's hits, or the
    /// hottest entries would look the least used.
    note_l1_hits: bool,
    inflight: Arc<Inflight>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Writes run after the answer has gone out; shutdown waits for them.
    writes: TaskTracker,
    /// Writes in flight, for [`Cache::settled`].
    writing: Arc<tokio::sync::watch::Sender<usize>>,
    /// Bytes of entries waiting to be written: a slow store must not make
    /// the gateway hold every vector it fetched meanwhile.
    pending_write_bytes: Arc<AtomicU64>,
    max_pending_write_bytes: u64,
    /// Keys whose expiry a hit pushed back lately, each kept a tenth of its
    /// TTL: a hot entry is refreshed at most that often.
    refreshed: moka::sync::Cache<KeyHash, Duration, KeyHashState>,
    /// A lookup gets at least this long...
    min_wait: Duration,
    /// ... and at most this long, however slow the vendor is.
    max_wait: Duration,
}

/// How the store answers, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub store: &'static str,
    pub read: SideState,
    pub write: SideState,
    /// Each node of a store made of several (a cluster); empty otherwise.
    pub nodes: Vec<NodeHealth>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.read == SideState::Ok
            && self.write == SideState::Ok
            && self.nodes.iter().all(|n| n.error.is_none())
    }

    /// The nodes that do not answer, as `host:port`.
    pub fn failing_nodes(&self) -> impl Iterator<Item = &NodeHealth> {
        self.nodes.iter().filter(|n| n.error.is_some())
    }
}

/// Keys whose refresh is remembered at most (then the oldest are forgotten
/// and may be refreshed once more).
const REFRESHED_KEYS: u64 = 1 << 20;

/// How long a refreshed key is remembered: the value it was stored with,
/// a tenth of the TTL it got.
struct TenthOfTtl;

impl moka::Expiry<KeyHash, Duration> for TenthOfTtl {
    fn expire_after_create(
        &self,
        _: &KeyHash,
        remembered_for: &Duration,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(*remembered_for)
    }
}

/// What a fetch holds until its entries are stored, so nobody else pays
/// for them meanwhile: its single-flight claims in this process, and the
/// leases it took on them in a fleet sharing the store.
#[derive(Default)]
pub struct Holds {
    /// Fulfilled claims: requests arriving meanwhile get the entries.
    pub claims: Vec<Promise>,
    /// Fleet leases, released with `lease_token` once the write is done.
    pub leases: Vec<KeyHash>,
    pub lease_token: Option<Arc<str>>,
}

impl Holds {
    /// Lets go of everything held: claims at once, leases in the store.
    async fn release(self, store: &dyn Store, health: &Health) {
        drop(self.claims);
        if let Some(token) = self.lease_token
            && !self.leases.is_empty()
            && let Err(e) = store.release_leases(&self.leases, &token).await
        {
            health.failed(Side::Write, "lease", &e);
        }
    }
}

impl Cache {
    pub fn new(
        store: Arc<dyn Store>,
        settings: &StoreSettings,
        l1_max_bytes: u64,
        l1_ttl: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> Cache {
        let l1 = L1::new(l1_max_bytes, l1_ttl);
        Cache {
            note_l1_hits: l1.is_some() && store.tracks_use(),
            store,
            l1,
            refreshed: moka::sync::Cache::builder()
                .max_capacity(REFRESHED_KEYS)
                .expire_after(TenthOfTtl)
                .build_with_hasher(KeyHashState::default()),
            inflight: Arc::new(Inflight::default()),
            health: Arc::new(Health::new(settings, Arc::clone(&metrics))),
            metrics,
            writes: TaskTracker::new(),
            writing: Arc::new(tokio::sync::watch::Sender::new(0)),
            pending_write_bytes: Arc::new(AtomicU64::new(0)),
            max_pending_write_bytes: settings.max_pending_write_bytes,
            min_wait: Duration::from_millis(settings.timeout_ms),
            max_wait: Duration::from_millis(settings.max_wait_ms),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// How long a lookup may wait for the store when a miss would be paid
    /// at a vendor that typically answers in `vendor`: waiting is cheaper
    /// than paying again, and usually faster too.
    pub fn lookup_wait(&self, vendor: Option<Duration>) -> Duration {
        vendor
            .unwrap_or(self.max_wait)
            .clamp(self.min_wait, self.max_wait.max(self.min_wait))
    }

    /// The entries of `hashes` (`None` for a miss): the L1 first, then the
    /// store, waiting up to `wait` (plus 0.1 ms per key: large lookups take
    /// longer to transfer). A failed or late chunk of the lookup makes its
    /// keys misses; an entry that does not verify is a miss, counted (and
    /// overwritten once fetched again), unless this is a repeated lookup
    /// (`again`) that would count it twice.
    pub async fn lookup(
        &self,
        hashes: &[KeyHash],
        dimensions: Option<u32>,
        wait: Duration,
        again: bool,
    ) -> Vec<Option<Entry>> {
        let mut found = vec![None; hashes.len()];
        // Slots still to look up in the store.
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
                    if self.note_l1_hits {
                        let used: Vec<KeyHash> = (hashes.iter().zip(&found))
                            .filter(|(_, entry)| entry.is_some())
                            .map(|(hash, _)| *hash)
                            .collect();
                        self.store.note_use(&used);
                    }
                }
            }
            None => wanted.extend(0..hashes.len()),
        }
        if wanted.is_empty() || !self.health.allow(Side::Read) {
            return found;
        }
        let keys: Vec<KeyHash> = wanted.iter().map(|slot| hashes[*slot]).collect();
        let limit = wait + Duration::from_micros(100 * keys.len() as u64);
        let mut chunks = self.store.get_many(&keys, limit);
        let mut failed = None;
        let mut answered = false;
        // Each chunk is checked as it arrives, while later ones are in transfer.
        while let Some((range, values)) = chunks.next().await {
            let values = match values {
                Ok(values) => {
                    answered = true;
                    values
                }
                Err(e) => {
                    if e.is_timeout() {
                        self.metrics.store_timeouts.inc_by(range.len() as u64);
                    }
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
                        self.health.warn("decode", &e);
                    }
                }
            }
        }
        match failed {
            // Some nodes of a cluster answered: only the others' keys missed.
            Some(e) if answered => self.health.partly_failed(Side::Read, "get", &e),
            Some(e) => self.health.failed(Side::Read, "get", &e),
            None => self.health.succeeded(Side::Read),
        }
        found
    }

    /// Single-flight: for each key, whether this request fetches it or
    /// waits for the request already fetching it.
    pub fn claim(&self, hashes: impl Iterator<Item = KeyHash>) -> Vec<Claim> {
        self.inflight.claim(hashes)
    }

    /// Keeps what the vendor returned: in the L1 at once, in the store in
    /// the background, so the caller is answered without waiting for the
    /// write. The fetch's `holds` are let go once the write is done (or
    /// skipped): until then a request arriving for these keys is handed the
    /// entries instead of missing the store and paying again.
    pub fn keep(&self, fetched: Vec<(KeyHash, Entry)>, holds: Holds, ttl: Option<Duration>) {
        if fetched.is_empty() {
            self.let_go(holds);
            return;
        }
        if let Some(l1) = &self.l1 {
            for (hash, entry) in &fetched {
                l1.insert(*hash, entry.clone());
            }
        }
        let bytes: u64 = fetched.iter().map(|(_, e)| e.as_bytes().len() as u64).sum();
        let pending = self.pending_write_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if pending > self.max_pending_write_bytes || !self.health.allow(Side::Write) {
            self.pending_write_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.metrics
                .store_errors
                .with_label_values(&["set_skipped"])
                .inc();
            if pending > self.max_pending_write_bytes {
                self.health.warn(
                    "set_skipped",
                    &"writes are backing up (store.max_pending_write_bytes); these entries are not stored",
                );
            }
            self.let_go(holds);
            return;
        }
        let items: Vec<(KeyHash, Bytes)> = fetched
            .into_iter()
            .map(|(hash, entry)| (hash, entry.as_bytes().clone()))
            .collect();
        let write = self.store.put_many(items, ttl);
        let pending_bytes = Arc::clone(&self.pending_write_bytes);
        let gauge = self.metrics.store_pending_write_bytes.clone();
        gauge.set(i64::try_from(pending).unwrap_or(i64::MAX));
        let health = Arc::clone(&self.health);
        let store = Arc::clone(&self.store);
        let writing = Arc::clone(&self.writing);
        writing.send_modify(|n| *n += 1);
        // The request's span goes along, so a failed write's log line names it.
        let write = async move {
            let result = write.await;
            let left = pending_bytes.fetch_sub(bytes, Ordering::Relaxed) - bytes;
            gauge.set(i64::try_from(left).unwrap_or(i64::MAX));
            match result {
                Ok(()) => health.succeeded(Side::Write),
                Err(e) => health.failed(Side::Write, "set", &e),
            }
            holds.release(store.as_ref(), &health).await;
            writing.send_modify(|n| *n -= 1);
        };
        self.writes.spawn(write.in_current_span());
    }

    /// Pushes back the expiry of `hashes`, found by hits, to `ttl` from now;
    /// keys refreshed less than a tenth of `ttl` ago are left alone.
    pub fn refresh(&self, hashes: impl Iterator<Item = KeyHash>, ttl: Duration) {
        let due: Vec<KeyHash> = hashes
            .filter(|hash| {
                let fresh = self.refreshed.contains_key(hash);
                if !fresh {
                    self.refreshed.insert(*hash, ttl / 10);
                }
                !fresh
            })
            .collect();
        if due.is_empty() || !self.health.allow(Side::Write) {
            return;
        }
        let refresh = self.store.expire_many(&due, ttl);
        let health = Arc::clone(&self.health);
        self.writes.spawn(
            async move {
                match refresh.await {
                    Ok(()) => health.succeeded(Side::Write),
                    Err(e) => health.failed(Side::Write, "expire", &e),
                }
            }
            .in_current_span(),
        );
    }

    /// Lets go of `holds` with nothing to write.
    fn let_go(&self, holds: Holds) {
        if holds.leases.is_empty() {
            drop(holds);
            return;
        }
        let (store, health) = (Arc::clone(&self.store), Arc::clone(&self.health));
        self.writes
            .spawn(async move { holds.release(store.as_ref(), &health).await }.in_current_span());
    }

    /// Waits until no write is in flight (those started meanwhile included).
    pub async fn settled(&self) {
        let mut writing = self.writing.subscribe();
        let _ = writing.wait_for(|n| *n == 0).await;
    }

    /// Waits for the writes still running (graceful shutdown).
    pub async fn drain(&self) {
        self.writes.close();
        self.writes.wait().await;
    }

    /// Asks the store whether it reads and writes now (a ping and a tiny
    /// write), and says what the cache knows of each side.
    pub async fn readiness(&self) -> Readiness {
        let limit = self.max_wait.max(Duration::from_millis(500));
        let (read, write, nodes) = tokio::join!(
            bounded(limit, self.store.ping()),
            bounded(limit, self.store.probe_write()),
            self.store.nodes(),
        );
        // The ping and the probe each reach one node: with others still
        // answering, that node's failure is the cluster's partial one.
        let others_answer = nodes.iter().any(|n| n.error.is_none());
        for (side, op, result) in [
            (Side::Read, "ping", read),
            (Side::Write, "write_probe", write),
        ] {
            match result {
                Ok(()) => self.health.succeeded(side),
                Err(e) if others_answer => self.health.partly_failed(side, op, &e),
                Err(e) => self.health.failed(side, op, &e),
            }
        }
        Readiness {
            store: self.store.kind(),
            read: self.health.state(Side::Read),
            write: self.health.state(Side::Write),
            nodes,
        }
    }
}

async fn bounded(
    limit: Duration,
    op: impl Future<Output = Result<(), store::StoreError>>,
) -> Result<(), store::StoreError> {
    tokio::time::timeout(limit, op)
        .await
        .unwrap_or(Err(store::StoreError::Timeout(limit)))
}
