//! Coalescing across gateway instances that share one Redis: a short lease
//! per key decides which instance pays for it; the others wait for the
//! entry to appear.

use std::time::Duration;

use super::{Embedder, Miss};
use crate::entry::Entry;
use crate::inflight::Promise;
use crate::key::KeyHash;

/// Keys this instance holds the fleet lease for, with their items.
pub(super) struct Leased {
    pub(super) items: Vec<(Miss, Promise)>,
    pub(super) leases: Vec<String>,
}

/// Coalescing across gateway instances through Redis leases.
pub(super) struct FleetSettings {
    /// Identifies this process as a lease holder.
    pub(super) token: String,
    pub(super) lease: Duration,
    pub(super) poll: Duration,
}

impl Embedder {
    /// Across gateway instances: takes a short Redis lease on each key; keys
    /// leased by another instance are awaited (polling Redis) until stored,
    /// or until the lease goes away, when this instance fetches them itself.
    pub(super) async fn wait_for_fleet(
        &self,
        fleet: &FleetSettings,
        dimensions: Option<u32>,
        items: Vec<(Miss, Promise)>,
    ) -> (Leased, Vec<(usize, Entry)>) {
        let lease_keys: Vec<String> = items
            .iter()
            .map(|(m, _)| m.hash.lease_key(&self.key_prefix))
            .collect();
        let won = match self
            .store
            .try_leases(&lease_keys, &fleet.token, fleet.lease)
            .await
        {
            Ok(won) => won,
            Err(e) => {
                self.store_failed("lease", &e);
                return (
                    Leased {
                        items,
                        leases: Vec::new(),
                    },
                    Vec::new(),
                );
            }
        };
        let mut ours = Leased {
            items: Vec::new(),
            leases: Vec::new(),
        };
        let mut theirs = Vec::new();
        for ((item, key), won) in items.into_iter().zip(lease_keys).zip(won) {
            if won {
                ours.items.push(item);
                ours.leases.push(key);
            } else {
                theirs.push((item, key));
            }
        }

        let mut shared = Vec::new();
        let deadline = tokio::time::Instant::now() + fleet.lease;
        while !theirs.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(fleet.poll).await;
            let hashes: Vec<KeyHash> = theirs.iter().map(|((m, _), _)| m.hash).collect();
            let found = self.lookup(&hashes, dimensions, true).await;
            let mut waiting = Vec::new();
            for (((miss, promise), key), entry) in theirs.into_iter().zip(found) {
                match entry {
                    Some(entry) => {
                        promise.fulfil(entry.clone());
                        shared.push((miss.slot, entry));
                    }
                    None => waiting.push(((miss, promise), key)),
                }
            }
            let keys: Vec<String> = waiting.iter().map(|(_, k)| k.clone()).collect();
            let alive = self.store.exist_many(&keys).await.unwrap_or_default();
            theirs = Vec::new();
            for (i, (item, key)) in waiting.into_iter().enumerate() {
                if alive.get(i).copied().unwrap_or(false) {
                    theirs.push((item, key));
                } else {
                    // The other instance gave up (or Redis is failing).
                    ours.items.push(item);
                }
            }
        }
        ours.items.extend(theirs.into_iter().map(|(item, _)| item));
        (ours, shared)
    }
}
