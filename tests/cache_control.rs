//! Steering the cache, on both stores: per-request directives, tenant
//! modes, TTL on write and refresh on hit, purge by every filter (dry run,
//! resumption) and the admin API's authentication.

mod common;

use std::time::Duration;

use common::*;
use embgate::auth::hash_key;
use embgate::cache::entry::{self, Entry, Header, ValueType};
use embgate::protocol::Input;
use embgate::purge::{self, Filter};
use fake_vendor::FakeVendor;
use rstest::rstest;
use serde_json::{Value, json};

fn body(input: &str) -> Value {
    json!({"model": SMALL, "input": input, "dimensions": 8})
}

/// POST with one extra header; (cache header, hits, misses).
async fn embed_with(gw: &TestGateway, body: &Value, header: (&str, &str)) -> (String, u64, u64) {
    let response = gw
        .http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(KEY)
        .header(header.0, header.1)
        .json(body)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let count = |name| header_of(&response, name).parse::<u64>().expect("a count");
    (
        header_of(&response, "x-embgate-cache"),
        count("x-embgate-cache-hits"),
        count("x-embgate-cache-misses"),
    )
}

fn header_of(response: &reqwest::Response, name: &str) -> String {
    header(response, name)
}

fn embedded_times(gw: &TestGateway, input: &str) -> u64 {
    gw.vendor.times_embedded(SMALL, Some(8), &text(input))
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn directives_fetch_fresh_skip_storing_and_bound_age(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    gw.embed(&body("kept")).await;
    gw.settled().await;

    // no-cache: fetched again, and the entry overwritten.
    let (cache, hits, misses) = embed_with(&gw, &body("kept"), ("cache-control", "no-cache")).await;
    assert_eq!((cache.as_str(), hits, misses), ("miss", 0, 1));
    assert_eq!(embedded_times(&gw, "kept"), 2);
    // The same through the gateway's own header.
    embed_with(&gw, &body("kept"), ("x-embgate-cache-control", "No-Cache")).await;
    assert_eq!(embedded_times(&gw, "kept"), 3);

    // no-store: hits are used, nothing new is kept.
    let both = json!({"model": SMALL, "input": ["kept", "passing"], "dimensions": 8});
    let (cache, hits, misses) = embed_with(&gw, &both, ("cache-control", "no-store")).await;
    assert_eq!((cache.as_str(), hits, misses), ("partial", 1, 1));
    gw.settled().await;
    let passing = gw.key(SMALL, Some(8), &Input::Text("passing".into()));
    assert!(!gw.entries().await.contains(&passing), "not stored");
    let (cache, _) = gw.embed(&body("passing")).await;
    assert_eq!(cache, "miss", "paid again: it was never kept");

    // max-age: an entry older than that is a miss and is refreshed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = embedded_times(&gw, "kept");
    let (cache, ..) = embed_with(&gw, &body("kept"), ("cache-control", "max-age=1")).await;
    assert_eq!(cache, "miss");
    assert_eq!(embedded_times(&gw, "kept"), before + 1);
    gw.settled().await;
    let (cache, ..) = embed_with(&gw, &body("kept"), ("cache-control", "max-age=1")).await;
    assert_eq!(cache, "hit", "the refreshed entry is young");
    let (cache, ..) = embed_with(&gw, &body("kept"), ("cache-control", "max-age=3600")).await;
    assert_eq!(cache, "hit");

    // What is not understood is ignored, never an error.
    let (cache, ..) = embed_with(
        &gw,
        &body("kept"),
        ("cache-control", "max-age=soon, private"),
    )
    .await;
    assert_eq!(cache, "hit");

    let metrics = gw.metrics().await;
    let counted = |kind: &str| {
        metric_value(
            &metrics,
            &format!("embgate_cache_directives_total{{directive=\"{kind}\"}}"),
        )
    };
    assert_eq!(counted("no-cache"), 2.0);
    assert_eq!(counted("no-store"), 1.0);
    assert_eq!(counted("max-age"), 3.0);
    assert_eq!(counted("ignored"), 2.0);
}

#[tokio::test]
async fn tenants_read_write_read_only_and_off() {
    let key = |t: &str| format!("client-key-{t}");
    let hashes: Vec<String> = ["rw", "ro", "off"]
        .iter()
        .map(|t| hash_key(&key(t)))
        .collect();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__AUTH__MODE", "gateway"),
            ("EMBGATE__UPSTREAM__API_KEY", "sk-gateway"),
            ("EMBGATE__AUTH__TENANTS__RW__KEY_SHA256", &hashes[0]),
            ("EMBGATE__AUTH__TENANTS__RO__KEY_SHA256", &hashes[1]),
            ("EMBGATE__AUTH__TENANTS__RO__CACHE", "read-only"),
            ("EMBGATE__AUTH__TENANTS__OFF__KEY_SHA256", &hashes[2]),
            ("EMBGATE__AUTH__TENANTS__OFF__CACHE", "off"),
        ],
    )
    .await;
    let ask = |tenant: &'static str, input: &'static str| {
        let gw = &gw;
        let key = key(tenant);
        async move {
            let response = post_with_key(gw, Some(&key), &body(input)).await;
            assert_eq!(response.status(), 200);
            let cache = header(&response, "x-embgate-cache");
            gw.settled().await;
            cache
        }
    };
    assert_eq!(ask("rw", "shared").await, "miss");
    assert_eq!(ask("ro", "shared").await, "hit", "read-only serves hits");
    assert_eq!(ask("ro", "ro only").await, "miss");
    assert_eq!(
        ask("ro", "ro only").await,
        "miss",
        "read-only stores nothing"
    );
    assert_eq!(ask("off", "shared").await, "miss", "off never reads");
    assert_eq!(ask("off", "off only").await, "miss");
    assert_eq!(ask("rw", "off only").await, "miss", "off stores nothing");
    assert_eq!(embedded_times(&gw, "shared"), 2);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn entries_expire_after_their_ttl_and_hits_extend_it(#[case] backend: Backend) {
    let gw = TestGateway::start_on(
        backend,
        FakeVendor::start().await,
        &[
            ("EMBGATE__CACHE__TTL_SECS", "2"),
            ("EMBGATE__CACHE__MODEL_TTL_SECS__ACME-EMBED-V1", "0"),
            ("EMBGATE__CACHE__REFRESH_TTL_ON_HIT", "false"),
        ],
    )
    .await;
    gw.embed(&body("short lived")).await;
    gw.embed(&json!({"model": "acme-embed-v1", "input": "forever"}))
        .await;
    gw.settled().await;
    assert_eq!(gw.embed(&body("short lived")).await.0, "hit");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(gw.embed(&body("short lived")).await.0, "miss", "expired");
    assert_eq!(
        gw.embed(&json!({"model": "acme-embed-v1", "input": "forever"}))
            .await
            .0,
        "hit",
        "a model's own TTL of 0 keeps its entries"
    );
    if backend == Backend::Redis {
        let key = gw.key(SMALL, Some(8), &Input::Text("short lived".into()));
        let mut conn = gw.redis().await;
        let ttl: i64 = redis::cmd("PTTL")
            .arg(gw.redis_key(&key))
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(ttl > 0 && ttl <= 2000, "written with its TTL: {ttl}");
    }
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn a_hit_pushes_the_expiry_back(#[case] backend: Backend) {
    let gw = TestGateway::start_on(
        backend,
        FakeVendor::start().await,
        &[
            ("EMBGATE__CACHE__TTL_SECS", "3"),
            ("EMBGATE__CACHE__REFRESH_TTL_ON_HIT", "true"),
        ],
    )
    .await;
    gw.embed(&body("kept alive")).await;
    gw.settled().await;
    // Hit every second: each pushes the 3 s expiry back (once per 0.3 s at
    // most), so it is still there well past 3 s after it was written.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(gw.embed(&body("kept alive")).await.0, "hit");
        gw.settled().await;
    }
    assert_eq!(embedded_times(&gw, "kept alive"), 1);
}

/// Plants an entry for `input` as the gateway would write it, with
/// `written_at` and tags of its own.
async fn plant(gw: &TestGateway, input: &str, written_at: u32, upstream: &str, tenant: u32) {
    let hash = gw.key(SMALL, Some(8), &Input::Text(input.into()));
    let vector = vendor_vector(SMALL, Some(8), &text(input));
    let payload: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = Header {
        value_type: ValueType::F32,
        tokens: 10,
        model_tag: entry::tag(SMALL),
        written_at,
        upstream_tag: entry::tag(upstream.trim_end_matches('/')),
        tenant_tag: tenant,
    };
    gw.put_raw(
        hash,
        Entry::from_parts(&hash, &header, &payload)
            .as_bytes()
            .clone(),
    )
    .await;
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn purge_by_every_filter_with_dry_runs_and_resumption(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let store = gw.store.as_ref();
    let context = purge::Context::new(&gw.settings);
    let vendor = gw.vendor.base_url();
    let now = entry::unix_now();
    let old = now - 40 * 86_400;
    for i in 0..30 {
        plant(&gw, &format!("old {i}"), old, &vendor, 0).await;
    }
    for i in 0..10 {
        plant(
            &gw,
            &format!("elsewhere {i}"),
            now,
            "https://elsewhere/v1",
            0,
        )
        .await;
        plant(
            &gw,
            &format!("tenant {i}"),
            now,
            &vendor,
            entry::tag("search"),
        )
        .await;
    }
    gw.embed(&json!({"model": "acme-embed-v1", "input": "acme"}))
        .await;
    gw.settled().await;
    assert_eq!(gw.entries().await.len(), 51);

    let filter = |f: Filter| f;
    let older = filter(Filter {
        older_than: Some("30d".into()),
        ..Filter::default()
    });
    let dry = purge::run(store, &context, &older, true, 7, None)
        .await
        .expect("dry run");
    let entry_bytes = (entry::HEADER_LEN + 8 * 4) as u64;
    assert_eq!((dry.matched, dry.deleted, dry.scanned), (30, 0, 51));
    assert_eq!(dry.bytes, 30 * entry_bytes);
    assert_eq!(dry.tokens, 300);
    assert!((dry.usd - 300.0 * 0.02 / 1e6).abs() < 1e-12, "{dry:?}");
    assert_eq!(gw.entries().await.len(), 51, "a dry run deletes nothing");

    // Interrupted after two batches, then resumed: everything old goes once.
    let part = purge::run(store, &context, &older, false, 7, Some(2))
        .await
        .expect("part");
    assert!(!part.complete);
    let rest = purge::run(store, &context, &older, false, 7, None)
        .await
        .expect("rest");
    assert!(rest.complete);
    assert_eq!(part.deleted + rest.deleted, 30);
    assert!(rest.scanned < 51, "resumed where it stopped");
    assert_eq!(gw.entries().await.len(), 21);

    let by = |f: Filter| {
        let context = &context;
        async move { purge::run(store, context, &f, false, 100, None).await }
    };
    let upstream = by(Filter {
        upstream: Some("https://elsewhere/v1/".into()),
        ..Filter::default()
    })
    .await
    .expect("by upstream");
    assert_eq!(upstream.deleted, 10);
    let tenant = by(Filter {
        tenant: Some("search".into()),
        ..Filter::default()
    })
    .await
    .expect("by tenant");
    assert_eq!(tenant.deleted, 10);
    let model = by(Filter {
        model: Some("acme-embed-v1".into()),
        upstream: Some("default".into()),
        ..Filter::default()
    })
    .await
    .expect("by model and upstream");
    assert_eq!(model.deleted, 1);
    assert!(gw.entries().await.is_empty());
    assert_eq!(
        gw.embed(&body("old 0")).await.0,
        "miss",
        "purged is paid again"
    );

    for refused in [
        Filter::default(),
        Filter {
            all: true,
            model: Some(SMALL.into()),
            ..Filter::default()
        },
        Filter {
            upstream: Some("nowhere".into()),
            ..Filter::default()
        },
        Filter {
            older_than: Some("a while".into()),
            ..Filter::default()
        },
    ] {
        assert!(by(refused).await.is_err());
    }
    let all = by(Filter {
        all: true,
        ..Filter::default()
    })
    .await
    .expect("all");
    assert_eq!(all.deleted, 1);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn the_admin_api_opens_only_to_the_admin_key(#[case] backend: Backend) {
    let closed = TestGateway::on(backend).await;
    let response = closed
        .http
        .get(format!("{}/admin/stats", closed.url))
        .bearer_auth("anything")
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 401);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["code"], "admin_api_off");
    drop(closed);

    let admin_key = "admin-secret";
    let client_key = "client-secret";
    let admin_hash = hash_key(admin_key);
    let client_hash = hash_key(client_key);
    let gw = TestGateway::start_on(
        backend,
        FakeVendor::start().await,
        &[
            ("EMBGATE__ADMIN__KEY_SHA256", &admin_hash),
            ("EMBGATE__AUTH__MODE", "gateway"),
            ("EMBGATE__UPSTREAM__API_KEY", "sk-gateway"),
            ("EMBGATE__AUTH__TENANTS__APP__KEY_SHA256", &client_hash),
        ],
    )
    .await;
    post_with_key(&gw, Some(client_key), &body("admin test")).await;
    gw.settled().await;
    let call = |method: reqwest::Method, path: &'static str, key: Option<&'static str>| {
        let gw = &gw;
        async move {
            let mut req = gw.http.request(method, format!("{}{path}", gw.url));
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            if path == "/admin/purge" {
                req = req.json(&json!({"all": true, "dry_run": true}));
            }
            req.send().await.expect("answer")
        }
    };
    for path in ["/admin/stats", "/admin/purge"] {
        let method = match path {
            "/admin/stats" => reqwest::Method::GET,
            _ => reqwest::Method::POST,
        };
        for key in [None, Some("wrong"), Some(client_key), Some("sk-gateway")] {
            let response = call(method.clone(), path, key).await;
            assert_eq!(response.status(), 401, "{path} with {key:?}");
        }
        let response = call(method, path, Some(admin_key)).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    let stats: Value = call(reqwest::Method::GET, "/admin/stats", Some(admin_key))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(stats["total"]["entries"], 1);
    let dry: Value = call(reqwest::Method::POST, "/admin/purge", Some(admin_key))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (dry["matched"].as_u64(), dry["deleted"].as_u64()),
        (Some(1), Some(0))
    );
    let purged: Value = gw
        .http
        .post(format!("{}/admin/purge", gw.url))
        .bearer_auth(admin_key)
        .json(&json!({"model": SMALL}))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(purged["deleted"], 1);
    assert!(gw.entries().await.is_empty());
    let bad = gw
        .http
        .post(format!("{}/admin/purge", gw.url))
        .bearer_auth(admin_key)
        .json(&json!({"colour": "blue"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(bad.status(), 400, "unknown filters are refused");
}
