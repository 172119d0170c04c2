//! The store rows: the embedded store next to Redis, and the safety limits
//! next to relaxed ones, in the same run.
//!
//! After the other scenarios, three gateways (L1 off, as the main runs, so
//! the store path is what is measured): on the Redis at `--redis-url` with
//! the shipped limits, on it with the limits relaxed (server limits and the
//! breaker threshold as high as they go), and on the embedded store in a
//! temporary file. Each round measures the 1-input all-hit base64 run on
//! all three and the 2048-input all-hit latency on the two stores, back to
//! back, so a change in the machine's load falls on all alike. Then the
//! miss path on both stores: fresh 64-input requests, and the entries
//! written per second until the writes (made after each answer) drained.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::load::Plan;
use crate::workload::Format;
use crate::{
    Args, Context, Expect, GatewayProcess, Measured, Pools, fresh, post_each, posting,
    spawn_gateway, wait_healthy,
};

/// Inputs per request of the miss runs.
const MISS_INPUTS: usize = 64;
/// Connections of the miss runs.
const MISS_CONNECTIONS: usize = 4;

/// Settings that take the safety limits out of the way.
pub const RELAXED: [(&str, &str); 4] = [
    ("EMBGATE__SERVER__MAX_CONNECTIONS", "1000000"),
    ("EMBGATE__SERVER__MAX_REQUESTS_IN_FLIGHT", "1000000"),
    ("EMBGATE__SERVER__HEADER_READ_TIMEOUT_SECS", "86400"),
    ("EMBGATE__STORE__BREAKER_FAILURES", "1000000"),
];

pub struct Round {
    pub redis: Measured,
    pub relaxed: Measured,
    pub embedded: Measured,
    pub redis_2048: Measured,
    pub embedded_2048: Measured,
}

pub struct MissRun {
    pub measured: Measured,
    /// Entries written per second, from the first request until the last
    /// write landed.
    pub written_per_second: f64,
}

pub struct StoreRuns {
    pub rounds: Vec<Round>,
    pub redis_miss: MissRun,
    pub embedded_miss: MissRun,
}

/// The three gateways, stopped by the caller.
#[derive(Default)]
pub struct Gateways {
    pub all: Vec<GatewayProcess>,
}

pub async fn compare(
    args: &Args,
    base: &Context,
    vendor_url: &str,
    prefix: &str,
    pools: &Pools,
    gateways: &mut Gateways,
) -> Result<StoreRuns, String> {
    let dir = std::env::temp_dir().join(format!("{prefix}-embedded"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("cache.redb");
    let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let embedded_env = [
        ("EMBGATE__STORE__URL".to_owned(), String::new()),
        (
            "EMBGATE__STORE__PATH".to_owned(),
            path.to_string_lossy().into_owned(),
        ),
    ];
    let specs: [(&str, Vec<(String, String)>); 3] = [
        ("gateway-redis", Vec::new()),
        ("gateway-relaxed", owned(&RELAXED)),
        ("gateway-embedded", embedded_env.to_vec()),
    ];
    let mut contexts = Vec::new();
    for (name, env) in specs {
        let mut gateway = spawn_gateway(args, vendor_url, prefix, name, &env)?;
        wait_healthy(&base.http, &mut gateway).await?;
        contexts.push(base.on(&gateway));
        gateways.all.push(gateway);
    }
    let [redis, relaxed, embedded] = &contexts[..] else {
        return Err("three gateways expected".into());
    };
    // The Redis keys are the main run's (same prefix); the embedded store
    // starts empty.
    eprintln!("store rows: warming the embedded store");
    for pool in [&pools.one, &pools.large] {
        post_each(embedded, pool.bodies(Format::Base64), 4, Expect::Nothing).await?;
    }
    settle(embedded).await?;

    let plan = args.plan(args.concurrency);
    let latency = args.plan(1);
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let label = |what: &str| format!("stores round {round}/{}: {what}", args.rounds);
        let hit1 = async |ctx: &Context, what: &str| -> Result<Measured, String> {
            let bodies = pools.one.bodies(Format::Base64);
            let op = posting(&ctx.gateway_url, plan.concurrency, 1, bodies).await?;
            Ok(ctx.measure(&label(what), plan, op).await)
        };
        let redis_1 = hit1(redis, "redis hit1").await?;
        let relaxed_1 = hit1(relaxed, "redis, limits relaxed, hit1").await?;
        let embedded_1 = hit1(embedded, "embedded hit1").await?;
        let hit2048 = async |ctx: &Context, what: &str| -> Result<Measured, String> {
            let bodies = pools.large.bodies(Format::Base64);
            let op = posting(&ctx.gateway_url, 1, 1, bodies).await?;
            Ok(ctx.measure(&label(what), latency, op).await)
        };
        let redis_2048 = hit2048(redis, "redis hit2048").await?;
        let embedded_2048 = hit2048(embedded, "embedded hit2048").await?;
        rounds.push(Round {
            redis: redis_1,
            relaxed: relaxed_1,
            embedded: embedded_1,
            redis_2048,
            embedded_2048,
        });
    }
    let miss = Plan {
        concurrency: MISS_CONNECTIONS,
        ..plan
    };
    let redis_miss = misses(redis, miss, "stores-redis").await?;
    let embedded_miss = misses(embedded, miss, "stores-embedded").await?;
    Ok(StoreRuns {
        rounds,
        redis_miss,
        embedded_miss,
    })
}

/// Fresh 64-input requests (every input a miss), then the rate at which
/// their entries reached the store.
async fn misses(ctx: &Context, plan: Plan, side: &'static str) -> Result<MissRun, String> {
    let url: Arc<str> = format!("{}/v1/embeddings", ctx.gateway_url).into();
    let fetched = || metric(ctx, "embgate_upstream_inputs_total");
    let before = fetched().await?;
    let started = Instant::now();
    let op = fresh(&ctx.http, url, side, MISS_INPUTS, Expect::Miss);
    let measured = ctx.measure(&format!("{side} miss64"), plan, op).await;
    settle(ctx).await?;
    let written = fetched().await? - before;
    Ok(MissRun {
        measured,
        written_per_second: written / started.elapsed().as_secs_f64(),
    })
}

/// Waits until the gateway has no write in flight.
async fn settle(ctx: &Context) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if metric(ctx, "embgate_store_pending_write_bytes").await? == 0.0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("writes did not drain within 120 s".into())
}

/// The sum of a metric's samples on the gateway's /metrics.
async fn metric(ctx: &Context, name: &str) -> Result<f64, String> {
    let url = format!("{}/metrics", ctx.gateway_url);
    let text = ctx
        .http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    Ok(crate::l1::sum_samples(&text, name, &[]).unwrap_or(0.0))
}
