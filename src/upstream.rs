//! The vendor client: one `POST {base_url}/embeddings` per batch of misses,
//! asking for base64 (exact f32 bytes), retried on 429/5xx/transport
//! failures, and checked before anything is trusted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::auth::ApiKey;
use crate::config::{Flavour, NamedUpstream, Settings, UpstreamSettings};
use crate::metrics::Metrics;
use crate::protocol::Input;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The vendor answered with an error; it reaches the caller as sent.
    #[error("vendor answered {status}")]
    Vendor {
        status: StatusCode,
        body: Bytes,
        /// Boxed: errors travel through every `Result` on the miss path.
        headers: Box<HeaderMap>,
    },
    #[error("vendor unreachable: {0}")]
    Transport(String),
    #[error("vendor did not answer within {0:?}")]
    Timeout(Duration),
    /// A 2xx answer that does not hold exactly the vectors asked for.
    #[error("vendor sent an invalid response: {0}")]
    InvalidResponse(String),
}

impl UpstreamError {
    fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Vendor { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            UpstreamError::Transport(_) | UpstreamError::Timeout(_) => true,
            UpstreamError::InvalidResponse(_) => false,
        }
    }

    /// The wait the vendor asked for (`retry-after-ms` or `Retry-After` seconds).
    fn retry_after(&self) -> Option<Duration> {
        let UpstreamError::Vendor { headers, .. } = self else {
            return None;
        };
        let number = |name: &str| -> Option<f64> {
            headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok()
        };
        let secs = number("retry-after-ms")
            .map(|ms| ms / 1000.0)
            .or_else(|| number("retry-after"))?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
    }
}

// Built once: a header looked up by `&str` is parsed on every call.
const OPENAI_ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");

/// What a caller contributes to an upstream call.
#[derive(Debug, Clone, Default)]
pub struct CallerAuth {
    /// The caller's own vendor key: set in forward mode only, never a
    /// gateway key.
    pub key: Option<ApiKey>,
    pub organization: Option<HeaderValue>,
    pub project: Option<HeaderValue>,
}

impl CallerAuth {
    pub fn new(key: Option<ApiKey>, h: &HeaderMap) -> Self {
        CallerAuth {
            key,
            organization: h.get(OPENAI_ORGANIZATION).cloned(),
            project: h.get(OPENAI_PROJECT).cloned(),
        }
    }
}

/// One upstream embeddings call.
pub struct EmbedCall<'a> {
    pub model: &'a str,
    pub inputs: Vec<&'a Input>,
    pub dimensions: Option<u32>,
    pub user: Option<&'a str>,
    pub extra: &'a [(String, Box<RawValue>)],
    pub auth: &'a CallerAuth,
}

/// A checked answer: one vector per input, in input order.
#[derive(Debug)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the vendor billed for the call, when it says.
    pub prompt_tokens: Option<u64>,
}

/// One vendor endpoint.
pub struct Upstream {
    name: String,
    http: reqwest::Client,
    base_url: String,
    api_key: Option<ApiKey>,
    flavour: Flavour,
    api_version: String,
    deployments: HashMap<String, String>,
    settings: UpstreamSettings,
    metrics: Arc<Metrics>,
}

/// Every configured vendor, and which one serves a model.
pub struct Upstreams {
    default: Arc<Upstream>,
    exact: HashMap<String, Arc<Upstream>>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<Upstream>)>,
}

impl Upstreams {
    pub fn new(settings: &Settings, metrics: &Arc<Metrics>) -> Result<Upstreams, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let make = |name: &str, base_url: &str, api_key: &str, named: Option<&NamedUpstream>| {
            Arc::new(Upstream {
                name: name.to_owned(),
                http: http.clone(),
                base_url: base_url.trim_end_matches('/').to_owned(),
                api_key: Some(api_key).filter(|k| !k.is_empty()).map(ApiKey::new),
                flavour: named.map_or(Flavour::Openai, |n| n.flavour),
                api_version: named.map_or_else(String::new, |n| n.api_version.clone()),
                deployments: named.map_or_else(HashMap::new, |n| n.deployments.clone()),
                settings: settings.upstream.clone(),
                metrics: Arc::clone(metrics),
            })
        };
        let default = make(
            "default",
            &settings.upstream.base_url,
            &settings.upstream.api_key,
            None,
        );
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        let mut names: Vec<&String> = settings.upstreams.keys().collect();
        names.sort();
        for name in names {
            let named = &settings.upstreams[name];
            let upstream = make(name, &named.base_url, &named.api_key, Some(named));
            for pattern in named
                .models
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                match pattern.strip_suffix('*') {
                    Some(prefix) => prefixes.push((prefix.to_owned(), Arc::clone(&upstream))),
                    None => {
                        exact.insert(pattern.to_owned(), Arc::clone(&upstream));
                    }
                }
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        Ok(Upstreams {
            default,
            exact,
            prefixes,
        })
    }

    /// The upstream serving `model`: an exact name, else the longest
    /// prefix, else the default.
    pub fn route(&self, model: &str) -> &Arc<Upstream> {
        self.exact
            .get(model)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| model.starts_with(p.as_str()))
                    .map(|(_, u)| u)
            })
            .unwrap_or(&self.default)
    }

    /// The upstream that other routes are passed through to.
    pub fn default(&self) -> &Arc<Upstream> {
        &self.default
    }
}

impl Upstream {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn has_own_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// What identifies the vectors of `model` at this upstream, for the
    /// cache key: the base URL (and for Azure the deployment).
    pub fn namespace(&self, model: &str) -> String {
        match self.flavour {
            Flavour::Openai => self.base_url.clone(),
            Flavour::Azure => format!("{}#azure:{}", self.base_url, self.deployment(model)),
        }
    }

    fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.deployments.get(model).map_or(model, String::as_str)
    }

    /// Where embeddings of `model` are requested.
    pub fn embeddings_url(&self, model: &str) -> String {
        match self.flavour {
            Flavour::Openai => format!("{}/embeddings", self.base_url),
            Flavour::Azure => format!(
                "{}/openai/deployments/{}/embeddings?api-version={}",
                self.base_url,
                self.deployment(model),
                self.api_version
            ),
        }
    }

    /// The credential header for a call: the gateway's key when it holds
    /// one, else the caller's.
    pub fn credential(&self, caller: Option<&ApiKey>) -> Option<(HeaderName, HeaderValue)> {
        self.credential_for(self.api_key.as_ref().or(caller)?)
    }

    /// Asks the vendor whether `key` may call the embeddings endpoint that
    /// serves `model`, without paying for it: the probe's empty input is
    /// refused (400, or 422 at some compatible servers) only after the key
    /// has been authenticated for that very endpoint, and nothing is billed.
    /// `Ok(false)` for 401/403 or a refusal that names the key as invalid;
    /// other answers and transport failures are errors, not verdicts.
    pub async fn verify_key(&self, key: &ApiKey, model: &str) -> Result<bool, UpstreamError> {
        let timeout = Duration::from_secs(self.settings.timeout_secs);
        let probe = serde_json::json!({ "model": model, "input": "" }).to_string();
        let mut req = self
            .http
            .post(self.embeddings_url(model))
            .timeout(timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(probe);
        if let Some((name, value)) = self.credential_for(key) {
            req = req.header(name, value);
        }
        let response = req.send().await.map_err(|e| transport_error(e, timeout))?;
        let status = response.status();
        let headers = Box::new(response.headers().clone());
        let body = response
            .bytes()
            .await
            .map_err(|e| transport_error(e, timeout))?;
        match status.as_u16() {
            401 | 403 => Ok(false),
            400 | 422 if names_invalid_key(&body) => Ok(false),
            200..=299 | 400 | 422 => Ok(true),
            _ => Err(UpstreamError::Vendor {
                status,
                body,
                headers,
            }),
        }
    }

    /// The header carrying exactly `key` in this flavour.
    pub fn credential_for(&self, key: &ApiKey) -> Option<(HeaderName, HeaderValue)> {
        match self.flavour {
            Flavour::Openai => Some((header::AUTHORIZATION, key.bearer()?)),
            Flavour::Azure => Some((crate::auth::API_KEY, key.header_value()?)),
        }
    }

    /// Embeds `call.inputs`, retrying transient failures within the deadline.
    pub async fn embed(&self, call: &EmbedCall<'_>) -> Result<Embeddings, UpstreamError> {
        let body = serde_json::to_vec(&RequestBody(call))
            .map_err(|e| UpstreamError::InvalidResponse(format!("encoding request: {e}")))?;
        let body = Bytes::from(body);
        let deadline = Instant::now() + Duration::from_secs(self.settings.retry_deadline_secs);
        let mut attempt = 0u32;
        loop {
            let err = match self.send_once(call, body.clone()).await {
                Ok(embeddings) => return Ok(embeddings),
                Err(e) => e,
            };
            if !err.is_retryable() || attempt >= self.settings.max_retries {
                return Err(err);
            }
            let wait = err.retry_after().unwrap_or_else(|| backoff(attempt));
            if Instant::now() + wait > deadline {
                return Err(err);
            }
            tracing::debug!(upstream = %self.name, attempt, ?wait, error = %err, "retrying upstream");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn send_once(
        &self,
        call: &EmbedCall<'_>,
        body: Bytes,
    ) -> Result<Embeddings, UpstreamError> {
        let timeout = Duration::from_secs(self.settings.timeout_secs);
        let mut req = self
            .http
            .post(self.embeddings_url(call.model))
            .timeout(timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some((name, value)) = self.credential(call.auth.key.as_ref()) {
            req = req.header(name, value);
        }
        if let Some(org) = &call.auth.organization {
            req = req.header(OPENAI_ORGANIZATION, org.clone());
        }
        if let Some(project) = &call.auth.project {
            req = req.header(OPENAI_PROJECT, project.clone());
        }

        let started = Instant::now();
        let result = req.send().await.map_err(|e| transport_error(e, timeout));
        self.metrics
            .upstream_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(response) => response.status().as_str().to_owned(),
            Err(UpstreamError::Timeout(_)) => "timeout".to_owned(),
            Err(_) => "error".to_owned(),
        };
        self.metrics
            .upstream_requests
            .with_label_values(&[label.as_str()])
            .inc();

        let response = result?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(e, timeout))?;
        if !status.is_success() {
            return Err(UpstreamError::Vendor {
                status,
                body: bytes,
                headers: Box::new(headers),
            });
        }
        check_response(&bytes, call.inputs.len(), call.dimensions)
    }
}

/// Some vendors answer a bad key with a 400 (Google's OpenAI-compatible
/// API says `API_KEY_INVALID`); such an answer is a refusal, not a pass.
fn names_invalid_key(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    text.contains("invalid_api_key") || text.contains("api_key_invalid")
}

fn transport_error(e: reqwest::Error, timeout: Duration) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout(timeout)
    } else {
        // Without the URL: it may carry credentials in its userinfo.
        UpstreamError::Transport(e.without_url().to_string())
    }
}

/// Exponential backoff with full jitter: 0..(250ms * 2^attempt), capped at 8s.
fn backoff(attempt: u32) -> Duration {
    let ceiling = 250u64.saturating_mul(1 << attempt.min(5)).min(8_000);
    Duration::from_millis(rand::random_range(ceiling / 2..=ceiling))
}

/// The JSON body sent upstream; always asks for base64.
struct RequestBody<'a>(&'a EmbedCall<'a>);

impl Serialize for RequestBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let call = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model", call.model)?;
        map.serialize_entry("input", &call.inputs)?;
        map.serialize_entry("encoding_format", "base64")?;
        if let Some(d) = call.dimensions {
            map.serialize_entry("dimensions", &d)?;
        }
        if let Some(user) = call.user {
            map.serialize_entry("user", user)?;
        }
        for (name, value) in call.extra {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl Serialize for Input {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Input::Text(t) => s.serialize_str(t),
            Input::Tokens(t) => t.serialize(s),
        }
    }
}

#[derive(Deserialize)]
struct ResponseBody {
    data: Vec<ResponseItem>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ResponseItem {
    index: usize,
    embedding: Vector,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Vector {
    Base64(String),
    // f64 so that values beyond f32's range are caught, not silently inf.
    Floats(Vec<f64>),
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
}

/// Parses and checks a 2xx answer: count, indices, equal (and requested)
/// dimensions, finite values. Anything off rejects the whole answer.
fn check_response(
    body: &[u8],
    expected: usize,
    dimensions: Option<u32>,
) -> Result<Embeddings, UpstreamError> {
    let bad = |m: String| Err(UpstreamError::InvalidResponse(m));
    let parsed: ResponseBody = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => return bad(format!("not an embeddings response: {e}")),
    };
    if parsed.data.len() != expected {
        return bad(format!(
            "{} embeddings for {expected} inputs",
            parsed.data.len()
        ));
    }
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; expected];
    for item in parsed.data {
        let values = match item.embedding {
            Vector::Base64(s) => {
                let raw = match base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
                    Ok(raw) if raw.len() % 4 == 0 => raw,
                    _ => return bad(format!("embedding {} is not base64 f32", item.index)),
                };
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>()
            }
            Vector::Floats(v) => v.into_iter().map(|x| x as f32).collect(),
        };
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return bad(format!("embedding {} is empty or not finite", item.index));
        }
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(values),
            Some(Some(_)) => return bad(format!("index {} appears twice", item.index)),
            None => return bad(format!("index {} out of range", item.index)),
        }
    }
    let vectors: Vec<Vec<f32>> = slots.into_iter().flatten().collect();
    let dims = vectors.first().map_or(0, Vec::len);
    if vectors.iter().any(|v| v.len() != dims) {
        return bad("embeddings of different lengths".to_owned());
    }
    if let Some(wanted) = dimensions.filter(|w| *w as usize != dims) {
        return bad(format!("{dims} dimensions, {wanted} requested"));
    }
    Ok(Embeddings {
        vectors,
        prompt_tokens: parsed.usage.map(|u| u.prompt_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &[f32]) -> String {
        let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    #[test]
    fn accepts_base64_and_floats_in_any_index_order() {
        let body = format!(
            r#"{{"data":[{{"index":1,"embedding":[0.5,1.0]}},{{"index":0,"embedding":"{}"}}],"usage":{{"prompt_tokens":9}}}}"#,
            b64(&[0.25, -2.0])
        );
        let e = check_response(body.as_bytes(), 2, Some(2)).expect("valid");
        assert_eq!(e.vectors, vec![vec![0.25, -2.0], vec![0.5, 1.0]]);
        assert_eq!(e.prompt_tokens, Some(9));
    }

    #[test]
    fn rejects_broken_answers() {
        let cases = [
            r#"{"data":[{"index":0,"embedding":[1.0]}]}"#, // count
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":0,"embedding":[1.0]}]}"#, // dup
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":2,"embedding":[1.0]}]}"#, // range
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0,2.0]}]}"#, // dims
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1e39]}]}"#, // inf
            r#"{"data":[{"index":0,"embedding":[]},{"index":1,"embedding":[]}]}"#, // empty
            r#"{"data":[{"index":0,"embedding":"@@"},{"index":1,"embedding":[1.0]}]}"#, // b64
            r#"<html>bad gateway</html>"#,
        ];
        for body in cases {
            assert!(
                matches!(
                    check_response(body.as_bytes(), 2, None),
                    Err(UpstreamError::InvalidResponse(_))
                ),
                "{body}"
            );
        }
        let ok = r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0]}]}"#;
        assert!(check_response(ok.as_bytes(), 2, Some(2)).is_err());
    }

    #[test]
    fn reads_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("2"));
        let e = UpstreamError::Vendor {
            status: StatusCode::TOO_MANY_REQUESTS,
            body: Bytes::new(),
            headers: Box::new(headers.clone()),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(e.is_retryable());
        headers.insert("retry-after-ms", HeaderValue::from_static("150"));
        let e = UpstreamError::Vendor {
            status: StatusCode::BAD_REQUEST,
            body: Bytes::new(),
            headers: Box::new(headers),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_millis(150)));
        assert!(!e.is_retryable());
    }
}
