//! A true drop-in: passthrough, the two key modes, tenants, several vendors
//! and Azure, against the running gateway.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use common::*;
use embgate::auth::hash_key;
use fake_vendor::FakeVendor;
use futures_util::StreamExt;
use serde_json::{Value, json};

const VENDOR_KEY: &str = "sk-vendor-owned-by-the-company";

#[tokio::test]
async fn forward_mode_refuses_a_rejected_key_even_on_a_full_hit() {
    let gw = TestGateway::start_with(vendor_accepting(&[KEY]).await, &[]).await;
    let body = json!({"model": SMALL, "input": ["paid for by a good key"], "dimensions": 8});
    assert_eq!(post_with_key(&gw, Some(KEY), &body).await.status(), 200);
    let hit = post_with_key(&gw, Some(KEY), &body).await;
    assert_eq!(header(&hit, "x-embgate-cache"), "hit");

    let stolen = "sk-not-a-real-key-1234";
    let response = post_with_key(&gw, Some(stolen), &body).await;
    assert_eq!(response.status(), 401);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["code"], "invalid_api_key");
    let message = err["error"]["message"].as_str().expect("message");
    assert!(
        !message.contains(stolen) && !message.contains("1234"),
        "{message}"
    );

    let response = post_with_key(&gw, None, &body).await;
    assert_eq!(response.status(), 401);

    // Verdicts are remembered: one vendor check per distinct key.
    for _ in 0..3 {
        post_with_key(&gw, Some(KEY), &body).await;
        post_with_key(&gw, Some(stolen), &body).await;
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "embgate_auth_verifications_total{result=\"accepted\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "embgate_auth_verifications_total{result=\"rejected\"}"
        ),
        1.0
    );
    assert!(!metrics.contains(stolen) && !metrics.contains(KEY));
    // The caller's own key paid for the miss.
    let calls = gw.vendor.embedding_requests();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
}

fn tenant_env(name: &str, key: &str, isolated: bool) -> Vec<(String, String)> {
    let upper = name.to_uppercase();
    vec![
        (
            format!("EMBGATE__AUTH__TENANTS__{upper}__KEY_SHA256"),
            hash_key(key),
        ),
        (
            format!("EMBGATE__AUTH__TENANTS__{upper}__ISOLATED"),
            isolated.to_string(),
        ),
    ]
}

async fn gateway_mode() -> TestGateway {
    let mut env: Vec<(String, String)> = vec![
        ("EMBGATE__AUTH__MODE".into(), "gateway".into()),
        ("EMBGATE__UPSTREAM__API_KEY".into(), VENDOR_KEY.into()),
        // The gateway's key pays for passthrough: only listed routes pass.
        ("EMBGATE__PASSTHROUGH__ALLOW".into(), "/v1/echo".into()),
    ];
    env.extend(tenant_env("search", "gk-search", false));
    env.extend(tenant_env("ads", "gk-ads", false));
    env.extend(tenant_env("legal", "gk-legal", true));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestGateway::start_with(vendor_accepting(&[VENDOR_KEY]).await, &env).await
}

#[tokio::test]
async fn gateway_keys_admit_tenants_and_the_gateway_pays() {
    let gw = gateway_mode().await;
    let body = json!({"model": SMALL, "input": "tenant text", "dimensions": 8});

    let response = post_with_key(&gw, Some("gk-search"), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-embgate-cache"), "miss");
    let calls = gw.vendor.embedding_requests();
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some(format!("Bearer {VENDOR_KEY}").as_str()),
        "the vendor sees the gateway's key, never the client key"
    );

    for key in [Some("gk-unknown"), Some(VENDOR_KEY), None] {
        let response = post_with_key(&gw, key, &body).await;
        assert_eq!(response.status(), 401, "{key:?}");
        let err: Value = response.json().await.expect("json");
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }

    // Shared tenants share entries.
    let response = post_with_key(&gw, Some("gk-ads"), &body).await;
    assert_eq!(header(&response, "x-embgate-cache"), "hit");
    // The isolated tenant does not see them, and keeps its own.
    let response = post_with_key(&gw, Some("gk-legal"), &body).await;
    assert_eq!(header(&response, "x-embgate-cache"), "miss");
    let legal: Value = response.json().await.expect("json");
    let response = post_with_key(&gw, Some("gk-legal"), &body).await;
    assert_eq!(header(&response, "x-embgate-cache"), "hit");
    assert_eq!(
        vectors(&legal)[0],
        vendor_vector(SMALL, Some(8), &text("tenant text"))
    );
    // ... and a shared tenant does not see the isolated one's entries.
    let only_legal = json!({"model": SMALL, "input": "legal only", "dimensions": 8});
    post_with_key(&gw, Some("gk-legal"), &only_legal).await;
    let response = post_with_key(&gw, Some("gk-search"), &only_legal).await;
    assert_eq!(header(&response, "x-embgate-cache"), "miss");

    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, "embgate_tenant_requests_total{tenant=\"search\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&metrics, "embgate_tenant_requests_total{tenant=\"legal\"}"),
        3.0
    );
    assert!(
        metric_value(
            &metrics,
            &format!("embgate_tenant_saved_tokens_total{{model=\"{SMALL}\",tenant=\"ads\"}}")
        ) > 0.0
    );
    assert!(!metrics.contains("gk-") && !metrics.contains(VENDOR_KEY));
}

#[tokio::test]
async fn other_routes_pass_through_with_headers_body_and_status() {
    let gw = TestGateway::start().await;
    let models = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), 200);
    let models: Value = models.json().await.expect("json");
    assert_eq!(models["object"], "list");

    let echo = gw
        .http
        .put(format!("{}/v1/echo/some/path?x=1&y=two", gw.url))
        .bearer_auth(KEY)
        .header("x-custom", "kept")
        .header("connection", "x-hop")
        .header("x-hop", "dropped")
        .header("x-fake-status", "418")
        .body("raw body bytes")
        .send()
        .await
        .expect("echo");
    assert_eq!(echo.status(), 418);
    let echo: Value = echo.json().await.expect("json");
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/v1/echo/some/path");
    assert_eq!(echo["query"], "x=1&y=two");
    assert_eq!(echo["body"], "raw body bytes");
    assert_eq!(echo["headers"]["x-custom"], "kept");
    assert_eq!(echo["headers"]["authorization"], format!("Bearer {KEY}"));
    assert!(echo["headers"].get("x-hop").is_none(), "hop-by-hop dropped");

    let missing = gw
        .http
        .get(format!("{}/v2/nothing", gw.url))
        .send()
        .await
        .expect("404");
    assert_eq!(missing.status(), 404);
    let err: Value = missing.json().await.expect("json");
    assert!(err["error"]["message"].is_string());
}

#[tokio::test]
async fn streamed_chat_arrives_chunk_by_chunk() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(KEY)
        .json(&json!({
            "model": "gpt-4o-mini",
            "stream": true,
            "messages": [{"role": "user", "content": "say something"}]
        }))
        .send()
        .await
        .expect("chat");
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    let started = Instant::now();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        arrivals.push(started.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.matches("data: ").count() > 3);
    assert!(arrivals.len() > 2, "several chunks, not one buffered body");
    let spread = arrivals.last().copied().unwrap_or_default() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(50),
        "chunks were not buffered"
    );
}

#[tokio::test]
async fn gateway_mode_passthrough_uses_the_gateways_vendor_key() {
    let gw = gateway_mode().await;
    let echo = gw
        .http
        .get(format!("{}/v1/echo/x", gw.url))
        .bearer_auth("gk-search")
        .send()
        .await
        .expect("echo");
    assert_eq!(echo.status(), 200);
    let echo: Value = echo.json().await.expect("json");
    assert_eq!(
        echo["headers"]["authorization"],
        format!("Bearer {VENDOR_KEY}")
    );
    let refused = gw
        .http
        .get(format!("{}/v1/echo/x", gw.url))
        .bearer_auth("gk-nobody")
        .send()
        .await
        .expect("refused");
    assert_eq!(refused.status(), 401);
}

#[tokio::test]
async fn models_are_routed_to_their_vendor() {
    let acme = FakeVendor::start().await;
    let acme_url = acme.base_url();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__UPSTREAMS__ACME__BASE_URL", &acme_url),
            (
                "EMBGATE__UPSTREAMS__ACME__MODELS",
                "acme-*,some-exact-model",
            ),
        ],
    )
    .await;
    let (_, body) = gw
        .embed(&json!({"model": "acme-embed-v1", "input": "routed"}))
        .await;
    assert_eq!(
        vectors(&body)[0],
        vendor_vector("acme-embed-v1", None, &text("routed"))
    );
    assert_eq!(acme.embedding_requests().len(), 1);
    assert!(gw.vendor.embedding_requests().is_empty());
    gw.embed(&json!({"model": SMALL, "input": "routed", "dimensions": 8}))
        .await;
    assert_eq!(gw.vendor.embedding_requests().len(), 1);
    assert_eq!(acme.embedding_requests().len(), 1);
}

/// One call to the Azure endpoint: path, query, `api-key`, `authorization`.
type AzureCall = (String, Option<String>, Option<String>, Option<String>);

/// What an Azure OpenAI endpoint was asked.
#[derive(Default)]
struct AzureLog {
    seen: Mutex<Vec<AzureCall>>,
}

async fn azure_endpoint(
    State(log): State<Arc<AzureLog>>,
    req: Request,
) -> axum::response::Response {
    let entry = {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (
            req.uri().path().to_owned(),
            req.uri().query().map(str::to_owned),
            header("api-key"),
            header("authorization"),
        )
    };
    let keyed = entry.2.is_some();
    log.seen.lock().expect("log").push(entry);
    // As Azure: the key first, then the body.
    let refuse = |status: u16, message: &str| {
        let status = axum::http::StatusCode::from_u16(status).expect("status");
        let body = json!({"error": {"code": status.as_u16().to_string(), "message": message}});
        (status, axum::Json(body)).into_response()
    };
    if !keyed {
        return refuse(401, "Access denied due to invalid subscription key.");
    }
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let input = match &request["input"] {
        Value::Array(items) => items.first().and_then(Value::as_str),
        other => other.as_str(),
    }
    .unwrap_or_default()
    .to_owned();
    if input.is_empty() {
        return refuse(400, "'$.input' is invalid.");
    }
    let vector = vendor_vector(SMALL, Some(4), &text(&input));
    axum::Json(json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": SMALL,
        "usage": {"prompt_tokens": 1, "total_tokens": 1}
    }))
    .into_response()
}

#[tokio::test]
async fn azure_paths_and_headers_are_built_for_deployments() {
    let log = Arc::new(AzureLog::default());
    let app = axum::Router::new()
        .fallback(azure_endpoint)
        .with_state(Arc::clone(&log));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let azure_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__AUTH__MODE", "forward"),
            ("EMBGATE__UPSTREAMS__AZ__BASE_URL", &azure_url),
            ("EMBGATE__UPSTREAMS__AZ__FLAVOUR", "azure"),
            ("EMBGATE__UPSTREAMS__AZ__MODELS", SMALL),
            ("EMBGATE__UPSTREAMS__AZ__API_KEY", "az-secret"),
            ("EMBGATE__UPSTREAMS__AZ__API_VERSION", "2024-06-01"),
            (
                "EMBGATE__UPSTREAMS__AZ__DEPLOYMENTS__TEXT-EMBEDDING-3-SMALL",
                "emb-small",
            ),
        ],
    )
    .await;
    let (_, body) = gw
        .embed(&json!({"model": SMALL, "input": "via azure", "dimensions": 4}))
        .await;
    assert_eq!(
        vectors(&body)[0],
        vendor_vector(SMALL, Some(4), &text("via azure"))
    );
    let seen = log.seen.lock().expect("log").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    // First the caller's key is checked at the deployment (forward mode),
    // then the miss is paid with the gateway's Azure key.
    let (check, embed) = (&seen[0], &seen[1]);
    for call in [check, embed] {
        assert_eq!(call.0, "/openai/deployments/emb-small/embeddings");
        assert_eq!(call.1.as_deref(), Some("api-version=2024-06-01"));
        assert_eq!(call.3, None, "no bearer header to Azure");
    }
    assert_eq!(check.2.as_deref(), Some(KEY));
    assert_eq!(embed.2.as_deref(), Some("az-secret"));
    assert!(gw.vendor.embedding_requests().is_empty());
}
