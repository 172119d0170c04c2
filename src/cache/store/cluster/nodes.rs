//! How each node of the cluster is doing, for `/readyz`: the nodes the
//! cluster knows (`CLUSTER NODES`), each one asked with a PING of its own.
//! A node the cluster itself marks as failed is named without being asked.

use std::time::Duration;

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::by_node::{Router, bounded};
use super::slots::Node;
use crate::cache::store::NodeHealth;

/// How long a node may take to answer its PING.
const PING_LIMIT: Duration = Duration::from_millis(500);

/// A node as `CLUSTER NODES` lists it.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    node: Node,
    role: &'static str,
    failed: bool,
}

pub async fn health(router: Router) -> Vec<NodeHealth> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("NODES");
    let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    let listed = bounded(PING_LIMIT, router.conn.clone().route_command(cmd, any))
        .await
        .ok()
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .map(|text| parse(&text))
        .unwrap_or_default();
    let listed = if listed.is_empty() {
        from_slot_map(&router)
    } else {
        listed
    };
    if listed.is_empty() {
        return vec![NodeHealth {
            node: "cluster".to_owned(),
            role: "master",
            error: Some("no node of the cluster answers".to_owned()),
        }];
    }
    let asked = listed.into_iter().map(|l| {
        let seed = router.seed.clone();
        async move {
            let error = if l.failed {
                Some("marked as failed by the cluster".to_owned())
            } else {
                ping(&seed, &l.node).await.err()
            };
            NodeHealth {
                node: l.node.to_string(),
                role: l.role,
                error,
            }
        }
    });
    let mut nodes = futures_util::future::join_all(asked).await;
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    nodes
}

/// PINGs `node` on a connection of its own (the cluster client connects
/// to replicas only when it reads from them), with the seed's credentials.
async fn ping(seed: &str, node: &Node) -> Result<(), String> {
    let mut url = reqwest::Url::parse(seed).map_err(|e| e.to_string())?;
    url.set_host(Some(&node.host)).map_err(|e| e.to_string())?;
    url.set_port(Some(node.port))
        .map_err(|()| "no port".to_owned())?;
    let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
    let asked = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    bounded(PING_LIMIT, asked)
        .await
        .map(|_| ())
        .map_err(|f| f.to_error().to_string())
}

fn from_slot_map(router: &Router) -> Vec<Listed> {
    let map = router.slots.current();
    let mut listed: Vec<Listed> = Vec::new();
    for (_, master) in map.masters() {
        listed.push(Listed {
            node: master,
            role: "master",
            failed: false,
        });
    }
    listed
}

/// The lines of `CLUSTER NODES`: `<id> <host:port@bus[,hostname]> <flags> ...`.
fn parse(text: &str) -> Vec<Listed> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _id = fields.next()?;
            let address = fields.next()?.split(['@', ',']).next()?;
            let flags: Vec<&str> = fields.next()?.split(',').collect();
            if flags.iter().any(|f| matches!(*f, "handshake" | "noaddr")) {
                return None;
            }
            let (host, port) = address.rsplit_once(':')?;
            let port = port.parse().ok().filter(|p| *p != 0)?;
            Some(Listed {
                node: Node {
                    host: host.to_owned(),
                    port,
                },
                role: if flags.contains(&"master") {
                    "master"
                } else {
                    "replica"
                },
                failed: flags.contains(&"fail"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master,fail - 1 1 2 disconnected
c3 127.0.0.1:7004@17004,node-4 slave a1 0 1 5 connected
d4 :0@0 master,noaddr - 0 0 0 disconnected
";
        let listed = parse(text);
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0].node.to_string(), "127.0.0.1:7000");
        assert_eq!((listed[0].role, listed[0].failed), ("master", false));
        assert_eq!((listed[1].role, listed[1].failed), ("master", true));
        assert_eq!(listed[2].node.port, 7004);
        assert_eq!(listed[2].role, "replica");
    }
}
