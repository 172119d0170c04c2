//! What is particular to the embedded store: the first command works
//! without Redis and keeps its cache across restarts, one process at a time
//! opens the file (and the others say who holds it and what to do), and
//! `store.max_bytes` evicts the least recently used entries.

mod common;

use std::time::Duration;

use common::*;
use embgate::protocol::Input;
use fake_vendor::FakeVendor;
use serde_json::{Value, json};

async fn embed(binary: &Binary, input: &str) -> (String, Vec<f32>) {
    let response = binary
        .post(&json!({"model": SMALL, "input": input, "dimensions": 8}))
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let cache = header(&response, "x-embgate-cache");
    let body: Value = response.json().await.expect("json");
    (cache, vectors(&body).remove(0))
}

/// The README's first command, on a machine without Redis: only the
/// upstream is set.
#[tokio::test]
async fn the_first_command_caches_across_restarts_without_redis() {
    let vendor = FakeVendor::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let env = [("EMBGATE__UPSTREAM__BASE_URL", vendor.base_url())];
    let binary = Binary::serve(&env, Some(dir.path()), std::process::Stdio::null()).await;
    let ready: Value = binary
        .http
        .get(format!("{}/readyz", binary.base))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["store"], "embedded", "{ready}");
    let expected = vendor_vector(SMALL, Some(8), &text("kept on disk"));
    assert_eq!(
        embed(&binary, "kept on disk").await,
        ("miss".into(), expected.clone())
    );
    assert!(binary.stop().await.success());

    let data = dir.path().join("embgate-data").join("cache.redb");
    assert!(data.is_file(), "the data lives at store.path");
    let binary = Binary::serve(&env, Some(dir.path()), std::process::Stdio::null()).await;
    assert_eq!(
        embed(&binary, "kept on disk").await,
        ("hit".into(), expected)
    );
    assert_eq!(
        vendor.total_inputs_embedded(),
        1,
        "paid once across restarts"
    );
    assert!(binary.stop().await.success());
}

/// Runs `embgate ARGS` on `home`; (success, stdout, stderr).
async fn run(home: &TestStore, args: &[&str]) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        embgate(args).envs(home.env()).kill_on_drop(true).output(),
    )
    .await
    .expect("finishes")
    .expect("runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_second_process_is_told_who_holds_the_store_and_what_to_do() {
    let vendor = FakeVendor::start().await;
    let home = TestStore::new(Backend::Embedded);
    let path = home.path().expect("embedded").display().to_string();
    let mut env = home.env();
    env.push(("EMBGATE__UPSTREAM__BASE_URL", vendor.base_url()));
    let server = Binary::serve(&env, None, std::process::Stdio::null()).await;
    embed(&server, "held").await;
    let holder = format!("process {} (", server.pid());

    let listen = format!("127.0.0.1:{}", free_port());
    let second = tokio::time::timeout(
        Duration::from_secs(60),
        embgate(&["serve"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("EMBGATE__LISTEN", &listen)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("refuses at once")
    .expect("runs");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    for part in [path.as_str(), holder.as_str(), "embgate serve"] {
        assert!(stderr.contains(part), "{part:?} not in: {stderr}");
    }

    let dir = tempfile::tempdir().expect("dir");
    let inputs = dir.path().join("inputs.jsonl");
    std::fs::write(&inputs, "\"held\"\n").expect("inputs");
    let inputs = inputs.display().to_string();
    for (args, advice) in [
        (vec!["stats"], "/metrics"),
        (vec!["warm", inputs.as_str(), "--quiet"], "embgate warm"),
        (vec!["migrate"], "embgate migrate"),
    ] {
        let (ok, _, stderr) = run(&home, &args).await;
        assert!(!ok, "{args:?} must not run beside the server");
        for part in [
            path.as_str(),
            holder.as_str(),
            advice,
            "SIGTERM",
            "EMBGATE__STORE__URL",
        ] {
            if args[0] == "migrate" && part == "EMBGATE__STORE__URL" {
                continue;
            }
            assert!(stderr.contains(part), "{args:?}: {part:?} not in: {stderr}");
        }
    }

    assert!(server.stop().await.success());
    let (ok, stdout, stderr) = run(&home, &["stats"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("entries           1"), "{stdout}");
}

#[tokio::test]
async fn distributed_coalescing_needs_a_shared_store() {
    let home = TestStore::new(Backend::Embedded);
    let output = embgate(&["serve"])
        .envs(home.env())
        .env("EMBGATE__COALESCE__DISTRIBUTED", "true")
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(2), "a configuration error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("coalesce.distributed") && stderr.contains("store.url"),
        "{stderr}"
    );
}

#[tokio::test]
async fn past_max_bytes_the_least_recently_used_entries_are_evicted() {
    // An entry of 8 dimensions: 32-byte key, its header, 32 bytes of floats.
    let entry = 32 + embgate::cache::entry::HEADER_LEN + 8 * 4;
    let bound = (10 * entry).to_string();
    let gw = TestGateway::start_on(
        Backend::Embedded,
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__MAX_BYTES", &bound),
            ("EMBGATE__LEDGER__SYNC_SECS", "1"),
        ],
    )
    .await;
    let body = |i: usize| json!({"model": SMALL, "input": format!("bounded {i}"), "dimensions": 8});
    for i in 0..20 {
        gw.embed(&body(i)).await;
        gw.settled().await;
        // Writes a millisecond apart have distinct ticks: a strict order.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let size = gw.store.size().await.expect("size");
    assert_eq!(size.entries, 10, "{size:?}");
    assert!(size.bytes <= 10 * entry as u64, "{size:?}");
    assert_eq!(size.evicted, Some(10));
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = gw.metric("embgate_store_evictions_total").await;
        if counted == 10.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, 10.0);
    assert_eq!(gw.metric("embgate_store_entries").await, 10.0);

    // The newest ten stayed; the oldest ten went, and are paid for again.
    for i in 10..20 {
        assert_eq!(gw.embed(&body(i)).await.0, "hit", "bounded {i}");
    }
    let key = gw.key(SMALL, Some(8), &Input::Text("bounded 0".into()));
    assert!(!gw.entries().await.contains(&key));
    let (cache, answer) = gw.embed(&body(0)).await;
    assert_eq!(cache, "miss");
    assert_eq!(
        vectors(&answer)[0],
        vendor_vector(SMALL, Some(8), &text("bounded 0"))
    );
    assert_eq!(gw.vendor.total_inputs_embedded(), 21);
}
