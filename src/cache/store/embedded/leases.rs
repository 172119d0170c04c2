//! Leases for the embedded store. Coalescing across gateways needs a store
//! they share, so `coalesce.distributed` is refused with this store at
//! start; these leases still behave as Redis's do, within the process.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::key::{KeyHash, KeyHashState};

#[derive(Default)]
pub(super) struct Leases {
    held: Mutex<HashMap<KeyHash, (String, Instant), KeyHashState>>,
}

impl Leases {
    /// Takes each lease nobody holds (or whose holder let it expire).
    pub(super) fn try_take(&self, keys: &[KeyHash], token: &str, ttl: Duration) -> Vec<bool> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|_, (_, until)| *until > now);
        keys.iter()
            .map(|key| match held.contains_key(key) {
                true => false,
                false => {
                    held.insert(*key, (token.to_owned(), now + ttl));
                    true
                }
            })
            .collect()
    }

    /// Releases the leases still held with `token`.
    pub(super) fn release(&self, keys: &[KeyHash], token: &str) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            if held.get(key).is_some_and(|(t, _)| t == token) {
                held.remove(key);
            }
        }
    }

    pub(super) fn held(&self, keys: &[KeyHash]) -> Vec<bool> {
        let now = Instant::now();
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .map(|key| held.get(key).is_some_and(|(_, until)| *until > now))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_once_released_by_its_holder_only_and_expires() {
        let leases = Leases::default();
        let (a, b) = (KeyHash([1; 32]), KeyHash([2; 32]));
        let long = Duration::from_secs(60);
        assert_eq!(leases.try_take(&[a], "one", long), [true]);
        assert_eq!(leases.try_take(&[a, b], "two", long), [false, true]);
        leases.release(&[a], "two");
        assert_eq!(leases.held(&[a, b]), [true, true], "not two's to release");
        leases.release(&[a], "one");
        assert_eq!(leases.held(&[a]), [false]);
        assert_eq!(leases.try_take(&[a], "three", Duration::ZERO), [true]);
        assert_eq!(leases.held(&[a]), [false], "expired at once");
        assert_eq!(leases.try_take(&[a], "four", long), [true]);
    }
}
