//! The vendor's Files and Batch APIs, as an embeddings batch uses them:
//! the JSONL input file (one `/v1/embeddings` request of one input per
//! line, base64), its upload (`POST files`, purpose `batch`), the batch
//! (`POST batches`, `GET batches/{id}`), and its output and error files
//! (`GET files/{id}/content`), every answer line checked exactly as a
//! synchronous answer is ([`super::wire::check_openai_answer`]).
//!
//! Azure OpenAI serves the same API under `/openai/files` and
//! `/openai/batches` with its `api-version`, and names the deployment
//! where OpenAI names the model.

use axum::http::header;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::response::{ERROR_BODY_LIMIT, read_capped};
use super::wire::check_openai_answer;
use super::{Embeddings, Upstream, UpstreamError};
use crate::auth::ApiKey;
use crate::protocol::Input;

/// The endpoint every line of an embeddings batch calls.
pub const ENDPOINT: &str = "/v1/embeddings";

/// A batch as the vendor reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchState {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    /// Why a batch failed as a whole.
    #[serde(default)]
    pub errors: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

impl BatchState {
    /// Nothing more will happen to it.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }

    /// The vendor's own words on why the batch failed as a whole.
    pub fn failure(&self) -> Option<String> {
        let first = &self.errors.as_ref()?["data"][0];
        first["message"]
            .as_str()
            .or(first["code"].as_str())
            .map(str::to_owned)
    }

    pub fn counts(&self) -> RequestCounts {
        self.request_counts.unwrap_or_default()
    }
}

/// One line of an input file: a request for one input.
pub fn input_line(
    upstream: &Upstream,
    custom_id: &str,
    model: &str,
    dimensions: Option<u32>,
    input: &Input,
) -> Vec<u8> {
    let mut body = json!({
        "model": upstream.batch_model(model),
        "input": [input],
        "encoding_format": "base64",
    });
    if let Some(d) = dimensions {
        body["dimensions"] = json!(d);
    }
    let line = json!({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body});
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// What the vendor made of one line.
#[derive(Debug)]
pub enum LineResult {
    /// A checked vector (little-endian f32 bytes), and the tokens billed
    /// for it.
    Answered {
        custom_id: String,
        vector: Vec<u8>,
        tokens: Option<u64>,
    },
    Failed {
        custom_id: String,
        reason: String,
    },
}

#[derive(Deserialize)]
struct OutputLine {
    custom_id: String,
    #[serde(default)]
    response: Option<LineResponse>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct LineResponse {
    status_code: u16,
    body: Box<serde_json::value::RawValue>,
}

/// Reads an output or error file: each line's answer is checked as a
/// synchronous answer for one input of `dimensions` is; a line that is not
/// even readable is skipped (its input is then unanswered, and falls back).
pub fn read_results(file: &[u8], dimensions: Option<u32>) -> Vec<LineResult> {
    file.split(|b| *b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .filter_map(|l| serde_json::from_slice::<OutputLine>(l).ok())
        .map(|line| read_line(line, dimensions))
        .collect()
}

fn read_line(line: OutputLine, dimensions: Option<u32>) -> LineResult {
    let custom_id = line.custom_id;
    let failed = |reason: String| LineResult::Failed {
        custom_id: custom_id.clone(),
        reason,
    };
    let response = match (line.response, line.error) {
        (Some(r), _) => r,
        (None, Some(error)) => {
            let message = error["message"].as_str().or(error["code"].as_str());
            return failed(message.unwrap_or("failed").to_owned());
        }
        (None, None) => return failed("no response".to_owned()),
    };
    let body = response.body.get().as_bytes();
    if !(200..300).contains(&response.status_code) {
        let message = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return failed(format!("{}: {message}", response.status_code));
    }
    match check_openai_answer(body, 1, dimensions) {
        Ok(Embeddings {
            mut vectors,
            prompt_tokens,
        }) => match vectors.pop() {
            Some(vector) => LineResult::Answered {
                custom_id,
                vector,
                tokens: prompt_tokens,
            },
            None => failed("no vector".to_owned()),
        },
        Err(e) => failed(e.to_string()),
    }
}

/// The most an output file for `lines` lines of `dimensions` values can
/// legitimately need (floats as JSON text, each line's envelope).
pub fn output_limit(lines: u64, dimensions: u32) -> u64 {
    const PER_VALUE: u64 = 24;
    const PER_LINE: u64 = 2048;
    (u64::from(dimensions) * PER_VALUE + PER_LINE).saturating_mul(lines.max(1))
}

impl Upstream {
    /// Uploads a batch input file; its id.
    pub async fn upload_batch_file(
        &self,
        key: Option<&ApiKey>,
        jsonl: Bytes,
    ) -> Result<String, UpstreamError> {
        #[derive(Deserialize)]
        struct File {
            id: String,
        }
        let file: File = self
            .retrying(|| async {
                let part =
                    reqwest::multipart::Part::stream_with_length(jsonl.clone(), jsonl.len() as u64)
                        .file_name("embgate-batch.jsonl")
                        .mime_str("application/jsonl")
                        .map_err(|e| UpstreamError::Transport(e.without_url().to_string()))?;
                let form = reqwest::multipart::Form::new()
                    .text("purpose", "batch")
                    .part("file", part);
                let req = self
                    .http()
                    .post(self.batch_api_url("files"))
                    .multipart(form);
                self.batch_call(req, key).await
            })
            .await?;
        Ok(file.id)
    }

    /// Creates a batch of `/v1/embeddings` requests from an uploaded file.
    pub async fn create_batch(
        &self,
        key: Option<&ApiKey>,
        input_file_id: &str,
    ) -> Result<BatchState, UpstreamError> {
        let body = json!({
            "input_file_id": input_file_id,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
        })
        .to_string();
        // Each batch created is paid for: only a refusal is tried again,
        // never a failure after which the batch may exist after all.
        let refused = |e: &UpstreamError| matches!(e, UpstreamError::Vendor { status, .. } if status.as_u16() == 429);
        self.retrying_when(
            || {
                let req = self
                    .http()
                    .post(self.batch_api_url("batches"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
                self.batch_call(req, key)
            },
            refused,
        )
        .await
    }

    /// Where a batch stands.
    pub async fn batch(&self, key: Option<&ApiKey>, id: &str) -> Result<BatchState, UpstreamError> {
        let url = self.batch_api_url(&format!("batches/{}", path_segment(id)?));
        self.retrying(|| self.batch_call(self.http().get(&url), key))
            .await
    }

    /// A file's content, refused past `limit` bytes.
    pub async fn file_content(
        &self,
        key: Option<&ApiKey>,
        id: &str,
        limit: u64,
    ) -> Result<Bytes, UpstreamError> {
        let url = self.batch_api_url(&format!("files/{}/content", path_segment(id)?));
        self.retrying(|| async {
            let response = self.send(self.http().get(&url), key).await?;
            read_capped(response, limit, self.timeout()).await
        })
        .await
    }

    /// Sends a Files or Batch API request with this upstream's credential;
    /// a non-2xx answer is the vendor's error.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let timeout = self.timeout();
        let mut req = req.timeout(timeout);
        if let Some((name, value)) = self.credential(key) {
            req = req.header(name, value);
        }
        let response = req
            .send()
            .await
            .map_err(|e| super::client::transport_error(e, timeout))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = Box::new(response.headers().clone());
        let body = read_capped(response, ERROR_BODY_LIMIT, timeout).await?;
        Err(UpstreamError::Vendor {
            status,
            body,
            headers,
        })
    }

    /// [`Upstream::send`], the answer a small JSON object.
    async fn batch_call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
    ) -> Result<T, UpstreamError> {
        let response = self.send(req, key).await?;
        let body = read_capped(response, ERROR_BODY_LIMIT, self.timeout()).await?;
        serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::InvalidResponse(format!("unexpected answer: {e}")))
    }
}

/// Ids come back from the vendor: one that could leave its path segment is
/// refused rather than followed.
fn path_segment(id: &str) -> Result<&str, UpstreamError> {
    match !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        true => Ok(id),
        false => Err(UpstreamError::InvalidResponse(format!(
            "unexpected id {id:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_answers_and_failures_line_by_line() {
        let good = r#"{"id":"r1","custom_id":"a","response":{"status_code":200,"body":{"data":[{"index":0,"embedding":[0.5,1.0]}],"usage":{"prompt_tokens":3}}},"error":null}"#;
        let short = r#"{"id":"r2","custom_id":"b","response":{"status_code":200,"body":{"data":[{"index":0,"embedding":[0.5]}]}},"error":null}"#;
        let refused = r#"{"id":"r3","custom_id":"c","response":{"status_code":500,"body":{"error":{"message":"boom"}}},"error":null}"#;
        let expired = r#"{"id":"r4","custom_id":"d","response":null,"error":{"code":"batch_expired","message":"too late"}}"#;
        let file = [good, short, refused, expired, "garbage"].join("\n");
        let results = read_results(file.as_bytes(), Some(2));
        assert_eq!(results.len(), 4);
        assert!(
            matches!(&results[0], LineResult::Answered { custom_id, vector, tokens: Some(3) }
            if custom_id == "a" && *vector == [0.5f32, 1.0].map(f32::to_le_bytes).concat())
        );
        assert!(matches!(&results[1], LineResult::Failed { custom_id, .. } if custom_id == "b"));
        assert!(
            matches!(&results[2], LineResult::Failed { reason, .. } if reason.contains("boom"))
        );
        assert!(matches!(&results[3], LineResult::Failed { reason, .. } if reason == "too late"));
    }

    #[test]
    fn ids_stay_in_their_path_segment() {
        assert!(path_segment("batch_abc-1").is_ok());
        for bad in ["", "../x", "a/b", "a?b", "a%2f"] {
            assert!(path_segment(bad).is_err(), "{bad}");
        }
    }
}
