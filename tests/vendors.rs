//! Native vendors (Cohere, Voyage, Gemini) behind the gateway, against their
//! fakes: OpenAI's format in and the vendor's own API out, and the vendors'
//! own APIs in. Vectors exact on miss and hit, only misses sent, vendor
//! parameters keyed, errors passed through and never cached, savings counted.

mod common;

use common::{TestGateway, header, text, vectors};
use fake_vendor::{FakeVendor, Fault, native_embedding, native_tokens, quantize};
use serde_json::{Value, json};

const COHERE: &str = "embed-v4.0";
const VOYAGE: &str = "voyage-3.5";
const GEMINI: &str = "gemini-embedding-001";

/// A gateway whose `embed-*`, `voyage-*` and `gemini-*` models go to the
/// fake's Cohere, Voyage and Gemini APIs, paid by the gateway's keys.
async fn gateway(extra: &[(&str, &str)]) -> TestGateway {
    let vendor = FakeVendor::start().await;
    let (cohere, voyage, gemini) = (
        vendor.cohere_url(),
        vendor.voyage_url(),
        vendor.gemini_url(),
    );
    let mut env: Vec<(&str, &str)> = vec![
        ("EMBGATE__AUTH__MODE", "open"),
        ("EMBGATE__UPSTREAM__API_KEY", "sk-openai"),
        ("EMBGATE__UPSTREAM__MAX_RETRIES", "0"),
        ("EMBGATE__UPSTREAMS__COHERE__BASE_URL", &cohere),
        ("EMBGATE__UPSTREAMS__COHERE__FLAVOUR", "cohere"),
        ("EMBGATE__UPSTREAMS__COHERE__MODELS", "embed-*"),
        ("EMBGATE__UPSTREAMS__COHERE__API_KEY", "co-key"),
        ("EMBGATE__UPSTREAMS__VOYAGE__BASE_URL", &voyage),
        ("EMBGATE__UPSTREAMS__VOYAGE__FLAVOUR", "voyage"),
        ("EMBGATE__UPSTREAMS__VOYAGE__MODELS", "voyage-*"),
        ("EMBGATE__UPSTREAMS__VOYAGE__API_KEY", "pa-key"),
        ("EMBGATE__UPSTREAMS__GEMINI__BASE_URL", &gemini),
        ("EMBGATE__UPSTREAMS__GEMINI__FLAVOUR", "gemini"),
        ("EMBGATE__UPSTREAMS__GEMINI__MODELS", "gemini-*"),
        ("EMBGATE__UPSTREAMS__GEMINI__API_KEY", "goog-key"),
    ];
    env.extend_from_slice(extra);
    TestGateway::start_with(vendor, &env).await
}

fn native(model: &str, input_type: &str, t: &str, dims: Option<u32>) -> Vec<f32> {
    native_embedding(model, input_type, t, dims).expect("known model")
}

/// The vectors of a JSON list of lists of numbers, read as f32.
fn floats(value: &Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| {
            v.as_array()
                .expect("a vector")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect()
        })
        .collect()
}

fn saved_tokens(model: &str) -> String {
    format!("embgate_cache_saved_tokens_total{{model=\"{model}\"}}")
}

#[tokio::test]
async fn cohere_in_openai_format_is_exact_on_miss_and_hit() {
    let gw = gateway(&[]).await;
    let body =
        json!({"model": COHERE, "input": ["alpha beta", "gamma"], "input_type": "search_query"});
    let (cache, miss) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    let want: Vec<Vec<f32>> = ["alpha beta", "gamma"]
        .iter()
        .map(|t| native(COHERE, "search_query", t, None))
        .collect();
    assert_eq!(vectors(&miss), want);
    let tokens = native_tokens("alpha beta") + native_tokens("gamma");
    assert_eq!(miss["usage"]["prompt_tokens"], tokens);
    gw.settled().await;

    let (cache, hit) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&hit), want);
    assert_eq!(hit["usage"]["prompt_tokens"], tokens);
    assert_eq!(gw.vendor.times_embedded(COHERE, None, &text("gamma")), 1);
    assert_eq!(gw.metric(&saved_tokens(COHERE)).await, tokens as f64);
    let usd = format!("embgate_cache_saved_usd_total{{model=\"{COHERE}\"}}");
    assert!((gw.metric(&usd).await - tokens as f64 * 0.12 / 1e6).abs() < 1e-12);
    // The gateway's Cohere key paid, as a bearer token.
    let sent = gw.vendor.embedding_requests();
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer co-key"));
}

#[tokio::test]
async fn cohere_partial_batches_send_only_misses() {
    let gw = gateway(&[]).await;
    gw.embed(&json!({"model": COHERE, "input": ["one", "two"]}))
        .await;
    gw.settled().await;
    let (cache, body) = gw
        .embed(&json!({"model": COHERE, "input": ["two", "three", "one", "three"]}))
        .await;
    assert_eq!(cache, "partial");
    let want: Vec<Vec<f32>> = ["two", "three", "one", "three"]
        .iter()
        .map(|t| native(COHERE, "search_document", t, None))
        .collect();
    assert_eq!(vectors(&body), want);
    let sent = gw.vendor.embedding_requests();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].inputs, vec![text("three")]);
}

#[tokio::test]
async fn vendor_parameters_change_the_key() {
    let gw = gateway(&[]).await;
    let ask = |extra: Value| {
        let mut body = json!({"model": COHERE, "input": "same text"});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        body
    };
    let (_, doc) = gw.embed(&ask(json!({}))).await;
    gw.settled().await;
    // Cohere's defaults written out key as the absent values do.
    let (cache, explicit) = gw
        .embed(&ask(
            json!({"input_type": "search_document", "truncate": "END"}),
        ))
        .await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&explicit), vectors(&doc));
    let (cache, query) = gw.embed(&ask(json!({"input_type": "search_query"}))).await;
    assert_eq!(cache, "miss");
    assert_ne!(vectors(&query), vectors(&doc));
    let (cache, short) = gw.embed(&ask(json!({"dimensions": 256}))).await;
    assert_eq!(cache, "miss");
    assert_eq!(
        vectors(&short)[0],
        native(COHERE, "search_document", "same text", Some(256))
    );
    let (cache, _) = gw.embed(&ask(json!({"truncate": "START"}))).await;
    assert_eq!(cache, "miss");
    // What Cohere does not take is refused before anything is paid.
    for bad in [
        json!({"input_type": "query"}),
        json!({"embedding_types": ["int8"]}),
        json!({"input": [[1, 2]]}),
        json!({"colour": "red"}),
    ] {
        let response = gw.post(&ask(bad.clone())).await;
        assert_eq!(response.status(), 400, "{bad}");
        let error: Value = response.json().await.expect("json");
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    assert_eq!(gw.vendor.embedding_requests().len(), 4);
}

#[tokio::test]
async fn vendor_errors_pass_through_and_are_not_cached() {
    let gw = gateway(&[]).await;
    let body = json!({"model": COHERE, "input": ["x y"]});
    gw.vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: Some(3),
    });
    let response = gw.post(&body).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), "3");
    let error: Value = response.json().await.expect("json");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("per minute request limit")),
        "{error}"
    );
    gw.vendor.push_fault(Fault::WrongCount);
    assert_eq!(gw.post(&body).await.status(), 502);
    gw.settled().await;
    assert!(gw.entries().await.is_empty(), "nothing broken is kept");
    let (cache, ok) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    assert_eq!(
        vectors(&ok)[0],
        native(COHERE, "search_document", "x y", None)
    );
}

#[tokio::test]
async fn voyage_speaks_its_own_fields_on_the_shared_path() {
    let gw = gateway(&[]).await;
    let body = json!({
        "model": VOYAGE, "input": ["first doc", "second"], "input_type": "document",
        "truncation": true, "output_dimension": 256, "output_dtype": "int8",
        "encoding_format": null,
    });
    let (cache, miss) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    let ints = |t: &str| -> Value {
        json!(quantize(&native(VOYAGE, "document", t, Some(256)), "int8").expect("int8"))
    };
    assert_eq!(miss["data"][0]["embedding"], ints("first doc"));
    assert_eq!(miss["data"][1]["embedding"], ints("second"));
    let tokens = native_tokens("first doc") + native_tokens("second");
    assert_eq!(miss["usage"], json!({"total_tokens": tokens}));
    gw.settled().await;
    let (cache, hit) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(hit["data"], miss["data"]);

    // Floats (the default type, as base64 like the SDK asks) key apart.
    let floats = json!({"model": VOYAGE, "input": "first doc", "input_type": "document",
        "output_dimension": 256, "encoding_format": "base64"});
    let (cache, f) = gw.embed(&floats).await;
    assert_eq!(cache, "miss");
    assert_eq!(
        vectors(&f)[0],
        native(VOYAGE, "document", "first doc", Some(256))
    );
    assert_eq!(gw.metric(&saved_tokens(VOYAGE)).await, tokens as f64);

    // Voyage's callers get Voyage's errors.
    let response = gw
        .post(&json!({"model": VOYAGE, "input": "x", "input_type": "query!"}))
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("json");
    assert!(error["detail"].is_string(), "{error}");
    gw.vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: None,
    });
    let response = gw.post(&json!({"model": VOYAGE, "input": "limited"})).await;
    assert_eq!(response.status(), 429);
    let error: Value = response.json().await.expect("json");
    assert_eq!(
        error["detail"],
        "You have exceeded your rate limit. Please slow down."
    );
}

#[tokio::test]
async fn gemini_in_openai_format_estimates_tokens() {
    let gw = gateway(&[]).await;
    let body = json!({"model": GEMINI, "input": ["twelve chars", "abc"],
        "task_type": "RETRIEVAL_QUERY", "dimensions": 768});
    let (cache, miss) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    let want: Vec<Vec<f32>> = ["twelve chars", "abc"]
        .iter()
        .map(|t| native(GEMINI, "RETRIEVAL_QUERY", t, Some(768)))
        .collect();
    assert_eq!(vectors(&miss), want);
    // No usage from the API: four characters a token, at least one a text.
    assert_eq!(miss["usage"]["prompt_tokens"], 3 + 1);
    gw.settled().await;
    let (cache, hit) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&hit), want);
    assert_eq!(gw.metric(&saved_tokens(GEMINI)).await, 4.0);
    let sent = gw.vendor.requests_seen();
    assert!(
        sent.iter().any(
            |l| l == "POST /v1beta/models/gemini%2Dembedding%2D001:batchEmbedContents"
                || l == "POST /v1beta/models/gemini-embedding-001:batchEmbedContents"
        ),
        "{sent:?}"
    );
    let (cache, _) = gw
        .embed(
            &json!({"model": GEMINI, "input": "abc", "task_type": "CLUSTERING", "dimensions": 768}),
        )
        .await;
    assert_eq!(cache, "miss");
}

#[tokio::test]
async fn cohere_calls_stay_within_its_batch_limit() {
    let gw = gateway(&[]).await;
    let inputs: Vec<String> = (0..200).map(|i| format!("text {i}")).collect();
    let (_, body) = gw.embed(&json!({"model": COHERE, "input": inputs})).await;
    assert_eq!(vectors(&body).len(), 200);
    let sizes: Vec<usize> = gw
        .vendor
        .embedding_requests()
        .iter()
        .map(|r| r.inputs.len())
        .collect();
    assert!(sizes.iter().all(|n| *n <= 96), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 200);
}

/// POST `path` on the gateway with `headers`, expecting JSON back.
async fn call(
    gw: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, String, Value) {
    let mut req = gw.http.post(format!("{}{path}", gw.url)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = req.send().await.expect("answers");
    let status = response.status().as_u16();
    let cache = header(&response, "x-embgate-cache");
    (status, cache, response.json().await.expect("json body"))
}

#[tokio::test]
async fn cohere_own_api_serves_each_type_as_sent() {
    let gw = gateway(&[]).await;
    let bearer = [("authorization", "Bearer client")];
    let body = json!({"model": COHERE, "texts": ["hello there", "bye"], "input_type": "search_query",
        "embedding_types": ["float", "int8", "ubinary"], "output_dimension": 256});
    let (status, cache, miss) = call(&gw, "/v2/embed", &bearer, &body).await;
    assert_eq!((status, cache.as_str()), (200, "miss"), "{miss}");
    let want: Vec<Vec<f32>> = ["hello there", "bye"]
        .iter()
        .map(|t| native(COHERE, "search_query", t, Some(256)))
        .collect();
    assert_eq!(floats(&miss["embeddings"]["float"]), want);
    for t in ["int8", "ubinary"] {
        let ints: Vec<Vec<i64>> = want.iter().map(|v| quantize(v, t).expect("type")).collect();
        assert_eq!(miss["embeddings"][t], json!(ints), "{t}");
    }
    let tokens = native_tokens("hello there") + native_tokens("bye");
    assert_eq!(miss["meta"]["billed_units"]["input_tokens"], tokens);
    assert_eq!(miss["texts"], json!(["hello there", "bye"]));
    gw.settled().await;

    let (_, cache, hit) = call(&gw, "/v2/embed", &bearer, &body).await;
    assert_eq!(cache, "hit");
    assert_eq!(hit["embeddings"], miss["embeddings"]);
    // Stored as sent: a float entry of 256 values, an int8 one of 256 bytes,
    // a ubinary one of 32.
    assert_eq!(gw.entries().await.len(), 6);
    // The same call in OpenAI's format shares the float entries.
    let (cache, openai) = gw
        .embed(&json!({"model": COHERE, "input": ["bye"], "input_type": "search_query", "dimensions": 256}))
        .await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&openai)[0], want[1]);
    assert_eq!(gw.vendor.times_embedded(COHERE, Some(256), &text("bye")), 3);
}

#[tokio::test]
async fn cohere_own_api_answers_errors_as_cohere() {
    let gw = gateway(&[]).await;
    let bearer = [("authorization", "Bearer client")];
    let (status, _, error) = call(
        &gw,
        "/v2/embed",
        &bearer,
        &json!({"model": COHERE, "texts": ["a"]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("input_type")),
        "{error}"
    );
    assert!(error["id"].is_string());
    let (status, _, error) = call(
        &gw,
        "/v2/embed",
        &bearer,
        &json!({"model": "voyage-3.5", "texts": ["a"], "input_type": "search_query"}),
    )
    .await;
    assert_eq!(status, 404, "{error}");
    gw.vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: None,
    });
    let body = json!({"model": COHERE, "texts": ["a"], "input_type": "search_query"});
    let (status, _, error) = call(&gw, "/v2/embed", &bearer, &body).await;
    assert_eq!(status, 429);
    // Cohere's own body, as Cohere sent it.
    assert_eq!(
        error["message"],
        "You are past the per minute request limit, please wait and try again later."
    );
    gw.settled().await;
    assert!(gw.entries().await.is_empty());
}

#[tokio::test]
async fn gemini_own_api_batches_and_single_calls() {
    let gw = gateway(&[]).await;
    let key = [("x-goog-api-key", "client")];
    let request = |t: &str, task: Option<&str>| {
        let mut r = json!({"model": format!("models/{GEMINI}"), "content": {"parts": [{"text": t}]},
            "outputDimensionality": 128});
        if let Some(task) = task {
            r["taskType"] = json!(task);
        }
        r
    };
    let batch = json!({"requests": [request("one", Some("RETRIEVAL_DOCUMENT")), request("two", None),
        request("three", Some("RETRIEVAL_DOCUMENT"))]});
    let path = format!("/v1beta/models/{GEMINI}:batchEmbedContents");
    let (status, cache, miss) = call(&gw, &path, &key, &batch).await;
    assert_eq!((status, cache.as_str()), (200, "miss"), "{miss}");
    let want = [
        native(GEMINI, "RETRIEVAL_DOCUMENT", "one", Some(128)),
        native(GEMINI, "", "two", Some(128)),
        native(GEMINI, "RETRIEVAL_DOCUMENT", "three", Some(128)),
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            &floats(&json!([miss["embeddings"][i]["values"]]))[0],
            w,
            "{i}"
        );
    }
    gw.settled().await;
    // The google-genai SDK with a custom base URL calls /v1.
    let path_v1 = format!("/v1/models/{GEMINI}:batchEmbedContents");
    let (_, cache, hit) = call(&gw, &path_v1, &key, &batch).await;
    assert_eq!(cache, "hit");
    assert_eq!(hit, miss);
    // `:embedContent`, the key in the query.
    let single = json!({"content": {"parts": [{"text": "two"}]}, "outputDimensionality": 128});
    let path = format!("/v1beta/models/{GEMINI}:embedContent?key=client");
    let (status, cache, one) = call(&gw, &path, &[], &single).await;
    assert_eq!((status, cache.as_str()), (200, "hit"), "{one}");
    assert_eq!(floats(&json!([one["embedding"]["values"]]))[0], want[1]);
    assert_eq!(gw.vendor.embedding_requests().len(), 2);
    // The gateway's own key paid.
    assert!(
        gw.vendor
            .requests_seen()
            .iter()
            .all(|l| !l.contains("key="))
    );

    let bad = json!({"requests": [{"content": {"parts": [{"text": "x"}]}, "taskType": "NOPE"}]});
    let path = format!("/v1beta/models/{GEMINI}:batchEmbedContents");
    let (status, _, error) = call(&gw, &path, &key, &bad).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["status"], "INVALID_ARGUMENT", "{error}");
    gw.vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: None,
    });
    let (status, _, error) = call(
        &gw,
        &path,
        &key,
        &json!({"requests": [request("new", None)]}),
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED", "{error}");
    // Other model methods still pass through.
    let get = gw.get(&format!("/v1/models/{GEMINI}")).await;
    assert_ne!(get.status(), 405);
}

#[tokio::test]
async fn forward_mode_checks_the_callers_key_with_the_vendor() {
    let vendor = common::vendor_accepting(&["co-good"]).await;
    let cohere = vendor.cohere_url();
    let env = [
        ("EMBGATE__AUTH__MODE", "forward"),
        ("EMBGATE__UPSTREAMS__COHERE__BASE_URL", cohere.as_str()),
        ("EMBGATE__UPSTREAMS__COHERE__FLAVOUR", "cohere"),
        ("EMBGATE__UPSTREAMS__COHERE__MODELS", "embed-*"),
    ];
    let gw = TestGateway::start_with(vendor, &env).await;
    let body = json!({"model": COHERE, "texts": ["k"], "input_type": "search_query"});
    let (status, _, error) = call(
        &gw,
        "/v2/embed",
        &[("authorization", "Bearer co-bad")],
        &body,
    )
    .await;
    assert_eq!(status, 401, "{error}");
    assert!(error["message"].is_string(), "{error}");
    let (status, _, ok) = call(
        &gw,
        "/v2/embed",
        &[("authorization", "Bearer co-good")],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{ok}");
    let sent = gw.vendor.embedding_requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer co-good"));
    assert_eq!(gw.vendor.key_checks().len(), 2);
}

#[tokio::test]
async fn passthrough_goes_to_the_upstream_of_the_model_named() {
    let other = FakeVendor::start().await;
    let other_url = other.base_url();
    let gw = gateway(&[
        ("EMBGATE__PASSTHROUGH__ALLOW", "/v1/chat,/v1/models"),
        ("EMBGATE__UPSTREAMS__OTHER__BASE_URL", other_url.as_str()),
        ("EMBGATE__UPSTREAMS__OTHER__MODELS", "other-*"),
        ("EMBGATE__UPSTREAMS__OTHER__API_KEY", "sk-other"),
    ])
    .await;
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let post = |body: Value| {
        gw.http
            .post(format!("{}/v1/chat/completions", gw.url))
            .json(&body)
            .send()
    };
    post(chat("other-chat")).await.expect("answers");
    post(chat("gpt-4o-mini")).await.expect("answers");
    let routed = |v: &FakeVendor| {
        v.requests_seen()
            .iter()
            .filter(|l| l.as_str() == "POST /v1/chat/completions")
            .count()
    };
    assert_eq!(routed(&other), 1);
    assert_eq!(routed(&gw.vendor), 1);
    // Without a body naming a model: the default upstream.
    assert_eq!(gw.get("/v1/models").await.status(), 200);
    assert!(other.requests_seen().iter().all(|l| !l.contains("/models")));
    // A model of a native vendor has only its embeddings served.
    let response = post(chat(COHERE)).await.expect("answers");
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn forward_mode_checks_a_gemini_key_with_google() {
    let vendor = common::vendor_accepting(&["g-good"]).await;
    let gemini = vendor.gemini_url();
    let env = [
        ("EMBGATE__AUTH__MODE", "forward"),
        ("EMBGATE__UPSTREAMS__GEMINI__BASE_URL", gemini.as_str()),
        ("EMBGATE__UPSTREAMS__GEMINI__FLAVOUR", "gemini"),
        ("EMBGATE__UPSTREAMS__GEMINI__MODELS", "gemini-*"),
    ];
    let gw = TestGateway::start_with(vendor, &env).await;
    let path = format!("/v1beta/models/{GEMINI}:embedContent");
    let body = json!({"content": {"parts": [{"text": "k"}]}});
    let (status, _, error) = call(&gw, &path, &[("x-goog-api-key", "g-bad")], &body).await;
    assert_eq!(status, 401, "{error}");
    assert_eq!(error["error"]["status"], "UNAUTHENTICATED", "{error}");
    let (status, _, ok) = call(&gw, &path, &[("x-goog-api-key", "g-good")], &body).await;
    assert_eq!(status, 200, "{ok}");
    assert!(gw.vendor.embedding_requests().len() == 1);
}

#[tokio::test]
async fn voyage_and_gemini_partial_batches_send_only_misses() {
    let gw = gateway(&[]).await;
    for (model, input_type, extra) in [
        (VOYAGE, "document", json!({"input_type": "document"})),
        (
            GEMINI,
            "RETRIEVAL_DOCUMENT",
            json!({"task_type": "RETRIEVAL_DOCUMENT"}),
        ),
    ] {
        let ask = |inputs: &[&str]| {
            let mut body = json!({"model": model, "input": inputs});
            for (k, v) in extra.as_object().into_iter().flatten() {
                body[k] = v.clone();
            }
            body
        };
        gw.embed(&ask(&["kept one", "kept two"])).await;
        gw.settled().await;
        let before = gw.vendor.embedding_requests().len();
        let (cache, body) = gw.embed(&ask(&["kept two", "fresh", "kept one"])).await;
        assert_eq!(cache, "partial", "{model}");
        let want: Vec<Vec<f32>> = ["kept two", "fresh", "kept one"]
            .iter()
            .map(|t| native(model, input_type, t, None))
            .collect();
        assert_eq!(vectors(&body), want, "{model}");
        let sent = gw.vendor.embedding_requests();
        assert_eq!(sent.len(), before + 1, "{model}");
        assert_eq!(sent[before].inputs, vec![text("fresh")], "{model}");
    }
}

#[tokio::test]
async fn voyage_and_gemini_errors_pass_through_and_are_not_cached() {
    let gw = gateway(&[]).await;
    for (kept, (model, input_type, extra)) in [
        (VOYAGE, "document", json!({"input_type": "document"})),
        (
            GEMINI,
            "RETRIEVAL_DOCUMENT",
            json!({"task_type": "RETRIEVAL_DOCUMENT"}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = json!({"model": model, "input": ["x y"]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        gw.vendor.push_fault(Fault::Status {
            status: 429,
            retry_after_secs: Some(4),
        });
        let response = gw.post(&body).await;
        assert_eq!(response.status(), 429, "{model}");
        assert_eq!(header(&response, "retry-after"), "4", "{model}");
        gw.vendor.push_fault(Fault::WrongCount);
        assert_eq!(gw.post(&body).await.status(), 502, "{model}");
        gw.settled().await;
        assert_eq!(
            gw.entries().await.len(),
            kept,
            "{model}: nothing broken is kept"
        );
        let (cache, ok) = gw.embed(&body).await;
        assert_eq!(cache, "miss", "{model}");
        assert_eq!(
            vectors(&ok)[0],
            native(model, input_type, "x y", None),
            "{model}"
        );
        // The answer of the first good call is the one kept.
        gw.settled().await;
        let (cache, _) = gw.embed(&body).await;
        assert_eq!(cache, "hit", "{model}");
    }
}
