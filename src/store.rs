//! The Redis store: MGETs for lookups (one per request unless it is large),
//! one MSET for writes, over a single multiplexed, self-reconnecting
//! connection. Every call is
//! bounded by a timeout so a slow or dead Redis never holds a request up:
//! the caller treats an error as a miss and carries on (fail open).

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::stream::{self, FuturesOrdered};
use futures_util::{Stream, StreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::StoreSettings;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// Keys per MGET. A large lookup goes as several MGETs, so the gateway
/// checks the first entries while Redis is still sending the rest.
pub const MGET_CHUNK_KEYS: usize = 256;

#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl Store {
    /// Prepares the connection without opening it, so the gateway starts
    /// (and serves from the vendor) even while Redis is down.
    pub fn connect_lazy(settings: &StoreSettings) -> Result<Store, StoreError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Store {
            conn,
            read_timeout: settings.read_timeout(),
            write_timeout: settings.write_timeout(),
        })
    }

    /// Values for `keys`, `None` where a key is absent: one MGET per
    /// [`MGET_CHUNK_KEYS`] keys, all sent at once (pipelined on the one
    /// connection), each chunk's values yielded with its range of `keys` as
    /// soon as it and those before it have arrived.
    pub fn get_chunks(
        &self,
        keys: &[String],
    ) -> impl Stream<Item = (Range<usize>, Result<Vec<Option<Bytes>>, StoreError>)> + use<> {
        // Large lookups take longer to transfer, and a chunk may queue
        // behind other requests' on the one connection: every chunk gets
        // the whole lookup's time, 0.1 ms more per key.
        let limit = self.read_timeout + Duration::from_micros(100 * keys.len() as u64);
        let mut chunks = keys
            .chunks(MGET_CHUNK_KEYS)
            .enumerate()
            .map(|(i, chunk)| mget(&self.conn, i * MGET_CHUNK_KEYS, chunk, limit));
        if keys.len() <= MGET_CHUNK_KEYS {
            // The common case, without FuturesOrdered's allocations.
            Either::Left(stream::iter(chunks.next()).then(|mget| mget))
        } else {
            Either::Right(chunks.collect::<FuturesOrdered<_>>())
        }
    }

    /// Stores every pair without expiry (an embedding never changes).
    pub async fn put_many(&self, items: &[(String, Bytes)]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("MSET");
        for (key, value) in items {
            cmd.arg(key).arg(value.as_ref());
        }
        bounded(self.write_timeout, cmd.query_async::<()>(&mut conn)).await
    }

    /// Takes each lease that nobody holds (SET NX PX); true where taken.
    pub async fn try_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64);
        }
        let mut conn = self.conn.clone();
        let answers: Vec<Option<String>> =
            bounded(self.read_timeout, pipe.query_async(&mut conn)).await?;
        Ok(answers.into_iter().map(|a| a.is_some()).collect())
    }

    /// Releases the leases still held with `token` (never someone else's).
    pub async fn release_leases(&self, keys: &[String], token: &str) -> Result<(), StoreError> {
        let script = redis::Script::new(
            r"local n = 0
              for _, k in ipairs(KEYS) do
                if redis.call('GET', k) == ARGV[1] then n = n + redis.call('DEL', k) end
              end
              return n",
        );
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(token);
        let mut conn = self.conn.clone();
        bounded(
            self.write_timeout,
            invocation.invoke_async::<i64>(&mut conn),
        )
        .await
        .map(|_| ())
    }

    /// Whether each key exists.
    pub async fn exist_many(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("EXISTS").arg(key);
        }
        let mut conn = self.conn.clone();
        bounded(self.read_timeout, pipe.query_async(&mut conn)).await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        bounded(
            self.read_timeout.max(Duration::from_millis(500)),
            async move {
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
            },
        )
        .await
    }

    /// Keys in the database (DBSIZE) and Redis' `used_memory`.
    pub async fn size(&self) -> Result<(u64, u64), StoreError> {
        let mut conn = self.conn.clone();
        let (keys, info): (u64, String) = bounded(
            self.write_timeout,
            redis::pipe()
                .cmd("DBSIZE")
                .cmd("INFO")
                .arg("memory")
                .query_async(&mut conn),
        )
        .await?;
        let memory = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok((keys, memory))
    }

    /// The connection, for tools (migrations, stats) that need more commands.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

/// One SCAN step over the keys matching `pattern`: (next cursor, keys).
/// A cursor of 0 starts, and a returned 0 means the walk is complete.
pub async fn scan_page(
    conn: &mut ConnectionManager,
    cursor: u64,
    pattern: &str,
    count: usize,
) -> redis::RedisResult<(u64, Vec<String>)> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
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
