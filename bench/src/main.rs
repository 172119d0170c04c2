//! `loadgen`: end-to-end benchmark of the embgate gateway.
//!
//! Starts the fake vendor (in process) and `embgate serve` (as its own
//! process, so its memory can be read), against the real Redis under a key
//! prefix of its own; warms the cache; measures all-hit, miss and skewed
//! workloads over HTTP; measures the same MGETs from a bare Redis client
//! (the ceiling); then, unless `--no-l1`, stops that gateway and repeats
//! the Zipf and 1-input runs on a second one with the in-process L1 cache
//! on (`l1.rs`); deletes its keys; writes a Markdown report.
//!
//! `bench/run.sh` builds everything and runs this with the defaults.

mod cluster;
mod http;
mod l1;
mod load;
mod report;
mod stores;
mod sys;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use fake_vendor::FakeVendor;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

use crate::load::{Plan, Reply, Stats};
use crate::workload::{Format, Keys, Pool, ZipfShape};

const API_KEY: &str = "sk-bench";

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// All-hit 1-input requests, and the bare-Redis ceiling.
    Hit1,
    /// All-hit 64-input requests, float and base64, and the ceiling.
    Hit64,
    /// All-hit 2048-input requests (latency and load), the ceiling, peak RSS.
    Hit2048,
    /// Fresh inputs: the latency the gateway adds over the vendor.
    Miss,
    /// A skewed (Zipf) all-hit workload over many keys.
    Zipf,
}

/// End-to-end load benchmark of embgate: gateway vs. the bare Redis reads it
/// cannot avoid.
#[derive(Parser, Debug)]
#[command(name = "loadgen")]
struct Args {
    /// Where to write the Markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// The gateway binary [default: `embgate` next to this binary].
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis_url: String,
    /// Extra environment for the gateway, e.g. EMBGATE__L1__MAX_BYTES=67108864
    /// (repeatable; overrides the harness's own settings).
    #[arg(long = "gateway-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    gateway_env: Vec<(String, String)>,
    /// Scenarios to run [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Unrecorded seconds before each measured run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connections for the 1-input and Zipf runs.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections for the 64-input runs.
    #[arg(long, default_value_t = 16)]
    concurrency_64: usize,
    /// Connections for the 2048-input load runs (the latency runs use 1).
    #[arg(long, default_value_t = 4)]
    concurrency_2048: usize,
    /// Connections for the miss-path runs.
    #[arg(long, default_value_t = 1)]
    concurrency_miss: usize,
    /// Requests pipelined on each connection in the pipelined 1-input run
    /// (its connections: --concurrency / this, so as many requests are in
    /// flight as in the other 1-input runs).
    #[arg(long, default_value_t = 8)]
    pipeline_depth: usize,
    /// Rounds of the target runs: the 1-input ones on the L1 gateway (the
    /// ceiling and both 1-input runs back to back) and the 2048-input
    /// latency ones (float, base64 and the ceiling back to back); each
    /// target is judged on the median round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Distinct keys of the Zipf workload.
    #[arg(long, default_value_t = 100_000)]
    zipf_keys: usize,
    /// Zipf exponent (larger: more skewed).
    #[arg(long, default_value_t = 1.1)]
    zipf_exponent: f64,
    /// Inputs per Zipf request.
    #[arg(long, default_value_t = 8)]
    zipf_inputs: usize,
    /// Distinct pre-built Zipf requests cycled through.
    #[arg(long, default_value_t = 8192)]
    zipf_requests: usize,
    /// Skip the in-process L1 cache comparison (a second gateway with
    /// EMBGATE__L1__MAX_BYTES set, rerunning the Zipf and 1-input base64 runs).
    #[arg(long)]
    no_l1: bool,
    /// EMBGATE__L1__MAX_BYTES of the L1 comparison's gateway (the gateway's
    /// default size).
    #[arg(long, default_value_t = 128 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    l1_bytes: u64,
    /// Skip the Redis Cluster rows (a local cluster of three masters and a
    /// gateway on it, repeating the 64- and 2048-input all-hit runs).
    #[arg(long)]
    no_cluster: bool,
    /// Skip the store rows (the embedded store next to Redis, and the safety
    /// limits next to relaxed ones: three more gateways, in rounds).
    #[arg(long)]
    no_stores: bool,
    /// Criterion output (`--output-format bencher`) to include in the report.
    #[arg(long)]
    criterion: Option<PathBuf>,
    /// The embedded engines' comparison (`target/release/engines --out`) to
    /// include in the report.
    #[arg(long)]
    engines: Option<PathBuf>,
    /// The command to cite in the report [default: this command line].
    #[arg(long)]
    command: Option<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

impl Args {
    fn runs(&self, s: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }

    /// Whether the L1 comparison runs: it repeats the Zipf and 1-input runs.
    /// Requests per connection in pipelined runs of `plan`.
    fn depth(&self, plan: Plan) -> usize {
        self.pipeline_depth.clamp(1, plan.concurrency.max(1))
    }

    fn compares_l1(&self) -> bool {
        !self.no_l1 && (self.runs(Scenario::Zipf) || self.runs(Scenario::Hit1))
    }

    fn plan(&self, concurrency: usize) -> Plan {
        Plan {
            concurrency,
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Duration::from_secs_f64(self.duration),
        }
    }
}

/// CPU used during a measured window, by process.
#[derive(Default, Clone, Copy)]
pub struct Cpu {
    pub gateway: Option<sys::CpuTime>,
    pub redis: Option<sys::CpuTime>,
    pub loadgen: Option<sys::CpuTime>,
}

#[derive(Clone)]
pub struct Measured {
    pub stats: Stats,
    pub cpu: Cpu,
    /// The gateway's peak RSS during the run, KiB, when it was reset
    /// before it (see `Context::measure_peak`).
    pub peak_rss: Option<u64>,
    /// The gateway's RSS when that reset happened, KiB.
    pub start_rss: Option<u64>,
}

/// Peak memory of the gateway process, KiB.
#[derive(Default)]
pub struct Memory {
    /// Once healthy, before any request.
    pub startup_rss: Option<u64>,
    pub after_warmup_rss: Option<u64>,
    pub peak_before_2048: Option<u64>,
    pub peak_2048: Option<u64>,
    pub reset_worked: bool,
}

/// Everything the report needs.
pub struct Results {
    pub runs: BTreeMap<&'static str, Measured>,
    pub memory: Memory,
    pub zipf: Option<ZipfShape>,
    pub warmed_inputs: usize,
    pub warmup_secs: f64,
    pub store_warnings: usize,
    pub deleted_keys: Option<u64>,
    /// The L1 comparison, unless skipped; `Err` if it failed.
    pub l1: Option<Result<l1::Comparison, String>>,
    /// The Redis Cluster rows, unless skipped; `Err` if they failed.
    pub cluster: Option<Result<cluster::ClusterRuns, String>>,
    /// The store rows, unless skipped; `Err` if they failed.
    pub stores: Option<Result<stores::StoreRuns, String>>,
    /// The 2048-input latency targets' rounds (`--rounds`).
    pub hit2048_rounds: Vec<LatencyRound>,
}

/// One round of the 2048-input latency targets: float, base64 and the
/// ceiling back to back, one connection each, so a change in the machine's
/// load between rounds falls on all three.
pub struct LatencyRound {
    pub float: Measured,
    pub base64: Measured,
    pub ceiling: Measured,
}

struct Context {
    http: reqwest::Client,
    gateway_url: Arc<str>,
    redis: redis::aio::MultiplexedConnection,
    gateway_pid: u32,
    redis_pid: Option<u32>,
    ticks: f64,
}

/// CPU used so far by the gateway, Redis and this process.
fn cpu_sample(gateway_pid: u32, redis_pid: Option<u32>, ticks: f64) -> Cpu {
    Cpu {
        gateway: sys::cpu_time(gateway_pid, ticks),
        redis: redis_pid.and_then(|p| sys::cpu_time(p, ticks)),
        loadgen: sys::cpu_time(std::process::id(), ticks),
    }
}

impl Context {
    /// The same client, Redis and clock, measuring another gateway.
    fn on(&self, gateway: &GatewayProcess) -> Context {
        Context {
            http: self.http.clone(),
            gateway_url: gateway.url.clone().into(),
            redis: self.redis.clone(),
            gateway_pid: gateway.pid(),
            redis_pid: self.redis_pid,
            ticks: self.ticks,
        }
    }

    /// Runs `op` under `plan`, with the CPU each process used in the window.
    async fn measure<F>(&self, label: &str, plan: Plan, op: F) -> Measured
    where
        F: Fn(u64) -> BoxFuture<Result<Reply, String>> + Send + Sync + 'static,
    {
        eprint!("  {label:<28} c={:<3} ", plan.concurrency);
        let warmup = plan.warmup;
        let (gateway_pid, redis_pid, ticks) = (self.gateway_pid, self.redis_pid, self.ticks);
        let sampler = tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            cpu_sample(gateway_pid, redis_pid, ticks)
        });
        let stats = load::run(plan, op).await;
        let after = cpu_sample(gateway_pid, redis_pid, ticks);
        let before = sampler.await.unwrap_or_default();
        let diff = |a: Option<sys::CpuTime>, b: Option<sys::CpuTime>| Some(a?.since(b?));
        let cpu = Cpu {
            gateway: diff(after.gateway, before.gateway),
            redis: diff(after.redis, before.redis),
            loadgen: diff(after.loadgen, before.loadgen),
        };
        eprintln!(
            "{:>9.0} req/s  p50 {:>9.3} ms  p99 {:>9.3} ms  errors {}  unexpected cache status {}",
            stats.per_second(),
            stats.p50(),
            stats.p99(),
            stats.errors,
            stats.unexpected
        );
        if let Some(e) = &stats.first_error {
            eprintln!("    first error: {e}");
        }
        Measured {
            stats,
            cpu,
            peak_rss: None,
            start_rss: None,
        }
    }

    /// `measure` with the gateway's peak RSS (VmHWM) reset before the run,
    /// so the run records its own peak. `earlier_peak` keeps the largest
    /// peak the resets cleared.
    async fn measure_peak<F>(
        &self,
        label: &str,
        plan: Plan,
        op: F,
        earlier_peak: &mut Option<u64>,
    ) -> Measured
    where
        F: Fn(u64) -> BoxFuture<Result<Reply, String>> + Send + Sync + 'static,
    {
        *earlier_peak = (*earlier_peak).max(sys::vm_kib(self.gateway_pid, "VmHWM"));
        let start_rss = sys::vm_kib(self.gateway_pid, "VmRSS");
        let reset = sys::reset_peak_rss(self.gateway_pid);
        let mut measured = self.measure(label, plan, op).await;
        let peak = sys::vm_kib(self.gateway_pid, "VmHWM");
        *earlier_peak = (*earlier_peak).max(peak);
        measured.peak_rss = peak.filter(|_| reset);
        measured.start_rss = start_rss;
        measured
    }
}

/// The cache status a scenario expects of the gateway.
#[derive(Clone, Copy)]
enum Expect {
    Hit,
    Miss,
    /// Not a gateway, or no expectation.
    Nothing,
}

/// POSTs one body; any status but 200 is an error.
async fn post(
    http: reqwest::Client,
    url: Arc<str>,
    body: Bytes,
    expect: Expect,
) -> Result<Reply, String> {
    let mut resp = http
        .post(&*url)
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, format!("Bearer {API_KEY}"))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(300).collect();
        return Err(format!("HTTP {status}: {text}"));
    }
    let cache = resp.headers().get("x-embgate-cache").map(|v| v.as_bytes());
    let as_expected = match expect {
        Expect::Hit => Some(cache == Some(b"hit")),
        Expect::Miss => Some(cache == Some(b"miss")),
        Expect::Nothing => None,
    };
    let mut bytes = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("body: {e}"))? {
        bytes += chunk.len() as u64;
    }
    Ok(Reply {
        as_expected,
        bytes,
        requests: 1,
    })
}

/// Cycles through `bodies`, POSTing each to the gateway's embeddings
/// endpoint (all hits expected) over `connections` connections opened now,
/// `depth` requests pipelined at a time on each.
async fn posting(
    gateway_url: &str,
    connections: usize,
    depth: usize,
    bodies: Vec<Bytes>,
) -> Result<impl Fn(u64) -> BoxFuture<Result<Reply, String>> + Send + Sync + 'static, String> {
    let authority = gateway_url.trim_start_matches("http://");
    let authorization = format!("Bearer {API_KEY}");
    let requests: Vec<Bytes> = bodies
        .iter()
        .map(|body| http::request(authority, "/v1/embeddings", &authorization, body))
        .collect();
    // Send k carries requests k, k+1, ... k+depth-1 (wrapping), prebuilt.
    let sends: Arc<Vec<Bytes>> = Arc::new(
        (0..requests.len())
            .map(|k| {
                let mut bytes = Vec::new();
                for j in 0..depth {
                    bytes.extend_from_slice(&requests[(k + j) % requests.len()]);
                }
                Bytes::from(bytes)
            })
            .collect(),
    );
    let client = http::Client::connect(authority, connections).await?;
    Ok(move |i| {
        let client = client.clone();
        let sends = Arc::clone(&sends);
        Box::pin(async move {
            let send = &sends[(i * depth as u64 % sends.len() as u64) as usize];
            let answer = client.send(send, depth).await?;
            if answer.status != 200 {
                let text = String::from_utf8_lossy(&answer.body_head).into_owned();
                return Err(format!("HTTP {}: {text}", answer.status));
            }
            Ok(Reply {
                as_expected: Some(answer.hit),
                bytes: answer.body_len,
                requests: depth as u64,
            })
        }) as BoxFuture<Result<Reply, String>>
    })
}

/// Cycles through pre-built MGETs on one multiplexed connection.
fn mgetting(
    conn: &redis::aio::MultiplexedConnection,
    cmds: Vec<Vec<redis::Cmd>>,
) -> impl Fn(u64) -> BoxFuture<Result<Reply, String>> + Send + Sync + 'static {
    let conn = conn.clone();
    let cmds = Arc::new(cmds);
    move |i| {
        let conn = conn.clone();
        let cmds = Arc::clone(&cmds);
        Box::pin(async move {
            // A request's MGETs leave at once, pipelined, as the gateway's do.
            let chunks = cmds[(i % cmds.len() as u64) as usize].iter().map(|cmd| {
                let mut conn = conn.clone();
                async move { cmd.query_async::<Vec<Option<Bytes>>>(&mut conn).await }
            });
            let values: Vec<Option<Bytes>> = futures_util::future::try_join_all(chunks)
                .await
                .map_err(|e| format!("redis: {e}"))?
                .into_iter()
                .flatten()
                .collect();
            let bytes = values.iter().flatten().map(|v| v.len() as u64).sum();
            Ok(Reply {
                as_expected: Some(values.iter().all(Option::is_some)),
                bytes,
                requests: 1,
            })
        })
    }
}

/// Fresh (never cached) inputs for each request: `inputs` texts from a set
/// unique to `side`, built before the request is timed.
fn fresh(
    http: &reqwest::Client,
    url: Arc<str>,
    side: &'static str,
    inputs: usize,
    expect: Expect,
) -> impl Fn(u64) -> BoxFuture<Result<Reply, String>> + Send + Sync + 'static {
    let http = http.clone();
    move |i| {
        let set = format!("fresh-{side}-{inputs}");
        let texts: Vec<String> = (0..inputs)
            .map(|j| workload::text(&set, i as usize * inputs + j))
            .collect();
        let body = workload::body(&texts, Format::Base64);
        Box::pin(post(http.clone(), Arc::clone(&url), body, expect))
    }
}

/// The gateway as a child process.
struct GatewayProcess {
    child: Child,
    url: String,
    log: PathBuf,
}

impl GatewayProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (graceful: in-flight cache writes finish), then SIGKILL
    /// after 10 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `embgate serve` with the harness's settings, then `--gateway-env`,
/// then `extra_env`; `name` tells its log file apart.
fn spawn_gateway(
    args: &Args,
    vendor_url: &str,
    prefix: &str,
    name: &str,
    extra_env: &[(String, String)],
) -> Result<GatewayProcess, String> {
    let bin = match &args.gateway_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("locating loadgen: {e}"))?
            .with_file_name("embgate"),
    };
    if !bin.exists() {
        return Err(format!(
            "gateway binary {} not found (cargo build --release -p embgate)",
            bin.display()
        ));
    }
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let log = std::env::temp_dir().join(format!("{prefix}-{name}.log"));
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let log_err = log_file.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("serve");
    // Only the harness decides the gateway's configuration.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EMBGATE") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .env("EMBGATE__LISTEN", format!("127.0.0.1:{port}"))
        .env("EMBGATE__STORE__URL", &args.redis_url)
        .env("EMBGATE__STORE__KEY_PREFIX", prefix)
        .env("EMBGATE__UPSTREAM__BASE_URL", vendor_url)
        .env("EMBGATE__UPSTREAM__API_KEY", API_KEY)
        // The load generator measures the cache, not caller checks.
        .env("EMBGATE__AUTH__MODE", "open")
        // The main scenarios measure the Redis path against the bare Redis
        // ceiling; the L1 comparison turns the in-process cache on.
        .env("EMBGATE__L1__MAX_BYTES", "0");
    for (k, v) in args.gateway_env.iter().chain(extra_env) {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err))
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    Ok(GatewayProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
    })
}

async fn wait_healthy(http: &reqwest::Client, gateway: &mut GatewayProcess) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = gateway.child.try_wait() {
            let log = std::fs::read_to_string(&gateway.log).unwrap_or_default();
            return Err(format!("gateway exited ({status}) during startup:\n{log}"));
        }
        if let Ok(r) = http.get(format!("{}/healthz", gateway.url)).send().await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            return Err("gateway not healthy after 20 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = http
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .map_err(|e| format!("readyz: {e}"))?;
    if !ready.status().is_success() {
        let body = ready.text().await.unwrap_or_default();
        return Err(format!("gateway cannot reach Redis: {body}"));
    }
    Ok(())
}

/// POSTs every body once to the gateway, `parallel` at a time, and counts
/// the replies whose cache status was not `expect`; fails on the first
/// failed request.
async fn post_each(
    ctx: &Context,
    bodies: Vec<Bytes>,
    parallel: usize,
    expect: Expect,
) -> Result<usize, String> {
    let url: Arc<str> = format!("{}/v1/embeddings", ctx.gateway_url).into();
    let mut pending = bodies.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut unexpected = 0;
    loop {
        while running.len() < parallel.max(1) {
            match pending.next() {
                Some(body) => {
                    running.spawn(post(ctx.http.clone(), Arc::clone(&url), body, expect));
                }
                None => break,
            }
        }
        match running.join_next().await {
            Some(Ok(Ok(reply))) => {
                if reply.as_expected == Some(false) {
                    unexpected += 1;
                }
            }
            Some(Ok(Err(e))) => return Err(format!("request failed: {e}")),
            Some(Err(e)) => return Err(format!("request task failed: {e}")),
            None => return Ok(unexpected),
        }
    }
}

/// Stores every text through the gateway (each warm-up request is a miss).
async fn warm(ctx: &Context, texts: &[String]) -> Result<(), String> {
    const CHUNK: usize = 2048;
    let chunks: Vec<Bytes> = texts
        .chunks(CHUNK)
        .map(|c| workload::body(c, Format::Base64))
        .collect();
    match post_each(ctx, chunks, 2, Expect::Miss).await {
        Ok(0) => Ok(()),
        Ok(_) => Err("a warm-up request was not a miss: keys left from another run?".into()),
        Err(e) => Err(format!("warm-up: {e}")),
    }
}

/// Checks, from the bare client, that every warmed key is in Redis: proves
/// the ceiling reads the very keys the gateway reads.
async fn verify_warm(ctx: &Context, keys: &Keys, texts: &[String]) -> Result<(), String> {
    let mut conn = ctx.redis.clone();
    let mut missing = 0usize;
    for chunk in texts.chunks(1024) {
        let names: Vec<String> = chunk.iter().map(|t| keys.redis_key(t)).collect();
        let found: Vec<Option<Bytes>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        missing += found.iter().filter(|v| v.is_none()).count();
    }
    if missing > 0 {
        return Err(format!(
            "{missing} of {} warmed inputs are not in Redis under the keys computed \
             with embgate::key (key derivation out of step, or warm-up failed)",
            texts.len()
        ));
    }
    Ok(())
}

/// Deletes every key under `prefix` (SCAN + DEL, never FLUSH*).
async fn delete_prefix(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Result<u64, String> {
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(2000)
            .query_async(conn)
            .await
            .map_err(|e| format!("SCAN: {e}"))?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(conn)
                .await
                .map_err(|e| format!("DEL: {e}"))?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

async fn redis_info(conn: &mut redis::aio::MultiplexedConnection) -> (Option<String>, Option<u32>) {
    let info: String = match redis::cmd("INFO").arg("server").query_async(conn).await {
        Ok(i) => i,
        Err(_) => return (None, None),
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    (
        field("redis_version").map(|v| format!("Redis {v}")),
        field("process_id").and_then(|p| p.parse().ok()),
    )
}

/// The requests of every scenario, built once: the L1 comparison repeats
/// runs with the very same requests.
pub struct Pools {
    pub one: Pool,
    pub sixtyfour: Pool,
    pub large: Pool,
    pub zipf: Option<(Pool, ZipfShape)>,
}

impl Pools {
    fn new(args: &Args) -> Pools {
        Pools {
            one: Pool::distinct("one", 1024, 1),
            sixtyfour: Pool::distinct("sixtyfour", 8, 64),
            large: Pool::distinct("large", 2, 2048),
            zipf: args.runs(Scenario::Zipf).then(|| {
                workload::zipf_pool(
                    args.zipf_keys,
                    args.zipf_exponent,
                    args.zipf_inputs,
                    args.zipf_requests,
                    0x5EED,
                )
            }),
        }
    }
}

async fn run_scenarios(
    args: &Args,
    ctx: &Context,
    keys: &Keys,
    vendor: &FakeVendor,
    pools: &Pools,
) -> Result<Results, String> {
    let gw: Arc<str> = format!("{}/v1/embeddings", ctx.gateway_url).into();
    let mut results = Results {
        runs: BTreeMap::new(),
        memory: Memory::default(),
        zipf: None,
        warmed_inputs: 0,
        warmup_secs: 0.0,
        store_warnings: 0,
        deleted_keys: None,
        l1: None,
        cluster: None,
        stores: None,
        hit2048_rounds: Vec::new(),
    };
    let (pool1, pool64, pool2048) = (&pools.one, &pools.sixtyfour, &pools.large);
    // The peak RSS that per-run resets (`measure_peak`) cleared.
    let mut earlier_peak = None;

    results.memory.startup_rss = sys::vm_kib(ctx.gateway_pid, "VmRSS");
    let mut to_warm = Vec::new();
    if args.runs(Scenario::Hit1) {
        to_warm.extend(pool1.texts());
    }
    if args.runs(Scenario::Hit64) {
        to_warm.extend(pool64.texts());
    }
    if args.runs(Scenario::Hit2048) {
        to_warm.extend(pool2048.texts());
    }
    if let Some((pool, _)) = &pools.zipf {
        to_warm.extend(pool.texts());
    }
    eprintln!("warming {} inputs through the gateway ...", to_warm.len());
    let started = Instant::now();
    warm(ctx, &to_warm).await?;
    verify_warm(ctx, keys, &to_warm).await?;
    results.warmed_inputs = to_warm.len();
    results.warmup_secs = started.elapsed().as_secs_f64();
    vendor.reset_records();
    results.memory.after_warmup_rss = sys::vm_kib(ctx.gateway_pid, "VmRSS");

    if args.runs(Scenario::Hit1) {
        eprintln!("all-hit, 1 input:");
        let plan = args.plan(args.concurrency);
        for (id, format) in [
            ("hit1/float", Format::Float),
            ("hit1/base64", Format::Base64),
        ] {
            let op = posting(&ctx.gateway_url, plan.concurrency, 1, pool1.bodies(format)).await?;
            // The L1 comparison repeats the base64 run, peak RSS included.
            let measured = match format {
                Format::Base64 => ctx.measure_peak(id, plan, op, &mut earlier_peak).await,
                Format::Float => ctx.measure(id, plan, op).await,
            };
            results.runs.insert(id, measured);
        }
        // The same 32 requests in flight, pipelined as the Redis client's are.
        let depth = args.depth(plan);
        let pipelined = Plan {
            concurrency: plan.concurrency.div_ceil(depth),
            ..plan
        };
        let op = posting(
            &ctx.gateway_url,
            pipelined.concurrency,
            depth,
            pool1.bodies(Format::Base64),
        )
        .await?;
        results.runs.insert(
            "hit1/base64-pipelined",
            ctx.measure("hit1/base64-pipelined", pipelined, op).await,
        );
        let op = mgetting(&ctx.redis, pool1.mgets(keys));
        results.runs.insert(
            "hit1/redis",
            ctx.measure("hit1/redis (ceiling)", plan, op).await,
        );
    }

    if args.runs(Scenario::Hit64) {
        eprintln!("all-hit, 64 inputs x 1536:");
        let plan = args.plan(args.concurrency_64);
        for (id, format) in [
            ("hit64/float", Format::Float),
            ("hit64/base64", Format::Base64),
        ] {
            let op = posting(&ctx.gateway_url, plan.concurrency, 1, pool64.bodies(format)).await?;
            results.runs.insert(id, ctx.measure(id, plan, op).await);
        }
        let op = mgetting(&ctx.redis, pool64.mgets(keys));
        results.runs.insert(
            "hit64/redis",
            ctx.measure("hit64/redis (ceiling)", plan, op).await,
        );
    }

    if args.runs(Scenario::Hit2048) {
        eprintln!("all-hit, 2048 inputs x 1536:");
        results.memory.peak_before_2048 = earlier_peak.max(sys::vm_kib(ctx.gateway_pid, "VmHWM"));
        results.memory.reset_worked = sys::reset_peak_rss(ctx.gateway_pid);
        let cmds = || pool2048.mgets(keys);
        let latency = args.plan(1);
        for round in 1..=args.rounds {
            let label = |what: &str| format!("hit2048 round {round}/{}: {what}", args.rounds);
            let bodies = |f: Format| posting(&ctx.gateway_url, 1, 1, pool2048.bodies(f));
            let op = bodies(Format::Float).await?;
            let float = ctx.measure(&label("float"), latency, op).await;
            let op = bodies(Format::Base64).await?;
            let base64 = ctx.measure(&label("base64"), latency, op).await;
            let op = mgetting(&ctx.redis, cmds());
            let ceiling = ctx.measure(&label("redis (ceiling)"), latency, op).await;
            if round == 1 {
                results.runs.insert("hit2048/float", float.clone());
                results.runs.insert("hit2048/base64", base64.clone());
                results.runs.insert("hit2048/redis", ceiling.clone());
            }
            results.hit2048_rounds.push(LatencyRound {
                float,
                base64,
                ceiling,
            });
        }
        let loaded = args.plan(args.concurrency_2048);
        let runs: [(&'static str, Option<Format>); 3] = [
            ("hit2048-load/float", Some(Format::Float)),
            ("hit2048-load/base64", Some(Format::Base64)),
            ("hit2048-load/redis", None),
        ];
        for (id, format) in runs {
            let measured = match format {
                Some(f) => {
                    let op = posting(&ctx.gateway_url, loaded.concurrency, 1, pool2048.bodies(f))
                        .await?;
                    ctx.measure(id, loaded, op).await
                }
                None => ctx.measure(id, loaded, mgetting(&ctx.redis, cmds())).await,
            };
            results.runs.insert(id, measured);
        }
        results.memory.peak_2048 = sys::vm_kib(ctx.gateway_pid, "VmHWM");
    }

    if args.runs(Scenario::Miss) {
        eprintln!("miss path (fresh inputs every request, vendor without added latency):");
        let plan = args.plan(args.concurrency_miss);
        let direct: Arc<str> = format!("{}/embeddings", vendor.base_url()).into();
        for (inputs, direct_id, gateway_id) in [
            (1usize, "miss1/direct", "miss1/gateway"),
            (64, "miss64/direct", "miss64/gateway"),
        ] {
            let op = fresh(
                &ctx.http,
                Arc::clone(&direct),
                "direct",
                inputs,
                Expect::Nothing,
            );
            results
                .runs
                .insert(direct_id, ctx.measure(direct_id, plan, op).await);
            vendor.reset_records();
            let op = fresh(&ctx.http, Arc::clone(&gw), "gateway", inputs, Expect::Miss);
            results
                .runs
                .insert(gateway_id, ctx.measure(gateway_id, plan, op).await);
            vendor.reset_records();
        }
    }

    if let Some((pool, shape)) = &pools.zipf {
        eprintln!(
            "zipf: {} keys, exponent {}, {} inputs per request ({} distinct touched):",
            shape.keys, shape.exponent, shape.inputs, shape.touched
        );
        let plan = args.plan(args.concurrency);
        let op = posting(
            &ctx.gateway_url,
            plan.concurrency,
            1,
            pool.bodies(Format::Base64),
        )
        .await?;
        let measured = ctx
            .measure_peak("zipf/base64", plan, op, &mut earlier_peak)
            .await;
        results.runs.insert("zipf/base64", measured);
        let op = mgetting(&ctx.redis, pool.mgets(keys));
        results.runs.insert(
            "zipf/redis",
            ctx.measure("zipf/redis (ceiling)", plan, op).await,
        );
        results.zipf = Some(shape.clone());
    }
    Ok(results)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // One thread, as redis-benchmark and `wrk -t1` use: the gateway and Redis
    // need the other core, and a second client thread would spend its CPU
    // on cross-thread wake-ups rather than on sending requests.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let command = args
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let prefix = format!("embgate-bench-{}", std::process::id());

    let redis_client =
        redis::Client::open(args.redis_url.as_str()).map_err(|e| format!("redis url: {e}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let mut redis_conn = redis_client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", args.redis_url))?;
    let (redis_version, redis_pid) = redis_info(&mut redis_conn).await;
    let machine = sys::machine(redis_version);

    let vendor = FakeVendor::start().await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| format!("http client: {e}"))?;

    let mut gateway = spawn_gateway(&args, &vendor.base_url(), &prefix, "gateway", &[])?;
    // The L1 comparison's and the cluster rows' gateways, once started.
    let mut l1_gateway: Option<GatewayProcess> = None;
    let mut cluster_gateway: Option<GatewayProcess> = None;
    let mut store_gateways = stores::Gateways::default();
    eprintln!(
        "gateway pid {} at {} (key prefix {prefix}, log {})",
        gateway.pid(),
        gateway.url,
        gateway.log.display()
    );
    let outcome = async {
        wait_healthy(&http, &mut gateway).await?;
        let ctx = Context {
            http: http.clone(),
            gateway_url: gateway.url.clone().into(),
            redis: redis_conn.clone(),
            gateway_pid: gateway.pid(),
            redis_pid,
            ticks: sys::clock_ticks(),
        };
        let keys = Keys {
            namespace: vendor.base_url().trim_end_matches('/').to_owned(),
            prefix: prefix.clone(),
        };
        let pools = Pools::new(&args);
        let all = async {
            let mut results = run_scenarios(&args, &ctx, &keys, &vendor, &pools).await?;
            if args.compares_l1() {
                // One gateway at a time on the shared cores.
                gateway.stop();
                let setup = l1::Setup {
                    vendor_url: &vendor.base_url(),
                    prefix: &prefix,
                };
                let compared =
                    l1::compare(&args, &ctx, &setup, &pools, &keys, &mut l1_gateway).await;
                if let Err(e) = &compared {
                    eprintln!("L1 comparison failed: {e}");
                }
                results.l1 = Some(compared);
            }
            if !args.no_cluster && (args.runs(Scenario::Hit64) || args.runs(Scenario::Hit2048)) {
                gateway.stop();
                if let Some(g) = &mut l1_gateway {
                    g.stop();
                }
                let compared = cluster::compare(
                    &args,
                    &ctx,
                    &vendor.base_url(),
                    &prefix,
                    &pools,
                    &mut cluster_gateway,
                )
                .await;
                if let Err(e) = &compared {
                    eprintln!("Redis Cluster rows failed: {e}");
                }
                if let Some(g) = &mut cluster_gateway {
                    g.stop();
                }
                results.cluster = Some(compared);
            }
            if !args.no_stores && args.runs(Scenario::Hit1) && args.runs(Scenario::Hit2048) {
                gateway.stop();
                if let Some(g) = &mut l1_gateway {
                    g.stop();
                }
                let compared = stores::compare(
                    &args,
                    &ctx,
                    &vendor.base_url(),
                    &prefix,
                    &pools,
                    &mut store_gateways,
                )
                .await;
                if let Err(e) = &compared {
                    eprintln!("store rows failed: {e}");
                }
                for g in &mut store_gateways.all {
                    g.stop();
                }
                results.stores = Some(compared);
            }
            Ok(results)
        };
        tokio::select! {
            r = all => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
        }
    }
    .await;

    // Stop the gateways first so no late cache write outlives the clean-up.
    gateway.stop();
    if let Some(g) = &mut l1_gateway {
        g.stop();
    }
    if let Some(g) = &mut cluster_gateway {
        g.stop();
    }
    for g in &mut store_gateways.all {
        g.stop();
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{prefix}-embedded")));
    let deleted = delete_prefix(&mut redis_conn, &prefix).await;
    match &deleted {
        Ok(n) => eprintln!("deleted {n} keys under {prefix}:*"),
        Err(e) => eprintln!("clean-up of {prefix}:* failed: {e}"),
    }
    let mut results = outcome?;
    results.store_warnings = store_failures(&gateway);
    results.deleted_keys = deleted.ok();
    if let (Some(g), Some(Ok(compared))) = (&l1_gateway, &mut results.l1) {
        compared.store_warnings = store_failures(g);
    }

    let read = |path: &Option<PathBuf>| match path {
        Some(path) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| format!("reading {}: {e}", path.display())),
        None => Ok(None),
    };
    let criterion = read(&args.criterion)?;
    let engines = read(&args.engines)?;
    let markdown = report::render(&report::Input {
        command: &command,
        machine: &machine,
        settings: report::Settings {
            duration: args.duration,
            warmup: args.warmup,
            concurrency: args.concurrency,
            concurrency_64: args.concurrency_64,
            concurrency_2048: args.concurrency_2048,
            concurrency_miss: args.concurrency_miss,
            pipeline_depth: args.pipeline_depth,
            gateway_env: &args.gateway_env,
        },
        results: &results,
        criterion: criterion.as_deref(),
        engines: engines.as_deref(),
    });
    std::fs::write(&args.out, &markdown)
        .map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    match &results.l1 {
        Some(Err(e)) => Err(format!(
            "the L1 comparison failed (the report says so): {e}"
        )),
        _ => Ok(()),
    }
}

/// The "store failed" warnings in a stopped gateway's log; the log is
/// removed when there are none, and kept (and named) otherwise.
fn store_failures(gateway: &GatewayProcess) -> usize {
    let log = std::fs::read_to_string(&gateway.log).unwrap_or_default();
    let failures = log.lines().filter(|l| l.contains("store failed")).count();
    if failures == 0 {
        let _ = std::fs::remove_file(&gateway.log);
    } else {
        eprintln!(
            "the gateway logged {failures} store failures: see {}",
            gateway.log.display()
        );
    }
    failures
}
