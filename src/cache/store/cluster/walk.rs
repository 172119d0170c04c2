//! Walking a cluster: SCAN runs on every master in turn, in the order of
//! the first slot each serves. The cursor says which master and where on
//! it: `<its first slot>-<its SCAN cursor>` (`0` starts and ends, as for
//! one server). A failover or a reshard during a walk may make it see an
//! entry twice or miss one moved meanwhile; migrations are idempotent, and
//! statistics are a count of the moment.

use std::time::Duration;

use redis::Value;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::by_node::{Router, bounded};
use crate::cache::key::{KeyHash, KeyLayout};
use crate::cache::store::redis::info_field;
use crate::cache::store::{Cursor, Scanned, StoreError, StoreSize};

/// About `count` entry keys from `cursor` on.
pub fn scan(
    router: Router,
    layout: KeyLayout,
    cursor: &Cursor,
    count: usize,
    limit: Duration,
) -> impl Future<Output = Scanned<(KeyHash, String)>> + use<> {
    let at = parse(cursor);
    async move {
        let map = bounded(limit, router.slots.get(&router.conn))
            .await
            .map_err(|f| f.to_error())?;
        let masters = map.masters();
        let (first, position) = match at {
            Some(at) => at,
            None => match masters.first() {
                Some((first, _)) => (*first, "0".to_owned()),
                None => return Ok((Cursor::start(), Vec::new())),
            },
        };
        let node = map
            .node(first, false)
            .cloned()
            .ok_or_else(|| unknown(&format!("no master serves slot {first}")))?;
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(&position)
            .arg("MATCH")
            .arg(layout.entry_pattern())
            .arg("COUNT")
            .arg(count);
        router.round_trips.with_label_values(&["scan"]).inc();
        let routing = RoutingInfo::SingleNode(node.route());
        let value = bounded(limit, router.conn.clone().route_command(cmd, routing))
            .await
            .map_err(|f| f.to_error())?;
        let (next, keys): (String, Vec<String>) =
            redis::from_redis_value(value).map_err(|e| unknown(&e.to_string()))?;
        let next = if next == "0" {
            masters
                .iter()
                .find(|(s, _)| *s > first)
                .map_or_else(Cursor::start, |(s, _)| Cursor(format!("{s}-0")))
        } else {
            Cursor(format!("{first}-{next}"))
        };
        let keys = keys
            .into_iter()
            .filter_map(|k| Some((layout.parse_entry(&k)?, k)))
            .collect();
        Ok((next, keys))
    }
}

/// The master (by a slot it served first) and its SCAN cursor; `None` at
/// the start, or for a cursor no cluster walk wrote (it starts over).
fn parse(cursor: &Cursor) -> Option<(u16, String)> {
    let (slot, position) = cursor.0.split_once('-')?;
    let slot = slot.parse().ok()?;
    position.parse::<u64>().ok()?;
    Some((slot, position.to_owned()))
}

/// Keys and memory, summed over the masters.
pub async fn size(router: Router, limit: Duration) -> Result<StoreSize, StoreError> {
    let map = bounded(limit, router.slots.get(&router.conn))
        .await
        .map_err(|f| f.to_error())?;
    let asked = map.masters().into_iter().map(|(_, node)| {
        let mut conn = router.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("DBSIZE")
            .cmd("INFO")
            .arg("memory")
            .cmd("INFO")
            .arg("stats");
        let route: SingleNodeRoutingInfo = node.route();
        async move { bounded(limit, conn.route_pipeline(pipe, 0, 3, route)).await }
    });
    let mut size = StoreSize::default();
    let mut evicted = 0;
    for answer in futures_util::future::join_all(asked).await {
        let values = answer.map_err(|f| f.to_error())?;
        let (entries, memory, stats): (u64, String, String) =
            redis::from_redis_value(Value::Array(values)).map_err(|e| unknown(&e.to_string()))?;
        size.entries += entries;
        size.bytes += info_field(&memory, "used_memory").unwrap_or(0);
        evicted += info_field(&stats, "evicted_keys").unwrap_or(0);
    }
    size.evicted = Some(evicted);
    Ok(size)
}

fn unknown(what: &str) -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::Parse,
        "cluster",
        what.to_owned(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_name_a_master_and_a_position() {
        assert_eq!(parse(&Cursor::start()), None);
        assert_eq!(parse(&Cursor("5461-17".into())), Some((5461, "17".into())));
        assert_eq!(parse(&Cursor("0-0".into())), Some((0, "0".into())));
        assert_eq!(parse(&Cursor("1234".into())), None);
        assert_eq!(parse(&Cursor("x-1".into())), None);
    }
}
