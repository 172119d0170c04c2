//! `embgate warm`: filling the cache from a JSONL file, end to end against
//! a real store (Redis or embedded) and the fake vendor, including resuming
//! after a stop.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use embgate::protocol::Input;
use embgate::warm::{self, Checkpoint, Stop, WarmError, WarmOptions};
use fake_vendor::{FakeVendor, Fault, InputItem};
use rstest::rstest;
use serde_json::{Value, json};

const LARGE: &str = "text-embedding-3-large";

fn options(file: &Path) -> WarmOptions {
    WarmOptions {
        quiet: true,
        ..WarmOptions::new(file)
    }
}

fn checkpoint(options: &WarmOptions) -> Checkpoint {
    warm::read_checkpoint(&options.checkpoint_path())
        .expect("readable checkpoint")
        .expect("a checkpoint exists")
}

/// One input as the test sees it: what the vendor records, and what a
/// request body carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Case {
    model: &'static str,
    dimensions: Option<u32>,
    item: InputItem,
}

impl Case {
    fn small(text: &str) -> Case {
        Case {
            model: SMALL,
            dimensions: None,
            item: InputItem::Text(text.into()),
        }
    }

    fn tokens(&self) -> u64 {
        u64::from(fake_vendor::tokens(self.model, &self.item).expect("tokens"))
    }

    fn body(&self) -> Value {
        let input = match &self.item {
            InputItem::Text(t) => json!(t),
            InputItem::Tokens(t) => json!(t),
        };
        let mut body = json!({"model": self.model, "input": input});
        if let Some(d) = self.dimensions {
            body["dimensions"] = json!(d);
        }
        body
    }
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn fills_the_cache_fetching_each_distinct_input_once(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    let token_case = Case {
        model: SMALL,
        dimensions: None,
        item: InputItem::Tokens(vec![1, 2, 3]),
    };
    let large = |t: &str| Case {
        model: LARGE,
        dimensions: Some(16),
        item: InputItem::Text(t.into()),
    };
    // (line, the input it holds, if valid)
    let lines: Vec<(String, Option<Case>)> = vec![
        (r#""alpha""#.into(), Some(Case::small("alpha"))),
        (r#"{"input": "beta"}"#.into(), Some(Case::small("beta"))),
        (r#"{"input": [1, 2, 3]}"#.into(), Some(token_case.clone())),
        (r#""alpha""#.into(), Some(Case::small("alpha"))),
        (
            format!(r#"{{"input": "alpha", "model": "{LARGE}", "dimensions": 16}}"#),
            Some(large("alpha")),
        ),
        (
            format!(r#"{{"input": "gamma", "model": "{LARGE}", "dimensions": 16}}"#),
            Some(large("gamma")),
        ),
        (
            format!(r#"{{"dimensions": 16, "input": "gamma", "model": "{LARGE}"}}"#),
            Some(large("gamma")),
        ),
        ("{this is not json".into(), None),
        (r#"{"input": ""}"#.into(), None),
        (String::new(), None),
        ("[1, 2, 3]".into(), Some(token_case.clone())),
        (r#""delta""#.into(), Some(Case::small("delta"))),
        (
            format!(r#"{{"input": "beta", "model": "{SMALL}"}}"#),
            Some(Case::small("beta")),
        ),
    ];
    let text: Vec<String> = lines.iter().map(|(l, _)| l.clone()).collect();
    let path = scratch.write("inputs.jsonl", &text);
    let cases: Vec<Case> = lines.iter().filter_map(|(_, c)| c.clone()).collect();
    let distinct: HashSet<Case> = cases.iter().cloned().collect();
    assert_eq!(distinct.len(), 6);

    let settings = scratch.settings(&vendor, &[]);
    let opts = WarmOptions {
        batch: 2,
        concurrency: 3,
        ..options(&path)
    };
    let summary = warm::warm(&settings, &opts).await.expect("warm succeeds");

    assert!(summary.complete);
    assert!(!summary.already_complete);
    assert_eq!(summary.total_lines, 13);
    assert_eq!(summary.lines, 13);
    assert_eq!(summary.checkpoint_lines, 13);
    assert_eq!(summary.resumed_lines, 0);
    assert_eq!(summary.bad_lines, 2);
    let bad: Vec<u64> = summary.bad.iter().map(|b| b.line).collect();
    assert_eq!(bad, [8, 9]);
    assert!(
        summary.bad[0].reason.contains("not JSON"),
        "{:?}",
        summary.bad
    );
    assert!(summary.bad[1].reason.contains("empty"), "{:?}", summary.bad);
    assert_eq!(summary.inputs, cases.len() as u64);
    assert_eq!(summary.embedded, 6);
    assert_eq!(summary.cached, cases.len() as u64 - 6);

    let prompt: u64 = cases.iter().map(Case::tokens).sum();
    let paid: u64 = distinct.iter().map(Case::tokens).sum();
    assert_eq!(summary.tokens_paid, paid);
    assert_eq!(summary.tokens_saved, prompt - paid);
    let usd = |cases: &mut dyn Iterator<Item = &Case>| -> f64 {
        cases
            .map(|c| c.tokens() as f64 * settings.prices[c.model] / 1e6)
            .sum()
    };
    let usd_paid = usd(&mut distinct.iter());
    let usd_saved = usd(&mut cases.iter()) - usd_paid;
    assert!((summary.usd_paid - usd_paid).abs() < 1e-12, "{summary:?}");
    assert!((summary.usd_saved - usd_saved).abs() < 1e-12, "{summary:?}");
    assert!(summary.unpriced_models.is_empty());
    let store = open_store(&settings).await;
    let ledger = embgate::accounting::ledger::read_ledger(store.as_ref(), None)
        .await
        .expect("ledger");
    drop(store);
    let spent: f64 = ledger
        .iter()
        .filter(|(account, _)| account.kind == embgate::accounting::ledger::Kind::SpentTokens)
        .map(|(_, tokens)| tokens)
        .sum();
    assert_eq!(
        spent as u64, summary.tokens_paid,
        "the run is in the all-time ledger"
    );
    let printed = summary.to_string();
    assert!(printed.contains("13 of 13 lines done"), "{printed}");

    let cp = checkpoint(&opts);
    assert!(cp.complete);
    assert_eq!(cp.lines, 13);
    assert_eq!(cp.offset, std::fs::metadata(&path).expect("metadata").len());

    // The vendor saw each distinct input once; every input is now a hit for
    // the server, with the vendor's vector.
    for case in &distinct {
        assert_eq!(
            vendor.times_embedded(case.model, case.dimensions, &case.item),
            1,
            "{case:?}"
        );
    }
    assert_eq!(vendor.total_inputs_embedded(), 6);
    let gw = TestGateway::start_in(
        Arc::clone(&scratch.home),
        vendor,
        &[
            ("EMBGATE__AUTH__MODE", "open"),
            ("EMBGATE__UPSTREAM__API_KEY", "sk-test"),
        ],
    )
    .await;
    for case in &cases {
        let input = match &case.item {
            InputItem::Text(t) => Input::Text(t.clone()),
            InputItem::Tokens(t) => Input::Tokens(t.clone()),
        };
        let key = gw.key(case.model, case.dimensions, &input);
        assert!(gw.entries().await.contains(&key), "{case:?} stored");
        let (cache, body) = gw.embed(&case.body()).await;
        assert_eq!(cache, "hit", "{case:?}");
        assert_eq!(
            vectors(&body)[0],
            vendor_vector(case.model, case.dimensions, &case.item)
        );
    }
    assert_eq!(gw.vendor.total_inputs_embedded(), 6, "no vendor call since");
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn a_stopped_run_resumes_where_the_checkpoint_ends(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    let texts: Vec<String> = (0..40).map(|i| format!("document number {i}")).collect();
    let lines: Vec<String> = texts
        .iter()
        .map(|t| json!({"input": t, "dimensions": 8}).to_string())
        .collect();
    let path = scratch.write("docs.jsonl", &lines);
    let settings = scratch.settings(&vendor, &[]);
    let opts = WarmOptions {
        batch: 4,
        concurrency: 2,
        ..options(&path)
    };

    // Three requests succeed, the fourth is refused for good.
    for _ in 0..3 {
        vendor.push_fault(Fault::Delay(Duration::ZERO));
    }
    vendor.push_fault(Fault::Status {
        status: 400,
        retry_after_secs: None,
    });
    let err = warm::warm(&settings, &opts)
        .await
        .expect_err("the vendor error stops the run");
    let WarmError::Stopped { cause, summary } = &err else {
        panic!("expected a stop, got {err}");
    };
    assert!(matches!(cause, Stop::Vendor { .. }), "{cause}");
    assert_eq!(cause.vendor_status(), Some(400));
    let message = err.to_string();
    assert!(message.contains("400"), "{message}");
    assert!(message.contains("a rerun resumes"), "{message}");
    assert!(!summary.complete);

    // The checkpoint covers the batches before the refused one, and only those.
    let cp = checkpoint(&opts);
    assert!(!cp.complete);
    assert!(
        cp.lines.is_multiple_of(4) && (4..=12).contains(&cp.lines),
        "checkpoint at {} lines",
        cp.lines
    );
    assert_eq!(summary.checkpoint_lines, cp.lines);
    let offset: usize = lines[..cp.lines as usize].iter().map(|l| l.len() + 1).sum();
    assert_eq!(cp.offset, offset as u64);
    let first_run = vendor.total_inputs_embedded();
    assert_eq!(summary.embedded, first_run);

    let summary = warm::warm(&settings, &opts)
        .await
        .expect("the rerun completes");
    assert!(summary.complete);
    assert_eq!(summary.resumed_lines, cp.lines);
    assert_eq!(summary.lines, 40 - cp.lines);
    assert_eq!(first_run + summary.embedded, 40);
    for t in &texts {
        assert_eq!(
            vendor.times_embedded(SMALL, Some(8), &text(t)),
            1,
            "{t} embedded once over both runs"
        );
    }
    let cp = checkpoint(&opts);
    assert!(cp.complete);
    assert_eq!(cp.lines, 40);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn a_finished_file_is_not_read_again_until_it_grows(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    let mut lines: Vec<String> = ["one", "two", "three"]
        .iter()
        .map(|t| json!(t).to_string())
        .collect();
    let path = scratch.write("small.jsonl", &lines);
    let settings = scratch.settings(&vendor, &[]);
    let opts = options(&path);

    let first = warm::warm(&settings, &opts).await.expect("first run");
    assert!(first.complete);
    assert_eq!((first.inputs, first.embedded), (3, 3));
    let requests = vendor.embedding_requests().len();

    let again = warm::warm(&settings, &opts).await.expect("rerun");
    assert!(again.already_complete);
    assert!(again.complete);
    assert_eq!((again.lines, again.inputs, again.requests), (0, 0, 0));
    assert_eq!(again.total_lines, 3);
    assert!(again.to_string().contains("nothing to do"), "{again}");
    assert_eq!(vendor.embedding_requests().len(), requests);

    // Lines appended later are warmed, and only those.
    lines.push(json!("four").to_string());
    let path = scratch.write("small.jsonl", &lines);
    let grown = warm::warm(&settings, &options(&path))
        .await
        .expect("run on the grown file");
    assert!(!grown.already_complete);
    assert_eq!(grown.resumed_lines, 3);
    assert_eq!((grown.lines, grown.inputs, grown.embedded), (1, 1, 1));
    assert_eq!(checkpoint(&opts).lines, 4);

    // --restart reads everything again, all of it from the cache.
    let restarted = warm::warm(
        &settings,
        &WarmOptions {
            restart: true,
            ..options(&path)
        },
    )
    .await
    .expect("restart");
    assert_eq!((restarted.lines, restarted.inputs), (4, 4));
    assert_eq!((restarted.embedded, restarted.cached), (0, 4));
    assert_eq!(restarted.tokens_paid, 0);
    assert!(restarted.tokens_saved > 0);
    assert_eq!(vendor.total_inputs_embedded(), 4);
}

#[tokio::test]
async fn nothing_is_paid_for_without_a_store_or_with_a_stale_checkpoint() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let path = scratch.write("x.jsonl", &[json!("x").to_string()]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let settings = scratch.settings(
        &vendor,
        &[(
            "EMBGATE__STORE__URL",
            format!("redis://127.0.0.1:{}/0", dead.port()),
        )],
    );
    let err = warm::warm(&settings, &options(&path))
        .await
        .expect_err("no store");
    assert!(matches!(err, WarmError::StoreUnavailable(_)), "{err}");

    let settings = scratch.settings(&vendor, &[]);
    let opts = options(&path);
    std::fs::write(
        opts.checkpoint_path(),
        r#"{"version":1,"offset":500,"lines":9,"complete":false}"#,
    )
    .expect("write checkpoint");
    let err = warm::warm(&settings, &opts)
        .await
        .expect_err("checkpoint past the end");
    assert!(matches!(err, WarmError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("--restart"), "{err}");

    std::fs::write(opts.checkpoint_path(), "garbage").expect("write checkpoint");
    let err = warm::warm(&settings, &opts)
        .await
        .expect_err("unreadable checkpoint");
    assert!(matches!(err, WarmError::Checkpoint { .. }), "{err}");
    assert!(vendor.embedding_requests().is_empty());

    let err = warm::warm(
        &settings,
        &WarmOptions {
            batch: 0,
            ..options(&path)
        },
    )
    .await
    .expect_err("bad options");
    assert!(matches!(err, WarmError::Options(_)), "{err}");
}

#[tokio::test]
async fn a_file_of_bad_lines_completes_without_a_vendor_call() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let lines: Vec<String> = vec![
        "nope".into(),
        r#"{"input": "x", "encoding_format": "base64"}"#.into(),
        r#"["a", "b"]"#.into(),
        String::new(),
        r#"{"input": []}"#.into(),
    ];
    let path = scratch.write("bad.jsonl", &lines);
    let summary = warm::warm(&scratch.settings(&vendor, &[]), &options(&path))
        .await
        .expect("completes");
    assert!(summary.complete);
    assert_eq!(
        (summary.lines, summary.bad_lines, summary.inputs),
        (5, 4, 0)
    );
    let bad: Vec<u64> = summary.bad.iter().map(|b| b.line).collect();
    assert_eq!(bad, [1, 2, 3, 5]);
    assert!(vendor.embedding_requests().is_empty());
    assert!(checkpoint(&options(&path)).complete);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn an_interrupted_run_finishes_its_requests_in_flight_and_resumes(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(50));
    let texts: Vec<String> = (0..40).map(|i| format!("paragraph {i}")).collect();
    let lines: Vec<String> = texts.iter().map(|t| json!(t).to_string()).collect();
    let path = scratch.write("paragraphs.jsonl", &lines);
    let settings = scratch.settings(&vendor, &[]);
    let opts = WarmOptions {
        batch: 4,
        concurrency: 2,
        ..options(&path)
    };

    let after_three_requests = async {
        while vendor.embedding_requests().len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let err = warm::warm_until(&settings, &opts, after_three_requests)
        .await
        .expect_err("interrupted");
    let WarmError::Stopped { cause, summary } = &err else {
        panic!("expected a stop, got {err}");
    };
    assert!(matches!(cause, Stop::Interrupted), "{cause}");
    // Every request that reached the vendor finished and counts.
    let sent = vendor.embedding_requests().len() as u64;
    assert!((3..10).contains(&sent), "{sent} requests");
    let cp = checkpoint(&opts);
    assert!(!cp.complete);
    assert_eq!(cp.lines, 4 * sent);
    assert_eq!(summary.lines, 4 * sent);
    assert_eq!(summary.embedded, 4 * sent);

    let summary = warm::warm(&settings, &opts).await.expect("resumes");
    assert!(summary.complete);
    assert_eq!(summary.resumed_lines, 4 * sent);
    for t in &texts {
        assert_eq!(vendor.times_embedded(SMALL, None, &text(t)), 1, "{t}");
    }
}

#[tokio::test]
async fn model_names_over_the_limit_are_refused() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let settings = scratch.settings(&vendor, &[]);
    let long = "m".repeat(settings.limits.max_model_bytes + 1);
    let lines = [
        format!(r#"{{"input": "alpha", "model": "{long}"}}"#),
        r#""beta""#.to_owned(),
    ];
    let path = scratch.write("inputs.jsonl", &lines);

    let opts = WarmOptions {
        model: long.clone(),
        ..options(&path)
    };
    let err = warm::warm(&settings, &opts).await.expect_err("refused");
    assert!(
        matches!(&err, WarmError::Options(m) if m.contains("--model") && m.contains("too long")),
        "{err}"
    );
    assert_eq!(vendor.total_inputs_embedded(), 0);

    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("warm succeeds");
    assert_eq!(summary.bad_lines, 1);
    assert!(summary.bad[0].reason.contains("too long"), "{summary:?}");
    assert_eq!(vendor.total_inputs_embedded(), 1);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn refresh_fetches_again_and_no_store_keeps_nothing(#[case] backend: Backend) {
    let scratch = Scratch::new(backend);
    let vendor = FakeVendor::start().await;
    let settings = scratch.settings(&vendor, &[]);
    let known = scratch.write("known.jsonl", &[r#""one""#.into(), r#""two""#.into()]);
    warm::warm(&settings, &options(&known))
        .await
        .expect("first run");

    let refresh = WarmOptions {
        refresh: true,
        restart: true,
        ..options(&known)
    };
    let summary = warm::warm(&settings, &refresh).await.expect("refresh");
    assert_eq!(summary.embedded, 2, "{summary:?}");
    for t in ["one", "two"] {
        assert_eq!(vendor.times_embedded(SMALL, None, &text(t)), 2, "{t}");
    }

    let passing = scratch.write("passing.jsonl", &[r#""one""#.into(), r#""three""#.into()]);
    let no_store = WarmOptions {
        no_store: true,
        ..options(&passing)
    };
    let summary = warm::warm(&settings, &no_store).await.expect("no store");
    assert_eq!((summary.embedded, summary.cached), (1, 1), "{summary:?}");
    let again = WarmOptions {
        no_store: true,
        restart: true,
        ..options(&passing)
    };
    let summary = warm::warm(&settings, &again).await.expect("again");
    assert_eq!(summary.embedded, 1, "three was never stored: {summary:?}");
    assert_eq!(vendor.times_embedded(SMALL, None, &text("three")), 2);
}

#[tokio::test]
async fn a_native_vendor_is_warmed_with_its_defaults_keyed_as_requests_key_them() {
    let scratch = Scratch::new(Backend::Redis);
    let vendor = FakeVendor::start().await;
    let cohere = vendor.cohere_url();
    let native = [
        ("EMBGATE__UPSTREAMS__COHERE__FLAVOUR", "cohere".to_owned()),
        ("EMBGATE__UPSTREAMS__COHERE__BASE_URL", cohere.clone()),
        ("EMBGATE__UPSTREAMS__COHERE__MODELS", "embed-*".to_owned()),
        ("EMBGATE__UPSTREAMS__COHERE__API_KEY", "co-key".to_owned()),
    ];
    let path = scratch.write(
        "cohere.jsonl",
        &[r#"{"input": "warm me", "model": "embed-v4.0"}"#.to_owned()],
    );
    let settings = scratch.settings(&vendor, &native);
    let summary = warm::warm(&settings, &options(&path))
        .await
        .expect("warm succeeds");
    assert!(summary.complete);
    assert_eq!(vendor.total_inputs_embedded(), 1);

    let env: Vec<(&str, &str)> = [
        ("EMBGATE__AUTH__MODE", "open"),
        ("EMBGATE__UPSTREAM__API_KEY", "sk-test"),
    ]
    .into_iter()
    .chain(native.iter().map(|(k, v)| (*k, v.as_str())))
    .collect();
    let gw = TestGateway::start_in(Arc::clone(&scratch.home), vendor, &env).await;
    let (cache, body) = gw
        .embed(&json!({"model": "embed-v4.0", "input": "warm me", "input_type": "search_document"}))
        .await;
    assert_eq!(cache, "hit");
    let want = fake_vendor::native_embedding("embed-v4.0", "search_document", "warm me", None)
        .expect("known");
    assert_eq!(vectors(&body)[0], want);
}
