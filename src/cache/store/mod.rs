//! Where entries live: the store backends behind one trait.
//!
//! A backend keeps raw entry bytes by [`KeyHash`] (how it names them is its
//! own business, through [`KeyLayout`](crate::cache::key::KeyLayout)), plus
//! the small things a keyspace needs around them: its version and migration
//! cursors (`meta`), the all-time ledger, and the leases gateways sharing it
//! take while fetching. It never interprets an entry: checking one is
//! `entry.rs`'s job, and failing open is the [`Cache`](crate::cache::Cache)'s.
//!
//! Methods return boxed `'static` futures so the trait can be used as
//! `Arc<dyn Store>`; each call owns what it needs.

pub mod cluster;
pub mod embedded;
pub mod redis;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::cache::key::{KeyHash, KeyLayout};
use crate::config::StoreSettings;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("embedded store: {0}")]
    Embedded(String),
    #[error("embedded store: {0}")]
    Redb(#[from] ::redb::Error),
    #[error("embedded store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process has the embedded store open.
    #[error(
        "the embedded store {} is in use by {holder}; only one process at a time opens it",
        path.display()
    )]
    InUse { path: PathBuf, holder: String },
    #[error("store metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Some nodes of a cluster failed, the others answered.
    #[error("{failed} of {nodes} store nodes failed: {first}")]
    Partial {
        failed: usize,
        nodes: usize,
        first: Box<StoreError>,
    },
}

impl StoreError {
    /// A store that is slow rather than failing.
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Timeout(_))
    }

    /// Only part of the store failed: the rest answered.
    pub fn is_partial(&self) -> bool {
        matches!(self, StoreError::Partial { .. })
    }
}

/// The values of one chunk of a lookup: the range of the keys asked for,
/// and `None` where a key is absent.
pub type Chunk = (Range<usize>, Result<Vec<Option<Bytes>>, StoreError>);

/// One step of a walk: where the next starts, and what this one found.
pub type Scanned<T> = Result<(Cursor, Vec<T>), StoreError>;

/// What a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreSize {
    pub entries: u64,
    pub bytes: u64,
    /// Entries the store dropped for room, as it counts them (Redis:
    /// `evicted_keys` since it started; the embedded store: since it was
    /// opened); `None` for a store that does not say.
    pub evicted: Option<u64>,
}

/// An entry's key and its first bytes (at most the entry header) and
/// length, as a scan for statistics sees it.
#[derive(Debug, Clone)]
pub struct EntryHead {
    pub hash: KeyHash,
    pub len: u64,
    pub head: Bytes,
}

/// One step of a walk over every entry. A walk starts with
/// [`Cursor::START`]; it is complete when a step returns [`Cursor::START`]
/// again. Cursors are text so they can be saved (migrations resume from
/// one) and mean something only to the backend that returned them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub String);

impl Cursor {
    pub const START: &str = "0";

    pub fn start() -> Cursor {
        Cursor(Self::START.to_owned())
    }

    pub fn is_start(&self) -> bool {
        self.0 == Self::START
    }
}

/// How one node of the store answers, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    /// `host:port`.
    pub node: String,
    /// `master` or `replica`.
    pub role: &'static str,
    /// Why it is failing; `None` while it answers.
    pub error: Option<String>,
}

/// An addition to one ledger field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Increment {
    Int(i64),
    Float(f64),
}

pub trait Store: Send + Sync + 'static {
    /// Names the backend in logs and `/readyz`.
    fn kind(&self) -> &'static str;

    /// The values of `keys`, chunk by chunk as they arrive, each within
    /// `limit`. A failed chunk makes only its own keys misses.
    fn get_many(&self, keys: &[KeyHash], limit: Duration) -> BoxStream<'static, Chunk>;

    /// Stores every pair, to expire after `ttl` (never when `None`).
    fn put_many(
        &self,
        items: Vec<(KeyHash, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Makes the entries of `keys` that exist expire `ttl` from now.
    fn expire_many(
        &self,
        keys: &[KeyHash],
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Deletes the entries of `keys`; returns how many existed.
    fn delete_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// Whether the store wants to hear of entries used without asking it
    /// ([`Store::note_use`]): one that evicts the least recently used does.
    fn tracks_use(&self) -> bool {
        false
    }

    /// Entries used without asking the store (answered by the L1).
    fn note_use(&self, _keys: &[KeyHash]) {}

    /// Whether each key holds an entry.
    fn exist_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>>;

    /// Whether the store answers reads.
    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Whether the store takes writes: a tiny write into `meta` (a store
    /// that is full refuses it while reads still work).
    fn probe_write(&self) -> BoxFuture<'static, Result<(), StoreError>>;

    fn size(&self) -> BoxFuture<'static, Result<StoreSize, StoreError>>;

    /// Takes each lease nobody holds, for `ttl`; true where taken.
    fn try_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Vec<bool>, StoreError>>;

    /// Releases the leases still held with `token` (never another's).
    fn release_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Whether each lease is still held by anyone.
    fn leases_held(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>>;

    fn meta_get(&self, field: &str) -> BoxFuture<'static, Result<Option<String>, StoreError>>;

    fn meta_set(&self, field: &str, value: &str) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Sets `field` only if it has no value yet; true if it set it.
    fn meta_set_new(
        &self,
        field: &str,
        value: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>>;

    fn meta_delete(&self, field: &str) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Adds to ledger fields, all or nothing.
    fn ledger_add(
        &self,
        increments: Vec<(String, Increment)>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Every ledger field and its value, as stored.
    fn ledger_read(&self) -> BoxFuture<'static, Result<Vec<(String, String)>, StoreError>>;

    /// About `count` entries from `cursor` on, whole.
    fn scan_entries(
        &self,
        cursor: &Cursor,
        count: usize,
    ) -> BoxFuture<'static, Scanned<(KeyHash, Bytes)>>;

    /// About `count` entries from `cursor` on: their length and first
    /// `head_len` bytes.
    fn scan_heads(
        &self,
        cursor: &Cursor,
        count: usize,
        head_len: usize,
    ) -> BoxFuture<'static, Scanned<EntryHead>>;

    /// Replaces each value only if it is still `old`; returns how many were
    /// replaced.
    fn compare_and_set(
        &self,
        changes: Vec<(KeyHash, Bytes, Bytes)>,
    ) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// Metrics of the backend's own, registered with the gateway's.
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        Vec::new()
    }

    /// Each node of a store made of several, and whether it answers;
    /// empty for a store of one.
    fn nodes(&self) -> BoxFuture<'static, Vec<NodeHealth>> {
        async { Vec::new() }.boxed()
    }
}

/// Opens the store the settings name: the Redis Cluster at
/// `store.cluster_nodes` when set, else Redis at `store.url`, else the
/// embedded store at `store.path`.
pub fn open(settings: &StoreSettings) -> Result<Arc<dyn Store>, StoreError> {
    let layout = KeyLayout::new(&settings.key_prefix);
    let seeds = settings.cluster_seeds();
    if !seeds.is_empty() {
        let store = cluster::ClusterStore::connect_lazy(
            &seeds,
            settings.read_from_replicas,
            layout,
            settings.write_timeout(),
        )?;
        return Ok(Arc::new(store));
    }
    if settings.is_embedded() {
        let options = embedded::Options {
            max_bytes: settings.max_bytes,
            cache_bytes: settings.cache_bytes,
            write_timeout: settings.write_timeout(),
        };
        let store = embedded::EmbeddedStore::open(settings.path.as_ref(), layout, options)?;
        return Ok(Arc::new(store));
    }
    let store = redis::RedisStore::connect_lazy(&settings.url, layout, settings.write_timeout())?;
    Ok(Arc::new(store))
}
