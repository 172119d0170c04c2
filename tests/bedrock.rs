//! Amazon Bedrock behind the gateway, against its fake: Titan text
//! embeddings v2 and Cohere on Bedrock through OpenAI's format, each call
//! signed with SigV4 from the AWS environment variables. One test in its own
//! process: it sets those variables before anything else runs.

mod common;

use common::{TestGateway, text, vectors};
use fake_vendor::{FakeVendor, Fault, native_embedding, native_tokens};
use serde_json::json;

const TITAN: &str = "amazon.titan-embed-text-v2:0";
const COHERE: &str = "cohere.embed-english-v3";

#[test]
fn bedrock_calls_are_signed_cached_and_accounted() {
    // Safe: no other thread exists yet in this test binary's only test.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE");
        std::env::set_var(
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        );
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let vendor = FakeVendor::start().await;
    let bedrock = vendor.bedrock_url();
    let gw = TestGateway::start_with(
        vendor,
        &[
            ("EMBGATE__AUTH__MODE", "open"),
            ("EMBGATE__UPSTREAM__API_KEY", "sk-openai"),
            ("EMBGATE__UPSTREAM__MAX_RETRIES", "0"),
            ("EMBGATE__UPSTREAMS__BEDROCK__FLAVOUR", "bedrock"),
            ("EMBGATE__UPSTREAMS__BEDROCK__BASE_URL", bedrock.as_str()),
            (
                "EMBGATE__UPSTREAMS__BEDROCK__MODELS",
                "amazon.titan-embed-*,cohere.embed-*",
            ),
        ],
    )
    .await;

    // Titan: one text a call, its own token count.
    let body = json!({"model": TITAN, "input": ["one two", "three"], "dimensions": 256});
    let (cache, miss) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    let want: Vec<Vec<f32>> = ["one two", "three"]
        .iter()
        .map(|t| native_embedding(TITAN, "", t, Some(256)).expect("known"))
        .collect();
    assert_eq!(vectors(&miss), want);
    let tokens = native_tokens("one two") + native_tokens("three");
    assert_eq!(miss["usage"]["prompt_tokens"], tokens);
    let sent = gw.vendor.embedding_requests();
    assert_eq!(sent.len(), 2, "one text a call");
    for r in &sent {
        let auth = r.authorization.as_deref().unwrap_or_default();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{auth}"
        );
        assert!(!auth.contains("wJalrXUtnFEMI"), "the secret never travels");
    }
    gw.settled().await;
    let (cache, hit) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&hit), want);
    let saved = format!("embgate_cache_saved_tokens_total{{model=\"{TITAN}\"}}");
    assert_eq!(gw.metric(&saved).await, tokens as f64);

    // `normalize` changes the vector, so the key; true is Titan's default.
    let (cache, _) = gw
        .embed(&json!({"model": TITAN, "input": "three", "dimensions": 256, "normalize": true}))
        .await;
    assert_eq!(cache, "hit");
    let (cache, raw) = gw
        .embed(&json!({"model": TITAN, "input": "three", "dimensions": 256, "normalize": false}))
        .await;
    assert_eq!(cache, "miss");
    let scaled: Vec<f32> = want[1].iter().map(|v| v * 2.5).collect();
    assert_eq!(vectors(&raw)[0], scaled);

    // Cohere on Bedrock: Cohere's fields, the model in the path.
    let (cache, co) = gw
        .embed(&json!({"model": COHERE, "input": ["a b c", "d"], "input_type": "search_query"}))
        .await;
    assert_eq!(cache, "miss");
    let want: Vec<Vec<f32>> = ["a b c", "d"]
        .iter()
        .map(|t| native_embedding(COHERE, "search_query", t, None).expect("known"))
        .collect();
    assert_eq!(vectors(&co), want);
    assert_eq!(
        co["usage"]["prompt_tokens"],
        native_tokens("a b c") + native_tokens("d")
    );
    assert_eq!(gw.vendor.times_embedded(COHERE, None, &text("d")), 1);

    // Bedrock's own InvokeModel at the gateway shares those entries.
    let invoke = |model: &str, body: serde_json::Value| {
        let model = model.replace(':', "%3A");
        gw.http
            .post(format!("{}/model/{model}/invoke", gw.url))
            .json(&body)
            .send()
    };
    let response = invoke(TITAN, json!({"inputText": "three", "dimensions": 256}))
        .await
        .expect("answers");
    assert_eq!(common::header(&response, "x-embgate-cache"), "hit");
    let titan: serde_json::Value = response.json().await.expect("json");
    let three = native_embedding(TITAN, "", "three", Some(256)).expect("known");
    let got: Vec<f32> = titan["embedding"]
        .as_array()
        .expect("embedding")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect();
    assert_eq!(got, three);
    assert_eq!(titan["inputTextTokenCount"], native_tokens("three"));
    let response = invoke(
        COHERE,
        json!({"texts": ["d"], "input_type": "search_query"}),
    )
    .await
    .expect("answers");
    assert_eq!(common::header(&response, "x-embgate-cache"), "hit");
    // The call's billed tokens were shared among its texts by size.
    let tokens: u64 = common::header(&response, "x-amzn-bedrock-input-token-count")
        .parse()
        .expect("a token count");
    assert!(tokens >= 1);
    let co: serde_json::Value = response.json().await.expect("json");
    assert_eq!(co["response_type"], "embeddings_floats");
    assert_eq!(co["embeddings"].as_array().map(Vec::len), Some(1));
    let response = invoke(TITAN, json!({"inputText": ""}))
        .await
        .expect("answers");
    assert_eq!(response.status(), 400);
    assert_eq!(
        common::header(&response, "x-amzn-errortype"),
        "ValidationException"
    );
    let error: serde_json::Value = response.json().await.expect("json");
    assert!(error["message"].is_string(), "{error}");

    // Bedrock's errors pass through and nothing is cached.
    gw.vendor.push_fault(Fault::Status {
        status: 429,
        retry_after_secs: None,
    });
    let limited = json!({"model": TITAN, "input": "fresh"});
    let response = gw.post(&limited).await;
    assert_eq!(response.status(), 429);
    let error: serde_json::Value = response.json().await.expect("json");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Too many requests")),
        "{error}"
    );
    let (cache, _) = gw.embed(&limited).await;
    assert_eq!(cache, "miss");
}
