//! Operating embgate: the ledger across restarts, store gauges, keyspace
//! migrations, `stats`, and the real binary, on either store.

mod common;

use std::time::Duration;

use common::*;
use embgate::migrate::{self, MigrateError};
use embgate::migrations::LATEST;
use embgate::migrations::m0001_entry_format_2::encode_v1;
use embgate::migrations::m0002_entry_format_3::encode_v2;
use embgate::protocol::Input;
use fake_vendor::FakeVendor;
use rstest::rstest;
use serde_json::{Value, json};

async fn wait_for_metric(gw: &TestGateway, sample: &str, wanted: f64) -> f64 {
    let mut seen = 0.0;
    for _ in 0..60 {
        seen = gw.metric(sample).await;
        if (seen - wanted).abs() < 1e-9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn the_ledger_survives_a_restart(#[case] backend: Backend) {
    let fast = [("EMBGATE__LEDGER__SYNC_SECS", "1")];
    let first = TestGateway::start_on(backend, FakeVendor::start().await, &fast).await;
    let inputs = ["ledger one", "ledger two"];
    let tokens: u64 = inputs
        .iter()
        .map(|t| u64::from(fake_vendor::tokens(SMALL, &text(t)).expect("tokens")))
        .sum();
    for _ in 0..3 {
        first
            .embed(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
            .await;
        first.settled().await;
    }
    // Shutting down flushes what the last sync has not written yet; the
    // second gateway opens the same store, as a restarted process would.
    let second = first.restart(&fast).await;
    let saved = format!("embgate_ledger_saved_tokens{{model=\"{SMALL}\",tenant=\"default\"}}");
    let spent = format!("embgate_ledger_spent_tokens{{model=\"{SMALL}\",tenant=\"default\"}}");
    assert_eq!(
        wait_for_metric(&second, &saved, 2.0 * tokens as f64).await,
        2.0 * tokens as f64
    );
    assert_eq!(second.metric(&spent).await, tokens as f64);
    let usd = second
        .metric(&format!(
            "embgate_ledger_saved_usd{{model=\"{SMALL}\",tenant=\"default\"}}"
        ))
        .await;
    assert!((usd - 2.0 * tokens as f64 * 0.02 / 1e6).abs() < 1e-12);
    // The counters of the new process start at zero; the ledger does not.
    assert_eq!(
        second
            .metric(&format!(
                "embgate_cache_saved_tokens_total{{model=\"{SMALL}\"}}"
            ))
            .await,
        0.0
    );
    let entries = second.metric("embgate_store_entries").await;
    assert!(entries >= 2.0, "entries gauge: {entries}");
    assert!(second.metric("embgate_store_memory_bytes").await > 0.0);
    // The entries outlived the first process too.
    let (cache, _) = second
        .embed(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
        .await;
    assert_eq!(cache, "hit");
}

/// Writes `n` entries in an earlier layout (1 or 2), with the vendor's
/// vectors, in a keyspace without a version as those layouts left it (the
/// gateway may have stamped the fresh keyspace at start).
async fn write_legacy(gw: &TestGateway, format: u8, n: usize) -> Vec<String> {
    let texts: Vec<String> = (0..n)
        .map(|i| format!("format {format} entry {i}"))
        .collect();
    for t in &texts {
        let hash = gw.key(SMALL, Some(8), &Input::Text(t.clone()));
        let vector = vendor_vector(SMALL, Some(8), &text(t));
        let tokens = fake_vendor::tokens(SMALL, &text(t)).expect("tokens");
        let value = match format {
            1 => encode_v1(&hash, &vector, tokens),
            _ => encode_v2(&hash, &vector, tokens, SMALL),
        };
        gw.put_raw(hash, value).await;
    }
    gw.store
        .meta_delete(migrate::VERSION_FIELD)
        .await
        .expect("meta");
    texts
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn migrations_upgrade_the_previous_layout_resumably_without_losing_an_entry(
    #[case] backend: Backend,
) {
    let gw = TestGateway::on(backend).await;
    let mut texts = write_legacy(&gw, 1, 300).await;
    texts.extend(write_legacy(&gw, 2, 100).await);
    let store = gw.store.as_ref();

    assert!(matches!(
        migrate::check(store).await,
        Err(MigrateError::Older { found: 0, .. })
    ));

    // Interrupted after two batches: nothing is marked done yet.
    let partial = migrate::run_pending(store, 50, Some(2))
        .await
        .expect("partial run");
    assert!(!partial.complete);
    assert!(partial.rewritten > 0 && partial.rewritten < 400);
    assert!(migrate::check(store).await.is_err());

    let rest = migrate::run_pending(store, 50, None)
        .await
        .expect("resumed run");
    assert!(rest.complete);
    assert_eq!(rest.to_version, LATEST);
    assert_eq!(partial.rewritten + rest.rewritten, 400, "each entry once");
    assert_eq!(rest.unreadable, 0);
    migrate::check(store).await.expect("current now");
    let again = migrate::run_pending(store, 50, None)
        .await
        .expect("idempotent");
    assert_eq!(again.rewritten, 0);

    // Every entry is served as a hit, with its vector intact.
    for chunk in texts.chunks(100) {
        let (cache, body) = gw
            .embed(&json!({"model": SMALL, "input": chunk, "dimensions": 8}))
            .await;
        assert_eq!(cache, "hit");
        for (v, t) in vectors(&body).iter().zip(chunk) {
            assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)));
        }
    }
    assert!(gw.vendor.embedding_requests().is_empty());
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn keyspace_versions_fresh_newer_and_stamped(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let store = gw.store.as_ref();
    migrate::check(store)
        .await
        .expect("a fresh keyspace is fine");
    let stamped = store.meta_get(migrate::VERSION_FIELD).await.expect("meta");
    assert_eq!(stamped, Some(LATEST.to_string()));
    store
        .meta_set(migrate::VERSION_FIELD, &(LATEST + 1).to_string())
        .await
        .expect("meta");
    assert!(matches!(
        migrate::check(store).await,
        Err(MigrateError::Newer { .. })
    ));
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn stats_report_entries_bytes_and_the_ledger(#[case] backend: Backend) {
    let gw = TestGateway::start_on(
        backend,
        FakeVendor::start().await,
        &[("EMBGATE__LEDGER__SYNC_SECS", "1")],
    )
    .await;
    gw.embed(&json!({"model": SMALL, "input": ["s1", "s2", "s3"], "dimensions": 8}))
        .await;
    gw.embed(&json!({"model": "acme-embed-v1", "input": "s4"}))
        .await;
    gw.embed(&json!({"model": SMALL, "input": ["s1"], "dimensions": 8}))
        .await;
    let saved = format!("embgate_ledger_saved_tokens{{model=\"{SMALL}\",tenant=\"default\"}}");
    let s1 = f64::from(fake_vendor::tokens(SMALL, &text("s1")).expect("tokens"));
    assert_eq!(wait_for_metric(&gw, &saved, s1).await, s1);
    gw.settled().await;

    let store = gw.store.as_ref();
    let stats = embgate::stats::collect(store, [SMALL])
        .await
        .expect("stats");
    assert_eq!(stats.total.entries, 4);
    assert_eq!(stats.by_model[SMALL].entries, 3);
    assert_eq!(
        stats.by_model[SMALL].bytes,
        3 * (embgate::cache::entry::HEADER_LEN as u64 + 8 * 4)
    );
    assert_eq!(
        stats.by_model["acme-embed-v1"].entries, 1,
        "named from the ledger"
    );
    let report = stats.render();
    assert!(report.contains("saved tokens"), "{report}");
    assert!(report.contains("acme-embed-v1"), "{report}");
}

/// The real binary on `home`, in front of `vendor_url`.
async fn serve(
    home: &TestStore,
    vendor_url: &str,
    rust_log: &str,
    stderr: std::process::Stdio,
) -> Binary {
    let mut env = home.env();
    env.push(("EMBGATE__UPSTREAM__BASE_URL", vendor_url.to_owned()));
    env.push(("RUST_LOG", rust_log.to_owned()));
    Binary::serve(&env, None, stderr).await
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn the_binary_serves_with_environment_configuration_and_stops_cleanly(
    #[case] backend: Backend,
) {
    let vendor = FakeVendor::start().await;
    let home = TestStore::new(backend);
    let binary = serve(
        &home,
        &vendor.base_url(),
        "warn",
        std::process::Stdio::inherit(),
    )
    .await;
    let (http, base) = (binary.http.clone(), binary.base.clone());
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz")
            .status(),
        200
    );
    for expected in ["miss", "hit"] {
        let response = http
            .post(format!("{base}/v1/embeddings"))
            .bearer_auth(KEY)
            .json(&json!({"model": SMALL, "input": "from the binary", "dimensions": 8}))
            .send()
            .await
            .expect("embeds");
        assert_eq!(header(&response, "x-embgate-cache"), expected);
        let body: Value = response.json().await.expect("json");
        assert_eq!(
            vectors(&body)[0],
            vendor_vector(SMALL, Some(8), &text("from the binary"))
        );
    }
    let status = binary.stop().await;
    assert!(status.success(), "{status:?}");
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn the_binary_refuses_an_older_keyspace_and_says_what_to_run(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    write_legacy(&gw, 2, 3).await;
    let vendor_url = gw.vendor.base_url();
    // Closed, so that the binary can open an embedded store.
    let (_vendor, home) = gw.stop().await;
    let serve = embgate(&["serve"])
        .env("EMBGATE__LISTEN", format!("127.0.0.1:{}", free_port()))
        .envs(home.env())
        .env("EMBGATE__UPSTREAM__BASE_URL", vendor_url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), serve)
        .await
        .expect("refuses to serve rather than serving")
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("embgate migrate"), "{stderr}");

    let migrated = embgate(&["migrate"])
        .envs(home.env())
        .output()
        .await
        .expect("runs");
    assert!(migrated.status.success());
    let stdout = String::from_utf8_lossy(&migrated.stdout);
    assert!(stdout.contains("3 rewritten"), "{stdout}");
}

#[test]
fn hash_key_prints_the_sha256_of_a_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_embgate"))
        .args(["hash-key", "abc"])
        .output()
        .expect("runs");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[tokio::test]
async fn keys_never_reach_the_logs() {
    let good = "sk-good-key-that-must-stay-secret";
    let bad = "sk-bad-key-that-must-stay-secret";
    let vendor = FakeVendor::start_with(fake_vendor::Options {
        valid_keys: Some(vec![good.to_owned()]),
        ..fake_vendor::Options::default()
    })
    .await;
    let home = TestStore::new(Backend::Redis);
    let log_path = std::env::temp_dir().join(format!("{}.log", home.prefix));
    let log = std::fs::File::create(&log_path).expect("log file");
    let binary = serve(
        &home,
        &vendor.base_url(),
        "trace",
        std::process::Stdio::from(log),
    )
    .await;
    let (http, base) = (binary.http.clone(), binary.base.clone());
    let body = json!({"model": SMALL, "input": "secret keeping", "dimensions": 8});
    for (key, status) in [(good, 200), (bad, 401), (good, 200), (bad, 401)] {
        let response = http
            .post(format!("{base}/v1/embeddings"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), status);
        let text = response.text().await.expect("body");
        assert!(!text.contains(key), "{text}");
        let passthrough = http
            .get(format!("{base}/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .expect("answer");
        assert_eq!(passthrough.status(), status);
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    binary.stop().await;
    let logs = std::fs::read_to_string(&log_path).expect("logs");
    let _ = std::fs::remove_file(&log_path);
    assert!(logs.lines().count() > 5, "trace logging was on:\n{logs}");
    for key in [good, bad] {
        assert!(!logs.contains(key), "a key leaked into the logs");
        assert!(!metrics.contains(key), "a key leaked into the metrics");
    }
}

/// A large lookup comes back chunk by chunk (one per MGET for Redis), each
/// with the range of keys it answers, in order, absent keys as `None`.
#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn large_lookups_come_back_in_order_chunk_by_chunk(#[case] backend: Backend) {
    use embgate::cache::key::KeyHash;
    use embgate::cache::store::{embedded, redis::MGET_CHUNK_KEYS};
    use futures_util::StreamExt;

    let gw = TestGateway::on(backend).await;
    let chunk = match backend {
        Backend::Redis => MGET_CHUNK_KEYS,
        Backend::Embedded => embedded::CHUNK_KEYS,
    };
    let n = 2 * chunk + 88;
    let keys: Vec<KeyHash> = (0..n)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            KeyHash(k)
        })
        .collect();
    // Every third key is never stored.
    let stored: Vec<(KeyHash, bytes::Bytes)> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(i, k)| (*k, bytes::Bytes::from(format!("value {i}"))))
        .collect();
    gw.store.put_many(stored, None).await.expect("stored");

    let chunks: Vec<_> = gw
        .store
        .get_many(&keys, Duration::from_secs(5))
        .collect()
        .await;
    let ranges: Vec<_> = chunks.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(ranges, vec![0..chunk, chunk..2 * chunk, 2 * chunk..n]);
    let values: Vec<Option<bytes::Bytes>> = chunks
        .into_iter()
        .flat_map(|(_, values)| values.expect("chunk answered"))
        .collect();
    assert_eq!(values.len(), n);
    for (i, value) in values.iter().enumerate() {
        let expected = (i % 3 != 0).then(|| bytes::Bytes::from(format!("value {i}")));
        assert_eq!(value, &expected, "key {i}");
    }
}
