//! Crash safety of the embedded store: the real binary is killed with
//! SIGKILL in the middle of a write-heavy load, then restarted on the same
//! file. What it acknowledged is there, every entry present is the
//! vendor's vector for its input, none is corrupt, the ledger is not below
//! the last value it synced, and inputs whose writes were lost are plain
//! misses, then hits.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use embgate::cache::entry::Entry;
use embgate::cache::key::KeyHash;
use embgate::cache::store::Cursor;
use embgate::config::Settings;
use embgate::protocol::Input;
use fake_vendor::FakeVendor;
use serde_json::{Value, json};

const DIMS: u32 = 64;

fn body(inputs: &[String]) -> Value {
    json!({"model": SMALL, "input": inputs, "dimensions": DIMS, "encoding_format": "base64"})
}

/// Posts `inputs`; the cache header, after checking every vector.
async fn embed(binary: &Binary, inputs: &[String]) -> String {
    let response = binary.post(&body(inputs)).await.expect("answers");
    assert_eq!(response.status(), 200);
    let cache = header(&response, "x-embgate-cache");
    let answer: Value = response.json().await.expect("json");
    for (v, t) in vectors(&answer).iter().zip(inputs) {
        assert_eq!(*v, vendor_vector(SMALL, Some(DIMS), &text(t)), "{t}");
    }
    cache
}

/// The value of a gauge once it is at least `floor` (the ledger is read
/// back at each sync), or the last one seen.
async fn gauge_at_least(binary: &Binary, sample: &str, floor: f64) -> f64 {
    let mut seen = 0.0;
    for _ in 0..200 {
        seen = binary.metric(sample).await;
        if seen >= floor && seen > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_mid_write_loses_nothing_acknowledged_and_corrupts_nothing() {
    let vendor = FakeVendor::start().await;
    let home = TestStore::new(Backend::Embedded);
    let mut env = home.env();
    env.extend([
        ("EMBGATE__UPSTREAM__BASE_URL", vendor.base_url()),
        ("EMBGATE__LEDGER__SYNC_SECS", "1".to_owned()),
        // Without the L1 a hit comes from the store: from a commit.
        ("EMBGATE__L1__MAX_BYTES", "0".to_owned()),
    ]);
    let spent = format!("embgate_ledger_spent_tokens{{model=\"{SMALL}\",tenant=\"default\"}}");
    let binary = Binary::serve(&env, None, std::process::Stdio::null()).await;

    // Write-heavy: every request brings new inputs.
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (http, url) = (
                binary.http.clone(),
                format!("{}/v1/embeddings", binary.base),
            );
            let (sent, answered) = (Arc::clone(&sent), Arc::clone(&answered));
            tokio::spawn(async move {
                for n in 0.. {
                    let inputs: Vec<String> =
                        (0..16).map(|i| format!("crash {w} {n} {i}")).collect();
                    sent.lock().expect("lock").extend(inputs.iter().cloned());
                    let response = http.post(&url).bearer_auth(KEY).json(&body(&inputs)).send();
                    // Once the gateway is killed, requests fail: the load ends.
                    let Ok(response) = response.await else { return };
                    if response.status() != 200 || response.bytes().await.is_err() {
                        return;
                    }
                    answered.lock().expect("lock").extend(inputs);
                }
            })
        })
        .collect();

    // The ledger has been synced at least once while writes go on.
    let synced = gauge_at_least(&binary, &spent, 1.0).await;
    assert!(synced > 0.0, "the ledger synced under load");
    while answered.lock().expect("lock").len() < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Acknowledged: answered earlier and now a hit, i.e. read from a commit.
    let earlier: Vec<String> = answered.lock().expect("lock")[..96].to_vec();
    let mut acknowledged = Vec::new();
    for chunk in earlier.chunks(16) {
        if embed(&binary, chunk).await == "hit" {
            acknowledged.extend(chunk.iter().cloned());
        }
    }
    assert!(!acknowledged.is_empty(), "writes are committed under load");
    let last_synced = binary.metric(&spent).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    binary.kill9().await;
    for worker in workers {
        worker.await.expect("worker");
    }
    let sent: Vec<String> = std::mem::take(&mut *sent.lock().expect("lock"));

    // Restarted on the same file: it opens (the dead holder's lock is
    // gone) and the ledger is where it was synced, or further.
    let binary = Binary::serve(&env, None, std::process::Stdio::null()).await;
    let ledger = gauge_at_least(&binary, &spent, last_synced).await;
    assert!(ledger >= last_synced, "ledger {ledger} below {last_synced}");
    assert!(binary.stop().await.success());

    // Every entry present is one of the inputs sent, and its vendor vector.
    let settings = Settings::load_from(
        None,
        Some(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
    )
    .expect("settings");
    let by_key: HashMap<KeyHash, &String> = sent
        .iter()
        .map(|t| {
            (
                key_hash(
                    &vendor.base_url(),
                    SMALL,
                    Some(DIMS),
                    &Input::Text(t.clone()),
                ),
                t,
            )
        })
        .collect();
    let store = open_store(&settings).await;
    let mut present = HashSet::new();
    let mut cursor = Cursor::start();
    loop {
        let (next, entries) = store.scan_entries(&cursor, 500).await.expect("scan");
        for (hash, bytes) in entries {
            let input = by_key.get(&hash).expect("an entry for an input sent");
            let entry = Entry::decode(&hash, bytes, Some(DIMS)).expect("not corrupt");
            let stored: Vec<f32> = entry
                .payload()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(stored, vendor_vector(SMALL, Some(DIMS), &text(input)));
            present.insert((*input).clone());
        }
        if next.is_start() {
            break;
        }
        cursor = next;
    }
    drop(store);
    for t in &acknowledged {
        assert!(present.contains(t), "{t} was acknowledged, then lost");
    }

    // What was lost is simply fetched again, once; then it is a hit.
    let lost: Vec<String> = sent
        .iter()
        .filter(|t| !present.contains(*t))
        .cloned()
        .collect();
    let binary = Binary::serve(&env, None, std::process::Stdio::null()).await;
    let paid_before = vendor.total_inputs_embedded();
    for chunk in lost.chunks(16) {
        assert_eq!(embed(&binary, chunk).await, "miss");
    }
    for chunk in lost.chunks(16) {
        // Entries are written after the answer: hits once they are.
        let mut cache = String::new();
        for _ in 0..100 {
            cache = embed(&binary, chunk).await;
            if cache == "hit" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(cache, "hit");
    }
    assert_eq!(
        vendor.total_inputs_embedded() - paid_before,
        lost.len() as u64,
        "each lost input paid once more"
    );
    let kept: Vec<String> = present.iter().take(64).cloned().collect();
    for chunk in kept.chunks(16) {
        assert_eq!(embed(&binary, chunk).await, "hit");
    }
    assert_eq!(
        binary
            .metric("embgate_store_errors_total{op=\"decode\"}")
            .await,
        0.0
    );
    assert!(binary.stop().await.success());
}
