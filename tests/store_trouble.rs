//! A store that is slow, frozen, full or damaged: the gateway answers first
//! and writes after, waits for a slow store rather than paying again, stops
//! asking a frozen one (circuit breaker), reports reads and writes apart,
//! and repairs what it can (keyspace version, ledger fields).

mod common;

use std::time::Duration;

use common::*;
use fake_vendor::FakeVendor;
use serde_json::{Value, json};

async fn readyz(gw: &TestGateway) -> (u16, Value) {
    let response = gw
        .http
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

/// Polls `sample` until it satisfies `ok` (a generous deadline, no timing claim).
async fn until_metric(gw: &TestGateway, sample: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let mut seen = 0.0;
    for _ in 0..200 {
        seen = gw.metric(sample).await;
        if ok(seen) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sample} stayed at {seen}");
}

fn body(input: &str) -> Value {
    json!({"model": SMALL, "input": input, "dimensions": 8})
}

/// A frozen Redis (SIGSTOP): requests are answered from the vendor without
/// waiting for the write; after a few failures the breaker stops asking
/// Redis; once Redis resumes, a probe closes the breaker and caching
/// resumes, and the writes that were waiting land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_trips_the_breaker_and_caching_resumes_after() {
    let redis = OwnRedis::start();
    let url = redis.url();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__URL", &url),
            ("EMBGATE__STORE__TIMEOUT_MS", "100"),
            ("EMBGATE__STORE__MAX_WAIT_MS", "100"),
            ("EMBGATE__STORE__WRITE_TIMEOUT_MS", "60000"),
            ("EMBGATE__STORE__BREAKER_FAILURES", "2"),
            ("EMBGATE__STORE__BREAKER_OPEN_MS", "200"),
            ("EMBGATE__STORE__BREAKER_MAX_OPEN_MS", "400"),
        ],
    )
    .await;
    let (cache, _) = gw.embed(&body("before the freeze")).await;
    assert_eq!(cache, "miss");
    assert_eq!(gw.entries().await.len(), 1);

    redis.signal("STOP");
    // Answered while the write to the frozen Redis is still pending.
    let (cache, answer) = gw.embed(&body("during the freeze")).await;
    assert_eq!(cache, "miss");
    assert_eq!(
        vectors(&answer)[0],
        vendor_vector(SMALL, Some(8), &text("during the freeze"))
    );
    assert!(
        gw.metric("embgate_store_pending_write_bytes").await > 0.0,
        "the write waits for Redis; the answer did not"
    );
    for i in 0..6 {
        gw.embed(&body(&format!("frozen {i}"))).await;
    }
    assert_eq!(
        gw.metric("embgate_store_breaker_open{side=\"read\"}").await,
        1.0
    );
    assert!(
        gw.metric("embgate_store_skipped_total{side=\"read\"}")
            .await
            >= 1.0,
        "lookups skipped while the breaker is open"
    );
    assert!(gw.metric("embgate_store_timeouts_total").await >= 1.0);
    assert_eq!(gw.metric("embgate_store_up").await, 0.0);

    redis.signal("CONT");
    let mut resumed = false;
    for _ in 0..100 {
        let (cache, _) = gw.embed(&body("before the freeze")).await;
        if cache == "hit" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "caching resumed after Redis did");
    until_metric(&gw, "embgate_store_breaker_open{side=\"read\"}", |v| {
        v == 0.0
    })
    .await;
    // The write queued during the freeze landed.
    let during = gw.key(
        SMALL,
        Some(8),
        &embgate::protocol::Input::Text("during the freeze".into()),
    );
    assert!(gw.entries().await.contains(&during));
}

/// Waiting for a slow Redis beats paying the vendor again: a lookup stuck
/// behind a slow command still finds the entry when the vendor typically
/// takes longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_waits_rather_than_paying_again() {
    let redis = OwnRedis::start_with(&["--enable-debug-command", "yes"]);
    let url = redis.url();
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(1500));
    let gw = TestGateway::start_with(
        vendor,
        &[
            ("EMBGATE__STORE__URL", &url),
            ("EMBGATE__STORE__TIMEOUT_MS", "50"),
            ("EMBGATE__STORE__MAX_WAIT_MS", "5000"),
        ],
    )
    .await;
    gw.embed(&body("worth waiting for")).await;
    assert_eq!(gw.entries().await.len(), 1);

    // Redis busy for 400 ms: far past the 50 ms floor, well within the
    // vendor's typical latency.
    let mut conn = redis.connection().await;
    let busy = tokio::spawn(async move {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.4")
            .query_async(&mut conn)
            .await
            .expect("debug sleep");
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (cache, _) = gw.embed(&body("worth waiting for")).await;
    busy.await.expect("busy");
    assert_eq!(cache, "hit");
    assert_eq!(gw.vendor.total_inputs_embedded(), 1, "not paid again");
    assert_eq!(gw.metric("embgate_store_timeouts_total").await, 0.0);
}

/// A Redis at `maxmemory` with `noeviction` answers reads and refuses
/// writes: readiness says so, and the gauges track the two apart.
#[tokio::test]
async fn readiness_reports_a_store_that_refuses_writes() {
    let redis = OwnRedis::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let url = redis.url();
    let gw =
        TestGateway::start_with(FakeVendor::start().await, &[("EMBGATE__STORE__URL", &url)]).await;
    let (status, ready) = readyz(&gw).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");

    // Fill Redis to its limit: large values first, then small ones until
    // even a small write is refused.
    let mut conn = redis.connection().await;
    for size in [64 * 1024, 64] {
        let filler = "x".repeat(size);
        for i in 0..100_000 {
            let filled: Result<(), redis::RedisError> = redis::cmd("SET")
                .arg(format!("filler:{size}:{i}"))
                .arg(&filler)
                .query_async(&mut conn)
                .await;
            if filled.is_err() {
                break;
            }
        }
    }
    let (status, ready) = readyz(&gw).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["reads"], "ok");
    assert!(
        ready["writes"].as_str().is_some_and(|w| w.contains("OOM")),
        "{ready}"
    );
    assert_eq!(gw.metric("embgate_store_reads_up").await, 1.0);
    assert_eq!(gw.metric("embgate_store_writes_up").await, 0.0);
    assert_eq!(gw.metric("embgate_store_up").await, 0.0);
    // Still served.
    let (cache, _) = gw.embed(&body("served anyway")).await;
    assert_eq!(cache, "miss");
}

/// A Redis that lost its data (restarted without persistence) gets the
/// keyspace version stamped again while the gateway serves.
#[tokio::test]
async fn the_keyspace_version_is_stamped_again_when_lost() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__URL", &url),
            ("EMBGATE__LEDGER__SYNC_SECS", "1"),
        ],
    )
    .await;
    let version = || async {
        gw.store
            .meta_get(embgate::migrate::VERSION_FIELD)
            .await
            .expect("meta")
    };
    for _ in 0..100 {
        if version().await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(version().await.is_some(), "stamped at start");
    redis.kill();
    redis.restart();
    let mut stamped = false;
    for _ in 0..100 {
        if matches!(
            gw.store.meta_get(embgate::migrate::VERSION_FIELD).await,
            Ok(Some(_))
        ) {
            stamped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stamped, "stamped again after the data was lost");
}

/// A ledger field that does not parse is skipped and counted; the others
/// still reach the gauges.
#[tokio::test]
async fn a_bad_ledger_field_does_not_freeze_the_ledger_gauges() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__LEDGER__SYNC_SECS", "1")],
    )
    .await;
    let mut conn = gw.redis().await;
    let ledger = embgate::cache::key::KeyLayout::new(&gw.prefix).ledger();
    let _: () = redis::cmd("HSET")
        .arg(&ledger)
        .arg("not a ledger field")
        .arg("12")
        .arg("saved_tokens\tdefault\tsome-model")
        .arg("twelve")
        .query_async(&mut conn)
        .await
        .expect("hset");
    gw.embed(&body("counted")).await;
    let spent = format!("embgate_ledger_spent_tokens{{model=\"{SMALL}\",tenant=\"default\"}}");
    until_metric(&gw, &spent, |v| v > 0.0).await;
    assert!(
        gw.metric("embgate_store_errors_total{op=\"ledger_field\"}")
            .await
            >= 2.0
    );
}
