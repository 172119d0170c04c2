//! `embgate warm --batch-api`: misses through the vendor's Batch API, end to
//! end against a real store and the fake vendor's files and batches.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use embgate::accounting::ledger::{Kind, read_ledger};
use embgate::config::Settings;
use embgate::protocol::Input;
use embgate::warm::{self, Checkpoint, Stop, WarmError, WarmOptions, WarmSummary};
use fake_vendor::{BatchFate, FakeVendor, InputItem};
use rstest::rstest;

/// One JSON string line per text.
fn write(scratch: &Scratch, name: &str, texts: &[&str]) -> PathBuf {
    let lines: Vec<String> = texts
        .iter()
        .map(|t| serde_json::to_string(t).expect("json"))
        .collect();
    scratch.write(name, &lines)
}

/// Settings for a run on the scratch's store, polling batches quickly.
fn settings(scratch: &Scratch, vendor: &FakeVendor, more: &[(&str, &str)]) -> Settings {
    let quick = [
        ("EMBGATE__BATCH_API__POLL_MIN_MS", "2"),
        ("EMBGATE__BATCH_API__POLL_MAX_MS", "20"),
    ];
    let more: Vec<(&str, String)> = quick
        .iter()
        .chain(more)
        .map(|(k, v)| (*k, (*v).to_owned()))
        .collect();
    scratch.settings(vendor, &more)
}

fn checkpoint(opts: &WarmOptions) -> Checkpoint {
    warm::read_checkpoint(&opts.checkpoint_path())
        .expect("readable checkpoint")
        .expect("a checkpoint exists")
}

/// A run interrupted as soon as the vendor has a batch of it.
async fn interrupted_once_submitted(
    settings: &Settings,
    opts: &WarmOptions,
    vendor: &FakeVendor,
) -> WarmError {
    let submitted = async {
        while vendor.batch_ids().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    warm::warm_until(settings, opts, submitted)
        .await
        .expect_err("interrupted")
}

/// What `--batch-api --status` prints.
async fn follow(settings: &Settings, opts: &WarmOptions) -> String {
    let opts = WarmOptions {
        status: true,
        ..opts.clone()
    };
    warm::batch_status(settings, &opts).await.expect("status")
}

fn options(file: &Path) -> WarmOptions {
    WarmOptions {
        quiet: true,
        batch_api: true,
        ..WarmOptions::new(file)
    }
}

fn tokens(t: &str) -> u64 {
    u64::from(fake_vendor::tokens(SMALL, &text(t)).expect("tokens"))
}

/// The inputs every batch line carried, with repeats.
fn batched(vendor: &FakeVendor) -> Vec<InputItem> {
    vendor
        .batch_lines()
        .into_iter()
        .flat_map(|line| {
            let request = line.request;
            assert_eq!(request.model.as_deref(), Some(SMALL));
            assert_eq!(request.encoding_format.as_deref(), Some("base64"));
            assert_eq!(request.inputs.len(), 1, "one input per request");
            request.inputs
        })
        .collect()
}

/// Synchronous embeddings calls' inputs.
fn synchronous(vendor: &FakeVendor) -> Vec<InputItem> {
    vendor
        .embedding_requests()
        .into_iter()
        .flat_map(|r| r.inputs)
        .collect()
}

/// Every text is a hit for a gateway on the store, with the vendor's vector.
async fn assert_cached(scratch: &Scratch, vendor: FakeVendor, texts: &[&str]) -> FakeVendor {
    let gw = TestGateway::start_in(
        Arc::clone(&scratch.home),
        vendor,
        &[
            ("EMBGATE__AUTH__MODE", "open"),
            ("EMBGATE__UPSTREAM__API_KEY", "sk-test"),
        ],
    )
    .await;
    let before = gw.vendor.total_inputs_embedded();
    for t in texts {
        let key = gw.key(SMALL, None, &Input::Text((*t).to_owned()));
        assert!(gw.entries().await.contains(&key), "{t} stored");
        let (cache, body) = gw
            .embed(&serde_json::json!({"model": SMALL, "input": t}))
            .await;
        assert_eq!(cache, "hit", "{t}");
        assert_eq!(
            vectors(&body)[0],
            vendor_vector(SMALL, None, &text(t)),
            "{t}"
        );
    }
    assert_eq!(gw.vendor.total_inputs_embedded(), before, "all hits");
    let (vendor, _) = gw.stop().await;
    vendor
}

/// The ledger's all-time total of `kind`.
async fn in_ledger(settings: &Settings, kind: Kind) -> f64 {
    let store = open_store(settings).await;
    let ledger = read_ledger(store.as_ref(), None).await.expect("ledger");
    ledger
        .iter()
        .filter(|(account, _)| account.kind == kind)
        .map(|(_, usd)| usd)
        .sum()
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn misses_complete_through_batches_and_only_misses_are_submitted(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    let cached = ["alpha", "beta"];
    let settings = settings(
        &scratch,
        &vendor,
        &[
            ("EMBGATE__BATCH_API__MAX_REQUESTS_PER_BATCH", "3"),
            ("EMBGATE__BATCH_API__MAX_IN_FLIGHT", "2"),
        ],
    );
    // Two inputs are cached already, synchronously.
    let first = write(&scratch, "first.jsonl", &cached);
    let sync = WarmOptions {
        batch_api: false,
        ..options(&first)
    };
    warm::warm(&settings, &sync).await.expect("sync warm");
    vendor.reset_records();

    let texts = [
        "alpha", "one", "two", "beta", "three", "one", "four", "five", "six", "two", "seven",
    ];
    let misses: HashSet<&str> = texts
        .iter()
        .copied()
        .filter(|t| !cached.contains(t))
        .collect();
    let path = write(&scratch, "docs.jsonl", &texts);
    let opts = WarmOptions {
        batch: 2,
        ..options(&path)
    };
    let summary = warm::warm(&settings, &opts).await.expect("batch warm");

    // Each miss went through a batch exactly once; nothing else was sent.
    let sent = batched(&vendor);
    let distinct: HashSet<InputItem> = sent.iter().cloned().collect();
    assert_eq!(sent.len(), distinct.len(), "no input paid twice: {sent:?}");
    let expected: HashSet<InputItem> = misses.iter().map(|t| text(t)).collect();
    assert_eq!(distinct, expected);
    assert!(synchronous(&vendor).is_empty(), "no synchronous call");
    let ids = vendor.batch_ids();
    assert!(ids.len() >= 3, "split within 3 requests a batch: {ids:?}");
    for id in &ids {
        let lines = vendor
            .batch_lines()
            .iter()
            .filter(|l| &l.batch_id == id)
            .count();
        assert!((1..=3).contains(&lines), "{id}: {lines} lines");
        assert_eq!(vendor.batch_status(id), Some("completed"));
    }

    assert!(summary.complete);
    assert_eq!(summary.lines, texts.len() as u64);
    assert_eq!(summary.inputs, texts.len() as u64);
    assert_eq!(summary.embedded, misses.len() as u64);
    assert_eq!(summary.batch_inputs, misses.len() as u64);
    assert_eq!(summary.batches, ids.len() as u64);
    assert_eq!(summary.batch_fallbacks, 0);
    let paid: u64 = misses.iter().map(|t| tokens(t)).sum();
    let all: u64 = texts.iter().map(|t| tokens(t)).sum();
    assert_eq!(summary.tokens_paid, paid);
    assert_eq!(summary.batch_tokens, paid);
    assert_eq!(summary.tokens_saved, all - paid);
    let cp = checkpoint(&opts);
    assert!(cp.complete && cp.batches.is_empty(), "{cp:?}");

    assert_cached(&scratch, vendor, &texts).await;
}

#[tokio::test]
async fn failed_lines_fall_back_to_synchronous_calls() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    vendor.fail_batch_input(text("two"));
    let settings = settings(&scratch, &vendor, &[]);
    let texts = ["one", "two", "three"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("batch warm");

    assert_eq!(vendor.batch_ids().len(), 1);
    assert_eq!(
        synchronous(&vendor),
        vec![text("two")],
        "only the failed line"
    );
    assert_eq!(summary.batch_inputs, 2);
    assert_eq!(summary.batch_fallbacks, 1);
    assert_eq!(summary.embedded, 3);
    assert_eq!(summary.batch_tokens, tokens("one") + tokens("three"));
    assert_eq!(
        summary.tokens_paid,
        tokens("one") + tokens("two") + tokens("three")
    );
    assert!(summary.to_string().contains("1 fell back"), "{summary}");
    assert_cached(&scratch, vendor, &texts).await;
}

#[rstest]
#[case::expired(BatchFate::Expire)]
#[case::failed(BatchFate::Fail)]
#[case::cancelled(BatchFate::Cancel)]
#[tokio::test]
async fn an_unfinished_batch_falls_back(#[case] fate: BatchFate) {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    vendor.push_batch_fate(fate);
    let settings = settings(&scratch, &vendor, &[]);
    let texts = ["one", "two", "three"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("batch warm");

    let ids = vendor.batch_ids();
    assert_eq!(ids.len(), 1);
    let status = vendor.batch_status(&ids[0]);
    let wanted = match fate {
        BatchFate::Expire => "expired",
        BatchFate::Fail => "failed",
        _ => "cancelled",
    };
    assert_eq!(status, Some(wanted));
    let mut sync = synchronous(&vendor);
    sync.sort_by_key(|i| format!("{i:?}"));
    let mut expected: Vec<InputItem> = texts.iter().map(|t| text(t)).collect();
    expected.sort_by_key(|i| format!("{i:?}"));
    assert_eq!(sync, expected, "every line fell back, once");
    assert_eq!(summary.batch_inputs, 0);
    assert_eq!(summary.batch_fallbacks, 3);
    assert_eq!(summary.batch_tokens, 0);
    assert_eq!(summary.usd_batch_saved, 0.0);
    assert!(summary.complete);
    assert_cached(&scratch, vendor, &texts).await;
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn a_rerun_collects_the_submitted_batch_without_paying_again(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    vendor.hold_batches(true);
    let settings = settings(&scratch, &vendor, &[]);
    let texts = ["one", "two", "three", "two"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let opts = options(&path);

    let err = interrupted_once_submitted(&settings, &opts, &vendor).await;
    let WarmError::Stopped { cause, summary } = &err else {
        panic!("expected a stop, got {err}");
    };
    assert!(matches!(cause, Stop::Interrupted), "{cause}");
    assert_eq!(summary.checkpoint_lines, 0);
    let ids = vendor.batch_ids();
    assert_eq!(ids.len(), 1);
    let cp = checkpoint(&opts);
    assert_eq!(cp.lines, 0);
    assert_eq!(cp.batches.len(), 1);
    assert_eq!(cp.batches[0].id, ids[0]);
    assert_eq!(cp.batches[0].requests, 3);
    assert_eq!((cp.batches[0].first_line, cp.batches[0].last_line), (1, 4));

    // Its state can be followed meanwhile.
    let status = follow(&settings, &opts).await;
    assert!(status.contains(&ids[0]), "{status}");
    assert!(status.contains("lines 1-4"), "{status}");
    assert!(
        status.contains("validating") || status.contains("in_progress"),
        "{status}"
    );
    // The same from the command line.
    let file = path.to_str().expect("utf-8 path");
    let cli = embgate(&["warm", file, "--batch-api", "--status"])
        .envs(scratch.home.env())
        .env("EMBGATE__UPSTREAM__BASE_URL", vendor.base_url())
        .env("EMBGATE__UPSTREAM__API_KEY", "sk-test")
        .env("EMBGATE__AUTH__MODE", "open")
        .output()
        .await
        .expect("runs");
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{printed}");
    assert!(
        printed.contains(&ids[0]) && printed.contains("lines 1-4"),
        "{printed}"
    );

    // A plain run may not skip it.
    let plain = WarmOptions {
        batch_api: false,
        ..opts.clone()
    };
    let refused = warm::warm(&settings, &plain).await.expect_err("refused");
    assert!(refused.to_string().contains("--batch-api"), "{refused}");

    vendor.hold_batches(false);
    let summary: WarmSummary = warm::warm(&settings, &opts)
        .await
        .expect("the rerun completes");
    assert_eq!(vendor.batch_ids(), ids, "nothing submitted again");
    assert!(
        synchronous(&vendor).is_empty(),
        "nothing paid synchronously"
    );
    assert!(summary.complete);
    assert_eq!(summary.batches, 1);
    assert_eq!(summary.batch_inputs, 3);
    assert_eq!(summary.embedded, 3);
    assert_eq!(summary.tokens_saved, tokens("two"), "the repeat");
    let cp = checkpoint(&opts);
    assert!(cp.complete && cp.batches.is_empty(), "{cp:?}");
    let status = follow(&settings, &opts).await;
    assert!(status.contains("0 batches in flight"), "{status}");
    assert_cached(&scratch, vendor, &texts).await;
}

#[tokio::test]
async fn batch_spend_is_priced_as_such_in_the_summary_and_the_ledger() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let settings = settings(
        &scratch,
        &vendor,
        &[("EMBGATE__PRICES__BATCH_DISCOUNT", "0.4")],
    );
    let price = settings.prices[SMALL];
    let first = write(&scratch, "first.jsonl", &["cached"]);
    let sync = WarmOptions {
        batch_api: false,
        ..options(&first)
    };
    let before = warm::warm(&settings, &sync).await.expect("sync warm");

    let texts = ["cached", "fresh", "new", "cached"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("batch warm");

    let paid = tokens("fresh") + tokens("new");
    let saved = 2 * tokens("cached");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert_eq!(summary.tokens_paid, paid);
    assert_eq!(summary.tokens_saved, saved);
    assert!(
        close(summary.usd_paid, paid as f64 * price * 0.4 / 1e6),
        "{summary:?}"
    );
    assert!(
        close(summary.usd_saved, saved as f64 * price / 1e6),
        "{summary:?}"
    );
    assert!(
        close(summary.usd_batch_saved, paid as f64 * price * 0.6 / 1e6),
        "{summary:?}"
    );
    let printed = summary.to_string();
    assert!(
        printed.contains("saved over synchronous calls"),
        "{printed}"
    );

    let spent = in_ledger(&settings, Kind::SpentUsd).await;
    assert!(
        close(spent, before.usd_paid + summary.usd_paid),
        "ledger {spent}"
    );
    let batch = in_ledger(&settings, Kind::BatchSpentUsd).await;
    assert!(
        close(batch, summary.usd_paid),
        "only this run's spend is batch: {batch}"
    );
}

#[tokio::test]
async fn an_azure_upstream_batches_through_its_own_paths() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let base = format!("http://{}", vendor.addr());
    let azure = [
        ("EMBGATE__UPSTREAMS__AZ__BASE_URL", base.as_str()),
        ("EMBGATE__UPSTREAMS__AZ__FLAVOUR", "azure"),
        ("EMBGATE__UPSTREAMS__AZ__API_KEY", "az-key"),
        ("EMBGATE__UPSTREAMS__AZ__API_VERSION", "2024-10-21"),
        ("EMBGATE__UPSTREAMS__AZ__MODELS", SMALL),
    ];
    let settings = settings(&scratch, &vendor, &azure);
    let texts = ["one", "two", "three"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("batch warm");
    assert_eq!(summary.batch_inputs, 3);
    assert_eq!(summary.batch_fallbacks, 0);

    let seen = vendor.requests_seen();
    assert!(
        seen.contains(&"POST /openai/files?api-version=2024-10-21".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"POST /openai/batches?api-version=2024-10-21".to_owned()),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|r| r.contains("/v1/")), "{seen:?}");
    assert_eq!(batched(&vendor).len(), 3);

    // A gateway with the same upstream finds them (the fake serves no Azure
    // embeddings route: a miss would fail).
    let mut env: Vec<(&str, &str)> = vec![
        ("EMBGATE__AUTH__MODE", "open"),
        ("EMBGATE__UPSTREAM__API_KEY", "sk-test"),
    ];
    env.extend(azure);
    let gw = TestGateway::start_in(Arc::clone(&scratch.home), vendor, &env).await;
    for t in texts {
        let (cache, body) = gw
            .embed(&serde_json::json!({"model": SMALL, "input": t}))
            .await;
        assert_eq!(cache, "hit", "{t}");
        assert_eq!(vectors(&body)[0], vendor_vector(SMALL, None, &text(t)));
    }
}

#[tokio::test]
async fn a_refresh_sends_each_input_once() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let settings = settings(
        &scratch,
        &vendor,
        &[("EMBGATE__BATCH_API__MAX_REQUESTS_PER_BATCH", "2")],
    );
    let texts = ["a", "b", "c", "a"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let sync = WarmOptions {
        batch_api: false,
        ..options(&path)
    };
    warm::warm(&settings, &sync).await.expect("sync warm");
    vendor.reset_records();

    let opts = WarmOptions {
        batch: 1,
        refresh: true,
        restart: true,
        ..options(&path)
    };
    let summary = warm::warm(&settings, &opts).await.expect("refresh");
    let mut sent = batched(&vendor);
    sent.sort_by_key(|i| format!("{i:?}"));
    assert_eq!(sent, vec![text("a"), text("b"), text("c")]);
    assert_eq!(vendor.batch_ids().len(), 2, "two windows");
    assert!(
        synchronous(&vendor).is_empty(),
        "the repeat is not fetched again"
    );
    assert_eq!(summary.batch_inputs, 3);
    assert_eq!(summary.embedded, 3);
}

#[tokio::test]
async fn a_batch_the_vendor_does_not_know_falls_back() {
    let scratch = Scratch::new(Backend::Redis);
    let first = FakeVendor::start().await;
    first.hold_batches(true);
    let texts = ["one", "two"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let opts = options(&path);
    interrupted_once_submitted(&settings(&scratch, &first, &[]), &opts, &first).await;
    assert_eq!(checkpoint(&opts).batches.len(), 1);

    // Another vendor account (here, another vendor) has never heard of it.
    let other = FakeVendor::start().await;
    let settings = settings(&scratch, &other, &[]);
    let summary = warm::warm(&settings, &opts).await.expect("completes");
    assert!(other.batch_ids().is_empty(), "nothing submitted again");
    let mut sync = synchronous(&other);
    sync.sort_by_key(|i| format!("{i:?}"));
    assert_eq!(sync, vec![text("one"), text("two")]);
    assert_eq!(summary.batch_fallbacks, 2);
    assert!(checkpoint(&opts).batches.is_empty());
}

#[tokio::test]
async fn batch_spend_has_a_metric_of_its_own_and_counts_in_the_spend() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let settings = settings(
        &scratch,
        &vendor,
        &[("EMBGATE__BATCH_PRICES__TEXT-EMBEDDING-3-SMALL", "0.015")],
    );
    let metrics = Arc::new(embgate::metrics::Metrics::new().expect("metrics"));
    let store = open_store(&settings).await;
    let engine =
        embgate::Engine::with_store(&settings, store, Arc::clone(&metrics)).expect("engine");
    engine.accounting.paid("t", SMALL, 1_000_000, 4);
    engine.accounting.paid_batch("t", SMALL, 2_000_000, 8);
    let text = String::from_utf8(metrics.render().expect("render")).expect("utf-8");
    let value = |sample: &str| metric_value(&text, sample);
    let label = format!("{{model=\"{SMALL}\"}}");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(
        value(&format!("embgate_upstream_batch_spent_usd_total{label}")),
        0.03
    ));
    assert!(close(
        value(&format!("embgate_upstream_spent_usd_total{label}")),
        0.05
    ));
    assert_eq!(value(&format!("embgate_upstream_tokens_total{label}")), 3e6);
    assert_eq!(
        value(&format!("embgate_upstream_inputs_total{label}")),
        12.0
    );
}

#[tokio::test]
async fn input_files_stay_within_the_byte_limit() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let settings = settings(
        &scratch,
        &vendor,
        &[("EMBGATE__BATCH_API__MAX_FILE_BYTES", "1")],
    );
    let texts = ["one", "two", "three"];
    let path = write(&scratch, "docs.jsonl", &texts);
    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("batch warm");
    assert_eq!(vendor.batch_ids().len(), 3, "a line a file, past the limit");
    assert_eq!(summary.batches, 3);
    assert_eq!(summary.batch_inputs, 3);
}

#[tokio::test]
async fn a_vendor_without_the_batch_api_stops_the_run_before_any_spend() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let elsewhere = format!("{}/no-batches", vendor.base_url());
    let settings = settings(
        &scratch,
        &vendor,
        &[("EMBGATE__UPSTREAM__BASE_URL", elsewhere.as_str())],
    );
    let path = write(&scratch, "docs.jsonl", &["one", "two"]);
    let opts = options(&path);
    let err = warm::warm(&settings, &opts).await.expect_err("refused");
    let WarmError::Stopped { cause, summary } = &err else {
        panic!("expected a stop, got {err}");
    };
    assert_eq!(cause.vendor_status(), Some(404), "{cause}");
    assert_eq!(summary.checkpoint_lines, 0);
    assert_eq!(summary.tokens_paid, 0);
    assert!(vendor.batch_ids().is_empty());
    assert_eq!(vendor.total_inputs_embedded(), 0);
    let recorded = warm::read_checkpoint(&opts.checkpoint_path()).expect("readable");
    assert!(recorded.is_none_or(|cp| cp.batches.is_empty()));
}

#[tokio::test]
async fn a_native_vendor_upstream_is_refused_before_any_lookup() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let base = vendor.base_url();
    let cohere = [
        ("EMBGATE__UPSTREAMS__CO__BASE_URL", base.as_str()),
        ("EMBGATE__UPSTREAMS__CO__FLAVOUR", "cohere"),
        ("EMBGATE__UPSTREAMS__CO__API_KEY", "co-key"),
        ("EMBGATE__UPSTREAMS__CO__MODELS", "embed-*"),
    ];
    let settings = settings(&scratch, &vendor, &cohere);
    let lines = [r#"{"input": "one", "model": "embed-v4.0"}"#.to_owned()];
    let path = scratch.write("docs.jsonl", &lines);
    let err = warm::warm(&settings, &options(&path))
        .await
        .expect_err("refused");
    let WarmError::Stopped { cause, summary } = &err else {
        panic!("expected a stop, got {err}");
    };
    assert!(matches!(cause, Stop::Invalid { .. }), "{cause}");
    assert!(cause.to_string().contains("no Batch API"), "{cause}");
    assert_eq!(summary.tokens_paid, 0);
    assert!(vendor.batch_ids().is_empty());
    assert!(
        vendor.requests_seen().is_empty(),
        "{:?}",
        vendor.requests_seen()
    );
}

#[rstest]
#[case::refused(429, true)]
#[case::failed(500, false)]
#[tokio::test]
async fn only_a_refused_batch_creation_is_tried_again(#[case] status: u16, #[case] again: bool) {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    vendor.push_batch_create_error(status);
    let settings = settings(&scratch, &vendor, &[]);
    let path = write(&scratch, "docs.jsonl", &["one"]);
    let result = warm::warm(&settings, &options(&path)).await;
    let creations = vendor
        .requests_seen()
        .iter()
        .filter(|r| *r == "POST /v1/batches")
        .count();
    match again {
        true => {
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(creations, 2);
        }
        false => {
            let err = result.expect_err("the run stops");
            let WarmError::Stopped { cause, .. } = &err else {
                panic!("expected a stop, got {err}");
            };
            assert_eq!(cause.vendor_status(), Some(500));
            assert_eq!(creations, 1, "a batch that may exist is not created twice");
        }
    }
}
