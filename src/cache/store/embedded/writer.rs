//! The one writer: a thread that takes every write waiting (entries, meta,
//! ledger, compare-and-set, expiries, deletes), applies them in one
//! transaction with the use marks due, expired entries reaped and any
//! eviction, commits once, then answers each. Concurrent
//! requests thus share one commit (group commit) and its sync to disk,
//! while readers keep reading the last commit (redb's MVCC): a hit never
//! waits for a write.
//!
//! Commits are `Durability::Immediate`: `commit` returns once the data is
//! synced, so what the writer has acknowledged survives the process being
//! killed, and a power loss too where the disk honours the sync. With
//! quick repair, each commit also records the allocator state (two syncs
//! instead of one), so reopening after a crash does not walk the whole file.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, WriteTransaction};
use tokio::sync::oneshot;

use super::expiry::REAP_EVERY;
use super::recency::{MARKS_EVERY, UseMarks};
use super::tables::{Open, Tables};
use crate::cache::key::KeyHash;
use crate::cache::store::{Increment, StoreError};

/// A write transaction takes at most this many requests...
const MAX_BATCH_REQUESTS: usize = 4096;
/// ... or about this many bytes of values; the rest wait for the next one.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// How long the writer sleeps with nothing to do and no marks to write.
const IDLE: Duration = Duration::from_secs(3600);

pub(super) enum Op {
    /// Entries, and how long they live (`None`: forever).
    Put(Vec<(KeyHash, Bytes)>, Option<Duration>),
    /// Pushes the expiry of the stored ones to this long from now.
    Expire(Vec<KeyHash>, Duration),
    Delete(Vec<KeyHash>),
    CompareAndSet(Vec<(KeyHash, Bytes, Bytes)>),
    MetaSet(String, String),
    MetaSetNew(String, String),
    MetaDelete(String),
    LedgerAdd(Vec<(String, Increment)>),
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Put(items, _) => items.iter().map(|(_, v)| v.len()).sum(),
            Op::CompareAndSet(changes) => changes.iter().map(|(_, _, v)| v.len()).sum(),
            _ => 0,
        }
    }
}

/// What an applied request answers.
#[derive(Debug)]
pub(super) enum Done {
    Nothing,
    /// `MetaSetNew`: whether it set the field.
    Set(bool),
    /// `CompareAndSet`: how many values it replaced.
    Replaced(u64),
    /// `Delete`: how many entries there were.
    Deleted(u64),
}

pub(super) struct Request {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<Done, StoreError>>,
}

pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    pub(super) tables: Arc<Tables>,
    pub(super) marks: Arc<UseMarks>,
    pub(super) max_bytes: u64,
    pub(super) evicted: Arc<AtomicU64>,
    /// Whether some entry can expire (then the writer reaps, and lookups
    /// check expiries).
    pub(super) expiring: Arc<AtomicBool>,
    pub(super) requests: Receiver<Request>,
}

impl Writer {
    pub(super) fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("embgate-store-writer".into())
            .spawn(move || self.run())
    }

    /// Runs until every sender is gone, then writes the last marks.
    fn run(self) {
        let mut marks_written = Instant::now();
        loop {
            let mut wait = match self.marks.enabled() {
                true => MARKS_EVERY.saturating_sub(marks_written.elapsed()),
                false => IDLE,
            };
            let expiring = self.expiring.load(Ordering::Relaxed);
            if expiring {
                wait = wait.min(REAP_EVERY);
            }
            let mut batch = Vec::new();
            match self.requests.recv_timeout(wait) {
                Ok(request) => batch.push(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let marks = self.marks.take();
                    if !marks.is_empty() {
                        self.commit(Vec::new(), marks);
                    }
                    return;
                }
            }
            let mut bytes = batch.first().map_or(0, |r: &Request| r.op.bytes());
            while batch.len() < MAX_BATCH_REQUESTS && bytes < MAX_BATCH_BYTES {
                match self.requests.try_recv() {
                    Ok(request) => {
                        bytes += request.op.bytes();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            let marks = match self.marks.enabled() && marks_written.elapsed() >= MARKS_EVERY {
                true => {
                    marks_written = Instant::now();
                    self.marks.take()
                }
                false => Vec::new(),
            };
            if !batch.is_empty() || !marks.is_empty() || expiring {
                self.commit(batch, marks);
            }
        }
    }

    /// One transaction for `batch` and `marks`; then each request's answer.
    fn commit(&self, batch: Vec<Request>, marks: Vec<KeyHash>) {
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        match self.apply(&ops, &marks) {
            Ok((results, evicted, expiring)) => {
                self.evicted.fetch_add(evicted, Ordering::Relaxed);
                self.expiring.store(expiring, Ordering::Relaxed);
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                let message = e.to_string();
                tracing::debug!(error = %message, requests = replies.len(), "embedded store write failed");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Embedded(message.clone())));
                }
            }
        }
    }

    /// What `ops` answer, how many entries were evicted, and whether some
    /// entry can still expire.
    fn apply(&self, ops: &[Op], marks: &[KeyHash]) -> Result<(Vec<Done>, u64, bool), redb::Error> {
        let tick = unix_millis();
        let txn = begin(&self.db)?;
        let mut results = Vec::with_capacity(ops.len());
        let (evicted, expiring);
        {
            let mut open = Open::tables(&txn, &self.tables)?;
            for op in ops {
                results.push(apply(&mut open, op, tick)?);
            }
            open.mark_used(marks, tick)?;
            open.reap(tick)?;
            evicted = match self.max_bytes {
                0 => 0,
                max => open.evict_to(max)?,
            };
            expiring = open.expiring()?;
            open.save_bytes()?;
        }
        txn.commit()?;
        Ok((results, evicted, expiring))
    }
}

/// A write transaction as every commit of the store makes it: synced
/// before it returns, and recording the allocator state (quick repair).
pub(super) fn begin(db: &Database) -> Result<WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(true);
    Ok(txn)
}

fn apply(open: &mut Open<'_>, op: &Op, tick: u64) -> Result<Done, redb::Error> {
    Ok(match op {
        Op::Put(items, ttl) => {
            let expires_at = ttl.map(|ttl| tick.saturating_add(millis(ttl)));
            for (hash, value) in items {
                open.put(&hash.0, value, tick, expires_at)?;
            }
            Done::Nothing
        }
        Op::Expire(keys, ttl) => {
            let expires_at = tick.saturating_add(millis(*ttl));
            for hash in keys {
                open.extend(&hash.0, expires_at)?;
            }
            Done::Nothing
        }
        Op::Delete(keys) => {
            let mut deleted = 0;
            for hash in keys {
                deleted += u64::from(open.remove(&hash.0)?);
            }
            Done::Deleted(deleted)
        }
        Op::CompareAndSet(changes) => {
            let changes: Vec<_> = changes
                .iter()
                .map(|(hash, old, new)| (hash.0, old.as_ref(), new.as_ref()))
                .collect();
            Done::Replaced(open.compare_and_set(&changes)?)
        }
        Op::MetaSet(field, value) => {
            open.meta.insert(field.as_str(), value.as_str())?;
            Done::Nothing
        }
        Op::MetaSetNew(field, value) => Done::Set(open.meta_set_new(field, value)?),
        Op::MetaDelete(field) => {
            open.meta.remove(field.as_str())?;
            Done::Nothing
        }
        Op::LedgerAdd(increments) => {
            open.ledger_add(increments)?;
            Done::Nothing
        }
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The tick entries are marked with (and expiries counted in).
pub(super) fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(super) fn unix_now() -> u64 {
    unix_millis() / 1000
}
