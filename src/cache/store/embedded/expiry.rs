//! Entries written with a TTL (`cache.ttl_secs`): each has its expiry in
//! `expires` and in the `by_expiry` index ordered by it. Lookups treat an
//! entry past its expiry as absent at once; the writer deletes such entries
//! oldest first, a bounded number per transaction ([`REAP_PER_COMMIT`]),
//! and wakes at least every [`REAP_EVERY`] while any entry can expire.

use std::time::Duration;

use redb::{ReadableTable as _, ReadableTableMetadata as _};

use super::tables::{Hash, Open, use_key};

/// How often the writer looks for expired entries while some can expire.
pub(super) const REAP_EVERY: Duration = Duration::from_secs(1);

/// Expired entries deleted per transaction at most: a burst of expiries is
/// spread over several commits instead of stalling one.
pub(super) const REAP_PER_COMMIT: usize = 4096;

impl Open<'_> {
    /// Sets when `hash` expires (unix ms), or that it never does.
    pub(super) fn set_expiry(
        &mut self,
        hash: &Hash,
        expires_at: Option<u64>,
    ) -> Result<(), redb::Error> {
        let old = match expires_at {
            Some(at) => self.expires.insert(hash, at)?.map(|v| v.value()),
            None => self.expires.remove(hash)?.map(|v| v.value()),
        };
        if old == expires_at {
            return Ok(());
        }
        if let Some(old) = old {
            self.by_expiry.remove(&use_key(old, hash))?;
        }
        if let Some(at) = expires_at {
            self.by_expiry.insert(&use_key(at, hash), ())?;
        }
        Ok(())
    }

    /// Moves the expiry of `hash`, if it is stored, to `expires_at`.
    pub(super) fn extend(&mut self, hash: &Hash, expires_at: u64) -> Result<(), redb::Error> {
        if self.entries.get(hash)?.is_some() {
            self.set_expiry(hash, Some(expires_at))?;
        }
        Ok(())
    }

    /// Deletes up to [`REAP_PER_COMMIT`] entries expired at `now` (unix
    /// ms); how many.
    pub(super) fn reap(&mut self, now: u64) -> Result<u64, redb::Error> {
        let mut reaped = 0;
        for _ in 0..REAP_PER_COMMIT {
            let first = self.by_expiry.first()?.map(|(k, _)| *k.value());
            let Some(first) = first else { break };
            let mut at = [0u8; 8];
            at.copy_from_slice(&first[..8]);
            if u64::from_be_bytes(at) > now {
                break;
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&first[8..]);
            if self.remove(&hash)? {
                reaped += 1;
            } else {
                // An index line without its entry: drop the line.
                self.by_expiry.remove(&first)?;
                self.expires.remove(&hash)?;
            }
        }
        Ok(reaped)
    }

    /// Whether any entry can expire.
    pub(super) fn expiring(&self) -> Result<bool, redb::Error> {
        Ok(!self.by_expiry.is_empty()?)
    }
}
