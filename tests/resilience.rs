//! Never a wrong vector, never down: coalescing, batching, retries, store
//! failures, corrupt entries and shutdown, against real Redis servers (and
//! the embedded store where the store matters).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use embgate::cache::entry::{Entry, Origin};
use embgate::protocol::Input;
use fake_vendor::{FakeVendor, Fault, InputItem};
use rstest::rstest;
use serde_json::{Value, json};

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_cost_one_upstream_input(#[case] backend: Backend) {
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(300));
    let gw = Arc::new(TestGateway::start_on(backend, vendor, &[]).await);
    let body = json!({"model": SMALL, "input": "everyone wants this", "dimensions": 16});
    let answers = futures_util::future::join_all((0..100).map(|_| {
        let gw = Arc::clone(&gw);
        let body = body.clone();
        tokio::spawn(async move { gw.embed(&body).await })
    }))
    .await;
    let expected = vendor_vector(SMALL, Some(16), &text("everyone wants this"));
    for answer in answers {
        let (_, body) = answer.expect("task");
        assert_eq!(vectors(&body)[0], expected);
    }
    assert_eq!(
        gw.vendor
            .times_embedded(SMALL, Some(16), &text("everyone wants this")),
        1
    );
    assert_eq!(gw.vendor.total_inputs_embedded(), 1);
    assert_eq!(gw.vendor.embedding_requests().len(), 1);
    assert!(
        gw.metric("embgate_coalesced_inputs_total{model=\"text-embedding-3-small\"}")
            .await
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_sharing_redis_pays_once_with_distributed_coalescing() {
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(300));
    let fleet = [("EMBGATE__COALESCE__DISTRIBUTED", "true")];
    let first = Arc::new(TestGateway::start_with(vendor, &fleet).await);
    let prefix = first.prefix.clone();
    let shared = [
        ("EMBGATE__COALESCE__DISTRIBUTED", "true"),
        ("EMBGATE__STORE__KEY_PREFIX", prefix.as_str()),
        ("EMBGATE__UPSTREAM__BASE_URL", &first.vendor.base_url()),
    ];
    // The second gateway must call the same vendor to share keys; the
    // vendor handle lives in `first`, this one only needs its URL.
    let second = Arc::new(TestGateway::start_with(FakeVendor::start().await, &shared).await);
    assert_eq!(second.prefix, prefix);

    let body = json!({"model": SMALL, "input": ["fleet item a", "fleet item b"], "dimensions": 8});
    let answers = futures_util::future::join_all((0..40).map(|i| {
        let gw = if i % 2 == 0 {
            Arc::clone(&first)
        } else {
            Arc::clone(&second)
        };
        let body = body.clone();
        tokio::spawn(async move { gw.embed(&body).await })
    }))
    .await;
    for answer in answers {
        let (_, body) = answer.expect("task");
        assert_eq!(
            vectors(&body)[1],
            vendor_vector(SMALL, Some(8), &text("fleet item b"))
        );
    }
    assert_eq!(
        first.vendor.total_inputs_embedded(),
        2,
        "the fleet paid once"
    );
    assert_eq!(second.vendor.total_inputs_embedded(), 0);
    let leases: Vec<String> = first
        .all_keys()
        .await
        .into_iter()
        .filter(|k| k.contains(":lease:"))
        .collect();
    assert!(leases.is_empty(), "leases are released: {leases:?}");
}

#[tokio::test]
async fn misses_are_split_into_vendor_sized_calls_and_reassembled_in_order() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__UPSTREAM__MAX_INPUTS_PER_CALL", "3"),
            ("EMBGATE__UPSTREAM__MAX_CONCURRENCY", "2"),
        ],
    )
    .await;
    let inputs: Vec<String> = (0..10).map(|i| format!("chunked input {i}")).collect();
    let (_, body) = gw
        .embed(&json!({"model": SMALL, "input": inputs, "dimensions": 4}))
        .await;
    let calls = gw.vendor.embedding_requests();
    assert_eq!(calls.len(), 4);
    assert!(calls.iter().all(|c| c.inputs.len() <= 3));
    for (v, t) in vectors(&body).iter().zip(&inputs) {
        assert_eq!(*v, vendor_vector(SMALL, Some(4), &text(t)));
    }

    // The token limit splits too: each input here is 3 tokens.
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__UPSTREAM__MAX_TOKENS_PER_CALL", "7")],
    )
    .await;
    let inputs = ["one two three", "four five six", "seven eight nine"];
    for t in inputs {
        assert_eq!(fake_vendor::tokens(SMALL, &text(t)), Some(3));
    }
    let (_, body) = gw.embed(&json!({"model": SMALL, "input": inputs})).await;
    assert_eq!(gw.vendor.embedding_requests().len(), 2);
    assert_eq!(body["usage"]["prompt_tokens"], 9);
}

#[tokio::test]
async fn rate_limits_are_retried_after_the_vendors_wait() {
    let gw = TestGateway::start().await;
    gw.vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: Some(1),
    });
    let started = Instant::now();
    let (cache, body) = gw
        .embed(&json!({"model": SMALL, "input": "patience", "dimensions": 8}))
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After honoured"
    );
    assert_eq!(cache, "miss");
    assert_eq!(
        vectors(&body)[0],
        vendor_vector(SMALL, Some(8), &text("patience"))
    );
    let statuses: Vec<u16> = gw
        .vendor
        .embedding_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 200]);
    assert_eq!(
        gw.metric("embgate_upstream_requests_total{status=\"429\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried() {
    let gw = TestGateway::start().await;
    gw.vendor.push_fault(Fault::Status {
        status: 500,
        retry_after_secs: None,
    });
    gw.vendor.push_fault(Fault::CloseConnection);
    let (_, body) = gw
        .embed(&json!({"model": SMALL, "input": "third time lucky", "dimensions": 8}))
        .await;
    assert_eq!(
        vectors(&body)[0],
        vendor_vector(SMALL, Some(8), &text("third time lucky"))
    );
    assert_eq!(gw.vendor.embedding_requests().len(), 3);
}

#[tokio::test]
async fn a_vendor_failing_for_good_returns_its_last_error_and_caches_nothing() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__UPSTREAM__MAX_RETRIES", "2")],
    )
    .await;
    for _ in 0..3 {
        gw.vendor.push_fault(Fault::Status {
            status: 429,
            retry_after_secs: Some(0),
        });
    }
    let response = gw
        .post(&json!({"model": SMALL, "input": ["never", "works"]}))
        .await;
    assert_eq!(response.status(), 429);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert_eq!(gw.vendor.embedding_requests().len(), 3);
    assert!(gw.entries().await.is_empty());
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn a_corrupt_entry_is_served_fresh_and_repaired(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let input = Input::Text("fragile".into());
    let key = gw.key(SMALL, Some(8), &input);
    // A foreign value, then a valid entry of another key copied here.
    let other = key_hash(
        &gw.vendor.base_url(),
        SMALL,
        Some(8),
        &Input::Text("x".into()),
    );
    let origin = Origin {
        model: SMALL,
        upstream: &gw.vendor.base_url(),
        tenant: None,
    };
    let impostor = Entry::encode(&other, &origin, &[0.5; 8], 1);
    for planted in [b"[0.1,0.2]".to_vec(), impostor.as_bytes().to_vec()] {
        gw.put_raw(key, planted).await;
        let (cache, body) = gw
            .embed(&json!({"model": SMALL, "input": "fragile", "dimensions": 8}))
            .await;
        assert_eq!(cache, "miss");
        assert_eq!(
            vectors(&body)[0],
            vendor_vector(SMALL, Some(8), &text("fragile"))
        );
        let stored = gw.raw(&key).await.expect("stored");
        assert!(Entry::decode(&key, stored, Some(8)).is_ok(), "repaired");
        let (cache, _) = gw
            .embed(&json!({"model": SMALL, "input": "fragile", "dimensions": 8}))
            .await;
        assert_eq!(cache, "hit");
    }
    assert_eq!(
        gw.metric("embgate_store_errors_total{op=\"decode\"}").await,
        2.0
    );
}

#[tokio::test]
async fn with_redis_down_the_gateway_serves_from_the_vendor() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    redis.kill();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__URL", &url),
            ("EMBGATE__STORE__TIMEOUT_MS", "50"),
        ],
    )
    .await;
    for i in 0..2 {
        let input = format!("no cache today {i}");
        let (cache, body) = gw
            .embed(&json!({"model": SMALL, "input": input, "dimensions": 8}))
            .await;
        assert_eq!(cache, "miss");
        assert_eq!(
            vectors(&body)[0],
            vendor_vector(SMALL, Some(8), &text(&input))
        );
    }
    let ready = gw
        .http
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["status"], "degraded");
    assert!(gw.metric("embgate_store_errors_total{op=\"get\"}").await >= 2.0);
    assert_eq!(gw.metric("embgate_store_up").await, 0.0);

    // Redis comes back: caching resumes by itself.
    redis.restart();
    let mut resumed = false;
    for _ in 0..100 {
        let (cache, _) = gw
            .embed(&json!({"model": SMALL, "input": "back again", "dimensions": 8}))
            .await;
        if cache == "hit" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "caching resumed after Redis returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_mid_load_fails_no_request_and_corrupts_nothing() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let gw = Arc::new(
        TestGateway::start_with(
            FakeVendor::start().await,
            &[
                ("EMBGATE__STORE__URL", &url),
                ("EMBGATE__STORE__TIMEOUT_MS", "100"),
            ],
        )
        .await,
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let gw = Arc::clone(&gw);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut done = 0u32;
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let inputs: Vec<String> = (0..4)
                        .map(|k| format!("load item {}", (n * 7 + k * 13 + w) % 40))
                        .collect();
                    let response = gw
                        .post(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
                        .await;
                    assert_eq!(response.status(), 200, "no request fails");
                    let body: Value = response.json().await.expect("json");
                    for (v, t) in vectors(&body).iter().zip(&inputs) {
                        assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)), "right vector");
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker never failed");
    }
    assert!(total > 0);
    assert!(
        gw.metric("embgate_store_errors_total{op=\"get\"}").await
            + gw.metric("embgate_store_errors_total{op=\"set\"}").await
            > 0.0,
        "the outage is counted"
    );

    // Caching works again after the restart (the new server starts empty).
    let mut resumed = false;
    for _ in 0..50 {
        gw.embed(&json!({"model": SMALL, "input": "after the storm", "dimensions": 8}))
            .await;
        let (cache, _) = gw
            .embed(&json!({"model": SMALL, "input": "after the storm", "dimensions": 8}))
            .await;
        if cache == "hit" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_their_writes(#[case] backend: Backend) {
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(400));
    let mut gw = TestGateway::start_on(backend, vendor, &[]).await;
    let request = gw
        .http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(KEY)
        .json(&json!({"model": SMALL, "input": "last words", "dimensions": 8}))
        .send();
    let pending = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.shutdown().await;
    let response = pending.await.expect("task").expect("answered");
    assert_eq!(response.status(), 200);
    let key = gw.key(SMALL, Some(8), &Input::Text("last words".into()));
    assert_eq!(gw.entries().await, vec![key], "its entry was stored");
    // No new connections are accepted.
    assert!(
        gw.http
            .get(format!("{}/healthz", gw.url))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn oversized_inputs_are_refused() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__LIMITS__MAX_INPUT_BYTES", "16"),
            ("EMBGATE__LIMITS__MAX_INPUTS", "3"),
        ],
    )
    .await;
    let response = gw
        .post(&json!({"model": SMALL, "input": "this input is longer than sixteen bytes"}))
        .await;
    assert_eq!(response.status(), 400);
    let response = gw
        .post(&json!({"model": SMALL, "input": ["a", "b", "c", "d"]}))
        .await;
    assert_eq!(response.status(), 400);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["param"], "input");
    assert!(gw.vendor.embedding_requests().is_empty());
}

/// Thousands of requests (400 in flight at once) with random overlapping batches across
/// models, dimensions, encodings and input kinds: every vector must be the
/// vendor's, and the vendor must see every distinct input exactly once.
#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_random_overlapping_batches(#[case] backend: Backend) {
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(5));
    let gw = Arc::new(TestGateway::start_on(backend, vendor, &[]).await);
    let variants: [(&str, Option<u32>); 5] = [
        (SMALL, Some(16)),
        (SMALL, Some(32)),
        ("text-embedding-3-large", Some(16)),
        ("text-embedding-ada-002", None),
        ("acme-embed-v1", None),
    ];
    let pool: Vec<InputItem> = (0..120)
        .map(|i| {
            if i % 4 == 0 {
                InputItem::Tokens(vec![1000 + i, 42, i * 3 + 1])
            } else {
                InputItem::Text(format!("torture item {i}: {}", "x".repeat(i as usize % 7)))
            }
        })
        .collect();
    let pool = Arc::new(pool);
    let requests = 4000usize;
    let concurrency = 400usize;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (gw, pool, next) = (Arc::clone(&gw), Arc::clone(&pool), Arc::clone(&next));
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= requests {
                        return seen;
                    }
                    let (model, dims) = variants[rand::random_range(0..variants.len())];
                    let tokens = rand::random_bool(0.5);
                    let picks: Vec<&InputItem> = (0..rand::random_range(1..12))
                        .map(|_| &pool[rand::random_range(0..pool.len())])
                        .filter(|i| matches!(i, InputItem::Tokens(_)) == tokens)
                        .collect();
                    if picks.is_empty() {
                        continue;
                    }
                    let input: Vec<Value> = picks
                        .iter()
                        .map(|i| match i {
                            InputItem::Text(t) => json!(t),
                            InputItem::Tokens(t) => json!(t),
                        })
                        .collect();
                    let mut body = json!({"model": model, "input": input});
                    if let Some(d) = dims {
                        body["dimensions"] = json!(d);
                    }
                    if rand::random_bool(0.5) {
                        body["encoding_format"] = json!("base64");
                    }
                    let (_, answer) = gw.embed(&body).await;
                    for (v, item) in vectors(&answer).iter().zip(&picks) {
                        assert_eq!(
                            *v,
                            vendor_vector(model, dims, item),
                            "{model} {dims:?} {item:?}"
                        );
                    }
                    seen.extend(picks.into_iter().map(|i| (model, dims, i.clone())));
                }
            })
        })
        .collect();
    let mut distinct = HashSet::new();
    for w in workers {
        distinct.extend(w.await.expect("worker"));
    }
    assert!(distinct.len() > 100);
    for (model, dims, item) in &distinct {
        assert_eq!(
            gw.vendor.times_embedded(model, *dims, item),
            1,
            "{model} {dims:?} {item:?} embedded exactly once"
        );
    }
    assert_eq!(gw.vendor.total_inputs_embedded(), distinct.len() as u64);
}

#[tokio::test]
async fn the_l1_cache_answers_hot_keys_without_redis() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__URL", &url),
            ("EMBGATE__STORE__TIMEOUT_MS", "50"),
            ("EMBGATE__L1__MAX_BYTES", "1048576"),
        ],
    )
    .await;
    let body = json!({"model": SMALL, "input": ["hot", "also hot"], "dimensions": 8});
    let (cache, first) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    // Redis is gone; the hot keys are still answered, from process memory.
    redis.kill();
    let (cache, second) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&second), vectors(&first));
    assert_eq!(
        vectors(&second)[1],
        vendor_vector(SMALL, Some(8), &text("also hot"))
    );
    assert_eq!(gw.metric("embgate_l1_hits_total").await, 2.0);
    assert_eq!(gw.vendor.embedding_requests().len(), 1);
}
