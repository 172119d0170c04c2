//! The cache: keys ([`key`]), the stored format ([`entry`]), the in-process
//! L1 in front ([`l1`]), the store behind it ([`store`], Redis or embedded),
//! single-flight for concurrent misses ([`inflight`]), and how the store is
//! doing ([`health`]).
//!
//! The cache never fails a request: a lookup the store cannot answer in
//! time is a miss, and a write it cannot take is skipped, both counted.

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
use self::key::KeyHash;
use self::l1::L1;
use self::store::{NodeHealth, Store};
use crate::config::StoreSettings;
use crate::metrics::Metrics;

pub struct Cache {
    store: Arc<dyn Store>,
    l1: Option<L1>,
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

impl Cache {
    pub fn new(
        store: Arc<dyn Store>,
        settings: &StoreSettings,
        l1_max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Cache {
        Cache {
            store,
            l1: L1::new(l1_max_bytes),
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
    /// write. `holds` are the fetch's single-flight claims, already
    /// fulfilled: they stay registered until the write is done, so a request
    /// arriving meanwhile gets the entry from them instead of missing the
    /// store and paying again.
    pub fn keep(&self, fetched: Vec<(KeyHash, Entry)>, holds: Vec<Promise>) {
        if fetched.is_empty() {
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
            return;
        }
        let items: Vec<(KeyHash, Bytes)> = fetched
            .into_iter()
            .map(|(hash, entry)| (hash, entry.as_bytes().clone()))
            .collect();
        let write = self.store.put_many(items);
        let pending_bytes = Arc::clone(&self.pending_write_bytes);
        let gauge = self.metrics.store_pending_write_bytes.clone();
        gauge.set(i64::try_from(pending).unwrap_or(i64::MAX));
        let health = Arc::clone(&self.health);
        let writing = Arc::clone(&self.writing);
        writing.send_modify(|n| *n += 1);
        // The request's span goes along, so a failed write's log line names it.
        let write = async move {
            let result = write.await;
            let left = pending_bytes.fetch_sub(bytes, Ordering::Relaxed) - bytes;
            gauge.set(i64::try_from(left).unwrap_or(i64::MAX));
            writing.send_modify(|n| *n -= 1);
            match result {
                Ok(()) => health.succeeded(Side::Write),
                Err(e) => health.failed(Side::Write, "set", &e),
            }
            drop(holds);
        };
        self.writes.spawn(write.in_current_span());
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
