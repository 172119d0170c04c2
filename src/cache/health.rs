//! How the store is doing, as the cache sees it.
//!
//! Reads and writes are tracked apart: a Redis at `maxmemory` with
//! `noeviction` refuses every write while reads still work, and a cache that
//! only pinged would call itself ready.
//!
//! Each side has a circuit breaker. After `store.breaker_failures`
//! consecutive failures the cache stops asking the store for
//! `store.breaker_open_ms` and treats every lookup as a miss (or skips the
//! write) at once, instead of paying a timeout per request. Then one
//! operation goes through as a probe: success closes the breaker, failure
//! keeps it open for twice as long, up to `store.breaker_max_open_ms`. The
//! intervals stay short so that a passing hiccup costs little caching.
//!
//! A store of several nodes (a cluster) whose failure is partial, some
//! nodes answering, does not open the breaker: only the failing nodes'
//! keys are misses, and the others keep being asked.
//!
//! Failures are counted in `embgate_store_errors_total` every time but
//! logged at most once per [`LOG_EVERY`] per operation, with the number
//! left out, so an outage does not flood the log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

use super::store::StoreError;
use crate::config::StoreSettings;
use crate::metrics::Metrics;

/// At most one warning per operation this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Read,
    Write,
}

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
struct Policy {
    failures: u32,
    open_for: Duration,
    max_open_for: Duration,
}

pub struct Health {
    read: SideHealth,
    write: SideHealth,
    policy: Policy,
    /// `Instant`s are stored as microseconds since this one.
    epoch: Instant,
    metrics: Arc<Metrics>,
    logged: Mutex<HashMap<&'static str, Logged>>,
}

struct SideHealth {
    name: &'static str,
    consecutive_failures: AtomicU32,
    /// Microseconds since `epoch` until which the breaker is open; 0 while
    /// it is closed.
    open_until: AtomicU64,
    /// How long the next opening lasts, in microseconds.
    open_for: AtomicU64,
    /// An operation is out as the probe of a breaker past its interval.
    probing: AtomicBool,
    last_error: Mutex<Option<String>>,
    up: IntGauge,
    breaker_open: IntGauge,
    skipped: IntCounter,
}

struct Logged {
    at: Instant,
    left_out: u64,
}

/// What the cache knows of one side, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideState {
    Ok,
    Failing(String),
    /// The breaker is open: the store is not asked until the next probe.
    BreakerOpen(String),
}

impl Health {
    pub fn new(settings: &StoreSettings, metrics: Arc<Metrics>) -> Health {
        let policy = Policy {
            failures: settings.breaker_failures,
            open_for: Duration::from_millis(settings.breaker_open_ms),
            max_open_for: Duration::from_millis(settings.breaker_max_open_ms),
        };
        let side = |name: &'static str, up: &IntGauge| SideHealth {
            name,
            consecutive_failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            open_for: AtomicU64::new(micros(policy.open_for)),
            probing: AtomicBool::new(false),
            last_error: Mutex::new(None),
            up: up.clone(),
            breaker_open: metrics.store_breaker_open.with_label_values(&[name]),
            skipped: metrics.store_skipped.with_label_values(&[name]),
        };
        let health = Health {
            read: side("read", &metrics.store_reads_up),
            write: side("write", &metrics.store_writes_up),
            policy,
            epoch: Instant::now(),
            logged: Mutex::new(HashMap::new()),
            metrics,
        };
        health.read.up.set(1);
        health.write.up.set(1);
        health.metrics.store_up.set(1);
        health
    }

    fn side(&self, side: Side) -> &SideHealth {
        match side {
            Side::Read => &self.read,
            Side::Write => &self.write,
        }
    }

    fn now(&self) -> u64 {
        micros(self.epoch.elapsed()).max(1)
    }

    /// Whether the store may be asked now. False while the breaker is open
    /// (counted as skipped); past its interval, true for one probe at a time.
    pub fn allow(&self, side: Side) -> bool {
        let s = self.side(side);
        let until = s.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.now() >= until
            && s.probing
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return true;
        }
        s.skipped.inc();
        false
    }

    pub fn succeeded(&self, side: Side) {
        let s = self.side(side);
        s.consecutive_failures.store(0, Ordering::Relaxed);
        if s.open_until.swap(0, Ordering::Relaxed) != 0 {
            s.open_for
                .store(micros(self.policy.open_for), Ordering::Relaxed);
            s.probing.store(false, Ordering::Relaxed);
            s.breaker_open.set(0);
            tracing::info!(side = s.name, "store answering again; breaker closed");
        }
        if s.up.get() != 1 {
            s.up.set(1);
            *lock(&s.last_error) = None;
            self.refresh_up();
        }
    }

    /// Records a failure of `op` on `side`: counted, logged (rate-limited),
    /// and the breaker opened once failures run on; a partial one (some
    /// nodes of a cluster) as [`Health::partly_failed`].
    pub fn failed(&self, side: Side, op: &'static str, error: &StoreError) {
        if error.is_partial() {
            return self.partly_failed(side, op, error);
        }
        self.metrics.store_errors.with_label_values(&[op]).inc();
        let s = self.side(side);
        *lock(&s.last_error) = Some(error.to_string());
        if s.up.get() != 0 {
            s.up.set(0);
            self.refresh_up();
        }
        let failures = s.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let probe_failed = s.probing.swap(false, Ordering::Relaxed);
        if failures >= self.policy.failures || probe_failed {
            let open_for = if probe_failed {
                let doubled = s.open_for.load(Ordering::Relaxed).saturating_mul(2);
                doubled.min(micros(self.policy.max_open_for))
            } else {
                s.open_for.load(Ordering::Relaxed)
            };
            s.open_for.store(open_for, Ordering::Relaxed);
            if s.open_until.swap(self.now() + open_for, Ordering::Relaxed) == 0 {
                tracing::warn!(side = s.name, open_for = ?Duration::from_micros(open_for),
                    "store failing; breaker open: serving from the vendor without asking it");
            }
            s.breaker_open.set(1);
        }
        self.warn(op, error);
    }

    /// Records a failure of `op` on part of the store (some nodes of a
    /// cluster) while the rest answered: counted and logged like any
    /// failure, but the store as a whole answers, so the breaker, which
    /// would stop asking every node, stays closed.
    pub fn partly_failed(&self, side: Side, op: &'static str, error: &StoreError) {
        self.metrics.store_errors.with_label_values(&[op]).inc();
        self.succeeded(side);
        self.warn(op, error);
    }

    /// Logs a store problem at most once per [`LOG_EVERY`] per `op`.
    pub fn warn(&self, op: &'static str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let left_out = {
            let mut logged = lock(&self.logged);
            let entry = logged.entry(op).or_insert(Logged {
                at: now - LOG_EVERY,
                left_out: 0,
            });
            if now.duration_since(entry.at) < LOG_EVERY {
                entry.left_out += 1;
                return;
            }
            entry.at = now;
            std::mem::take(&mut entry.left_out)
        };
        tracing::warn!(op, error = %error, like_this_since_last = left_out,
            "store failed; served from the vendor");
    }

    pub fn state(&self, side: Side) -> SideState {
        let s = self.side(side);
        let error = || lock(&s.last_error).clone().unwrap_or_default();
        if s.open_until.load(Ordering::Relaxed) != 0 {
            SideState::BreakerOpen(error())
        } else if s.up.get() == 0 {
            SideState::Failing(error())
        } else {
            SideState::Ok
        }
    }

    fn refresh_up(&self) {
        let up = self.read.up.get() == 1 && self.write.up.get() == 1;
        self.metrics.store_up.set(i64::from(up));
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(failures: u32, open_ms: u64) -> Health {
        let mut settings = crate::config::Settings::load_from(None, Some(HashMap::new()))
            .expect("defaults")
            .store;
        settings.breaker_failures = failures;
        settings.breaker_open_ms = open_ms;
        settings.breaker_max_open_ms = open_ms * 4;
        Health::new(&settings, Arc::new(Metrics::new().expect("metrics")))
    }

    fn timeout() -> StoreError {
        StoreError::Timeout(Duration::from_millis(1))
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_closes_on_success() {
        let h = health(3, 60_000);
        for _ in 0..2 {
            assert!(h.allow(Side::Read));
            h.failed(Side::Read, "get", &timeout());
        }
        assert!(h.allow(Side::Read), "two failures do not open it");
        h.succeeded(Side::Read);
        for _ in 0..3 {
            h.failed(Side::Read, "get", &timeout());
        }
        assert!(!h.allow(Side::Read), "open after three in a row");
        assert!(h.allow(Side::Write), "writes are tracked apart");
        assert!(matches!(h.state(Side::Read), SideState::BreakerOpen(_)));
        assert_eq!(h.metrics.store_up.get(), 0);
        h.succeeded(Side::Read);
        assert!(h.allow(Side::Read));
        assert_eq!(h.state(Side::Read), SideState::Ok);
        assert_eq!(h.metrics.store_up.get(), 1);
    }

    #[test]
    fn partial_failures_are_counted_but_never_open_the_breaker() {
        let h = health(1, 60_000);
        let partial = StoreError::Partial {
            failed: 1,
            nodes: 3,
            first: Box::new(timeout()),
        };
        for _ in 0..5 {
            h.failed(Side::Read, "get", &partial);
        }
        assert!(h.allow(Side::Read), "the other nodes are still asked");
        assert_eq!(h.state(Side::Read), SideState::Ok);
        assert_eq!(h.metrics.store_errors.with_label_values(&["get"]).get(), 5);
        h.failed(Side::Read, "get", &timeout());
        assert!(!h.allow(Side::Read), "a whole failure still opens it");
    }

    #[test]
    fn one_probe_past_the_interval_and_a_failed_probe_doubles_it() {
        let h = health(1, 1);
        h.failed(Side::Write, "set", &timeout());
        std::thread::sleep(Duration::from_millis(5));
        assert!(h.allow(Side::Write), "the probe");
        assert!(!h.allow(Side::Write), "only one probe at a time");
        h.failed(Side::Write, "set", &timeout());
        assert_eq!(h.write.open_for.load(Ordering::Relaxed), 2_000);
        std::thread::sleep(Duration::from_millis(5));
        assert!(h.allow(Side::Write));
        h.failed(Side::Write, "set", &timeout());
        std::thread::sleep(Duration::from_millis(10));
        assert!(h.allow(Side::Write));
        h.failed(Side::Write, "set", &timeout());
        assert_eq!(
            h.write.open_for.load(Ordering::Relaxed),
            4_000,
            "capped at breaker_max_open_ms"
        );
        assert!(h.write.skipped.get() >= 1);
    }
}
