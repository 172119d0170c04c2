//! What a client can hold of the gateway is bounded: header read timeout,
//! connection cap, requests in flight, declared body size, drain deadline;
//! and every answer carries a request id.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use fake_vendor::{FakeVendor, Fault};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Long enough for anything that is going to happen to happen, on a busy
/// machine: only waited out when a test is failing.
const PATIENCE: Duration = Duration::from_secs(60);

async fn connect(gw: &TestGateway) -> TcpStream {
    TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// A request head (and `body`) as raw bytes.
fn raw_request(method: &str, path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {KEY}\r\n{extra}\r\n{body}"
    )
    .into_bytes()
}

/// Reads until the connection closes (or `PATIENCE` runs out, which fails).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the gateway never closed the connection");
    got
}

/// Reads one response head: its status and its lower-cased header lines.
async fn read_head(stream: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read");
            assert!(n > 0, "closed before an answer: {got:?}");
            got.push(byte[0]);
        }
    })
    .await
    .expect("no answer");
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let status = head[9..12].parse().expect("a status code");
    (status, head)
}

fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// A fresh id: 32 lower-case hex digits.
fn is_fresh_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Sends an embeddings request that the vendor holds for an hour, and
/// returns once the vendor has it.
async fn held_at_the_vendor(
    gw: &TestGateway,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    // The key is checked with the vendor before the slow part starts.
    gw.embed(&json!({"model": SMALL, "input": "warm up"})).await;
    gw.vendor.reset_records();
    gw.vendor.set_latency(Duration::from_secs(3600));
    let (http, url) = (gw.http.clone(), gw.url.clone());
    let held = tokio::spawn(async move {
        http.post(format!("{url}/v1/embeddings"))
            .bearer_auth(KEY)
            .json(&json!({"model": SMALL, "input": "held at the vendor"}))
            .send()
            .await
    });
    tokio::time::timeout(PATIENCE, async {
        while gw.vendor.embedding_requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the request never reached the vendor");
    held
}

#[tokio::test]
async fn a_connection_that_sends_no_headers_is_closed() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__SERVER__HEADER_READ_TIMEOUT_SECS", "1")],
    )
    .await;
    let mut silent = connect(&gw).await;
    read_to_close(&mut silent).await;

    // Half a request head is no better.
    let mut slow = connect(&gw).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: gat")
        .await
        .expect("write");
    read_to_close(&mut slow).await;

    // A connection that asks in time is served.
    assert_eq!(gw.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_one_to_close() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__SERVER__MAX_CONNECTIONS", "2"),
            ("EMBGATE__SERVER__HEADER_READ_TIMEOUT_SECS", "600"),
        ],
    )
    .await;
    let first = connect(&gw).await;
    let _second = connect(&gw).await;
    let mut third = connect(&gw).await;
    third
        .write_all(&raw_request("GET", "/healthz", "", ""))
        .await
        .expect("write");
    // Not served while two connections hold both places.
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "the third connection was served: {early:?}");

    drop(first);
    let (status, head) = read_head(&mut third).await;
    assert_eq!(status, 200, "{head}");
}

#[tokio::test]
async fn idle_connections_holding_every_place_are_dropped_and_health_answers_again() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__SERVER__MAX_CONNECTIONS", "2"),
            ("EMBGATE__SERVER__HEADER_READ_TIMEOUT_SECS", "1"),
        ],
    )
    .await;
    let mut idle = [connect(&gw).await, connect(&gw).await];
    let health = tokio::time::timeout(PATIENCE, gw.get("/healthz"))
        .await
        .expect("healthz never answered");
    assert_eq!(health.status(), 200);
    for stream in &mut idle {
        read_to_close(stream).await;
    }
}

#[tokio::test]
async fn requests_beyond_the_bound_in_flight_are_shed_while_health_answers() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__SERVER__MAX_REQUESTS_IN_FLIGHT", "1")],
    )
    .await;
    let slow = held_at_the_vendor(&gw).await;

    let shed = gw
        .post(&json!({"model": SMALL, "input": "one too many"}))
        .await;
    assert_eq!(shed.status(), 503);
    assert_eq!(header(&shed, "retry-after"), "1");
    assert!(is_fresh_id(&header(&shed, "x-request-id")));
    let body: Value = shed.json().await.expect("json");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], "overloaded");

    // Passthrough counts against the same bound.
    let models = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), 503);

    for route in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(gw.get(route).await.status(), 200, "{route}");
    }
    let shed_count = gw
        .metric(r#"embgate_http_requests_total{route="/v1/embeddings",status="503"}"#)
        .await;
    assert_eq!(shed_count, 1.0);
    assert_eq!(
        gw.vendor.embedding_requests().len(),
        1,
        "the shed one never left"
    );
    slow.abort();
}

#[tokio::test]
async fn a_declared_body_above_the_limit_is_refused_unread() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__LIMITS__MAX_BODY_BYTES", "1000")],
    )
    .await;
    for (method, path) in [
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/echo"),
        ("GET", "/healthz"),
    ] {
        let mut stream = connect(&gw).await;
        // Headers only: the body would be 1001 bytes, and never comes.
        stream
            .write_all(&raw_request(
                method,
                path,
                "content-type: application/json\r\ncontent-length: 1001\r\n",
                "",
            ))
            .await
            .expect("write");
        let (status, head) = read_head(&mut stream).await;
        assert_eq!(status, 413, "{path}: {head}");
        assert!(
            head_header(&head, "x-request-id").is_some_and(is_fresh_id),
            "{head}"
        );
    }
    assert!(gw.vendor.embedding_requests().is_empty());

    // At the limit is fine.
    let at_limit = json!({"model": SMALL, "input": "x".repeat(900)}).to_string();
    let padded = format!("{at_limit:<1000}");
    let response = gw
        .http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(padded)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_passthrough_body_without_a_length_is_cut_at_the_limit() {
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__LIMITS__MAX_BODY_BYTES", "1000")],
    )
    .await;
    // Streamed in 100-byte chunks, so reqwest sends no Content-Length.
    let echo_streamed = |chunks: usize| {
        let chunks = (0..chunks).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 100]));
        gw.http
            .post(format!("{}/v1/echo", gw.url))
            .bearer_auth(KEY)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
    };
    let response = echo_streamed(20).await.expect("answer");
    assert_eq!(response.status(), 413);
    assert!(is_fresh_id(&header(&response, "x-request-id")));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "request_too_large");

    // Under the limit it goes through.
    let response = echo_streamed(5).await.expect("answer");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["body"].as_str().map(str::len), Some(500));
}

#[tokio::test]
async fn shutdown_finishes_at_the_drain_deadline_despite_a_hanging_request() {
    let mut gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__SERVER__DRAIN_TIMEOUT_SECS", "1"),
            ("EMBGATE__UPSTREAM__TIMEOUT_SECS", "3600"),
        ],
    )
    .await;
    let hanging = held_at_the_vendor(&gw).await;

    tokio::time::timeout(PATIENCE, gw.shutdown())
        .await
        .expect("shutdown waited for the vendor");
    let answer = tokio::time::timeout(PATIENCE, hanging)
        .await
        .expect("the client was never let go")
        .expect("task");
    assert!(
        answer.is_err(),
        "the hanging request was dropped: {answer:?}"
    );
}

#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let gw = TestGateway::start().await;
    let embed_with = |id: Option<&str>| {
        let mut request = gw
            .http
            .post(format!("{}/v1/embeddings", gw.url))
            .bearer_auth(KEY)
            .json(&json!({"model": SMALL, "input": "identified"}));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };

    // None sent: a fresh one, different each time.
    let a = header(&embed_with(None).await.expect("answer"), "x-request-id");
    let b = header(&embed_with(None).await.expect("answer"), "x-request-id");
    assert!(is_fresh_id(&a) && is_fresh_id(&b), "{a} {b}");
    assert_ne!(a, b);

    // A sane one comes back as sent.
    let sane = "trace-7f3a/step:2";
    let response = embed_with(Some(sane)).await.expect("answer");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-request-id"), sane);
    let longest = "i".repeat(128);
    let response = embed_with(Some(&longest)).await.expect("answer");
    assert_eq!(header(&response, "x-request-id"), longest);

    // Too long, with a tab or a space, or not ASCII: replaced.
    for insane in [
        "i".repeat(129),
        "tab\tinside".to_owned(),
        "two words".to_owned(),
    ] {
        let response = embed_with(Some(&insane)).await.expect("answer");
        let id = header(&response, "x-request-id");
        assert!(is_fresh_id(&id), "{insane:?} answered with {id:?}");
    }
    let response = gw
        .http
        .get(format!("{}/healthz", gw.url))
        .header(
            "x-request-id",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text"),
        )
        .send()
        .await
        .expect("answer");
    assert!(is_fresh_id(&header(&response, "x-request-id")));

    // Errors: the gateway's own, and the vendor's (whose id is kept aside).
    let response = gw.post(&json!({"model": SMALL})).await;
    assert_eq!(response.status(), 400);
    assert!(is_fresh_id(&header(&response, "x-request-id")));
    gw.vendor.push_fault(Fault::Status {
        status: 400,
        retry_after_secs: None,
    });
    let response = gw
        .http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(KEY)
        .header("x-request-id", "mine-1")
        .json(&json!({"model": SMALL, "input": "refused by the vendor"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 400);
    assert_eq!(header(&response, "x-request-id"), "mine-1");
    assert!(header(&response, "x-vendor-request-id").starts_with("req_"));

    // Passthrough, with the vendor's id kept aside too.
    let response = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(KEY)
        .header("x-request-id", "mine-2")
        .send()
        .await
        .expect("models");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-request-id"), "mine-2");
    assert!(header(&response, "x-vendor-request-id").starts_with("req_"));
    let response = gw.get("/not-v1").await;
    assert_eq!(response.status(), 404);
    assert!(is_fresh_id(&header(&response, "x-request-id")));
}

/// Log lines of this test binary, captured once for all its tests.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("embgate=debug")
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        logs
    }))
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// With Redis unreachable, the lookup fails in the request and the write in
/// the fetch task it spawns: both log lines name the request.
#[tokio::test]
async fn log_lines_carry_the_request_span() {
    let logs = captured_logs();
    let gw = TestGateway::start_with(
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__URL", "redis://127.0.0.1:1/0"),
            ("EMBGATE__STORE__TIMEOUT_MS", "200"),
        ],
    )
    .await;
    let id = format!("span-test-{}", rand::random::<u32>());
    let response = gw
        .http
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(KEY)
        .header("x-request-id", &id)
        .json(&json!({"model": SMALL, "input": "logged"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200, "served from the vendor");
    // The write runs after the answer.
    gw.cache.settled().await;
    let text =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "request{{id={id} method=POST route=/v1/embeddings}}"
            ))
        })
        .collect();
    assert!(
        ours.iter()
            .any(|l| l.contains("store failed") && l.contains("op=\"get\"")),
        "lookup failure not in the span: {ours:#?}"
    );
    assert!(
        ours.iter()
            .any(|l| l.contains("store failed") && l.contains("op=\"set\"")),
        "write failure not in the span: {ours:#?}"
    );
}
