//! The Redis Cluster store, on the `redis` crate's async cluster client.
//!
//! Everything keyed by entry (lookups, writes, existence, leases, the
//! compare-and-set of migrations) goes as one pipeline per node
//! ([`by_node`]), one command per key; `meta` and `ledger` are single keys,
//! routed by the client. A node that fails turns only its own keys into
//! misses (its writes are skipped), reported as a partial failure so the
//! cache keeps asking the others. Walks (`migrate`, `stats`) SCAN every
//! master in turn ([`walk`]).

mod by_node;
mod nodes;
mod slots;
mod walk;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream};
use futures_util::{FutureExt as _, StreamExt as _};
use redis::Value;
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_read_routing::RandomReplicaStrategy;

use self::by_node::{Answer, Make, Router};
use self::slots::{Slots, slot_of};
use super::redis::{COMPARE_AND_SET, PROBE_FIELD, RELEASE_LEASES, millis, unix_now};
use super::{
    Chunk, Cursor, EntryHead, Increment, NodeHealth, Scanned, Store, StoreError, StoreSize,
};
use crate::cache::key::{KeyHash, KeyLayout};

#[derive(Clone)]
pub struct ClusterStore {
    router: Router,
    layout: KeyLayout,
    /// For everything but lookups, whose limit the caller gives.
    write_timeout: Duration,
}

impl ClusterStore {
    /// Prepares the client without connecting, so the gateway starts (and
    /// serves from the vendor) even while the cluster is down.
    pub fn connect_lazy(
        seeds: &[String],
        read_from_replicas: bool,
        layout: KeyLayout,
        write_timeout: Duration,
    ) -> Result<ClusterStore, StoreError> {
        // Our own timeouts bound every call; the client's retries and
        // waits stay short so a node that is gone fails fast.
        let mut builder = ClusterClientBuilder::new(seeds.to_vec())
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if read_from_replicas {
            builder = builder.read_routing_strategy(RandomReplicaStrategy);
        }
        let client = builder.build()?;
        let config = ClusterConfig::new().set_connection_timeout(Duration::from_millis(500));
        let conn = client.get_pending_async_connection_with_config(config);
        let default_host = seeds
            .first()
            .and_then(|s| reqwest::Url::parse(s).ok())
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let round_trips = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "embgate_store_round_trips_total",
                "Requests sent to store nodes, by operation (get|set|...): a pipeline to one node counts once.",
            ),
            &["op"],
        )?;
        Ok(ClusterStore {
            router: Router {
                conn,
                slots: Arc::new(Slots::new(&default_host)),
                round_trips,
                read_from_replicas,
                failing: Arc::default(),
                seed: seeds.first().map_or("", String::as_str).into(),
            },
            layout,
            write_timeout,
        })
    }

    fn conn(&self) -> ClusterConnection {
        self.router.conn.clone()
    }

    /// One command per key in `keys`, grouped by node; every answer in order.
    fn per_key(
        &self,
        keys: Vec<String>,
        read: bool,
        op: &'static str,
        make: impl Fn(usize, &str) -> redis::Cmd + Send + Sync + 'static,
    ) -> BoxFuture<'static, Result<Vec<Value>, StoreError>> {
        let slots = keys.iter().map(|k| slot_of(k.as_bytes())).collect();
        let make: Make = Arc::new(move |i| make(i, &keys[i]));
        let router = self.router.clone();
        let limit = self.write_timeout;
        async move { router.ask_all(slots, read, op, limit, make).await }.boxed()
    }

    /// Runs a single-key command within the write timeout; the client
    /// routes it and follows redirects.
    fn query<T: redis::FromRedisValue + Send + 'static>(
        &self,
        cmd: redis::Cmd,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let mut conn = self.conn();
        let limit = self.write_timeout;
        async move {
            match tokio::time::timeout(limit, cmd.query_async(&mut conn)).await {
                Ok(result) => Ok(result?),
                Err(_) => Err(StoreError::Timeout(limit)),
            }
        }
        .boxed()
    }

    /// `read`: a replica may answer (not for leases, which must be current).
    fn exists(
        &self,
        keys: Vec<String>,
        read: bool,
    ) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        let asked = self.per_key(keys, read, "exists", |_, k| {
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(k);
            cmd
        });
        async move { Ok(asked.await?.iter().map(|v| *v == Value::Int(1)).collect()) }.boxed()
    }
}

impl Store for ClusterStore {
    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn get_many(&self, keys: &[KeyHash], limit: Duration) -> BoxStream<'static, Chunk> {
        let names: Vec<String> = keys.iter().map(|k| self.layout.entry(k)).collect();
        let slots = names.iter().map(|k| slot_of(k.as_bytes())).collect();
        let make: Make = Arc::new(move |i| {
            let mut cmd = redis::cmd("GET");
            cmd.arg(&names[i]);
            cmd
        });
        self.router
            .ask(slots, true, "get", limit, make)
            .flat_map(|answer| stream::iter(chunks(answer)))
            .boxed()
    }

    fn put_many(
        &self,
        items: Vec<(KeyHash, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let names = items.iter().map(|(k, _)| self.layout.entry(k)).collect();
        let written = self.per_key(names, false, "set", move |i, k| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(k).arg(items[i].1.as_ref());
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(millis(ttl));
            }
            cmd
        });
        async move { written.await.map(|_| ()) }.boxed()
    }

    fn expire_many(
        &self,
        keys: &[KeyHash],
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let names = keys.iter().map(|k| self.layout.entry(k)).collect();
        let ttl = millis(ttl);
        let expired = self.per_key(names, false, "expire", move |_, k| {
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(k).arg(ttl);
            cmd
        });
        async move { expired.await.map(|_| ()) }.boxed()
    }

    fn delete_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<u64, StoreError>> {
        let names = keys.iter().map(|k| self.layout.entry(k)).collect();
        // One DEL per key: keys of different slots cannot share one.
        let deleted = self.per_key(names, false, "delete", |_, k| {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(k);
            cmd
        });
        async move {
            Ok(deleted
                .await?
                .iter()
                .filter(|v| **v == Value::Int(1))
                .count() as u64)
        }
        .boxed()
    }

    fn exist_many(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        self.exists(keys.iter().map(|k| self.layout.entry(k)).collect(), true)
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
        walk::size(self.router.clone(), self.write_timeout).boxed()
    }

    fn try_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        let token = token.to_owned();
        let ttl = millis(ttl);
        let names = keys.iter().map(|k| self.layout.lease(k)).collect();
        let taken = self.per_key(names, false, "lease", move |_, k| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(k).arg(&token).arg("NX").arg("PX").arg(ttl);
            cmd
        });
        async move { Ok(taken.await?.iter().map(|v| *v != Value::Nil).collect()) }.boxed()
    }

    fn release_leases(
        &self,
        keys: &[KeyHash],
        token: &str,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let token = token.to_owned();
        let names = keys.iter().map(|k| self.layout.lease(k)).collect();
        // The script of one server, one key at a time: keys of different
        // slots cannot share a script.
        let released = self.per_key(names, false, "lease", move |_, k| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RELEASE_LEASES).arg(1).arg(k).arg(&token);
            cmd
        });
        async move { released.await.map(|_| ()) }.boxed()
    }

    fn leases_held(&self, keys: &[KeyHash]) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        self.exists(keys.iter().map(|k| self.layout.lease(k)).collect(), false)
    }

    fn meta_get(&self, field: &str) -> BoxFuture<'static, Result<Option<String>, StoreError>> {
        self.query(super::redis::meta_command("HGET", &self.layout, &[field]))
    }

    fn meta_set(&self, field: &str, value: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.query(super::redis::meta_command(
            "HSET",
            &self.layout,
            &[field, value],
        ))
    }

    fn meta_set_new(
        &self,
        field: &str,
        value: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.query(super::redis::meta_command(
            "HSETNX",
            &self.layout,
            &[field, value],
        ))
    }

    fn meta_delete(&self, field: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        self.query(super::redis::meta_command("HDEL", &self.layout, &[field]))
    }

    fn ledger_add(
        &self,
        increments: Vec<(String, Increment)>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        if increments.is_empty() {
            return async { Ok(()) }.boxed();
        }
        // One key, so one slot: the transaction goes to its master whole.
        let pipe = super::redis::ledger_transaction(&self.layout.ledger(), &increments);
        let mut conn = self.conn();
        let limit = self.write_timeout;
        async move {
            match tokio::time::timeout(limit, pipe.query_async::<()>(&mut conn)).await {
                Ok(result) => Ok(result?),
                Err(_) => Err(StoreError::Timeout(limit)),
            }
        }
        .boxed()
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
        let step = walk::scan(
            self.router.clone(),
            self.layout.clone(),
            cursor,
            count,
            self.write_timeout,
        );
        let this = self.clone();
        async move {
            let (next, keys) = step.await?;
            let names = keys.iter().map(|(_, name)| name.clone()).collect();
            let values = this
                .per_key(names, false, "scan", |_, k| {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(k);
                    cmd
                })
                .await?;
            let found = keys
                .into_iter()
                .zip(values)
                .filter_map(|((hash, _), value)| match value {
                    Value::BulkString(bytes) => Some((hash, Bytes::from(bytes))),
                    _ => None,
                })
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
        let step = walk::scan(
            self.router.clone(),
            self.layout.clone(),
            cursor,
            count,
            self.write_timeout,
        );
        let this = self.clone();
        async move {
            let (next, keys) = step.await?;
            // Two commands a key, each routed by that key.
            let names = keys
                .iter()
                .flat_map(|(_, name)| [name.clone(), name.clone()])
                .collect();
            let answers = this
                .per_key(names, false, "scan", move |i, k| {
                    if i % 2 == 0 {
                        let mut cmd = redis::cmd("STRLEN");
                        cmd.arg(k);
                        cmd
                    } else {
                        let mut cmd = redis::cmd("GETRANGE");
                        cmd.arg(k).arg(0).arg(head_len.saturating_sub(1));
                        cmd
                    }
                })
                .await?;
            let heads = keys
                .into_iter()
                .zip(answers.chunks_exact(2))
                .filter_map(|((hash, _), pair)| {
                    let (Value::Int(len), head) = (&pair[0], &pair[1]) else {
                        return None;
                    };
                    let head = match head {
                        Value::BulkString(b) => Bytes::copy_from_slice(b),
                        _ => Bytes::new(),
                    };
                    // A key deleted between SCAN and STRLEN reads as length 0.
                    let len = u64::try_from(*len).ok().filter(|l| *l > 0)?;
                    Some(EntryHead { hash, len, head })
                })
                .collect();
            Ok((next, heads))
        }
        .boxed()
    }

    fn compare_and_set(
        &self,
        changes: Vec<(KeyHash, Bytes, Bytes)>,
    ) -> BoxFuture<'static, Result<u64, StoreError>> {
        let names = changes
            .iter()
            .map(|(k, _, _)| self.layout.entry(k))
            .collect();
        // The script of one server, one key at a time.
        let replaced = self.per_key(names, false, "cas", move |i, k| {
            let (_, old, new) = &changes[i];
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(COMPARE_AND_SET)
                .arg(1)
                .arg(k)
                .arg(old.as_ref())
                .arg(new.as_ref());
            cmd
        });
        async move {
            Ok(replaced
                .await?
                .iter()
                .map(|v| match v {
                    Value::Int(n) => u64::try_from(*n).unwrap_or(0),
                    _ => 0,
                })
                .sum())
        }
        .boxed()
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.router.round_trips.clone())]
    }

    fn nodes(&self) -> BoxFuture<'static, Vec<NodeHealth>> {
        nodes::health(self.router.clone()).boxed()
    }
}

/// A node's answer as chunks of a lookup: one per run of consecutive
/// positions, since a chunk covers a range of the keys asked for.
fn chunks(answer: Answer) -> Vec<Chunk> {
    let Answer { positions, values } = answer;
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, p) in positions.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if positions[run.end - 1] + 1 == *p => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    let span = |run: &Range<usize>| positions[run.start]..positions[run.end - 1] + 1;
    match values {
        Ok(values) => {
            let mut values = values.into_iter();
            runs.iter()
                .map(|run| {
                    let found = values.by_ref().take(run.len()).map(entry_value).collect();
                    (span(run), Ok(found))
                })
                .collect()
        }
        Err(failure) => runs
            .iter()
            .map(|run| (span(run), Err(failure.to_error())))
            .collect(),
    }
}

fn entry_value(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::from(bytes)),
        _ => None,
    }
}
