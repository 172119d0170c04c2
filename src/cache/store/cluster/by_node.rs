//! A request's keys grouped by the node that serves them: one pipeline per
//! node, all nodes at once, so a request costs one round trip per node it
//! touches, whatever its number of keys. Every command of a group touches
//! one key, so no group can ever be refused with `CROSSSLOT`.
//!
//! A group sent where the slot map says can still meet a moved slot (a
//! reshard) or a node gone (a failover). Moved keys are asked again one by
//! one through the cluster client, which follows `MOVED` and `ASK` itself,
//! and the map is read again; a group whose node does not answer fails on
//! its own, so only that node's keys are misses; a node whose groups keep
//! failing is not asked for a moment ([`Failing`]), so that its keys miss
//! at once instead of each request waiting for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream, FuturesUnordered};
use futures_util::{FutureExt as _, StreamExt as _};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RetryMethod, Value};

use super::slots::{Node, Slots};
use crate::cache::store::StoreError;

/// What one group got back: the positions (in the request) of its items,
/// in order, and an answer for each, or why none came.
pub struct Answer {
    pub positions: Vec<usize>,
    pub values: Result<Vec<Value>, Failure>,
}

/// Why a group got no answer; turned into a [`StoreError`] wherever one is
/// needed (a lookup reports it once per run of keys).
#[derive(Debug, Clone)]
pub enum Failure {
    Redis(RedisError),
    Timeout(Duration),
}

impl Failure {
    pub fn to_error(&self) -> StoreError {
        match self {
            Failure::Redis(e) => StoreError::Redis(e.clone()),
            Failure::Timeout(limit) => StoreError::Timeout(*limit),
        }
    }
}

/// Consecutive groups a node did not answer (no connection, or no answer
/// in time) after which it is skipped...
const SKIP_AFTER: u32 = 3;
/// ... for this long; then it is asked again (and skipped again at its
/// next failure).
const SKIP_FOR: Duration = Duration::from_secs(1);

/// Nodes whose groups failed lately: how many in a row, and until when
/// they are skipped.
#[derive(Default)]
pub struct Failing(Mutex<HashMap<Node, (u32, Option<Instant>)>>);

impl Failing {
    fn skipped(&self, node: &Node) -> bool {
        let failing = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        failing
            .get(node)
            .and_then(|(_, until)| *until)
            .is_some_and(|until| Instant::now() < until)
    }

    fn record(&self, node: &Node, answered: bool) {
        let mut failing = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if answered {
            if !failing.is_empty() {
                failing.remove(node);
            }
            return;
        }
        let (failures, until) = failing.entry(node.clone()).or_default();
        *failures += 1;
        if *failures >= SKIP_AFTER {
            *until = Some(Instant::now() + SKIP_FOR);
        }
    }
}

/// Builds the command of item `i`: one key each.
pub type Make = Arc<dyn Fn(usize) -> Cmd + Send + Sync>;

/// The connection, the slot map, and the count of round trips, shared by
/// every call.
#[derive(Clone)]
pub struct Router {
    pub conn: ClusterConnection,
    pub slots: Arc<Slots>,
    pub round_trips: prometheus::IntCounterVec,
    pub read_from_replicas: bool,
    pub failing: Arc<Failing>,
    /// The first seed URL: other nodes are reached with its scheme and
    /// credentials.
    pub seed: Arc<str>,
}

impl Router {
    /// Sends item `i` (whose key is in `slots[i]`) with the others of its
    /// node; answers arrive node by node, as each node answers, each
    /// within `limit`. `read` items may go to a replica.
    pub fn ask(
        &self,
        slots: Vec<u16>,
        read: bool,
        op: &'static str,
        limit: Duration,
        make: Make,
    ) -> BoxStream<'static, Answer> {
        if slots.is_empty() {
            return stream::empty().boxed();
        }
        let this = self.clone();
        async move {
            let map = match bounded(limit, this.slots.get(&this.conn)).await {
                Ok(map) => map,
                Err(failure) => {
                    let positions = (0..slots.len()).collect();
                    let answer = Answer {
                        positions,
                        values: Err(failure),
                    };
                    return stream::iter([answer]).boxed();
                }
            };
            let replicas = read && this.read_from_replicas;
            // A request touches few nodes: a list beats a map.
            let mut groups: Vec<(Option<Node>, Vec<usize>)> = Vec::new();
            for (i, slot) in slots.iter().enumerate() {
                let node = map.node(*slot, replicas);
                match groups.iter_mut().find(|(n, _)| n.as_ref() == node) {
                    Some((_, positions)) => positions.push(i),
                    None => groups.push((node.cloned(), vec![i])),
                }
            }
            groups
                .into_iter()
                .map(|(node, positions)| {
                    this.clone()
                        .ask_node(node, positions, op, limit, Arc::clone(&make))
                })
                .collect::<FuturesUnordered<_>>()
                .boxed()
        }
        .into_stream()
        .flatten()
        .boxed()
    }

    /// Every answer of `ask`, in the order of the items.
    pub async fn ask_all(
        &self,
        slots: Vec<u16>,
        read: bool,
        op: &'static str,
        limit: Duration,
        make: Make,
    ) -> Result<Vec<Value>, StoreError> {
        let mut all = vec![Value::Nil; slots.len()];
        let mut answers = self.ask(slots, read, op, limit, make);
        let mut failed = None;
        let (mut nodes, mut answered) = (0, 0);
        while let Some(answer) = answers.next().await {
            nodes += 1;
            match answer.values {
                Ok(values) => {
                    answered += 1;
                    for (i, value) in answer.positions.into_iter().zip(values) {
                        all[i] = value;
                    }
                }
                Err(failure) => {
                    failed.get_or_insert(failure.to_error());
                }
            }
        }
        match failed {
            None => Ok(all),
            Some(first) if answered == 0 => Err(first),
            Some(first) => Err(StoreError::Partial {
                failed: nodes - answered,
                nodes,
                first: Box::new(first),
            }),
        }
    }

    async fn ask_node(
        self,
        node: Option<Node>,
        positions: Vec<usize>,
        op: &'static str,
        limit: Duration,
        make: Make,
    ) -> Answer {
        if let Some(node) = node.as_ref().filter(|n| self.failing.skipped(n)) {
            let why = "failing: not asked for a moment";
            let skipped = RedisError::from((ErrorKind::Io, why, node.to_string()));
            return Answer {
                positions,
                values: Err(Failure::Redis(skipped)),
            };
        }
        let asked = async {
            let Some(node) = &node else {
                // A slot the map does not cover: the cluster client finds it.
                return self.one_by_one(&positions, op, &make).await;
            };
            let mut pipe = redis::pipe();
            for i in &positions {
                pipe.add_command(make(*i));
            }
            self.round_trips.with_label_values(&[op]).inc();
            let sent = self
                .conn
                .clone()
                .route_pipeline(pipe, 0, positions.len(), node.route())
                .await;
            match sent {
                Ok(values) => values.into_iter().map(Value::extract_error).collect(),
                Err(e) => {
                    self.slots.stale(&self.conn);
                    if redirected(&e) {
                        self.one_by_one(&positions, op, &make).await
                    } else {
                        Err(e)
                    }
                }
            }
        };
        let values = match tokio::time::timeout(limit, asked).await {
            Ok(Ok(values)) => Ok(values),
            Ok(Err(e)) => Err(Failure::Redis(e)),
            Err(_) => Err(Failure::Timeout(limit)),
        };
        if let Some(node) = &node {
            // An error the node itself answered (a full node refusing a
            // write) says nothing of its reads: only silence counts.
            let silent = match &values {
                Ok(_) => false,
                Err(Failure::Timeout(_)) => true,
                Err(Failure::Redis(e)) => {
                    e.is_io_error()
                        || e.is_connection_refusal()
                        || e.is_connection_dropped()
                        || e.is_timeout()
                        || e.kind() == ErrorKind::ClusterConnectionNotFound
                }
            };
            self.failing.record(node, !silent);
        }
        Answer { positions, values }
    }

    /// Each item on its own, routed (and redirected) by the cluster client.
    async fn one_by_one(
        &self,
        positions: &[usize],
        op: &'static str,
        make: &Make,
    ) -> Result<Vec<Value>, RedisError> {
        self.round_trips
            .with_label_values(&[op])
            .inc_by(positions.len() as u64);
        let asked = positions.iter().map(|i| {
            let mut conn = self.conn.clone();
            let cmd = make(*i);
            async move { cmd.query_async::<Value>(&mut conn).await }
        });
        futures_util::future::join_all(asked)
            .await
            .into_iter()
            .collect()
    }
}

/// The group met a slot that is moving or has moved.
fn redirected(e: &RedisError) -> bool {
    matches!(
        e.retry_method(),
        RetryMethod::MovedRedirect
            | RetryMethod::AskRedirect
            | RetryMethod::RefreshSlotsAndRetry
            | RetryMethod::WaitAndRetry
    )
}

pub async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::Redis(e)),
        Err(_) => Err(Failure::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_silent_for_a_while_is_skipped_until_it_is_asked_again() {
        let failing = Failing::default();
        let node = Node {
            host: "127.0.0.1".into(),
            port: 7000,
        };
        let other = Node {
            host: "127.0.0.1".into(),
            port: 7001,
        };
        for _ in 0..SKIP_AFTER - 1 {
            failing.record(&node, false);
        }
        assert!(!failing.skipped(&node), "not before {SKIP_AFTER} in a row");
        failing.record(&node, false);
        assert!(failing.skipped(&node));
        assert!(!failing.skipped(&other), "only that node");
        failing.record(&node, true);
        assert!(!failing.skipped(&node), "an answer clears it");
        failing.record(&node, false);
        assert!(!failing.skipped(&node), "the count starts over");
    }
}
