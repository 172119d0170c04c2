use std::time::{Duration, Instant};

use base64::Engine as _;
use fake_vendor::{FakeVendor, Fault, InputItem, Options, embedding, tokens};
use serde_json::{Value, json};

const SMALL: &str = "text-embedding-3-small";
const KEY: &str = "sk-test-key-0001";

fn text(s: &str) -> InputItem {
    InputItem::Text(s.to_owned())
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn post(vendor: &FakeVendor, path: &str, body: impl Into<reqwest::Body>) -> Reply {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", vendor.base_url()))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body read");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

async fn embed(vendor: &FakeVendor, body: Value) -> Reply {
    post(vendor, "/embeddings", body.to_string()).await
}

fn float_vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|item| {
            item["embedding"]
                .as_array()
                .expect("float array")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

fn base64_vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|item| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(item["embedding"].as_str().expect("base64 string"))
                .expect("valid base64");
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect()
}

fn assert_error(reply: &Reply, status: u16, param: Value, code: Value) {
    assert_eq!(reply.status, status, "{}", reply.body);
    let error = &reply.body["error"];
    assert!(error["message"].is_string(), "{}", reply.body);
    assert!(error["type"].is_string(), "{}", reply.body);
    assert_eq!(error["param"], param, "{}", reply.body);
    assert_eq!(error["code"], code, "{}", reply.body);
}

#[tokio::test]
async fn float_and_base64_match_the_vendor_function() {
    let vendor = FakeVendor::start().await;
    let input = json!(["hello", "world"]);
    let float = embed(&vendor, json!({"model": SMALL, "input": input})).await;
    let b64 = embed(
        &vendor,
        json!({"model": SMALL, "input": input, "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(float.status, 200);
    assert_eq!(b64.status, 200);
    let expected: Vec<Vec<f32>> = ["hello", "world"]
        .iter()
        .map(|s| embedding(SMALL, None, &text(s)).expect("known model"))
        .collect();
    assert_eq!(float_vectors(&float.body), expected);
    assert_eq!(base64_vectors(&b64.body), expected);

    let body = &float.body;
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], SMALL);
    assert_eq!(body["data"][1]["object"], "embedding");
    assert_eq!(body["data"][1]["index"], 1);
    let n = tokens(SMALL, &text("hello")).expect("known")
        + tokens(SMALL, &text("world")).expect("known");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": n, "total_tokens": n})
    );
    assert_eq!(float.headers["openai-model"], SMALL);
    assert!(
        float.headers["x-request-id"]
            .to_str()
            .expect("ascii")
            .starts_with("req_")
    );
}

#[tokio::test]
async fn text_and_token_array_give_the_same_vector() {
    let vendor = FakeVendor::start().await;
    let s = "Embeddings are cached by the gateway.";
    let ids = tiktoken_ids(s);
    let by_text = embed(&vendor, json!({"model": SMALL, "input": s})).await;
    let by_ids = embed(&vendor, json!({"model": SMALL, "input": ids})).await;
    let by_nested = embed(&vendor, json!({"model": SMALL, "input": [ids, ids]})).await;
    let v = float_vectors(&by_text.body);
    assert_eq!(v, float_vectors(&by_ids.body));
    let nested = float_vectors(&by_nested.body);
    assert_eq!(nested.len(), 2);
    assert_eq!(nested[0], v[0]);
    assert_eq!(
        by_text.body["usage"]["prompt_tokens"],
        by_ids.body["usage"]["prompt_tokens"]
    );
}

fn tiktoken_ids(s: &str) -> Vec<u32> {
    let ids = tiktoken_rs::cl100k_base_singleton().encode_ordinary(s);
    assert_eq!(tokens(SMALL, &text(s)), Some(ids.len() as u32));
    ids
}

#[tokio::test]
async fn dimensions_shorten_to_unit_length() {
    let vendor = FakeVendor::start().await;
    let reply = embed(
        &vendor,
        json!({"model": "text-embedding-3-large", "input": "x", "dimensions": 256}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v = &float_vectors(&reply.body)[0];
    assert_eq!(v.len(), 256);
    let norm: f64 = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
    assert_eq!(
        Some(v.clone()),
        embedding("text-embedding-3-large", Some(256), &text("x"))
    );
    assert_eq!(
        vendor.times_embedded("text-embedding-3-large", Some(256), &text("x")),
        1
    );
}

#[tokio::test]
async fn ada_rejects_dimensions() {
    let vendor = FakeVendor::start().await;
    let reply = embed(
        &vendor,
        json!({"model": "text-embedding-ada-002", "input": "x", "dimensions": 512}),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.body,
        json!({"error": {
            "message": "This model does not support specifying dimensions.",
            "type": "invalid_request_error",
            "param": null,
            "code": null,
        }})
    );
}

#[tokio::test]
async fn validation_errors_are_openai_shaped() {
    let vendor = FakeVendor::start().await;
    let cases = [
        (json!({"input": "x"}), 400, Value::Null),
        (json!({"model": 5, "input": "x"}), 400, json!("model")),
        (json!({"model": SMALL}), 400, json!("input")),
        (json!({"model": SMALL, "input": ""}), 400, json!("input")),
        (json!({"model": SMALL, "input": []}), 400, json!("input")),
        (json!({"model": SMALL, "input": [[]]}), 400, json!("input")),
        (
            json!({"model": SMALL, "input": ["a", 1]}),
            400,
            json!("input"),
        ),
        (
            json!({"model": SMALL, "input": [1, -2]}),
            400,
            json!("input"),
        ),
        (
            json!({"model": SMALL, "input": [100277]}),
            400,
            json!("input"),
        ),
        (
            json!({"model": SMALL, "input": vec!["a"; 2049]}),
            400,
            json!("input"),
        ),
        (
            json!({"model": SMALL, "input": vec![42; 8193]}),
            400,
            json!("input"),
        ),
        (
            json!({"model": SMALL, "input": "x", "encoding_format": "int8"}),
            400,
            json!("encoding_format"),
        ),
        (
            json!({"model": SMALL, "input": "x", "dimensions": 0}),
            400,
            json!("dimensions"),
        ),
        (
            json!({"model": SMALL, "input": "x", "dimensions": 1537}),
            400,
            json!("dimensions"),
        ),
        (
            json!({"model": SMALL, "input": "x", "dimensions": "8"}),
            400,
            json!("dimensions"),
        ),
        (
            json!({"model": SMALL, "input": "x", "user": 1}),
            400,
            json!("user"),
        ),
        (
            json!({"model": SMALL, "input": "x", "temperature": 1}),
            400,
            Value::Null,
        ),
    ];
    for (body, status, param) in cases {
        let reply = embed(&vendor, body).await;
        assert_error(&reply, status, param, Value::Null);
    }

    let reply = embed(&vendor, json!({"model": "nope", "input": "x"})).await;
    assert_error(&reply, 404, Value::Null, json!("model_not_found"));
    assert_eq!(
        reply.body["error"]["message"],
        "The model `nope` does not exist or you do not have access to it."
    );

    let reply = embed(
        &vendor,
        json!({"model": SMALL, "input": vec![vec![42; 8000]; 38]}),
    )
    .await;
    assert_error(&reply, 400, json!("input"), json!("max_tokens_per_request"));

    let reply = embed(&vendor, json!({"model": SMALL, "input": vec![42; 8193]})).await;
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .expect("message")
            .starts_with("This model's maximum context length is 8192 tokens, however you requested 8193 tokens")
    );

    for garbage in ["{", "[1,2]", "null", "\u{0}"] {
        let reply = post(&vendor, "/embeddings", garbage).await;
        assert_error(&reply, 400, Value::Null, Value::Null);
    }

    assert_eq!(vendor.total_inputs_embedded(), 0);
    let statuses: Vec<u16> = vendor
        .embedding_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    // The two empty inputs are key checks, recorded apart.
    assert_eq!(statuses.len(), 22);
    assert!(statuses.iter().all(|&s| s >= 400));
    assert_eq!(vendor.key_checks().len(), 2);
}

/// An empty input is how a caller's key is checked for free: the key is
/// authenticated first (401 for a bad one), then the input refused (400).
/// Such checks never take a queued fault.
#[tokio::test]
async fn key_checks_authenticate_before_refusing_the_input() {
    let vendor = FakeVendor::start_with(Options {
        valid_keys: Some(vec![KEY.to_owned()]),
        ..Options::default()
    })
    .await;
    vendor.push_fault(Fault::Status {
        status: 500,
        retry_after_secs: None,
    });
    let client = reqwest::Client::new();
    let url = format!("{}/embeddings", vendor.base_url());
    let check = |key: &'static str, input: Value| {
        client
            .post(&url)
            .bearer_auth(key)
            .json(&json!({"model": SMALL, "input": input}))
            .send()
    };
    let bad = check("sk-wrong-key-wxyz", json!("")).await.expect("sent");
    assert_eq!(bad.status(), 401);
    let bad: Value = bad.json().await.expect("json");
    assert_eq!(bad["error"]["code"], "invalid_api_key");
    let good = check(KEY, json!("")).await.expect("sent");
    assert_eq!(good.status(), 400);
    let good: Value = good.json().await.expect("json");
    assert_eq!(good["error"]["param"], "input");
    assert_eq!(check(KEY, json!([])).await.expect("sent").status(), 400);

    let statuses: Vec<u16> = vendor.key_checks().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 400, 400]);
    assert!(vendor.embedding_requests().is_empty());
    assert_eq!(vendor.total_inputs_embedded(), 0);
    // The fault is still queued for the next request that embeds.
    assert_eq!(
        embed(&vendor, json!({"model": SMALL, "input": "x"}))
            .await
            .status,
        500
    );
}

#[tokio::test]
async fn authentication() {
    let vendor = FakeVendor::start_with(Options {
        valid_keys: Some(vec![KEY.to_owned()]),
        ..Options::default()
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("{}/embeddings", vendor.base_url());
    let body = json!({"model": SMALL, "input": "x"});

    let missing = client.post(&url).json(&body).send().await.expect("sent");
    assert_eq!(missing.status(), 401);
    let missing: Value = missing.json().await.expect("json");
    assert_eq!(missing["error"]["code"], Value::Null);
    assert!(
        missing["error"]["message"]
            .as_str()
            .expect("message")
            .starts_with("You didn't provide an API key.")
    );

    let wrong = client
        .post(&url)
        .bearer_auth("sk-wrong-key-wxyz")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(wrong.status(), 401);
    let wrong: Value = wrong.json().await.expect("json");
    assert_eq!(wrong["error"]["code"], "invalid_api_key");
    let message = wrong["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("Incorrect API key provided: sk-...wxyz."));
    assert!(!message.contains("wrong"));

    let ok = embed(&vendor, body).await;
    assert_eq!(ok.status, 200);

    let recorded = vendor.embedding_requests();
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[0].authorization, None);
    assert_eq!(
        recorded[1].authorization.as_deref(),
        Some("Bearer sk-wrong-key-wxyz")
    );
    assert_eq!(
        recorded.iter().map(|r| r.status).collect::<Vec<_>>(),
        [401, 401, 200]
    );
}

#[tokio::test]
async fn status_faults() {
    let vendor = FakeVendor::start().await;
    vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: Some(7),
    });
    vendor.push_fault(Fault::Status {
        status: 500,
        retry_after_secs: None,
    });
    vendor.push_fault(Fault::RawBody {
        status: 502,
        content_type: "text/html".into(),
        body: "<html>Bad Gateway</html>".into(),
    });
    let body = json!({"model": SMALL, "input": "x"});

    let reply = embed(&vendor, body.clone()).await;
    assert_error(&reply, 429, Value::Null, json!("rate_limit_exceeded"));
    assert_eq!(reply.body["error"]["type"], "requests");
    assert_eq!(reply.headers["retry-after"], "7");

    let reply = embed(&vendor, body.clone()).await;
    assert_error(&reply, 500, Value::Null, Value::Null);
    assert_eq!(reply.body["error"]["type"], "server_error");
    assert!(reply.headers.get("retry-after").is_none());

    let raw = reqwest::Client::new()
        .post(format!("{}/embeddings", vendor.base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(raw.status(), 502);
    assert_eq!(raw.headers()["content-type"], "text/html");
    assert!(raw.headers().get("x-request-id").is_none());
    assert_eq!(raw.text().await.expect("text"), "<html>Bad Gateway</html>");

    assert_eq!(embed(&vendor, body).await.status, 200);
    let statuses: Vec<u16> = vendor
        .embedding_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [429, 500, 502, 200]);
    assert_eq!(vendor.times_embedded(SMALL, None, &text("x")), 1);
}

#[tokio::test]
async fn corrupting_faults() {
    let vendor = FakeVendor::start().await;
    let body = json!({"model": SMALL, "input": ["a", "b"]});

    vendor.push_fault(Fault::WrongCount);
    let reply = embed(&vendor, body.clone()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(float_vectors(&reply.body).len(), 1);

    vendor.push_fault(Fault::WrongDimensions);
    let v = float_vectors(&embed(&vendor, body.clone()).await.body);
    assert_eq!((v[0].len(), v[1].len()), (1536, 1535));

    vendor.push_fault(Fault::NonFinite);
    let v = float_vectors(&embed(&vendor, body.clone()).await.body);
    assert!(v[0][0].is_infinite());

    vendor.push_fault(Fault::NonFinite);
    let mut b64 = body.clone();
    b64["encoding_format"] = json!("base64");
    let v = base64_vectors(&embed(&vendor, b64).await.body);
    assert!(v[0][0].is_nan());

    vendor.push_fault(Fault::DuplicateIndex);
    let reply = embed(&vendor, body.clone()).await;
    assert_eq!(reply.body["data"][0]["index"], 0);
    assert_eq!(reply.body["data"][1]["index"], 0);

    assert_eq!(vendor.total_inputs_embedded(), 0);
    assert_eq!(embed(&vendor, body).await.status, 200);
    assert_eq!(vendor.total_inputs_embedded(), 2);
    assert_eq!(vendor.times_embedded(SMALL, None, &text("a")), 1);
}

#[tokio::test]
async fn delay_latency_and_close() {
    let vendor = FakeVendor::start().await;
    let body = json!({"model": SMALL, "input": "x"});

    vendor.push_fault(Fault::Delay(Duration::from_millis(150)));
    let started = Instant::now();
    assert_eq!(embed(&vendor, body.clone()).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    vendor.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(embed(&vendor, body.clone()).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(100));
    vendor.set_latency(Duration::ZERO);

    vendor.push_fault(Fault::CloseConnection);
    let closed = reqwest::Client::new()
        .post(format!("{}/embeddings", vendor.base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let err = closed.expect_err("no response");
    assert!(!err.is_timeout(), "{err}");

    assert_eq!(embed(&vendor, body).await.status, 200);
    let statuses: Vec<u16> = vendor
        .embedding_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 200, 0, 200]);
    assert_eq!(vendor.times_embedded(SMALL, None, &text("x")), 3);
}

#[tokio::test]
async fn recording() {
    let vendor = FakeVendor::start().await;
    embed(
        &vendor,
        json!({"model": SMALL, "input": ["a", "a", "b"], "dimensions": 64, "encoding_format": "base64"}),
    )
    .await;
    embed(
        &vendor,
        json!({"model": "acme-embed-v1", "input": [[1, 2]]}),
    )
    .await;
    let recorded = vendor.embedding_requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].model.as_deref(), Some(SMALL));
    assert_eq!(recorded[0].inputs, [text("a"), text("a"), text("b")]);
    assert_eq!(recorded[0].dimensions, Some(64));
    assert_eq!(recorded[0].encoding_format.as_deref(), Some("base64"));
    assert_eq!(
        recorded[0].authorization.as_deref(),
        Some("Bearer sk-test-key-0001")
    );
    assert_eq!(recorded[1].inputs, [InputItem::Tokens(vec![1, 2])]);
    assert_eq!(vendor.times_embedded(SMALL, Some(64), &text("a")), 2);
    assert_eq!(vendor.times_embedded(SMALL, None, &text("a")), 0);
    assert_eq!(
        vendor.times_embedded("acme-embed-v1", None, &InputItem::Tokens(vec![1, 2])),
        1
    );
    assert_eq!(vendor.total_inputs_embedded(), 4);
    vendor.reset_records();
    assert!(vendor.embedding_requests().is_empty());
    assert_eq!(vendor.total_inputs_embedded(), 0);
}

#[tokio::test]
async fn acme_model() {
    let vendor = FakeVendor::start().await;
    let reply = embed(
        &vendor,
        json!({"model": "acme-embed-v1", "input": "three little words"}),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["usage"]["prompt_tokens"], 4);
    assert_eq!(float_vectors(&reply.body)[0].len(), 256);
    let reply = embed(
        &vendor,
        json!({"model": "acme-embed-v1", "input": "x", "dimensions": 128}),
    )
    .await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn models() {
    let vendor = FakeVendor::start().await;
    let client = reqwest::Client::new();
    let list: Value = client
        .get(format!("{}/models", vendor.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for id in [
        SMALL,
        "text-embedding-3-large",
        "text-embedding-ada-002",
        "acme-embed-v1",
    ] {
        assert!(ids.contains(&id), "{id}");
    }
    let one = client
        .get(format!("{}/models/{SMALL}", vendor.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(one.status(), 200);
    let one: Value = one.json().await.expect("json");
    assert_eq!(one["object"], "model");
    assert_eq!(one["id"], SMALL);
    let missing = client
        .get(format!("{}/models/nope", vendor.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn chat_completion() {
    let vendor = FakeVendor::start().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say something back"},
        ],
    });
    let reply = post(&vendor, "/chat/completions", body.to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["object"], "chat.completion");
    assert_eq!(
        reply.body["choices"][0]["message"]["content"],
        "say something back"
    );
    let reply = post(&vendor, "/chat/completions", "{}").await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn chat_stream_is_flushed_chunk_by_chunk() {
    let vendor = FakeVendor::start().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}],
    });
    let mut response = reqwest::Client::new()
        .post(format!("{}/chat/completions", vendor.base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        arrivals.push(Instant::now());
        text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
    }
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    assert!(chunks.len() >= 5);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "hi");
    assert!(chunks.last().expect("usage chunk")["usage"]["total_tokens"].is_u64());
    assert!(arrivals.len() >= 5, "chunks were not flushed separately");
    let spread = *arrivals.last().expect("arrival") - arrivals[0];
    assert!(spread >= Duration::from_millis(100));
}

#[tokio::test]
async fn echo_reflects_the_request() {
    let vendor = FakeVendor::start().await;
    let response = reqwest::Client::new()
        .put(format!("{}/echo/a/b?x=1&y=2", vendor.base_url()))
        .header("X-Custom", "value")
        .header("x-fake-status", "418")
        .body("payload ✓")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 418);
    let echo: Value = response.json().await.expect("json");
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/v1/echo/a/b");
    assert_eq!(echo["query"], "x=1&y=2");
    assert_eq!(echo["headers"]["x-custom"], "value");
    assert_eq!(echo["body"], "payload ✓");
    assert_eq!(vendor.requests_seen(), ["PUT /v1/echo/a/b?x=1&y=2"]);
}

#[tokio::test]
async fn unknown_routes_are_openai_404s() {
    let vendor = FakeVendor::start().await;
    let reply = post(&vendor, "/nope", "{}").await;
    assert_error(&reply, 404, Value::Null, Value::Null);
    let get = reqwest::get(format!("{}/embeddings", vendor.base_url()))
        .await
        .expect("sent");
    assert_eq!(get.status(), 405);
}

#[tokio::test]
async fn binary_prints_its_address_and_stops_on_sigterm() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-vendor"))
        .args(["--listen", "127.0.0.1:0", "--keys", "k1,k2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn fake-vendor");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read line");
    let base = line
        .trim_end()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    assert!(base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"));

    let client = reqwest::Client::new();
    let status = |key: &'static str| {
        let request = client
            .post(format!("{base}/embeddings"))
            .bearer_auth(key)
            .json(&json!({"model": SMALL, "input": "x"}));
        async move { request.send().await.expect("sent").status().as_u16() }
    };
    assert_eq!(status("k2").await, 200);
    assert_eq!(status("k3").await, 401);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit:?}");
}
