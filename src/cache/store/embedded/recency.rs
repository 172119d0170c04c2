//! Least-recently-used eviction for `store.max_bytes`.
//!
//! Every entry carries the tick (unix milliseconds) of its last use, in
//! `last_use` and in the `by_use` index that orders entries by it. Writing
//! a mark on every hit would turn reads into disk writes, so uses are
//! gathered in memory ([`UseMarks`]) and written in the writer's
//! transactions at most once per [`MARKS_EVERY`]: an entry used many
//! times in that period costs one update. Eviction pops the oldest ticks
//! from `by_use` until the entries fit, inside the transaction that made
//! them too large, so the count and the entries never disagree.
//!
//! Entries are marked when written whether or not a bound is set, so a
//! bound set later finds them in write order.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redb::ReadableTable as _;

use super::tables::{Hash, Open, use_key};
use crate::cache::key::{KeyHash, KeyHashState};

/// How often uses gathered in memory are written.
pub(super) const MARKS_EVERY: Duration = Duration::from_secs(5);

/// Uses kept between writes at most; past it, further uses in the period
/// are not recorded (those entries keep their older mark).
const MAX_MARKS: usize = 65_536;

/// Entries used since the last write of marks.
pub(super) struct UseMarks {
    enabled: bool,
    keys: Mutex<std::collections::HashSet<KeyHash, KeyHashState>>,
}

impl UseMarks {
    /// Gathers uses only when something evicts by them.
    pub(super) fn new(enabled: bool) -> UseMarks {
        UseMarks {
            enabled,
            keys: Mutex::default(),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(super) fn note<'a>(&self, keys: impl Iterator<Item = &'a KeyHash>) {
        if !self.enabled {
            return;
        }
        let mut marks = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            if marks.len() >= MAX_MARKS {
                return;
            }
            marks.insert(*key);
        }
    }

    pub(super) fn take(&self) -> Vec<KeyHash> {
        let mut marks = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        marks.drain().collect()
    }
}

impl Open<'_> {
    /// Records that `hash` was used at `tick`.
    pub(super) fn set_last_use(&mut self, hash: &Hash, tick: u64) -> Result<(), redb::Error> {
        let old = self.last_use.insert(hash, tick)?.map(|v| v.value());
        match old {
            Some(old) if old == tick => return Ok(()),
            Some(old) => {
                self.by_use.remove(&use_key(old, hash))?;
            }
            None => {}
        }
        self.by_use.insert(&use_key(tick, hash), ())?;
        Ok(())
    }

    /// Marks the entries still present as used at `tick`.
    pub(super) fn mark_used(&mut self, keys: &[KeyHash], tick: u64) -> Result<(), redb::Error> {
        for key in keys {
            if self.last_use.get(&key.0)?.is_some() {
                self.set_last_use(&key.0, tick)?;
            }
        }
        Ok(())
    }

    /// Removes the least recently used entries until the rest take at most
    /// `max_bytes`; how many it removed.
    pub(super) fn evict_to(&mut self, max_bytes: u64) -> Result<u64, redb::Error> {
        let mut evicted = 0;
        while self.bytes > max_bytes {
            let oldest = self.by_use.pop_first()?.map(|(k, _)| *k.value());
            let Some(oldest) = oldest else { break };
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&oldest[8..]);
            // Its `by_use` key is gone already; `remove` takes the rest.
            if self.remove(&hash)? {
                evicted += 1;
            }
        }
        Ok(evicted)
    }
}
