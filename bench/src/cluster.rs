//! The Redis Cluster rows: after the other scenarios, a local cluster of
//! three masters (no replicas: the machine has two cores to share) on free
//! loopback ports, and a gateway on it (L1 off, as the main runs) that
//! repeats the 64-input and 2048-input all-hit base64 runs. Round trips per
//! request come from the gateway's own `embgate_store_round_trips_total`,
//! read around a few requests sent one at a time.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::Plan;
use crate::workload::{Format, Pool};
use crate::{
    Args, Context, Expect, GatewayProcess, Measured, Pools, post_each, posting, spawn_gateway,
    wait_healthy,
};

const MASTERS: usize = 3;
/// Requests whose round trips are counted, one at a time.
const COUNTED: usize = 20;
const ROUND_TRIPS: &str = "embgate_store_round_trips_total{op=\"get\"}";

pub struct Row {
    pub measured: Measured,
    /// Store round trips per request (one per master touched).
    pub round_trips: f64,
}

pub struct ClusterRuns {
    /// By the id of the single-Redis run repeated (`hit64/base64`,
    /// `hit2048/base64`).
    pub rows: Vec<(&'static str, Row)>,
    pub masters: usize,
}

/// Three `redis-server --cluster-enabled yes`, joined; stopped on drop.
struct LocalCluster {
    children: Vec<Child>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl LocalCluster {
    fn start() -> Result<LocalCluster, String> {
        let dir =
            std::env::temp_dir().join(format!("embgate-bench-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut cluster = LocalCluster {
            children: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        // Below the ephemeral range, with the bus port (+10000) free too.
        let mut port = 10000 + (std::process::id() % 12000) as u16;
        while cluster.ports.len() < MASTERS {
            port = if port >= 22700 { 10000 } else { port + 1 };
            let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
            if cluster.ports.contains(&port) || !free(port) || !free(port + 10000) {
                continue;
            }
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("redis-server: {e}"))?;
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let created = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("redis-cli: {e}"))?;
            if created.success() {
                break;
            }
            if Instant::now() > deadline {
                return Err("redis-cli --cluster create failed".to_owned());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        while !cluster.ports.iter().all(|p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "CLUSTER", "INFO"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        }) {
            if Instant::now() > deadline {
                return Err("the cluster did not become ok".to_owned());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    fn seeds(&self) -> String {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        seeds.join(",")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the cluster and its gateway (into `slot`, for the caller to
/// stop), warms the pools through it and measures.
pub async fn compare(
    args: &Args,
    base: &Context,
    vendor_url: &str,
    prefix: &str,
    pools: &Pools,
    slot: &mut Option<GatewayProcess>,
) -> Result<ClusterRuns, String> {
    let cluster = LocalCluster::start()?;
    let env = [
        // The cluster is the store: store.url must name no other.
        ("EMBGATE__STORE__URL".to_owned(), String::new()),
        ("EMBGATE__STORE__CLUSTER_NODES".to_owned(), cluster.seeds()),
    ];
    let gateway = slot.insert(spawn_gateway(
        args,
        vendor_url,
        prefix,
        "gateway-cluster",
        &env,
    )?);
    eprintln!(
        "Redis Cluster ({MASTERS} masters): gateway pid {} at {} (log {})",
        gateway.pid(),
        gateway.url,
        gateway.log.display()
    );
    wait_healthy(&base.http, gateway).await?;
    // Redis CPU here is the cluster nodes', not the single Redis's.
    let ctx = Context {
        redis_pid: None,
        ..base.on(gateway)
    };
    let runs: [(&'static str, &Pool, Plan); 2] = [
        (
            "hit64/base64",
            &pools.sixtyfour,
            args.plan(args.concurrency_64),
        ),
        ("hit2048/base64", &pools.large, args.plan(1)),
    ];
    let mut rows = Vec::new();
    for (id, pool, plan) in runs {
        let bodies = pool.bodies(Format::Base64);
        // Fills the cluster (misses), then every request must be a hit.
        post_each(&ctx, bodies.clone(), 4, Expect::Nothing).await?;
        let before = round_trips(&ctx).await?;
        let counted: Vec<_> = bodies.iter().cycle().take(COUNTED).cloned().collect();
        let not_hit = post_each(&ctx, counted, 1, Expect::Hit).await?;
        if not_hit > 0 {
            return Err(format!(
                "{not_hit} of the counted {id} requests were not hits"
            ));
        }
        let trips = (round_trips(&ctx).await? - before) / COUNTED as f64;
        let op = posting(&ctx.gateway_url, plan.concurrency, 1, bodies).await?;
        let measured = ctx.measure(&format!("cluster/{id}"), plan, op).await;
        rows.push((
            id,
            Row {
                measured,
                round_trips: trips,
            },
        ));
    }
    Ok(ClusterRuns {
        rows,
        masters: MASTERS,
    })
}

async fn round_trips(ctx: &Context) -> Result<f64, String> {
    let text = ctx
        .http
        .get(format!("{}/metrics", ctx.gateway_url))
        .send()
        .await
        .map_err(|e| format!("metrics: {e}"))?
        .text()
        .await
        .map_err(|e| format!("metrics: {e}"))?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(ROUND_TRIPS)?.trim().parse().ok())
        .unwrap_or(0.0))
}
