//! Closed-loop load: a fixed number of tasks, each sending its next request
//! as soon as the previous one completed, for a warm-up period (not
//! recorded) and then a measured window.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What one successful operation reports.
pub struct Reply {
    /// Whether the cache status was the one the scenario expects: a hit in
    /// all-hit runs, a miss for fresh inputs (`None`: not applicable).
    pub as_expected: Option<bool>,
    /// Payload bytes received.
    pub bytes: u64,
    /// Requests this operation made (more than 1 when pipelined); each is
    /// counted, with the operation's latency.
    pub requests: u64,
}

/// The measured window of one run.
#[derive(Clone)]
pub struct Stats {
    pub concurrency: usize,
    /// Successful operations that started inside the window.
    pub ok: u64,
    /// Failed operations (transport errors, non-200 statuses) in the window.
    pub errors: u64,
    /// Successful operations whose cache status was not the expected one.
    pub unexpected: u64,
    pub first_error: Option<String>,
    pub bytes: u64,
    /// From the window's start to the last measured completion.
    pub window: Duration,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
}

impl Stats {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn p50(&self) -> f64 {
        self.ms(0.5)
    }

    pub fn p99(&self) -> f64 {
        self.ms(0.99)
    }
}

/// Run parameters.
#[derive(Clone, Copy)]
pub struct Plan {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

struct TaskResult {
    ok: u64,
    errors: u64,
    unexpected: u64,
    first_error: Option<String>,
    bytes: u64,
    last_done: Option<Instant>,
    latency: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 us .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Runs `op(i)` for i = 0, 1, 2, ... from `plan.concurrency` tasks. The
/// closure's synchronous part (preparing a request) is not timed; only the
/// future it returns is.
pub async fn run<F, Fut>(plan: Plan, op: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let stop_at = measure_from + plan.duration;

    let tasks: Vec<_> = (0..plan.concurrency)
        .map(|_| {
            let op = Arc::clone(&op);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut r = TaskResult {
                    ok: 0,
                    errors: 0,
                    unexpected: 0,
                    first_error: None,
                    bytes: 0,
                    last_done: None,
                    latency: histogram(),
                };
                loop {
                    if Instant::now() >= stop_at {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let fut = op(i);
                    let began = Instant::now();
                    let outcome = fut.await;
                    let done = Instant::now();
                    if began < measure_from {
                        continue;
                    }
                    r.last_done = Some(done);
                    match outcome {
                        Ok(reply) => {
                            r.ok += reply.requests;
                            r.bytes += reply.bytes;
                            if reply.as_expected == Some(false) {
                                r.unexpected += reply.requests;
                            }
                            let us = (done - began).as_micros().max(1) as u64;
                            let _ = r.latency.record_n(us, reply.requests);
                        }
                        Err(e) => {
                            r.errors += 1;
                            r.first_error.get_or_insert(e);
                        }
                    }
                }
                r
            })
        })
        .collect();

    let mut stats = Stats {
        concurrency: plan.concurrency,
        ok: 0,
        errors: 0,
        unexpected: 0,
        first_error: None,
        bytes: 0,
        window: Duration::ZERO,
        latency: histogram(),
    };
    let mut last_done = measure_from;
    for task in tasks {
        match task.await {
            Ok(r) => {
                stats.ok += r.ok;
                stats.errors += r.errors;
                stats.unexpected += r.unexpected;
                stats.bytes += r.bytes;
                if stats.first_error.is_none() {
                    stats.first_error = r.first_error;
                }
                if let Some(done) = r.last_done {
                    last_done = last_done.max(done);
                }
                // Same bounds on both sides: adding cannot fail.
                let _ = stats.latency.add(&r.latency);
            }
            Err(e) => {
                stats.errors += 1;
                stats
                    .first_error
                    .get_or_insert_with(|| format!("load task failed: {e}"));
            }
        }
    }
    stats.window = last_done.saturating_duration_since(measure_from);
    stats
}
