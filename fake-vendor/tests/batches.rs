//! The Files and Batch APIs: uploads, the statuses a batch goes through,
//! output and error files, validation, and the controls tests use.

use base64::Engine as _;
use fake_vendor::{BatchFate, FakeVendor, InputItem, embedding};
use serde_json::{Value, json};

const SMALL: &str = "text-embedding-3-small";
const KEY: &str = "sk-test-key-0001";

fn text(s: &str) -> InputItem {
    InputItem::Text(s.to_owned())
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// One embeddings request line.
fn line(custom_id: &str, input: &str) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
        "body": {"model": SMALL, "input": [input], "encoding_format": "base64"}})
    .to_string()
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn upload(vendor: &FakeVendor, purpose: &str, jsonl: String) -> (u16, Value) {
    let part = reqwest::multipart::Part::text(jsonl).file_name("in.jsonl");
    let form = reqwest::multipart::Form::new()
        .text("purpose", purpose.to_owned())
        .part("file", part);
    let response = client()
        .post(format!("{}/files", vendor.base_url()))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .expect("sent");
    answer(response).await
}

async fn create(vendor: &FakeVendor, file_id: &str, endpoint: &str) -> (u16, Value) {
    let body = json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"});
    let response = client()
        .post(format!("{}/batches", vendor.base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("sent");
    answer(response).await
}

async fn get(vendor: &FakeVendor, path: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{}{path}", vendor.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    answer(response).await
}

/// A file's lines as JSON.
async fn content(vendor: &FakeVendor, id: &Value) -> Vec<Value> {
    let id = id.as_str().expect("a file id");
    let text = client()
        .get(format!("{}/files/{id}/content", vendor.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

async fn submit(vendor: &FakeVendor, lines: &[String]) -> String {
    let (status, file) = upload(vendor, "batch", lines.join("\n") + "\n").await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["purpose"], "batch");
    let (status, batch) = create(vendor, file["id"].as_str().expect("id"), "/v1/embeddings").await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["status"], "validating");
    batch["id"].as_str().expect("id").to_owned()
}

fn vector(item: &Value) -> Vec<f32> {
    let b64 = item["response"]["body"]["data"][0]["embedding"]
        .as_str()
        .expect("base64");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("decodes");
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[tokio::test]
async fn a_batch_goes_through_its_statuses_and_answers_each_line() {
    let vendor = FakeVendor::start().await;
    vendor.fail_batch_input(text("bad"));
    let id = submit(
        &vendor,
        &[line("a", "alpha"), line("b", "bad"), line("c", "gamma")],
    )
    .await;

    let mut seen = Vec::new();
    let batch = loop {
        let (status, batch) = get(&vendor, &format!("/batches/{id}")).await;
        assert_eq!(status, 200);
        seen.push(batch["status"].as_str().expect("status").to_owned());
        if batch["status"] == "finalizing" {
            assert_eq!(batch["request_counts"]["completed"], 2, "{batch}");
            assert_eq!(
                batch["output_file_id"],
                Value::Null,
                "not before completion"
            );
        }
        if batch["status"] == "completed" {
            break batch;
        }
        assert!(seen.len() < 10, "{seen:?}");
    };
    assert_eq!(seen, ["in_progress", "finalizing", "completed"]);
    assert_eq!(
        batch["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );

    let output = content(&vendor, &batch["output_file_id"]).await;
    let ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(output[0]["response"]["status_code"], 200);
    assert_eq!(
        vector(&output[0]),
        embedding(SMALL, None, &text("alpha")).expect("vector")
    );
    assert_eq!(
        vector(&output[1]),
        embedding(SMALL, None, &text("gamma")).expect("vector")
    );
    let errors = content(&vendor, &batch["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "b");
    assert_eq!(errors[0]["response"]["status_code"], 500);

    assert_eq!(vendor.times_embedded(SMALL, None, &text("alpha")), 1);
    assert_eq!(vendor.times_embedded(SMALL, None, &text("bad")), 0);
    let lines = vendor.batch_lines();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1].request.inputs, vec![text("bad")]);
    assert!(
        vendor.embedding_requests().is_empty(),
        "no synchronous call"
    );
}

#[tokio::test]
async fn held_batches_wait_and_finish_on_demand() {
    let vendor = FakeVendor::start().await;
    vendor.hold_batches(true);
    let id = submit(&vendor, &[line("a", "alpha")]).await;
    for _ in 0..3 {
        let (_, batch) = get(&vendor, &format!("/batches/{id}")).await;
        assert_eq!(batch["status"], "validating");
    }
    vendor.finish_batches();
    assert_eq!(vendor.batch_status(&id), Some("completed"));
    let (_, batch) = get(&vendor, &format!("/batches/{id}")).await;
    assert_eq!(batch["request_counts"]["completed"], 1);
}

#[tokio::test]
async fn batches_expire_fail_or_are_cancelled_as_asked() {
    let vendor = FakeVendor::start().await;
    vendor.push_batch_fate(BatchFate::Expire);
    vendor.push_batch_fate(BatchFate::Fail);
    let expired = submit(&vendor, &[line("a", "alpha"), line("b", "beta")]).await;
    let failed = submit(&vendor, &[line("a", "alpha")]).await;
    let cancelled = submit(&vendor, &[line("a", "alpha")]).await;
    let response = client()
        .post(format!("{}/batches/{cancelled}/cancel", vendor.base_url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("sent");
    let (status, batch) = answer(response).await;
    assert_eq!(status, 200);
    assert_eq!(batch["status"], "cancelling");
    vendor.finish_batches();

    let (_, batch) = get(&vendor, &format!("/batches/{expired}")).await;
    assert_eq!(batch["status"], "expired");
    assert_eq!(batch["output_file_id"], Value::Null);
    let errors = content(&vendor, &batch["error_file_id"]).await;
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["error"]["code"], "batch_expired");

    let (_, batch) = get(&vendor, &format!("/batches/{failed}")).await;
    assert_eq!(batch["status"], "failed");
    assert!(batch["errors"]["data"][0]["message"].is_string(), "{batch}");

    let (_, batch) = get(&vendor, &format!("/batches/{cancelled}")).await;
    assert_eq!(batch["status"], "cancelled");
    let errors = content(&vendor, &batch["error_file_id"]).await;
    assert_eq!(errors[0]["error"]["code"], "batch_cancelled");
    assert_eq!(vendor.total_inputs_embedded(), 0);
}

#[tokio::test]
async fn bad_input_files_and_requests_are_refused() {
    let vendor = FakeVendor::start().await;
    // A line for another endpoint fails the batch in validation.
    let mismatched = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": SMALL, "input": ["x"]}})
    .to_string();
    let id = submit(&vendor, &[mismatched]).await;
    let (_, batch) = get(&vendor, &format!("/batches/{id}")).await;
    assert_eq!(batch["status"], "failed");
    assert_eq!(batch["errors"]["data"][0]["code"], "mismatched_url");
    let id = submit(&vendor, &[line("a", "x"), line("a", "y")]).await;
    let (_, batch) = get(&vendor, &format!("/batches/{id}")).await;
    assert_eq!(batch["errors"]["data"][0]["code"], "duplicate_custom_id");

    let (status, _) = upload(&vendor, "nonsense", line("a", "x")).await;
    assert_eq!(status, 400);
    let (_, file) = upload(&vendor, "fine-tune", line("a", "x")).await;
    let (status, _) = create(&vendor, file["id"].as_str().expect("id"), "/v1/embeddings").await;
    assert_eq!(status, 400, "not a batch file");
    let (status, _) = create(&vendor, "file-missing", "/v1/embeddings").await;
    assert_eq!(status, 404);
    let (_, file) = upload(&vendor, "batch", line("a", "x")).await;
    let (status, _) = create(&vendor, file["id"].as_str().expect("id"), "/v1/nowhere").await;
    assert_eq!(status, 400);
    let (status, _) = get(&vendor, "/batches/batch_missing").await;
    assert_eq!(status, 404);

    let response = client()
        .get(format!("{}/batches/{id}", vendor.base_url()))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 401, "the key is required");
}

#[tokio::test]
async fn azure_paths_take_an_api_key_and_an_api_version() {
    let vendor = FakeVendor::start().await;
    let root = format!("http://{}", vendor.addr());
    let call = |url: String, key: Option<&'static str>| {
        let mut req = client().get(url);
        if let Some(key) = key {
            req = req.header("api-key", key);
        }
        async move { req.send().await.expect("sent").status().as_u16() }
    };
    let missing = format!("{root}/openai/batches/batch_x?api-version=2024-10-21");
    assert_eq!(
        call(missing.clone(), Some("az-key")).await,
        404,
        "no such batch"
    );
    assert_eq!(call(missing, None).await, 401, "no api-key");
    let unversioned = format!("{root}/openai/batches/batch_x");
    assert_eq!(call(unversioned, Some("az-key")).await, 404);
}
