//! The embedded store: the cache in one file of this process's own, with
//! redb (pure Rust, ACID, crash-safe copy-on-write B-trees), for a gateway
//! that runs without Redis.
//!
//! Lookups read the last commit through one read transaction per call, on
//! the calling task when they are small, on the blocking pool in chunks
//! when they are large ([`INLINE_KEYS`]). Writes of every kind go to one
//! writer thread that commits them in groups ([`writer`]). Only one process
//! opens the file at a time ([`lock`]). With `store.max_bytes`, the least
//! recently used entries are evicted past the bound ([`recency`]); entries
//! written with a TTL expire ([`expiry`]).

mod expiry;
mod leases;
pub mod lock;
mod reads;
mod recency;
mod tables;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream};
use futures_util::{FutureExt as _, StreamExt as _};
use redb::{Builder, Database, DatabaseError, ReadableDatabase as _};
use tokio::sync::oneshot;

use self::leases::Leases;
use self::lock::Lock;
use self::reads::Snapshot;
use self::recency::UseMarks;
use self::tables::{Open, Tables};
use self::writer::{Done, Op, Request, Writer};
use super::{Chunk, Cursor, EntryHead, Increment, Scanned, Store, StoreError, StoreSize};
use crate::cache::key::{KeyHash, KeyLayout};

/// Lookups of at most this many keys read on the calling task: measured,
/// that costs about as much as handing the read to the blocking pool and
/// back. Larger ones go to the blocking pool, so that a runtime worker is
/// not held reading (or waiting for the disk) while other requests wait.
pub const INLINE_KEYS: usize = 16;

/// Keys per chunk of a large lookup: the caller checks a chunk while the
/// next is read.
pub const CHUNK_KEYS: usize = 256;

/// The `meta` field the write probe sets.
const PROBE_FIELD: &str = "write_probe";

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Evict least recently used entries past this many bytes; 0: never.
    pub max_bytes: u64,
    /// redb's page cache.
    pub cache_bytes: u64,
    /// For writes, which wait for the writer's commit.
    pub write_timeout: Duration,
}

#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    tables: Arc<Tables>,
    marks: Arc<UseMarks>,
    evicted: Arc<AtomicU64>,
    /// Some entry can expire: lookups then check expiries.
    expiring: Arc<AtomicBool>,
    leases: Leases,
    write_timeout: Duration,
    /// To the writer; taken on drop so that it finishes.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    /// Released last, once the database is closed.
    _lock: Lock,
}

impl Drop for Inner {
    /// Lets the writer finish what it was given and write the last marks,
    /// so the file is closed cleanly before the lock is released.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens (creating it and its directory if need be) the store at `path`.
    pub fn open(
        path: &Path,
        layout: KeyLayout,
        options: Options,
    ) -> Result<EmbeddedStore, StoreError> {
        // Named in full in logs and errors: a relative path depends on
        // where the process was started.
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let lock = Lock::acquire(path)?;
        let failed =
            |e: &dyn std::fmt::Display| StoreError::Embedded(format!("{}: {e}", path.display()));
        let db = Builder::new()
            .set_cache_size(usize::try_from(options.cache_bytes).unwrap_or(usize::MAX))
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                    path: path.to_owned(),
                    holder: "another process".into(),
                },
                e => failed(&e),
            })?;
        let db = Arc::new(db);
        let tables = Arc::new(Tables::new(&layout));
        let evicted = prepare(&db, &tables, options.max_bytes).map_err(|e| failed(&e))?;
        let marks = Arc::new(UseMarks::new(options.max_bytes > 0));
        let evicted = Arc::new(AtomicU64::new(evicted));
        let expiring = reads::expiring(&db, &tables).map_err(|e| failed(&e))?;
        let expiring = Arc::new(AtomicBool::new(expiring));
        let (requests, received) = mpsc::channel();
        let writer = Writer {
            db: Arc::clone(&db),
            tables: Arc::clone(&tables),
            marks: Arc::clone(&marks),
            max_bytes: options.max_bytes,
            evicted: Arc::clone(&evicted),
            expiring: Arc::clone(&expiring),
            requests: received,
        }
        .spawn()
        .map_err(|source| StoreError::Io {
            path: path.to_owned(),
            source,
        })?;
        let store = EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                tables,
                marks,
                evicted,
                expiring,
                leases: Leases::default(),
                write_timeout: options.write_timeout,
                requests: Some(requests),
                writer: Some(writer),
                _lock: lock,
            }),
        };
        if let Ok((entries, bytes)) = reads::size(&store.inner.db, &store.inner.tables) {
            tracing::info!(path = %path.display(), entries, bytes, "embedded store open");
        }
        Ok(store)
    }

    /// Hands `op` to the writer; resolves once it is committed.
    fn write(&self, op: Op) -> BoxFuture<'static, Result<Done, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .inner
            .requests
            .as_ref()
            .is_some_and(|requests| requests.send(Request { op, reply }).is_ok());
        let limit = self.inner.write_timeout;
        async move {
            if !sent {
                return Err(StoreError::Embedded("the writer has stopped".into()));
            }
            match tokio::time::timeout(limit, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(StoreError::Embedded(
                    "the writer stopped before committing".into(),
                )),
                Err(_) => Err(StoreError::Timeout(limit)),
            }
        }
        .boxed()
    }

    fn write_unit(&self, op: Op) -> BoxFuture<'static, Result<(), StoreError>> {
        let done = self.write(op);
        async move { done.await.map(|_| ()) }.boxed()
    }

    /// Runs `read` on the blocking pool (scans copy many values).
    fn read_blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let inner = Arc::clone(&self.inner);
        async move {
            tokio::task::spawn_blocking(move || read(&inner))
                .await
                .unwrap_or_else(|e| Err(StoreError::Embedded(format!("read task: {e}"))))
        }
        .boxed()
    }
}

impl Inner {
    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let expiring = self.expiring.load(Ordering::Relaxed);
        Ok(Snapshot::take(&self.db, &self.tables, expiring)?)
    }

    /// Reads `keys` through `snapshot`, noting the ones found as used.
    fn values(
        &self,
        snapshot: &Snapshot,
        keys: &[KeyHash],
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        let values = snapshot.values(keys)?;
        if self.marks.enabled() {
            let found = keys.iter().zip(&values).filter(|(_, v)| v.is_some());
            self.marks.note(found.map(|(k, _)| k));
        }
        Ok(values)
    }

    /// A large lookup, chunk by chunk from one snapshot, into `chunks`.
    fn send_values(&self, keys: &[KeyHash], chunks: &tokio::sync::mpsc::Sender<Chunk>) {
        let snapshot = match self.snapshot() {
            Ok(snapshot) => snapshot,
            Err(e) => {
                let _ = chunks.blocking_send((0..keys.len(), Err(e)));
                return;
            }
        };
        for (i, chunk) in keys.chunks(CHUNK_KEYS).enumerate() {
            let start = i * CHUNK_KEYS;
            let (range, values) = match self.values(&snapshot, chunk) {
                Ok(values) => (start..start + chunk.len(), Ok(values)),
                // The rest of the lookup fails with it.
                Err(e) => (start..keys.len(), Err(e)),
            };
            let failed = values.is_err();
            // A caller that gave up has dropped the receiver.
            if chunks.blocking_send((range, values)).is_err() || failed {
                return;
            }
        }
    }
}

/// Creates the keyspace's tables, and evicts what a lowered bound no longer
/// allows; how many it evicted.
fn prepare(db: &Database, tables: &Tables, max_bytes: u64) -> Result<u64, redb::Error> {
    let txn = writer::begin(db)?;
    let evicted = {
        let mut open = Open::tables(&txn, tables)?;
        let evicted = match max_bytes {
            0 => 0,
            max => open.evict_to(max)?,
        };
        open.save_bytes()?;
        evicted
    };
    txn.commit()?;
    Ok(evicted)
}

/// The chunks of a lookup of `n` keys as `received`, within `limit`: what
/// has not arrived by then fails as a timeout.
fn within(
    received: tokio::sync::mpsc::Receiver<Chunk>,
    n: usize,
    limit: Duration,
) -> BoxStream<'static, Chunk> {
    let deadline = tokio::time::Instant::now() + limit;
    stream::unfold((received, 0), move |(mut received, next)| async move {
        if next >= n {
            return None;
        }
        let chunk = match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => (
                next..n,
                Err(StoreError::Embedded("the lookup ended early".into())),
            ),
            Err(_) => (next..n, Err(StoreError::Timeout(limit))),
        };
        let end = chunk.0.end;
        Some((chunk, (received, end)))
    })
    .boxed()
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn get_many(&self, keys: &[KeyHash], limit: Duration) -> BoxStream<'static, Chunk> {
        let n = keys.len();
        if n <= INLINE_KEYS {
            let inner = &self.inner;
            let values = inner.snapshot().and_then(|s| inner.values(&s, keys));
            return stream::once(async move { (0..n, values) }).boxed();
        }
        let (chunks, received) = tokio::sync::mpsc::channel(2);
        let inner = Arc::clone(&self.inner);
        let keys = keys.to_vec();
        tokio::task::spawn_blocking(move || inner.send_values(&keys, &chunks));
        within(received, n, limit)
    }

    fn put_many(
        &self,
        items: Vec<(KeyHash, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if items.is_empty() {
            return async { Ok(()) }.boxed();
        }
        if ttl.is_some() {
            // Lookups check expiries from now on, before the writer has
            // committed (and said so) the first entry that can expire.
            self.inner.expiring.store(true, Ordering::Relaxed);
        }
        self.write_unit(Op::Put(items, ttl))
    }

    fn expire_many(
        &self,
        keys: &[KeyHash],
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if keys.is_empty() {
            return async { Ok(()) }.boxed();
        }
        self.inner.expiring.store(true, Ordering::Relaxed);
        self.write_unit(Op::Expire(keys.to_vec(), ttl))
    }

    fn delete_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<u64, StoreError>> {
        if keys.is_empty() {
            return async { Ok(0) }.boxed();
        }
        let done = self.write(Op::Delete(keys.to_vec()));
        async move {
            match done.await? {
                Done::Deleted(n) => Ok(n),
                other => Err(StoreError::Embedded(format!("unexpected answer {other:?}"))),
            }
        }
        .boxed()
    }

    fn tracks_use(&self) -> bool {
        self.inner.marks.enabled()
    }

    fn note_use(&self, keys: &[KeyHash]) {
        self.inner.marks.note(keys.iter());
    }

    fn exist_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        if keys.len() > INLINE_KEYS {
            let keys = keys.to_vec();
            return self.read_blocking(move |inner| Ok(inner.snapshot()?.exist(&keys)?));
        }
        let found = self.inner.snapshot().and_then(|s| Ok(s.exist(keys)?));
        async move { found }.boxed()
    }

    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let read = self
            .inner
            .db
            .begin_read()
            .map(|_| ())
            .map_err(|e| StoreError::Redb(e.into()));
        async move { read }.boxed()
    }

    fn probe_write(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let now = writer::unix_now().to_string();
        self.write_unit(Op::MetaSet(PROBE_FIELD.into(), now))
    }

    fn size(&self) -> BoxFuture<'static, Result<StoreSize, StoreError>> {
        let size = reads::size(&self.inner.db, &self.inner.tables);
        let evicted = self.inner.evicted.load(Ordering::Relaxed);
        async move {
            let (entries, bytes) = size?;
            Ok(StoreSize {
                entries,
                bytes,
                evicted: Some(evicted),
            })
        }
        .boxed()
    }

    fn try_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        let taken = self.inner.leases.try_take(keys, token, ttl);
        async move { Ok(taken) }.boxed()
    }

    fn release_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.leases.release(keys, token);
        async { Ok(()) }.boxed()
    }

    fn leases_held(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        let held = self.inner.leases.held(keys);
        async move { Ok(held) }.boxed()
    }

    fn meta_get(&self, field: &str) -> BoxFuture<'static, Result<Option<String>, StoreError>> {
        let value = reads::meta_get(&self.inner.db, &self.inner.tables, field);
        async move { Ok(value?) }.boxed()
    }

    fn meta_set(&self, field: &str, value: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.write_unit(Op::MetaSet(field.into(), value.into()))
    }

    fn meta_set_new(
        &self,
        field: &str,
        value: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let done = self.write(Op::MetaSetNew(field.into(), value.into()));
        async move {
            match done.await? {
                Done::Set(set) => Ok(set),
                other => Err(StoreError::Embedded(format!("unexpected answer {other:?}"))),
            }
        }
        .boxed()
    }

    fn meta_delete(&self, field: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.write_unit(Op::MetaDelete(field.into()))
    }

    fn ledger_add(
        &self,
        increments: Vec<(String, Increment)>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if increments.is_empty() {
            return async { Ok(()) }.boxed();
        }
        self.write_unit(Op::LedgerAdd(increments))
    }

    fn ledger_read(&self) -> BoxFuture<'static, Result<Vec<(String, String)>, StoreError>> {
        let fields = reads::ledger_read(&self.inner.db, &self.inner.tables);
        async move { Ok(fields?) }.boxed()
    }

    fn scan_entries(
        &self,
        cursor: &Cursor,
        count: usize,
    ) -> BoxFuture<'static, Scanned<(KeyHash, Bytes)>> {
        let cursor = cursor.clone();
        self.read_blocking(move |inner| {
            inner.snapshot()?.scan(&cursor, count, |hash, value| {
                (hash, Bytes::copy_from_slice(value))
            })
        })
    }

    fn scan_heads(
        &self,
        cursor: &Cursor,
        count: usize,
        head_len: usize,
    ) -> BoxFuture<'static, Scanned<EntryHead>> {
        let cursor = cursor.clone();
        self.read_blocking(move |inner| {
            inner
                .snapshot()?
                .scan(&cursor, count, |hash, value| EntryHead {
                    hash,
                    len: value.len() as u64,
                    head: Bytes::copy_from_slice(&value[..head_len.min(value.len())]),
                })
        })
    }

    fn compare_and_set(
        &self,
        changes: Vec<(KeyHash, Bytes, Bytes)>,
    ) -> BoxFuture<'static, Result<u64, StoreError>> {
        if changes.is_empty() {
            return async { Ok(0) }.boxed();
        }
        let done = self.write(Op::CompareAndSet(changes));
        async move {
            match done.await? {
                Done::Replaced(n) => Ok(n),
                other => Err(StoreError::Embedded(format!("unexpected answer {other:?}"))),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
