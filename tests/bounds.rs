//! What callers and vendors cannot make the gateway hold: vendor answers
//! past what a call can need, and metric labels for invented model names.

mod common;

use common::*;
use fake_vendor::{FakeVendor, Fault};
use serde_json::{Value, json};

/// The resident memory of this process, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A vendor streaming an endless answer is cut off at what the call could
/// need: the caller gets a 502 (nothing cached), and memory stays bounded.
#[tokio::test]
async fn an_endless_vendor_answer_is_cut_off() {
    let gw = TestGateway::start().await;
    let before = rss();
    for _ in 0..3 {
        gw.vendor.push_fault(Fault::EndlessBody);
        let response = gw
            .post(&json!({"model": SMALL, "input": ["a", "b"], "dimensions": 8}))
            .await;
        assert_eq!(response.status(), 502);
        let err: Value = response.json().await.expect("json");
        assert_eq!(err["error"]["code"], "upstream_response_too_large");
    }
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "grew by {grown} bytes");
    assert!(gw.entries().await.is_empty());
    // The next answer is normal.
    let (cache, _) = gw
        .embed(&json!({"model": SMALL, "input": ["a", "b"], "dimensions": 8}))
        .await;
    assert_eq!(cache, "miss");
}

/// Thousands of invented model names leave no series behind: a model is a
/// label only once it is priced, configured or answered by the vendor, and
/// learned models are bounded by `metrics.max_models`.
#[tokio::test]
async fn invented_model_names_do_not_grow_the_metrics() {
    let gw = TestGateway::start().await;
    for i in 0..2000 {
        let response = gw
            .post(&json!({"model": format!("invented-model-{i}"), "input": "x"}))
            .await;
        assert_eq!(response.status(), 404);
    }
    // A real model the vendor answers for, though nobody priced it.
    gw.embed(&json!({"model": "acme-embed-v1", "input": "real"}))
        .await;
    let metrics = gw.metrics().await;
    assert!(
        !metrics.contains("invented-model"),
        "no series for invented models"
    );
    assert!(metrics.contains("model=\"acme-embed-v1\""));
    assert_eq!(
        metric_value(
            &metrics,
            "embgate_tenant_requests_total{tenant=\"default\"}"
        ),
        2001.0
    );
    assert!(
        metrics.len() < 64 * 1024,
        "{} bytes of metrics",
        metrics.len()
    );

    // With no room for learned models, real but unconfigured ones are `other`.
    let strict = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__METRICS__MAX_MODELS", "0")],
    )
    .await;
    strict
        .embed(&json!({"model": "acme-embed-v1", "input": "real"}))
        .await;
    let metrics = strict.metrics().await;
    assert!(!metrics.contains("acme-embed-v1"));
    assert_eq!(
        metric_value(
            &metrics,
            "embgate_cache_lookups_total{model=\"other\",result=\"miss\"}"
        ),
        1.0
    );
}
