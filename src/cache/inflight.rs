//! Request coalescing inside one process: while one request fetches a key
//! from the vendor, other requests missing the same key wait for that fetch
//! instead of paying for it again.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::cache::entry::Entry;
use crate::cache::key::{KeyHash, KeyHashMap};

type Slot = watch::Receiver<Option<Entry>>;

#[derive(Default)]
pub struct Inflight {
    fetches: Mutex<KeyHashMap<Slot>>,
}

/// The leader's promise to publish an entry for one key.
pub struct Promise {
    hash: KeyHash,
    sender: watch::Sender<Option<Entry>>,
    inflight: Arc<Inflight>,
}

/// What [`Inflight::claim`] decided for each key, by position.
pub enum Claim {
    /// Nobody is fetching this key: the caller must, and keep its promise.
    Lead(Promise),
    /// Another request is fetching it: wait on this.
    Follow(Slot),
}

impl Inflight {
    pub fn claim(self: &Arc<Self>, hashes: impl Iterator<Item = KeyHash>) -> Vec<Claim> {
        let mut fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
        hashes
            .map(|hash| match fetches.get(&hash) {
                Some(slot) => Claim::Follow(slot.clone()),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    fetches.insert(hash, receiver);
                    Claim::Lead(Promise {
                        hash,
                        sender,
                        inflight: Arc::clone(self),
                    })
                }
            })
            .collect()
    }

    /// Keys currently being fetched (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.fetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Promise {
    pub fn hash(&self) -> &KeyHash {
        &self.hash
    }

    /// Hands the entry to every waiter, and to every request that claims
    /// the key while this promise is kept. Dropping a promise unfulfilled
    /// tells waiters to fetch for themselves.
    pub fn fulfil(&self, entry: Entry) {
        self.sender.send_replace(Some(entry));
    }
}

impl Drop for Promise {
    fn drop(&mut self) {
        let mut fetches = self
            .inflight
            .fetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Remove only our own registration.
        if fetches
            .get(&self.hash)
            .is_some_and(|slot| slot.same_channel(&self.sender.subscribe()))
        {
            fetches.remove(&self.hash);
        }
    }
}

/// Waits for a leader's entry; `None` if the leader failed or went away.
pub async fn wait(mut slot: Slot) -> Option<Entry> {
    slot.wait_for(Option::is_some).await.ok()?.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_entry_or_none() {
        let inflight = Arc::new(Inflight::default());
        let a = KeyHash([1; 32]);
        let b = KeyHash([2; 32]);
        let mut first = inflight.claim([a, b].into_iter());
        let second = inflight.claim([a, b].into_iter());
        assert!(first.iter().all(|c| matches!(c, Claim::Lead(_))));
        assert!(second.iter().all(|c| matches!(c, Claim::Follow(_))));
        assert_eq!(inflight.len(), 2);

        let origin = crate::cache::entry::Origin {
            model: "m",
            upstream: "u",
            tenant: None,
        };
        let entry = Entry::encode(&a, &origin, &[1.0], 1);
        let (Some(Claim::Lead(pb)), Some(Claim::Lead(pa))) = (first.pop(), first.pop()) else {
            panic!("leader claims expected");
        };
        pa.fulfil(entry.clone());
        drop(pb);
        // Kept after fulfilling, a promise still answers new claims at once.
        let Some(Claim::Follow(late)) = inflight.claim([a].into_iter()).pop() else {
            panic!("a kept promise is followed");
        };
        assert_eq!(wait(late).await, Some(entry.clone()));
        drop(pa);
        let mut waits = second.into_iter().map(|c| match c {
            Claim::Follow(slot) => wait(slot),
            Claim::Lead(_) => panic!("follower claim expected"),
        });
        let (wa, wb) = (waits.next(), waits.next());
        assert_eq!(wa.expect("a").await, Some(entry));
        assert_eq!(wb.expect("b").await, None);
        assert!(inflight.is_empty());
    }
}
