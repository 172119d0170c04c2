//! An optional in-process cache in front of the store for hot keys, bounded
//! in bytes. Entries are immutable (a key is a content hash), so it can
//! never serve a stale vector; it only saves the store's round trip and
//! transfer.

use std::time::Duration;

use moka::sync::Cache;

use crate::cache::entry::Entry;
use crate::cache::key::{KeyHash, KeyHashState};

/// Per-entry bookkeeping charged on top of the stored bytes.
const OVERHEAD: u32 = 96;

#[derive(Clone)]
pub struct L1 {
    entries: Cache<KeyHash, Entry, KeyHashState>,
}

impl L1 {
    /// `None` when `max_bytes` is 0 (disabled). With a `ttl`, an entry is
    /// kept at most that long, so it never outlives the store's copy by
    /// much.
    pub fn new(max_bytes: u64, ttl: Option<Duration>) -> Option<L1> {
        if max_bytes == 0 {
            return None;
        }
        let mut builder = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, e: &Entry| {
                u32::try_from(e.as_bytes().len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(OVERHEAD)
            });
        if let Some(ttl) = ttl {
            builder = builder.time_to_live(ttl);
        }
        Some(L1 {
            entries: builder.build_with_hasher(KeyHashState::default()),
        })
    }

    pub fn get(&self, key: &KeyHash) -> Option<Entry> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: KeyHash, entry: Entry) {
        self.entries.insert(key, entry);
    }
}
