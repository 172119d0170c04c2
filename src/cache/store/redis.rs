//! The Redis store: MGETs for lookups (pipelined, one per
//! [`MGET_CHUNK_KEYS`] keys), one MSET for writes, over a single
//! multiplexed, self-reconnecting connection shared by every request.
//! Every call is bounded by a timeout so a slow or dead Redis never holds a
//! request up.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, FuturesOrdered};
use futures_util::{FutureExt as _, StreamExt as _};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Chunk, Cursor, EntryHead, Increment, Scanned, Store, StoreError, StoreSize};
use crate::cache::key::{KeyHash, KeyLayout};

/// Keys per MGET. A large lookup goes as several MGETs, so the gateway
/// checks the first entries while Redis is still sending the rest.
pub const MGET_CHUNK_KEYS: usize = 256;

/// The `meta` field the write probe sets.
pub(super) const PROBE_FIELD: &str = "write_probe";

/// Checks `GET` against the token before deleting: a lease that expired and
/// was taken by another gateway is not ours to release.
pub(super) const RELEASE_LEASES: &str = r"
local n = 0
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then n = n + redis.call('DEL', k) end
end
return n";

/// Replaces each key's value only if it is still the one read.
pub(super) const COMPARE_AND_SET: &str = r"
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2 * i - 1] then
    redis.call('SET', key, ARGV[2 * i])
    n = n + 1
  end
end
return n";

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    layout: KeyLayout,
    /// For everything but lookups, whose limit the caller gives.
    write_timeout: Duration,
}

impl RedisStore {
    /// Prepares the connection without opening it, so the gateway starts
    /// (and serves from the vendor) even while Redis is down.
    pub fn connect_lazy(
        url: &str,
        layout: KeyLayout,
        write_timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url)?;
        // Every call is bounded by our own timeouts (a lookup's wait depends
        // on the vendor's latency); the crate's own response timeout would
        // cut them short.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(RedisStore {
            conn,
            layout,
            write_timeout,
        })
    }

    fn entry_keys(&self, keys: &[KeyHash]) -> Vec<String> {
        keys.iter().map(|k| self.layout.entry(k)).collect()
    }

    /// Runs `cmd` within the write timeout.
    fn query<T: redis::FromRedisValue + Send + 'static>(
        &self,
        cmd: redis::Cmd,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let mut conn = self.conn.clone();
        let limit = self.write_timeout;
        async move { bounded(limit, cmd.query_async(&mut conn)).await }.boxed()
    }

    fn query_pipe<T: redis::FromRedisValue + Send + 'static>(
        &self,
        pipe: redis::Pipeline,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let mut conn = self.conn.clone();
        let limit = self.write_timeout;
        async move { bounded(limit, pipe.query_async(&mut conn)).await }.boxed()
    }

    fn scan_keys(
        &self,
        cursor: &Cursor,
        count: usize,
    ) -> BoxFuture<'static, Scanned<(KeyHash, String)>> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor.0.as_str())
            .arg("MATCH")
            .arg(self.layout.entry_pattern())
            .arg("COUNT")
            .arg(count);
        let step = self.query::<(String, Vec<String>)>(cmd);
        let layout = self.layout.clone();
        async move {
            let (next, keys) = step.await?;
            let keys = keys
                .into_iter()
                .filter_map(|k| Some((layout.parse_entry(&k)?, k)))
                .collect();
            Ok((Cursor(next), keys))
        }
        .boxed()
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn get_many(&self, keys: &[KeyHash], limit: Duration) -> BoxStream<'static, Chunk> {
        let keys = self.entry_keys(keys);
        let mut chunks = keys
            .chunks(MGET_CHUNK_KEYS)
            .enumerate()
            .map(|(i, chunk)| mget(&self.conn, i * MGET_CHUNK_KEYS, chunk, limit))
            .collect::<Vec<_>>()
            .into_iter();
        if keys.len() <= MGET_CHUNK_KEYS {
            // The common case, without FuturesOrdered's allocations.
            stream::iter(chunks.next()).then(|mget| mget).boxed()
        } else {
            chunks.collect::<FuturesOrdered<_>>().boxed()
        }
    }

    fn put_many(
        &self,
        items: Vec<(KeyHash, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if items.is_empty() {
            return async { Ok(()) }.boxed();
        }
        let Some(ttl) = ttl else {
            let mut cmd = redis::cmd("MSET");
            for (key, value) in &items {
                cmd.arg(self.layout.entry(key)).arg(value.as_ref());
            }
            return self.query::<()>(cmd);
        };
        let mut pipe = redis::pipe();
        for (key, value) in &items {
            pipe.cmd("SET")
                .arg(self.layout.entry(key))
                .arg(value.as_ref())
                .arg("PX")
                .arg(millis(ttl))
                .ignore();
        }
        self.query_pipe::<()>(pipe)
    }

    fn expire_many(
        &self,
        keys: &[KeyHash],
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if keys.is_empty() {
            return async { Ok(()) }.boxed();
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("PEXPIRE")
                .arg(self.layout.entry(key))
                .arg(millis(ttl))
                .ignore();
        }
        self.query_pipe::<()>(pipe)
    }

    fn delete_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<u64, StoreError>> {
        if keys.is_empty() {
            return async { Ok(0) }.boxed();
        }
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(self.layout.entry(key));
        }
        self.query(cmd)
    }

    fn exist_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        exists(self, self.entry_keys(keys))
    }

    fn ping(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let ping = self.query::<String>(redis::cmd("PING"));
        async move { ping.await.map(|_| ()) }.boxed()
    }

    fn probe_write(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(self.layout.meta()).arg(PROBE_FIELD).arg(unix_now());
        self.query::<()>(cmd)
    }

    fn size(&self) -> BoxFuture<'static, Result<StoreSize, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("DBSIZE")
            .cmd("INFO")
            .arg("memory")
            .cmd("INFO")
            .arg("stats");
        let answer = self.query_pipe::<(u64, String, String)>(pipe);
        async move {
            let (entries, memory, stats) = answer.await?;
            Ok(StoreSize {
                entries,
                bytes: info_field(&memory, "used_memory").unwrap_or(0),
                evicted: info_field(&stats, "evicted_keys"),
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
        if keys.is_empty() {
            return async { Ok(Vec::new()) }.boxed();
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(self.layout.lease(key))
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl));
        }
        let answers = self.query_pipe::<Vec<Option<String>>>(pipe);
        async move { Ok(answers.await?.into_iter().map(|a| a.is_some()).collect()) }.boxed()
    }

    fn release_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if keys.is_empty() {
            return async { Ok(()) }.boxed();
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RELEASE_LEASES).arg(keys.len());
        for key in keys {
            cmd.arg(self.layout.lease(key));
        }
        cmd.arg(token);
        let released = self.query::<i64>(cmd);
        async move { released.await.map(|_| ()) }.boxed()
    }

    fn leases_held(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        exists(self, keys.iter().map(|k| self.layout.lease(k)).collect())
    }

    fn meta_get(&self, field: &str) -> BoxFuture<'static, Result<Option<String>, StoreError>> {
        self.query(meta_command("HGET", &self.layout, &[field]))
    }

    fn meta_set(&self, field: &str, value: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.query(meta_command("HSET", &self.layout, &[field, value]))
    }

    fn meta_set_new(
        &self,
        field: &str,
        value: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.query(meta_command("HSETNX", &self.layout, &[field, value]))
    }

    fn meta_delete(&self, field: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.query(meta_command("HDEL", &self.layout, &[field]))
    }

    fn ledger_add(
        &self,
        increments: Vec<(String, Increment)>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if increments.is_empty() {
            return async { Ok(()) }.boxed();
        }
        self.query_pipe::<()>(ledger_transaction(&self.layout.ledger(), &increments))
    }

    fn ledger_read(&self) -> BoxFuture<'static, Result<Vec<(String, String)>, StoreError>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.layout.ledger());
        self.query(cmd)
    }

    fn scan_entries(
        &self,
        cursor: &Cursor,
        count: usize,
    ) -> BoxFuture<'static, Scanned<(KeyHash, Bytes)>> {
        let step = self.scan_keys(cursor, count);
        let this = self.clone();
        async move {
            let (next, keys) = step.await?;
            if keys.is_empty() {
                return Ok((next, Vec::new()));
            }
            let mut cmd = redis::cmd("MGET");
            for (_, key) in &keys {
                cmd.arg(key);
            }
            let values: Vec<Option<Bytes>> = this.query(cmd).await?;
            let found = keys
                .into_iter()
                .zip(values)
                .filter_map(|((hash, _), value)| Some((hash, value?)))
                .collect();
            Ok((next, found))
        }
        .boxed()
    }

    fn scan_heads(
        &self,
        cursor: &Cursor,
        count: usize,
        head_len: usize,
    ) -> BoxFuture<'static, Scanned<EntryHead>> {
        let step = self.scan_keys(cursor, count);
        let this = self.clone();
        async move {
            let (next, keys) = step.await?;
            if keys.is_empty() {
                return Ok((next, Vec::new()));
            }
            let mut pipe = redis::pipe();
            for (_, key) in &keys {
                pipe.cmd("STRLEN").arg(key);
                pipe.cmd("GETRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(head_len.saturating_sub(1));
            }
            let answers: Vec<(u64, Bytes)> = this.query_pipe(pipe).await?;
            let heads = keys
                .into_iter()
                .zip(answers)
                // A key deleted between SCAN and STRLEN reads as length 0.
                .filter(|(_, (len, _))| *len > 0)
                .map(|((hash, _), (len, head))| EntryHead { hash, len, head })
                .collect();
            Ok((next, heads))
        }
        .boxed()
    }

    fn compare_and_set(
        &self,
        changes: Vec<(KeyHash, Bytes, Bytes)>,
    ) -> BoxFuture<'static, Result<u64, StoreError>> {
        if changes.is_empty() {
            return async { Ok(0) }.boxed();
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPARE_AND_SET).arg(changes.len());
        for (key, _, _) in &changes {
            cmd.arg(self.layout.entry(key));
        }
        for (_, old, new) in &changes {
            cmd.arg(old.as_ref()).arg(new.as_ref());
        }
        self.query(cmd)
    }
}

/// The ledger's increments as one transaction on its hash.
/// `command` (`HGET`, `HSET`...) on the meta hash with `args`: one key, so
/// one slot, alike on one Redis and on a cluster.
pub(super) fn meta_command(command: &str, layout: &KeyLayout, args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(command);
    cmd.arg(layout.meta()).arg(args);
    cmd
}

pub(super) fn ledger_transaction(key: &str, increments: &[(String, Increment)]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (field, increment) in increments {
        match increment {
            Increment::Int(n) => pipe.cmd("HINCRBY").arg(key).arg(field).arg(*n),
            Increment::Float(x) => pipe.cmd("HINCRBYFLOAT").arg(key).arg(field).arg(*x),
        }
        .ignore();
    }
    pipe
}

fn exists(
    store: &RedisStore,
    keys: Vec<String>,
) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
    if keys.is_empty() {
        return async { Ok(Vec::new()) }.boxed();
    }
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("EXISTS").arg(key);
    }
    store.query_pipe(pipe)
}

/// One MGET of `chunk`, the keys from `start` on, within `limit`.
fn mget(
    conn: &ConnectionManager,
    start: usize,
    chunk: &[String],
    limit: Duration,
) -> impl Future<Output = (Range<usize>, Result<Vec<Option<Bytes>>, StoreError>)> + use<> {
    let range = start..start + chunk.len();
    let mut conn = conn.clone();
    let mut cmd = redis::cmd("MGET");
    cmd.arg(chunk);
    async move { (range, bounded(limit, cmd.query_async(&mut conn)).await) }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Timeout(limit)),
    }
}

/// A numeric field of an `INFO` section.
pub(super) fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
