//! An optional in-process cache in front of the store for hot keys, bounded in
//! bytes. Entries are immutable (a key is a content hash), so it can never
//! serve a stale vector; it only saves the store round trip and copy.

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
    /// `None` when `max_bytes` is 0 (disabled).
    pub fn new(max_bytes: u64) -> Option<L1> {
        (max_bytes > 0).then(|| L1 {
            entries: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, e: &Entry| {
                    u32::try_from(e.as_bytes().len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(OVERHEAD)
                })
                .build_with_hasher(KeyHashState::default()),
        })
    }

    pub fn get(&self, key: &KeyHash) -> Option<Entry> {
        self.entries.get(key)
    }

    pub fn insert(&self, key: KeyHash, entry: Entry) {
        self.entries.insert(key, entry);
    }
}
