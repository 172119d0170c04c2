//! Coalescing across gateway instances that share one store: a short lease
//! per key decides which instance pays for it; the others wait for the
//! entry to appear.

use std::sync::Arc;
use std::time::Duration;

use super::{Miss, Pipeline};
use crate::cache::control::CachePolicy;
use crate::cache::entry::Entry;
use crate::cache::health::Side;
use crate::cache::inflight::Promise;
use crate::cache::key::KeyHash;

/// Keys this instance holds the fleet lease for, with their items.
pub(super) struct Leased {
    pub(super) items: Vec<(Miss, Promise)>,
    pub(super) leased: Vec<KeyHash>,
}

/// Coalescing across gateway instances through store leases.
pub(super) struct Fleet {
    /// Identifies this process as a lease holder.
    pub(super) token: Arc<str>,
    pub(super) lease: Duration,
    pub(super) poll: Duration,
}

impl Pipeline {
    /// Takes a short lease on each key; keys leased by another instance are
    /// awaited (polling the store) until stored, or until the lease goes
    /// away, when this instance fetches them itself.
    pub(super) async fn wait_for_fleet(
        &self,
        fleet: &Fleet,
        dimensions: Option<u32>,
        wait: Duration,
        policy: CachePolicy,
        items: Vec<(Miss, Promise)>,
    ) -> (Leased, Vec<(usize, Entry)>) {
        let store = self.cache.store();
        let health = self.cache.health();
        let on_our_own = |items| {
            let leased = Vec::new();
            (Leased { items, leased }, Vec::new())
        };
        if !health.allow(Side::Write) {
            return on_our_own(items);
        }
        let keys: Vec<KeyHash> = items.iter().map(|(m, _)| m.hash).collect();
        let won = match store.try_leases(&keys, &fleet.token, fleet.lease).await {
            Ok(won) => won,
            Err(e) => {
                health.failed(Side::Write, "lease", &e);
                return on_our_own(items);
            }
        };
        let mut ours = Leased {
            items: Vec::new(),
            leased: Vec::new(),
        };
        let mut theirs = Vec::new();
        for (item, won) in items.into_iter().zip(won) {
            if won {
                ours.leased.push(item.0.hash);
                ours.items.push(item);
            } else {
                theirs.push(item);
            }
        }

        let mut shared = Vec::new();
        let deadline = tokio::time::Instant::now() + fleet.lease;
        while !theirs.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(fleet.poll).await;
            let hashes: Vec<KeyHash> = theirs.iter().map(|(m, _)| m.hash).collect();
            let found = self.look_up(&hashes, dimensions, wait, true, policy).await;
            let mut waiting = Vec::new();
            for ((miss, promise), entry) in theirs.into_iter().zip(found) {
                match entry {
                    Some(entry) => {
                        promise.fulfil(entry.clone());
                        shared.push((miss.slot, entry));
                    }
                    None => waiting.push((miss, promise)),
                }
            }
            let keys: Vec<KeyHash> = waiting.iter().map(|(m, _)| m.hash).collect();
            let held = store.leases_held(&keys).await.unwrap_or_default();
            theirs = Vec::new();
            for (i, item) in waiting.into_iter().enumerate() {
                if held.get(i).copied().unwrap_or(false) {
                    theirs.push(item);
                } else {
                    // The other instance gave up (or the store is failing).
                    ours.items.push(item);
                }
            }
        }
        ours.items.extend(theirs);
        (ours, shared)
    }
}
