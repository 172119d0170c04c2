//! Safe by default: `auto` never opens the gateway's key, passthrough
//! paths stay under the vendor's base path, routes paid by the gateway pass
//! only when listed, every caller key is checked by the vendor that serves
//! it, and the cache headers can be hidden.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use common::*;
use embgate::auth::hash_key;
use fake_vendor::FakeVendor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VENDOR_KEY: &str = "sk-vendor-owned-by-the-company";
const TENANT_KEY: &str = "gk-search";

/// A gateway in `mode` paying with `VENDOR_KEY`, one tenant (`TENANT_KEY`)
/// and `allow` as `passthrough.allow`.
async fn paying_gateway(mode: &str, allow: &str) -> TestGateway {
    let tenant_hash = hash_key(TENANT_KEY);
    TestGateway::start_with(
        vendor_accepting(&[VENDOR_KEY, KEY]).await,
        &[
            ("EMBGATE__AUTH__MODE", mode),
            ("EMBGATE__UPSTREAM__API_KEY", VENDOR_KEY),
            ("EMBGATE__AUTH__TENANTS__SEARCH__KEY_SHA256", &tenant_hash),
            ("EMBGATE__PASSTHROUGH__ALLOW", allow),
        ],
    )
    .await
}

/// Sends `METHOD target` exactly as written (an HTTP client would resolve
/// dot segments before sending) and returns the status and body.
async fn raw_request(gw: &TestGateway, method: &str, target: &str, key: &str) -> (u16, Value) {
    let addr = gw.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request written");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("answer read");
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = answer
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

async fn get(gw: &TestGateway, path: &str, key: &str) -> reqwest::Response {
    gw.http
        .get(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .send()
        .await
        .expect("answer")
}

/// Runs `embgate serve` with `env`, expecting it to refuse to start:
/// the exit code and what it wrote to stderr.
async fn refused_start(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_embgate"))
        .arg("serve")
        .env("EMBGATE__LISTEN", "127.0.0.1:0")
        .env("EMBGATE__STORE__URL", redis_url())
        .envs(env.iter().copied())
        .output()
        .await
        .expect("runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn auto_with_a_vendor_key_and_no_tenants_refuses_to_start() {
    let (code, stderr) =
        refused_start(&[("EMBGATE__UPSTREAM__API_KEY", "sk-would-be-spent-by-anyone")]).await;
    assert_eq!(code, Some(2));
    for choice in [
        "auth.mode",
        "forward",
        "gateway",
        "open",
        "EMBGATE__AUTH__MODE",
    ] {
        assert!(stderr.contains(choice), "{choice} not named in: {stderr}");
    }
    assert!(!stderr.contains("sk-would-be-spent-by-anyone"));

    // The library refuses the same settings.
    let settings = embgate::config::Settings::load_from(
        None,
        Some(
            [("EMBGATE__UPSTREAM__API_KEY", "sk-1")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
        ),
    )
    .expect("loads");
    assert!(matches!(
        embgate::Gateway::new(&settings),
        Err(embgate::StartupError::Config(_))
    ));
}

#[tokio::test]
async fn unknown_configuration_keys_stop_the_binary() {
    let (code, stderr) = refused_start(&[
        ("EMBGATE__AUTH__MOD", "open"),
        ("EMBGATE__LIMITS__MAX_INPUT", "1"),
    ])
    .await;
    assert_eq!(code, Some(2));
    for named in [
        "auth.mod (environment: EMBGATE__AUTH__MOD)",
        "limits.max_input (environment: EMBGATE__LIMITS__MAX_INPUT)",
    ] {
        assert!(stderr.contains(named), "{named} not named in: {stderr}");
    }
}

#[tokio::test]
async fn passthrough_refuses_dot_segments_before_anything_is_sent() {
    // Every route allowed, on the gateway's key: only the path check stands
    // between these requests and the vendor's other paths.
    let gw = paying_gateway("gateway", "/v1").await;
    for target in [
        "/v1/../admin",
        "/v1/../../admin/api_keys",
        "/v1/models/../../admin",
        "/v1/./models",
        "/v1/%2e%2e/anything",
        "/v1/%2E%2E/anything",
        "/v1/%2e%2E/%2e%2e/admin",
        "/v1/.%2e/x",
        "/v1/%2e/models",
        "/v1/files%2f..%2fadmin",
        "/v1/files%2F%2e%2e%2Fadmin",
        "/v1/files%5c..%5cadmin",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let (status, body) = raw_request(&gw, method, target, TENANT_KEY).await;
            assert_eq!(status, 400, "{method} {target}: {body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{target}");
            assert_eq!(body["error"]["code"], "invalid_path", "{target}");
        }
    }
    assert!(
        gw.vendor.requests_seen().is_empty(),
        "nothing reached the vendor: {:?}",
        gw.vendor.requests_seen()
    );
    // Decoded once only: the vendor gets the literal segment, under /v1.
    let (status, _) = raw_request(&gw, "GET", "/v1/echo/%252e%252e/x", TENANT_KEY).await;
    assert_eq!(status, 200);
    let (status, _) = raw_request(&gw, "GET", "/v1/models", TENANT_KEY).await;
    assert_eq!(status, 200);
    assert_eq!(
        gw.vendor.requests_seen(),
        ["GET /v1/echo/%252e%252e/x", "GET /v1/models"]
    );

    // The same in forward mode, where callers pay with their own key.
    let forward = TestGateway::start().await;
    let (status, body) = raw_request(&forward, "GET", "/v1/%2e%2e/admin", KEY).await;
    assert_eq!(status, 400, "{body}");
    assert!(forward.vendor.requests_seen().is_empty());
}

#[tokio::test]
async fn gateway_paid_routes_pass_only_when_listed() {
    for mode in ["gateway", "open"] {
        let gw = paying_gateway(mode, "/v1/models, echo").await;
        assert_eq!(get(&gw, "/v1/models", TENANT_KEY).await.status(), 200);
        assert_eq!(
            get(&gw, "/v1/models/gpt-4o", TENANT_KEY).await.status(),
            200
        );
        let echo = get(&gw, "/v1/echo/a", TENANT_KEY).await;
        assert_eq!(echo.status(), 200, "{mode}");
        let echo: Value = echo.json().await.expect("json");
        assert_eq!(
            echo["headers"]["authorization"],
            format!("Bearer {VENDOR_KEY}"),
            "{mode}: the gateway's key pays"
        );
        let seen = gw.vendor.requests_seen().len();
        for path in ["/v1/chat/completions", "/v1/modelsx", "/v1/files", "/v1"] {
            let refused = gw
                .http
                .post(format!("{}{path}", gw.url))
                .bearer_auth(TENANT_KEY)
                .json(&json!({"model": "gpt-4o-mini", "messages": []}))
                .send()
                .await
                .expect("answer");
            assert_eq!(refused.status(), 403, "{mode} {path}");
            let err: Value = refused.json().await.expect("json");
            assert_eq!(err["error"]["code"], "passthrough_not_allowed");
            let message = err["error"]["message"].as_str().expect("message");
            assert!(message.contains("passthrough.allow"), "{message}");
        }
        assert_eq!(
            gw.vendor.requests_seen().len(),
            seen,
            "{mode}: refused before sending"
        );
    }

    // Gateway mode still wants a tenant key before the allowlist is read.
    let gw = paying_gateway("gateway", "/v1/models").await;
    assert_eq!(get(&gw, "/v1/models", "gk-nobody").await.status(), 401);
    // Nothing is listed by default.
    let gw = paying_gateway("gateway", "").await;
    assert_eq!(get(&gw, "/v1/models", TENANT_KEY).await.status(), 403);
    assert!(gw.vendor.requests_seen().is_empty());
}

#[tokio::test]
async fn forwarded_caller_keys_pass_every_route_and_gateway_keys_need_the_list() {
    // Forward mode, no key of the gateway's: the caller pays, all pass.
    let gw = TestGateway::start_with(vendor_accepting(&[KEY]).await, &[]).await;
    for path in ["/v1/models", "/v1/echo/x"] {
        let response = get(&gw, path, KEY).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    let echo: Value = get(&gw, "/v1/echo/x", KEY)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(echo["headers"]["authorization"], format!("Bearer {KEY}"));

    // Forward mode with a key of the gateway's own: it would pay, so the
    // list applies, and the caller's key must still be a vendor key.
    let gw = paying_gateway("forward", "/v1/echo").await;
    assert_eq!(get(&gw, "/v1/models", KEY).await.status(), 403);
    let echo = get(&gw, "/v1/echo/x", KEY).await;
    assert_eq!(echo.status(), 200);
    let echo: Value = echo.json().await.expect("json");
    assert_eq!(
        echo["headers"]["authorization"],
        format!("Bearer {VENDOR_KEY}")
    );
    let stranger = get(&gw, "/v1/echo/x", "sk-not-a-vendor-key").await;
    assert_eq!(stranger.status(), 401);
    assert_eq!(
        gw.vendor
            .requests_seen()
            .iter()
            .filter(|r| r.contains("/echo"))
            .count(),
        1,
        "the stranger's call was not sent"
    );
}

#[tokio::test]
async fn keys_are_verified_by_the_vendor_that_serves_the_model() {
    let acme = vendor_accepting(&["sk-acme-owned", "sk-acme-caller"]).await;
    let acme_url = acme.base_url();
    let gw = TestGateway::start_with(
        vendor_accepting(&[KEY]).await,
        &[
            ("EMBGATE__AUTH__MODE", "forward"),
            ("EMBGATE__UPSTREAMS__ACME__BASE_URL", &acme_url),
            ("EMBGATE__UPSTREAMS__ACME__MODELS", "acme-*"),
            ("EMBGATE__UPSTREAMS__ACME__API_KEY", "sk-acme-owned"),
        ],
    )
    .await;
    let acme_body = json!({"model": "acme-embed-v1", "input": "acme text"});
    let default_body = json!({"model": SMALL, "input": "default text", "dimensions": 8});

    // A key of the default vendor does not spend acme's key.
    let response = post_with_key(&gw, Some(KEY), &acme_body).await;
    assert_eq!(response.status(), 401);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert!(
        acme.embedding_requests().is_empty(),
        "acme's key was not spent"
    );

    // An acme key is accepted for acme's models, paid by the gateway's key...
    let response = post_with_key(&gw, Some("sk-acme-caller"), &acme_body).await;
    assert_eq!(response.status(), 200);
    let calls = acme.embedding_requests();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].authorization.as_deref(),
        Some("Bearer sk-acme-owned")
    );
    // ... and it is not a key of the default vendor.
    assert_eq!(
        post_with_key(&gw, Some("sk-acme-caller"), &default_body)
            .await
            .status(),
        401
    );
    assert_eq!(
        post_with_key(&gw, Some(KEY), &default_body).await.status(),
        200
    );

    // Each check was a free embeddings call with the caller's own key.
    let checks = acme.key_checks();
    assert_eq!(
        checks
            .iter()
            .map(|c| (c.authorization.clone().unwrap_or_default(), c.status))
            .collect::<Vec<_>>(),
        [
            (format!("Bearer {KEY}"), 401),
            ("Bearer sk-acme-caller".to_owned(), 400),
        ]
    );
    assert_eq!(checks[1].model.as_deref(), Some("acme-embed-v1"));
    assert_eq!(acme.total_inputs_embedded(), 1);

    // Verdicts are kept per endpoint and key: repeating costs no new check.
    for _ in 0..3 {
        post_with_key(&gw, Some(KEY), &acme_body).await;
        post_with_key(&gw, Some("sk-acme-caller"), &acme_body).await;
        post_with_key(&gw, Some(KEY), &default_body).await;
    }
    assert_eq!(acme.key_checks().len(), 2);
    assert_eq!(gw.vendor.key_checks().len(), 2);
    assert_eq!(
        gw.metric("embgate_auth_verifications_total{result=\"accepted\"}")
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("embgate_auth_verifications_total{result=\"rejected\"}")
            .await,
        2.0
    );
}

/// A vendor whose key check fails with 503 the first time, then works.
async fn flaky_vendor(calls: Arc<AtomicUsize>) -> String {
    async fn answer(
        State(calls): State<Arc<AtomicUsize>>,
        _req: Request,
    ) -> axum::response::Response {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            let body = json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}});
            return (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(body),
            )
                .into_response();
        }
        let body = json!({"error": {"message": "'$.input' is invalid.", "type": "invalid_request_error", "param": null, "code": null}});
        (axum::http::StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    }
    let app = axum::Router::new().fallback(answer).with_state(calls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test]
async fn a_failed_key_check_reaches_the_caller_and_is_not_kept() {
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = flaky_vendor(Arc::clone(&calls)).await;
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__UPSTREAMS__FLAKY__BASE_URL", &flaky),
            ("EMBGATE__UPSTREAMS__FLAKY__MODELS", "flaky-*"),
        ],
    )
    .await;
    let body = json!({"model": "flaky-embed", "input": "x"});
    let response = post_with_key(&gw, Some(KEY), &body).await;
    assert_eq!(response.status(), 503);
    let err: Value = response.json().await.expect("json");
    assert_eq!(err["error"]["message"], "overloaded");
    assert_eq!(
        gw.metric("embgate_auth_verifications_total{result=\"error\"}")
            .await,
        1.0
    );
    // Checked again: the error was not kept as a verdict.
    let _ = post_with_key(&gw, Some(KEY), &body).await;
    assert!(calls.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        gw.metric("embgate_auth_verifications_total{result=\"accepted\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn cache_headers_can_be_hidden() {
    let body = json!({"model": SMALL, "input": "who asked before?", "dimensions": 8});
    let shown = TestGateway::start().await;
    let response = shown.post(&body).await;
    assert_eq!(header(&response, "x-embgate-cache"), "miss");
    assert!(!header(&response, "x-embgate-upstream-tokens").is_empty());

    let hidden = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__RESPONSE__CACHE_HEADERS", "false")],
    )
    .await;
    for _ in 0..2 {
        let response = hidden.post(&body).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("x-embgate-cache").is_none());
        assert!(
            response
                .headers()
                .get("x-embgate-upstream-tokens")
                .is_none()
        );
    }
    assert_eq!(
        hidden.vendor.embedding_requests().len(),
        1,
        "the second was a hit"
    );
}
