//! The fakes of the vendors' own APIs answer as those vendors do: their
//! validation, usage, error formats and rate limits.

use fake_vendor::{FakeVendor, Fault, Options, native_embedding, native_tokens, quantize};
use serde_json::{Value, json};

async fn send(
    url: String,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().post(url).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = req.send().await.expect("answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

const BEARER: (&str, &str) = ("authorization", "Bearer k");

#[tokio::test]
async fn cohere_validates_bills_and_limits() {
    let v = FakeVendor::start_with(Options {
        valid_keys: Some(vec!["k".into()]),
        ..Options::default()
    })
    .await;
    let url = format!("{}/v2/embed", v.cohere_url());
    let ok = json!({"model": "embed-v4.0", "texts": ["a b", "c"], "input_type": "search_query",
        "embedding_types": ["float", "int8"], "output_dimension": 256});
    let (status, _, body) = send(url.clone(), &[BEARER], ok.clone()).await;
    assert_eq!(status, 200, "{body}");
    let a = native_embedding("embed-v4.0", "search_query", "a b", Some(256)).expect("known");
    assert_eq!(body["embeddings"]["int8"][0], json!(quantize(&a, "int8")));
    assert_eq!(
        body["meta"]["billed_units"]["input_tokens"],
        native_tokens("a b") + native_tokens("c")
    );
    assert_eq!(body["response_type"], "embeddings_by_type");

    for bad in [
        json!({"model": "embed-v4.0", "texts": ["a"]}),
        json!({"model": "embed-v4.0", "texts": ["a"], "input_type": "search_query", "output_dimension": 100}),
        json!({"model": "embed-v4.0", "texts": vec!["a"; 97], "input_type": "search_query"}),
        json!({"texts": ["a"], "input_type": "search_query"}),
    ] {
        let (status, _, body) = send(url.clone(), &[BEARER], bad.clone()).await;
        assert_eq!(status, 400, "{bad}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("invalid request")),
            "{body}"
        );
        assert!(body["id"].is_string());
    }
    let (status, _, body) =
        send(url.clone(), &[("authorization", "Bearer nope")], ok.clone()).await;
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("invalid api token"))
    );
    v.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: Some(2),
    });
    let (status, headers, _) = send(url, &[BEARER], ok).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
}

#[tokio::test]
async fn voyage_answers_its_own_fields_and_errors() {
    let v = FakeVendor::start().await;
    let url = format!("{}/embeddings", v.voyage_url());
    let (status, _, body) = send(
        url.clone(),
        &[BEARER],
        json!({"model": "voyage-3.5", "input": "x y", "input_type": null, "truncation": true,
            "output_dimension": 512, "output_dtype": "uint8", "encoding_format": null}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let x = native_embedding("voyage-3.5", "", "x y", Some(512)).expect("known");
    assert_eq!(body["data"][0]["embedding"], json!(quantize(&x, "uint8")));
    assert_eq!(body["usage"], json!({"total_tokens": native_tokens("x y")}));
    let (status, _, body) = send(
        url.clone(),
        &[BEARER],
        json!({"model": "voyage-3.5", "input": "x", "input_type": "search"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["detail"].is_string(), "{body}");
    let (status, _, body) = send(url, &[], json!({"model": "voyage-3.5", "input": "x"})).await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (401, Some("Provided API key is invalid."))
    );
}

#[tokio::test]
async fn gemini_takes_its_key_as_google_does() {
    let v = FakeVendor::start().await;
    let url = format!(
        "{}/models/gemini-embedding-001:batchEmbedContents",
        v.gemini_url()
    );
    let batch = json!({"requests": [{"model": "models/gemini-embedding-001",
        "content": {"parts": [{"text": "hi"}]}, "taskType": "CLUSTERING", "outputDimensionality": 64}]});
    let (status, _, body) = send(url.clone(), &[], batch.clone()).await;
    assert_eq!(
        (status, body["error"]["status"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let (status, _, body) = send(format!("{url}?key=k"), &[], batch.clone()).await;
    assert_eq!(status, 200, "{body}");
    let want =
        native_embedding("gemini-embedding-001", "CLUSTERING", "hi", Some(64)).expect("known");
    let got: Vec<f32> = body["embeddings"][0]["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect();
    assert_eq!(got, want);
    let wrong =
        json!({"requests": [{"model": "models/other", "content": {"parts": [{"text": "hi"}]}}]});
    let (status, _, body) = send(url.clone(), &[("x-goog-api-key", "k")], wrong).await;
    assert_eq!(
        (status, body["error"]["status"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
    v.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: None,
    });
    let (status, _, body) = send(url, &[("x-goog-api-key", "k")], batch).await;
    assert_eq!(
        (status, body["error"]["status"].as_str()),
        (429, Some("RESOURCE_EXHAUSTED"))
    );
}

#[tokio::test]
async fn bedrock_wants_a_sigv4_signature() {
    let v = FakeVendor::start().await;
    let url = format!(
        "{}/model/amazon.titan-embed-text-v2%3A0/invoke",
        v.bedrock_url()
    );
    let body = json!({"inputText": "hello"});
    let (status, headers, error) = send(url.clone(), &[], body.clone()).await;
    assert_eq!(status, 403, "{error}");
    assert_eq!(headers["x-amzn-errortype"], "UnrecognizedClientException");
    let signature = format!(
        "AWS4-HMAC-SHA256 Credential=AKID/20261201/us-east-1/bedrock/aws4_request, \
        SignedHeaders=content-type;host;x-amz-date, Signature={}",
        "a".repeat(64)
    );
    let signed = [
        ("authorization", signature.as_str()),
        ("x-amz-date", "20261201T120000Z"),
    ];
    let (status, _, answer) = send(url.clone(), &signed, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["inputTextTokenCount"], native_tokens("hello"));
    let (status, headers, _) =
        send(url, &signed, json!({"inputText": "x", "dimensions": 300})).await;
    assert_eq!(status, 400);
    assert_eq!(headers["x-amzn-errortype"], "ValidationException");
}
