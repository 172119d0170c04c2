//! The in-process L1 cache comparison: after the other scenarios, a second
//! gateway with the same key prefix and vendor plus `EMBGATE__L1__MAX_BYTES`
//! (the shipped default: the gateway as a user runs it) repeats the Zipf
//! and 1-input base64 all-hit runs (one request per connection, and
//! pipelined), with the same requests, against the keys the first gateway
//! stored. Then come the rounds the 1-input target is judged on: the
//! bare-Redis ceiling and both 1-input runs, back to back, several times.

use std::collections::BTreeMap;

use crate::load::Plan;
use crate::workload::{Format, Pool};
use crate::{
    Args, Context, Expect, GatewayProcess, Keys, Measured, Pools, Scenario, mgetting, post_each,
    posting, spawn_gateway, sys, wait_healthy,
};

/// The environment variable that sizes the L1.
pub const MAX_BYTES_ENV: &str = "EMBGATE__L1__MAX_BYTES";

/// Requests in flight while priming the L1.
const PRIME_PARALLEL: usize = 8;

/// What the second gateway needs to read the first one's keys.
pub struct Setup<'a> {
    pub vendor_url: &'a str,
    pub prefix: &'a str,
}

/// One run repeated with the L1 on.
pub struct Run {
    pub measured: Measured,
    /// Share of the run's cache hits (warm-up included) the L1 answered,
    /// from the gateway's counters; `None` if there was no hit.
    pub l1_share: Option<f64>,
}

/// One round of the 1-input target: the ceiling and the gateway's two
/// 1-input runs back to back, so a change in the machine's load (other
/// tenants, CPU frequency) falls on all three alike.
pub struct Round {
    pub ceiling: Measured,
    pub one_per_connection: Measured,
    pub pipelined: Measured,
}

pub struct Comparison {
    pub max_bytes: u64,
    /// By the id of the run repeated (`zipf/base64`, `hit1/base64`,
    /// `hit1/base64-pipelined`).
    pub runs: BTreeMap<&'static str, Run>,
    /// The 1-input target's rounds (`--rounds`), after the L1 runs.
    pub hit1_rounds: Vec<Round>,
    /// RSS of the L1 gateway once healthy, before any request, KiB.
    pub startup_rss: Option<u64>,
    /// Peak RSS (VmHWM) of the L1 gateway over its whole life, KiB.
    pub peak_rss: Option<u64>,
    pub store_warnings: usize,
}

/// Starts the L1 gateway (into `slot`, for the caller to stop), primes its
/// L1 and repeats the runs.
pub async fn compare(
    args: &Args,
    base: &Context,
    setup: &Setup<'_>,
    pools: &Pools,
    keys: &Keys,
    slot: &mut Option<GatewayProcess>,
) -> Result<Comparison, String> {
    let env = [(MAX_BYTES_ENV.to_owned(), args.l1_bytes.to_string())];
    let gateway = slot.insert(spawn_gateway(
        args,
        setup.vendor_url,
        setup.prefix,
        "gateway-l1",
        &env,
    )?);
    eprintln!(
        "L1 comparison: gateway pid {} at {} with {MAX_BYTES_ENV}={} (log {})",
        gateway.pid(),
        gateway.url,
        args.l1_bytes,
        gateway.log.display()
    );
    wait_healthy(&base.http, gateway).await?;
    let ctx = base.on(gateway);
    let mut compared = Comparison {
        max_bytes: args.l1_bytes,
        runs: BTreeMap::new(),
        hit1_rounds: Vec::new(),
        startup_rss: sys::vm_kib(ctx.gateway_pid, "VmRSS"),
        peak_rss: None,
        store_warnings: 0,
    };
    // The peak RSS that per-run resets (`measure_peak`) cleared.
    let mut earlier_peak = None;
    let plan = args.plan(args.concurrency);
    if args.runs(Scenario::Hit1) {
        let run = repeat(
            &ctx,
            "l1/hit1/base64",
            plan,
            1,
            &pools.one,
            &mut earlier_peak,
        )
        .await?;
        compared.runs.insert("hit1/base64", run);
        let (label, depth) = ("l1/hit1/base64-pipelined", args.depth(plan));
        let pipelined = Plan {
            concurrency: plan.concurrency.div_ceil(depth),
            ..plan
        };
        let run = repeat(&ctx, label, pipelined, depth, &pools.one, &mut earlier_peak).await?;
        compared.runs.insert("hit1/base64-pipelined", run);
        // The L1 is primed by the runs just above.
        for round in 1..=args.rounds {
            let label = |what: &str| format!("l1/hit1 round {round}/{}: {what}", args.rounds);
            let op = mgetting(&ctx.redis, pools.one.mgets(keys));
            let ceiling = ctx.measure(&label("redis (ceiling)"), plan, op).await;
            let bodies = pools.one.bodies(Format::Base64);
            let op = posting(&ctx.gateway_url, plan.concurrency, 1, bodies.clone()).await?;
            let one_per_connection = ctx.measure(&label("base64"), plan, op).await;
            let op = posting(&ctx.gateway_url, pipelined.concurrency, depth, bodies).await?;
            let pipelined = ctx.measure(&label("base64-pipelined"), pipelined, op).await;
            compared.hit1_rounds.push(Round {
                ceiling,
                one_per_connection,
                pipelined,
            });
        }
    }
    if let Some((pool, _)) = &pools.zipf {
        let run = repeat(&ctx, "l1/zipf/base64", plan, 1, pool, &mut earlier_peak).await?;
        compared.runs.insert("zipf/base64", run);
    }
    compared.peak_rss = earlier_peak.max(sys::vm_kib(ctx.gateway_pid, "VmHWM"));
    Ok(compared)
}

/// Primes the L1 with one untimed pass over `pool` (every request must be a
/// hit: the keys are the first gateway's), then measures the pool's base64
/// run with the L1 counters read around it.
async fn repeat(
    ctx: &Context,
    label: &str,
    plan: Plan,
    depth: usize,
    pool: &Pool,
    earlier_peak: &mut Option<u64>,
) -> Result<Run, String> {
    let bodies = pool.bodies(Format::Base64);
    eprintln!(
        "  priming the L1 with the {} requests of {label}",
        bodies.len()
    );
    let not_hit = post_each(ctx, bodies.clone(), PRIME_PARALLEL, Expect::Hit)
        .await
        .map_err(|e| format!("priming the L1 for {label}: {e}"))?;
    if not_hit > 0 {
        return Err(format!(
            "{not_hit} of {} requests priming the L1 for {label} were not hits: the L1 \
             gateway does not read the keys the first one stored",
            bodies.len()
        ));
    }
    let op = posting(&ctx.gateway_url, plan.concurrency, depth, bodies).await?;
    let before = scrape(ctx).await?;
    let measured = ctx.measure_peak(label, plan, op, earlier_peak).await;
    let after = scrape(ctx).await?;
    Ok(Run {
        measured,
        l1_share: after.since(before).l1_share(),
    })
}

/// The gateway's cache counters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counters {
    /// `embgate_l1_hits_total`.
    pub l1_hits: f64,
    /// `embgate_cache_lookups_total{result="hit"}`, summed over models.
    pub hits: f64,
}

impl Counters {
    fn since(self, earlier: Counters) -> Counters {
        Counters {
            l1_hits: self.l1_hits - earlier.l1_hits,
            hits: self.hits - earlier.hits,
        }
    }

    fn l1_share(self) -> Option<f64> {
        (self.hits > 0.0).then(|| self.l1_hits / self.hits)
    }
}

async fn scrape(ctx: &Context) -> Result<Counters, String> {
    let url = format!("{}/metrics", ctx.gateway_url);
    let resp = ctx
        .http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status()));
    }
    let text = resp
        .text()
        .await
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    counters(&text).ok_or_else(|| {
        format!(
            "{url} lacks embgate_l1_hits_total or embgate_cache_lookups_total{{result=\"hit\"}}"
        )
    })
}

fn counters(text: &str) -> Option<Counters> {
    Some(Counters {
        l1_hits: sum_samples(text, "embgate_l1_hits_total", &[])?,
        hits: sum_samples(text, "embgate_cache_lookups_total", &[("result", "hit")])?,
    })
}

/// The sum of the samples of metric `name` (Prometheus text format) whose
/// labels include every `want` pair; `None` if there is none.
pub(crate) fn sum_samples(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                // Not a longer name sharing the prefix (`name_created`).
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let has = |(k, v): &(&str, &str)| {
                labels
                    .split(',')
                    .any(|pair| pair.trim() == format!("{k}=\"{v}\""))
            };
            if !want.iter().all(has) {
                return None;
            }
            value.split_whitespace().next()?.parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP embgate_cache_lookups_total Distinct inputs looked up in the cache.
# TYPE embgate_cache_lookups_total counter
embgate_cache_lookups_total{model=\"a\",result=\"hit\"} 100
embgate_cache_lookups_total{model=\"a\",result=\"miss\"} 7
embgate_cache_lookups_total{model=\"b\",result=\"hit\"} 20
# TYPE embgate_l1_hits_total counter
embgate_l1_hits_total 90
embgate_l1_hits_total_created 1.7e9
";

    #[test]
    fn reads_the_cache_counters() {
        let c = counters(METRICS);
        assert_eq!(
            c,
            Some(Counters {
                l1_hits: 90.0,
                hits: 120.0
            })
        );
        assert_eq!(
            sum_samples(METRICS, "embgate_cache_lookups_total", &[]),
            Some(127.0)
        );
        assert_eq!(sum_samples(METRICS, "embgate_nothing", &[]), None);
    }

    #[test]
    fn share_is_of_the_hits_between_two_scrapes() {
        let before = Counters {
            l1_hits: 10.0,
            hits: 20.0,
        };
        let after = Counters {
            l1_hits: 55.0,
            hits: 70.0,
        };
        assert_eq!(after.since(before).l1_share(), Some(0.9));
        assert_eq!(before.since(before).l1_share(), None);
    }
}
