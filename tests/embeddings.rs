//! The core contract of POST /v1/embeddings, end to end: a real store
//! (Redis, and the embedded store where the store matters), the fake
//! vendor, the gateway on a loopback port.

mod common;

use std::time::Duration;

use common::*;
use embgate::protocol::Input;
use fake_vendor::{Fault, InputItem};
use rstest::rstest;
use serde_json::{Value, json};

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn miss_then_hit_returns_the_vendors_exact_vectors(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let body = json!({"model": SMALL, "input": ["alpha", "beta", "gamma"]});

    let (cache, first) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    let got = vectors(&first);
    for (i, t) in ["alpha", "beta", "gamma"].iter().enumerate() {
        assert_eq!(got[i], vendor_vector(SMALL, None, &text(t)), "input {i}");
        assert_eq!(got[i].len(), 1536);
    }
    assert_eq!(first["object"], "list");
    assert_eq!(first["model"], SMALL);
    assert_eq!(first["data"][0]["object"], "embedding");
    assert_eq!(gw.vendor.embedding_requests().len(), 1);

    gw.settled().await;
    let (cache, second) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(second, first, "a hit answers exactly like the miss did");
    assert_eq!(
        gw.vendor.embedding_requests().len(),
        1,
        "no second vendor call"
    );
}

#[tokio::test]
async fn usage_matches_what_the_vendor_bills() {
    let gw = TestGateway::start().await;
    let inputs = ["hello world", "the quick brown fox jumps", "hello world"];
    let (_, miss) = gw.embed(&json!({"model": SMALL, "input": inputs})).await;
    let billed: u64 = inputs
        .iter()
        .map(|t| u64::from(fake_vendor::tokens(SMALL, &text(t)).expect("tokens")))
        .sum();
    assert_eq!(miss["usage"]["prompt_tokens"], billed);
    assert_eq!(miss["usage"]["total_tokens"], billed);
    let (_, hit) = gw.embed(&json!({"model": SMALL, "input": inputs})).await;
    assert_eq!(hit["usage"], miss["usage"]);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn a_partial_batch_sends_only_the_misses_and_keeps_the_callers_order(
    #[case] backend: Backend,
) {
    let gw = TestGateway::on(backend).await;
    let dims = 8;
    let all: Vec<String> = (0..2048).map(|i| format!("document number {i}")).collect();
    let cached = &all[..2000];
    gw.embed(&json!({"model": SMALL, "input": cached, "dimensions": dims}))
        .await;
    gw.settled().await;
    gw.vendor.reset_records();

    // Interleave new and cached inputs, in an order of our own.
    let mut order: Vec<&String> = all.iter().collect();
    order.reverse();
    let (cache, body) = gw
        .embed(&json!({"model": SMALL, "input": order, "dimensions": dims, "encoding_format": "base64"}))
        .await;
    assert_eq!(cache, "partial");

    let calls = gw.vendor.embedding_requests();
    assert_eq!(calls.len(), 1, "one upstream call");
    let sent: Vec<InputItem> = calls[0].inputs.clone();
    assert_eq!(sent.len(), 48, "only the 48 misses go upstream");
    for item in &sent {
        let InputItem::Text(t) = item else {
            panic!("text expected")
        };
        assert!(!cached.contains(t), "{t} was cached");
    }
    assert_eq!(calls[0].encoding_format.as_deref(), Some("base64"));

    let got = vectors(&body);
    assert_eq!(got.len(), 2048);
    for (v, t) in got.iter().zip(&order) {
        assert_eq!(*v, vendor_vector(SMALL, Some(dims), &text(t)));
    }
    assert_eq!(
        gw.metric("embgate_cache_lookups_total{model=\"text-embedding-3-small\",result=\"miss\"}")
            .await,
        2048.0
    );
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn duplicates_in_one_request_are_fetched_once(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let (_, body) = gw
        .embed(&json!({"model": SMALL, "input": ["same", "other", "same", "same"]}))
        .await;
    let got = vectors(&body);
    assert_eq!(got[0], got[2]);
    assert_eq!(got[0], got[3]);
    assert_eq!(got[0], vendor_vector(SMALL, None, &text("same")));
    let calls = gw.vendor.embedding_requests();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].inputs, vec![text("same"), text("other")]);
}

#[tokio::test]
async fn float_and_base64_carry_the_same_vectors_from_cache_and_vendor() {
    let gw = TestGateway::start().await;
    let input = ["one", "two"];
    let (_, float_miss) = gw.embed(&json!({"model": SMALL, "input": input})).await;
    let (_, b64_hit) = gw
        .embed(&json!({"model": SMALL, "input": input, "encoding_format": "base64"}))
        .await;
    assert!(b64_hit["data"][0]["embedding"].is_string());
    assert!(float_miss["data"][0]["embedding"].is_array());
    assert_eq!(vectors(&float_miss), vectors(&b64_hit));

    let (_, b64_miss) = gw
        .embed(&json!({"model": SMALL, "input": ["three"], "encoding_format": "base64"}))
        .await;
    let (_, float_hit) = gw.embed(&json!({"model": SMALL, "input": ["three"]})).await;
    assert_eq!(vectors(&b64_miss), vectors(&float_hit));
    assert_eq!(
        vectors(&float_hit)[0],
        vendor_vector(SMALL, None, &text("three"))
    );
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn keys_are_separated_by_model_and_dimensions(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let variants = [
        json!({"model": SMALL, "input": "shared text"}),
        json!({"model": SMALL, "input": "shared text", "dimensions": 64}),
        json!({"model": SMALL, "input": "shared text", "dimensions": 32}),
        json!({"model": "text-embedding-3-large", "input": "shared text", "dimensions": 64}),
        json!({"model": "text-embedding-ada-002", "input": "shared text"}),
    ];
    for round in 0..2 {
        gw.settled().await;
        for v in &variants {
            let (cache, body) = gw.embed(v).await;
            assert_eq!(cache, if round == 0 { "miss" } else { "hit" }, "{v}");
            let model = v["model"].as_str().expect("model");
            let dims = v["dimensions"].as_u64().map(|d| d as u32);
            assert_eq!(
                vectors(&body)[0],
                vendor_vector(model, dims, &text("shared text")),
                "{v}"
            );
        }
    }
    assert_eq!(gw.vendor.embedding_requests().len(), variants.len());
}

#[tokio::test]
async fn token_arrays_are_cached_apart_from_text() {
    let gw = TestGateway::start().await;
    let tokens = vec![15339u32, 1917];
    let (_, one) = gw.embed(&json!({"model": SMALL, "input": tokens})).await;
    assert_eq!(
        vectors(&one)[0],
        vendor_vector(SMALL, None, &InputItem::Tokens(tokens.clone()))
    );
    assert_eq!(one["usage"]["prompt_tokens"], 2);
    let (cache, many) = gw
        .embed(&json!({"model": SMALL, "input": [tokens, [9906]]}))
        .await;
    assert_eq!(cache, "partial");
    assert_eq!(vectors(&many)[0], vectors(&one)[0]);
    assert_eq!(
        vectors(&many)[1],
        vendor_vector(SMALL, None, &InputItem::Tokens(vec![9906]))
    );
    let calls = gw.vendor.embedding_requests();
    assert_eq!(calls[1].inputs, vec![InputItem::Tokens(vec![9906])]);
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn entries_never_expire_and_stay_compact(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    gw.embed(&json!({"model": SMALL, "input": ["kept forever"]}))
        .await;
    let key = gw.key(SMALL, None, &Input::Text("kept forever".into()));
    assert_eq!(gw.entries().await, vec![key]);
    let len = gw.raw(&key).await.expect("stored").len();
    assert!(len <= 4 * 1536 + 64, "entry is {len} bytes");
    assert!(len >= 4 * 1536);
    if backend == Backend::Redis {
        let mut conn = gw.redis().await;
        let ttl: i64 = redis::cmd("TTL")
            .arg(gw.redis_key(&key))
            .query_async(&mut conn)
            .await
            .expect("ttl");
        assert_eq!(ttl, -1, "no expiry");
    }
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_never_reach_the_vendor() {
    let gw = TestGateway::start_with(
        fake_vendor::FakeVendor::start().await,
        &[
            ("EMBGATE__LIMITS__MAX_BODY_BYTES", "100000"),
            ("EMBGATE__LIMITS__MAX_EXTRA_FIELDS", "2"),
            ("EMBGATE__LIMITS__MAX_MODEL_BYTES", "40"),
        ],
    )
    .await;
    let many: Vec<String> = (0..2049).map(|i| i.to_string()).collect();
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{not json".into(), 400, None),
        ("[1,2]".into(), 400, None),
        (json!({"input": "x"}).to_string(), 400, Some("model")),
        (
            json!({"model": 3, "input": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (json!({"model": SMALL}).to_string(), 400, Some("input")),
        (
            json!({"model": SMALL, "input": []}).to_string(),
            400,
            Some("input"),
        ),
        (
            json!({"model": SMALL, "input": ""}).to_string(),
            400,
            Some("input"),
        ),
        (
            json!({"model": SMALL, "input": ["a", [1]]}).to_string(),
            400,
            Some("input"),
        ),
        (
            json!({"model": SMALL, "input": many}).to_string(),
            400,
            Some("input"),
        ),
        (
            json!({"model": SMALL, "input": "x", "encoding_format": "int8"}).to_string(),
            400,
            Some("encoding_format"),
        ),
        (
            json!({"model": SMALL, "input": "x", "dimensions": -1}).to_string(),
            400,
            Some("dimensions"),
        ),
        (
            json!({"model": "m".repeat(41), "input": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (
            json!({"model": SMALL, "input": "x", "a": 1, "b": 2, "c": 3}).to_string(),
            400,
            None,
        ),
        (
            json!({"model": SMALL, "input": "x".repeat(200_000)}).to_string(),
            413,
            None,
        ),
    ];
    for (body, status, param) in cases {
        let response = gw
            .http
            .post(format!("{}/v1/embeddings", gw.url))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("answer");
        let snippet: String = body.chars().take(60).collect();
        assert_eq!(response.status(), status, "{snippet}");
        let err: Value = response.json().await.expect("json error");
        let e = &err["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{err}"
        );
        assert_eq!(e["type"], "invalid_request_error", "{snippet}");
        assert_eq!(e["param"].as_str(), param, "{snippet}: {err}");
        assert!(e.get("code").is_some());
    }
    let wrong_method = gw
        .http
        .get(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong_method.status(), 405);
    let err: Value = wrong_method.json().await.expect("json error");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(gw.vendor.embedding_requests().is_empty());
    assert!(gw.entries().await.is_empty());
}

#[tokio::test]
async fn vendor_errors_reach_the_caller_verbatim_and_are_not_cached() {
    let gw = TestGateway::start_with(
        fake_vendor::FakeVendor::start().await,
        &[("EMBGATE__UPSTREAM__MAX_RETRIES", "0")],
    )
    .await;
    // Unknown model: the vendor's 404 passes through.
    let response = gw
        .post(&json!({"model": "no-such-model", "input": "x"}))
        .await;
    assert_eq!(response.status(), 404);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["code"], "model_not_found");

    // A vendor-side validation error (ada does not take dimensions).
    let response = gw
        .post(&json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": 8}))
        .await;
    assert_eq!(response.status(), 400);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["type"], "invalid_request_error");

    // Server errors and rate limits pass through once retries are exhausted.
    gw.vendor.push_fault(Fault::Status {
        status: 503,
        retry_after_secs: None,
    });
    let response = gw.post(&json!({"model": SMALL, "input": "x"})).await;
    assert_eq!(response.status(), 503);
    let err: Value = response.json().await.expect("json");
    assert!(err["error"]["message"].is_string());

    // A non-JSON error page keeps its status and becomes OpenAI-shaped.
    gw.vendor.push_fault(Fault::RawBody {
        status: 502,
        content_type: "text/html".into(),
        body: "<html>bad gateway</html>".into(),
    });
    let response = gw.post(&json!({"model": SMALL, "input": "x"})).await;
    assert_eq!(response.status(), 502);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["type"], "upstream_error");

    // Broken 200 answers are refused with 502 and nothing is stored.
    for fault in [
        Fault::WrongCount,
        Fault::WrongDimensions,
        Fault::NonFinite,
        Fault::DuplicateIndex,
    ] {
        gw.vendor.push_fault(fault.clone());
        let response = gw
            .post(&json!({"model": SMALL, "input": ["x", "y"], "encoding_format": "base64"}))
            .await;
        assert_eq!(response.status(), 502, "{fault:?}");
        let err: Value = response.json().await.expect("json");
        assert_eq!(
            err["error"]["code"], "upstream_invalid_response",
            "{fault:?}"
        );
    }
    assert!(
        gw.entries().await.is_empty(),
        "nothing cached from failures"
    );

    // And the next good answer is cached as usual.
    let (cache, _) = gw
        .embed(&json!({"model": SMALL, "input": ["x", "y"]}))
        .await;
    assert_eq!(cache, "miss");
    assert_eq!(gw.entries().await.len(), 2);
}

#[tokio::test]
async fn savings_and_spend_counters_move_by_the_right_amounts() {
    let gw = TestGateway::start().await;
    let inputs = ["counting tokens is fun", "and so is saving money"];
    let tokens: u64 = inputs
        .iter()
        .map(|t| u64::from(fake_vendor::tokens(SMALL, &text(t)).expect("tokens")))
        .sum();
    let (_, miss) = gw.embed(&json!({"model": SMALL, "input": inputs})).await;
    assert_eq!(miss["usage"]["prompt_tokens"], tokens);
    let m = gw.metrics().await;
    let sample = |name: &str| metric_value(&m, &format!("{name}{{model=\"{SMALL}\"}}"));
    assert_eq!(sample("embgate_upstream_tokens_total"), tokens as f64);
    assert!(
        (sample("embgate_upstream_spent_usd_total") - tokens as f64 * 0.02 / 1e6).abs() < 1e-12
    );
    assert_eq!(sample("embgate_cache_saved_tokens_total"), 0.0);

    gw.embed(&json!({"model": SMALL, "input": inputs})).await;
    gw.embed(&json!({"model": SMALL, "input": inputs})).await;
    let m = gw.metrics().await;
    let sample = |name: &str| metric_value(&m, &format!("{name}{{model=\"{SMALL}\"}}"));
    assert_eq!(
        sample("embgate_cache_saved_tokens_total"),
        2.0 * tokens as f64
    );
    assert!(
        (sample("embgate_cache_saved_usd_total") - 2.0 * tokens as f64 * 0.02 / 1e6).abs() < 1e-12
    );
    assert_eq!(
        sample("embgate_upstream_tokens_total"),
        tokens as f64,
        "no new spend"
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("embgate_cache_lookups_total{{model=\"{SMALL}\",result=\"hit\"}}")
        ),
        4.0
    );
    assert_eq!(
        metric_value(&m, "embgate_upstream_requests_total{status=\"200\"}"),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "embgate_http_requests_total{route=\"/v1/embeddings\",status=\"200\"}"
        ),
        3.0
    );
    assert!(m.contains("embgate_upstream_duration_seconds_count 1"));
    assert!(m.contains("embgate_http_request_duration_seconds_bucket{route=\"/v1/embeddings\""));
}

/// Every answer is counted under its route and status, the passthrough
/// fallback and errors included, and timed by route.
#[tokio::test]
async fn http_metrics_count_each_route_and_status() {
    let gw = TestGateway::start().await;
    let get = |path: &str| {
        gw.http
            .get(format!("{}{path}", gw.url))
            .bearer_auth(KEY)
            .send()
    };
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    assert_eq!(get("/v1/models").await.expect("models").status(), 200);
    assert_eq!(get("/v1/embeddings").await.expect("get").status(), 405);
    assert_eq!(gw.post(&json!({"model": SMALL})).await.status(), 400);
    gw.embed(&json!({"model": SMALL, "input": "counted"})).await;

    let m = gw.metrics().await;
    for (route, status, count) in [
        ("/healthz", "200", 2.0),
        ("passthrough", "200", 1.0),
        ("/v1/embeddings", "405", 1.0),
        ("/v1/embeddings", "400", 1.0),
        ("/v1/embeddings", "200", 1.0),
    ] {
        let sample =
            format!("embgate_http_requests_total{{route=\"{route}\",status=\"{status}\"}}");
        assert_eq!(metric_value(&m, &sample), count, "{sample}");
    }
    for (route, count) in [
        ("/healthz", 2.0),
        ("passthrough", 1.0),
        ("/v1/embeddings", 3.0),
    ] {
        let sample = format!("embgate_http_request_duration_seconds_count{{route=\"{route}\"}}");
        assert_eq!(metric_value(&m, &sample), count, "{sample}");
    }
}

#[tokio::test]
async fn other_models_share_the_vendors_billed_usage() {
    let gw = TestGateway::start().await;
    let model = "acme-embed-v1";
    let inputs = [
        "a short one",
        "a somewhat longer input text here",
        "mid sized text",
    ];
    let billed: u64 = inputs
        .iter()
        .map(|t| u64::from(fake_vendor::tokens(model, &text(t)).expect("tokens")))
        .sum();
    let (_, miss) = gw.embed(&json!({"model": model, "input": inputs})).await;
    assert_eq!(miss["usage"]["prompt_tokens"], billed, "sums to the bill");
    let (cache, hit) = gw.embed(&json!({"model": model, "input": inputs})).await;
    assert_eq!(cache, "hit");
    assert_eq!(hit["usage"]["prompt_tokens"], billed);
    assert_eq!(
        vectors(&hit)[1],
        vendor_vector(model, None, &text(inputs[1]))
    );
    // A single input gets exactly what the vendor billed for it.
    let (_, one) = gw
        .embed(&json!({"model": model, "input": "just this one"}))
        .await;
    assert_eq!(
        one["usage"]["prompt_tokens"],
        fake_vendor::tokens(model, &text("just this one")).expect("tokens")
    );
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn health_readiness_and_metrics_routes(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let get = |path: &str| gw.http.get(format!("{}{path}", gw.url)).send();
    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    let ready = get("/readyz").await.expect("readyz");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("json");
    let kind = match backend {
        Backend::Redis => "redis",
        Backend::Embedded => "embedded",
    };
    assert_eq!(ready["store"], kind, "{ready}");
    assert_eq!(ready["writes"], "ok", "{ready}");
    let metrics = get("/metrics").await.expect("metrics");
    assert_eq!(metrics.status(), 200);
    assert!(
        header(&metrics, "content-type").starts_with("text/plain"),
        "prometheus text"
    );
}

#[tokio::test]
async fn the_upstream_tokens_header_reports_what_was_paid() {
    let gw = TestGateway::start().await;
    let response = gw.post(&json!({"model": SMALL, "input": "pay once"})).await;
    let paid = header(&response, "x-embgate-upstream-tokens");
    assert_eq!(
        paid,
        fake_vendor::tokens(SMALL, &text("pay once"))
            .expect("tokens")
            .to_string()
    );
    let response = gw.post(&json!({"model": SMALL, "input": "pay once"})).await;
    assert_eq!(header(&response, "x-embgate-upstream-tokens"), "0");
    assert_eq!(header(&response, "x-embgate-cache"), "hit");
}

#[rstest]
#[case::redis(Backend::Redis)]
#[case::embedded(Backend::Embedded)]
#[tokio::test]
async fn large_responses_are_streamed_and_stay_exact(#[case] backend: Backend) {
    let gw = TestGateway::on(backend).await;
    let inputs: Vec<String> = (0..200).map(|i| format!("a long document {i}")).collect();
    for format in ["float", "base64"] {
        let (_, body) = gw
            .embed(&json!({"model": SMALL, "input": inputs, "encoding_format": format}))
            .await;
        let got = vectors(&body);
        assert_eq!(got.len(), 200);
        for (v, t) in got.iter().zip(&inputs) {
            assert_eq!(*v, vendor_vector(SMALL, None, &text(t)), "{format}");
        }
        assert_eq!(body["model"], SMALL);
        assert!(
            body["usage"]["prompt_tokens"]
                .as_u64()
                .is_some_and(|t| t > 0)
        );
    }
}

/// Opens a connection to the gateway and sends `bodies` to
/// `/v1/embeddings` in one write, pipelined.
async fn send_pipelined(gw: &TestGateway, bodies: &[Value]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let authority = gw.url.trim_start_matches("http://");
    let mut requests = Vec::new();
    for body in bodies {
        let body = body.to_string();
        requests.extend_from_slice(
            format!(
                "POST /v1/embeddings HTTP/1.1\r\nhost: {authority}\r\n\
                 authorization: Bearer {KEY}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    stream.write_all(&requests).await.expect("write");
    stream
}

/// Reads one HTTP/1.1 response with a Content-Length body off `stream`,
/// keeping any bytes past it in `buf` for the next one.
async fn read_response(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, Value) {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head[9..12].parse().expect("status code");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("content-length")
                .trim()
                .parse()
                .expect("a length");
            let start = end + 4;
            while buf.len() < start + length {
                let mut chunk = [0u8; 65536];
                let n = stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = serde_json::from_slice(&buf[start..start + length]).expect("JSON body");
            buf.drain(..start + length);
            return (status, body);
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn pipelined_requests_get_their_own_answers_in_order() {
    let gw = TestGateway::start().await;
    // Half hits, half misses, mixed formats and dimensions, and one error.
    gw.embed(&json!({"model": SMALL, "input": "pipelined one"}))
        .await;
    gw.embed(&json!({"model": SMALL, "input": "pipelined three", "dimensions": 8}))
        .await;
    let bodies = [
        json!({"model": SMALL, "input": "pipelined one"}),
        json!({"model": SMALL, "input": ["pipelined two"], "encoding_format": "base64"}),
        json!({"model": SMALL, "input": "pipelined three", "dimensions": 8}),
        json!({"model": SMALL}),
        json!({"model": SMALL, "input": "pipelined four", "encoding_format": "base64"}),
    ];
    // All five leave in one write: the gateway reads them from one buffer.
    let mut stream = send_pipelined(&gw, &bodies).await;
    let mut buf = Vec::new();
    for (i, (sent, (input, dims))) in bodies
        .iter()
        .zip([
            ("pipelined one", None),
            ("pipelined two", None),
            ("pipelined three", Some(8)),
            ("", None),
            ("pipelined four", None),
        ])
        .enumerate()
    {
        let (status, answer) = read_response(&mut stream, &mut buf).await;
        if sent.get("input").is_none() {
            assert_eq!(status, 400, "request {i}: {answer}");
            assert_eq!(answer["error"]["type"], "invalid_request_error");
            continue;
        }
        assert_eq!(status, 200, "request {i}: {answer}");
        assert_eq!(
            vectors(&answer),
            vec![vendor_vector(SMALL, dims, &text(input))],
            "request {i} got another input's vector"
        );
    }
}

/// Answers to pipelined requests may leave together, but one that is ready
/// never waits for a slow one behind it.
#[tokio::test]
async fn a_ready_pipelined_answer_does_not_wait_for_the_next() {
    let gw = TestGateway::start().await;
    gw.embed(&json!({"model": SMALL, "input": "ready at once"}))
        .await;
    // The next request is a miss, and the vendor takes long to answer it.
    gw.vendor.push_fault(Fault::Delay(Duration::from_secs(5)));
    let bodies = [
        json!({"model": SMALL, "input": "ready at once"}),
        json!({"model": SMALL, "input": "slow to embed"}),
    ];
    let mut stream = send_pipelined(&gw, &bodies).await;
    let mut buf = Vec::new();
    // Well under the vendor's delay: only a held answer takes that long.
    let (status, answer) =
        tokio::time::timeout(Duration::from_secs(4), read_response(&mut stream, &mut buf))
            .await
            .expect("the ready answer waited for the slow one");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        vectors(&answer),
        vec![vendor_vector(SMALL, None, &text("ready at once"))]
    );
    let (status, answer) = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        vectors(&answer),
        vec![vendor_vector(SMALL, None, &text("slow to embed"))]
    );
}
