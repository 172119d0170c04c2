//! Operating embgate: the ledger across restarts, store gauges, keyspace
//! migrations, `stats`, and the real binary.

mod common;

use std::time::Duration;

use common::*;
use embgate::migrate::{self, MigrateError};
use embgate::migrations::LATEST;
use embgate::migrations::m0001_entry_format_2::encode_v1;
use embgate::migrations::m0002_entry_format_3::encode_v2;
use embgate::protocol::Input;
use fake_vendor::FakeVendor;
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

#[tokio::test]
async fn the_ledger_survives_a_restart() {
    let fast = [("EMBGATE__LEDGER__SYNC_SECS", "1")];
    let mut first = TestGateway::start_with(FakeVendor::start().await, &fast).await;
    let inputs = ["ledger one", "ledger two"];
    let tokens: u64 = inputs
        .iter()
        .map(|t| u64::from(fake_vendor::tokens(SMALL, &text(t)).expect("tokens")))
        .sum();
    for _ in 0..3 {
        first
            .embed(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
            .await;
    }
    // Shutting down flushes what the last sync has not written yet.
    first.shutdown().await;

    let prefix = first.prefix.clone();
    let url = first.vendor.base_url();
    let second = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__LEDGER__SYNC_SECS", "1"),
            ("EMBGATE__STORE__KEY_PREFIX", &prefix),
            ("EMBGATE__UPSTREAM__BASE_URL", &url),
        ],
    )
    .await;
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
    drop(first);
}

/// Writes `n` entries in an earlier layout (1 or 2), with the vendor's vectors.
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
    texts
}

#[tokio::test]
async fn migrations_upgrade_the_previous_layout_resumably_without_losing_an_entry() {
    let gw = TestGateway::start().await;
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

#[tokio::test]
async fn keyspace_versions_fresh_newer_and_stamped() {
    let gw = TestGateway::start().await;
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

#[tokio::test]
async fn stats_report_entries_bytes_and_the_ledger() {
    let gw = TestGateway::start_with(
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// The real binary, serving on a free port in front of `vendor_url`.
struct Binary {
    child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Binary {
    async fn serve(
        vendor_url: &str,
        prefix: &str,
        rust_log: &str,
        stderr: std::process::Stdio,
    ) -> Binary {
        let port = free_port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_embgate"))
            .arg("serve")
            .env("EMBGATE__LISTEN", format!("127.0.0.1:{port}"))
            .env("EMBGATE__STORE__URL", redis_url())
            .env("EMBGATE__STORE__KEY_PREFIX", prefix)
            .env("EMBGATE__UPSTREAM__BASE_URL", vendor_url)
            .env("RUST_LOG", rust_log)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("starts");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return Binary { child, base, http };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the binary did not come up");
    }

    /// SIGTERM, then the exit status.
    async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("pid");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("stops after SIGTERM")
            .expect("status")
    }
}

#[tokio::test]
async fn the_binary_serves_with_environment_configuration_and_stops_cleanly() {
    let vendor = FakeVendor::start().await;
    let prefix = unique_prefix();
    let binary = Binary::serve(
        &vendor.base_url(),
        &prefix,
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
    delete_prefix(&prefix);
}

#[tokio::test]
async fn the_binary_refuses_an_older_keyspace_and_says_what_to_run() {
    let gw = TestGateway::start().await;
    write_legacy(&gw, 2, 3).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_embgate"))
        .arg("serve")
        .env("EMBGATE__LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("EMBGATE__STORE__URL", redis_url())
        .env("EMBGATE__STORE__KEY_PREFIX", &gw.prefix)
        .env("EMBGATE__UPSTREAM__BASE_URL", gw.vendor.base_url())
        .output()
        .await
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("embgate migrate"), "{stderr}");

    let migrated = tokio::process::Command::new(env!("CARGO_BIN_EXE_embgate"))
        .arg("migrate")
        .env("EMBGATE__STORE__URL", redis_url())
        .env("EMBGATE__STORE__KEY_PREFIX", &gw.prefix)
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
    let prefix = unique_prefix();
    let log_path = std::env::temp_dir().join(format!("{prefix}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let binary = Binary::serve(
        &vendor.base_url(),
        &prefix,
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
    delete_prefix(&prefix);
    assert!(logs.lines().count() > 5, "trace logging was on:\n{logs}");
    for key in [good, bad] {
        assert!(!logs.contains(key), "a key leaked into the logs");
        assert!(!metrics.contains(key), "a key leaked into the metrics");
    }
}

/// A lookup larger than one MGET comes back chunk by chunk, each with the
/// range of keys it answers, in order, absent keys as `None`.
#[tokio::test]
async fn large_lookups_come_back_in_order_chunk_by_chunk() {
    use embgate::cache::key::KeyHash;
    use embgate::cache::store::redis::MGET_CHUNK_KEYS;
    use futures_util::StreamExt;

    let gw = TestGateway::start().await;
    let n = 2 * MGET_CHUNK_KEYS + 88;
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
    assert_eq!(
        ranges,
        vec![
            0..MGET_CHUNK_KEYS,
            MGET_CHUNK_KEYS..2 * MGET_CHUNK_KEYS,
            2 * MGET_CHUNK_KEYS..n
        ]
    );
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
