//! Which node serves which key: the cluster's slot map, as `CLUSTER SLOTS`
//! tells it, kept by the store so that it can group a request's keys by
//! node. The cluster client keeps a map of its own for the commands it
//! routes; this one only decides where each group goes. When it is stale
//! (a slot moved, a master failed over), a group gets a redirect or a
//! connection error, and the map is read again.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::Value;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The map is read again at most this often, however many groups fail.
const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// ... and at least this often, so that changes that cause no error (a
/// replica now listed, for `read_from_replicas`) are seen too.
const REREAD_AFTER: Duration = Duration::from_secs(10);

/// The hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the
/// key, or of its hash tag (the part between the first `{` and the next
/// `}`, when not empty).
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|b| *b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// A node's address, as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl Node {
    pub fn route(&self) -> SingleNodeRoutingInfo {
        SingleNodeRoutingInfo::ByAddress {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A range of slots, its master and replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub first: u16,
    pub last: u16,
    pub master: Node,
    pub replicas: Vec<Node>,
}

/// Slot ranges in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    shards: Vec<Shard>,
}

impl SlotMap {
    /// Reads the answer to `CLUSTER SLOTS`; `default_host` stands for a
    /// node announced without one.
    pub fn parse(value: &Value, default_host: &str) -> Option<SlotMap> {
        let Value::Array(ranges) = value else {
            return None;
        };
        let mut shards = Vec::with_capacity(ranges.len());
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let [first, last, master, replicas @ ..] = fields.as_slice() else {
                return None;
            };
            let slot = |v: &Value| match v {
                Value::Int(n) => u16::try_from(*n).ok().filter(|s| *s < SLOTS),
                _ => None,
            };
            shards.push(Shard {
                first: slot(first)?,
                last: slot(last)?,
                master: node(master, default_host)?,
                replicas: replicas
                    .iter()
                    .filter_map(|r| node(r, default_host))
                    .collect(),
            });
        }
        shards.sort_by_key(|s| s.first);
        Some(SlotMap { shards })
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn shard(&self, slot: u16) -> Option<&Shard> {
        let i = self.shards.partition_point(|s| s.first <= slot);
        let shard = self.shards.get(i.checked_sub(1)?)?;
        (slot <= shard.last).then_some(shard)
    }

    /// The node to ask for `slot`: its master, or with `replicas` one of
    /// its replicas (the same for a slot until the map changes, so a
    /// request's keys still go to few nodes).
    pub fn node(&self, slot: u16, replicas: bool) -> Option<&Node> {
        let shard = self.shard(slot)?;
        if replicas && !shard.replicas.is_empty() {
            return shard.replicas.get(usize::from(slot) % shard.replicas.len());
        }
        Some(&shard.master)
    }

    /// Each master once, ordered by the first slot it serves.
    pub fn masters(&self) -> Vec<(u16, Node)> {
        let mut masters: Vec<(u16, Node)> = Vec::new();
        for shard in &self.shards {
            if !masters.iter().any(|(_, n)| *n == shard.master) {
                masters.push((shard.first, shard.master.clone()));
            }
        }
        masters
    }
}

fn node(value: &Value, default_host: &str) -> Option<Node> {
    let Value::Array(fields) = value else {
        return None;
    };
    let host = match fields.first()? {
        Value::BulkString(h) if !h.is_empty() && h.as_slice() != b"?" => {
            String::from_utf8(h.clone()).ok()?
        }
        Value::SimpleString(h) if !h.is_empty() => h.clone(),
        _ => default_host.to_owned(),
    };
    let port = match fields.get(1)? {
        Value::Int(p) => u16::try_from(*p).ok()?,
        _ => return None,
    };
    Some(Node { host, port })
}

/// The map in force, read again when a group finds it stale.
pub struct Slots {
    map: RwLock<Arc<SlotMap>>,
    refreshing: AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
    default_host: String,
}

impl Slots {
    pub fn new(default_host: &str) -> Slots {
        Slots {
            map: RwLock::new(Arc::new(SlotMap::default())),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
            default_host: default_host.to_owned(),
        }
    }

    pub fn current(&self) -> Arc<SlotMap> {
        Arc::clone(&self.map.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The map, read first if none is known yet (and read again in the
    /// background when it is old).
    pub async fn get(
        self: &Arc<Self>,
        conn: &ClusterConnection,
    ) -> Result<Arc<SlotMap>, redis::RedisError> {
        let map = self.current();
        if map.is_empty() {
            return self.refresh(conn).await;
        }
        let old = self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() > REREAD_AFTER);
        if old {
            self.stale(conn);
        }
        Ok(map)
    }

    /// Reads the map from any node.
    pub async fn refresh(
        &self,
        conn: &ClusterConnection,
    ) -> Result<Arc<SlotMap>, redis::RedisError> {
        *self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let value = conn
            .clone()
            .route_command(cmd, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await?;
        let map = SlotMap::parse(&value, &self.default_host)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "CLUSTER SLOTS answer not understood",
                ))
            })?;
        let map = Arc::new(map);
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&map);
        Ok(map)
    }

    /// The map looked stale: reads it again in the background, at most
    /// once per [`REFRESH_EVERY`] and one read at a time.
    pub fn stale(self: &Arc<Self>, conn: &ClusterConnection) {
        let recent = self
            .last_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < REFRESH_EVERY);
        if recent
            || self
                .refreshing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let slots = Arc::clone(self);
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), slots.refresh(&conn)).await
            {
                tracing::debug!(error = %e, "cluster slot map not read");
            }
            slots.refreshing.store(false, Ordering::Release);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    fn node_value(port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(b"127.0.0.1".to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn parses_cluster_slots_and_finds_nodes() {
        let answer = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node_value(7001),
                node_value(7004),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node_value(7000)]),
        ]);
        let map = SlotMap::parse(&answer, "h").expect("parses");
        assert_eq!(map.node(0, false).map(|n| n.port), Some(7000));
        assert_eq!(map.node(5460, true).map(|n| n.port), Some(7000));
        assert_eq!(map.node(5461, false).map(|n| n.port), Some(7001));
        assert_eq!(map.node(16383, true).map(|n| n.port), Some(7004));
        let masters: Vec<u16> = map.masters().into_iter().map(|(s, _)| s).collect();
        assert_eq!(masters, [0, 5461]);
        let partial = SlotMap::parse(
            &Value::Array(vec![Value::Array(vec![
                Value::Int(10),
                Value::Int(20),
                node_value(1),
            ])]),
            "h",
        )
        .expect("parses");
        assert!(partial.node(9, false).is_none());
        assert!(partial.node(21, false).is_none());
        assert!(SlotMap::parse(&Value::Nil, "h").is_none());
    }
}
