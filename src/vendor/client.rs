//! The client of one vendor endpoint: one request per call in the vendor's
//! wire format ([`super::wire`]), retried on 429/5xx/transport failures, its
//! answer read within a size cap ([`super::response`]) and checked before
//! anything is trusted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use bytes::Bytes;
use serde_json::value::RawValue;

use super::response::{ERROR_BODY_LIMIT, read_capped, response_limit};
use super::wire::{Endpoint, WireRequest};
use crate::auth::ApiKey;
use crate::config::{Flavour, NamedUpstream, UpstreamSettings};
use crate::metrics::Metrics;
use crate::protocol::{Input, VendorParams};

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
    /// An answer larger than the call can legitimately need.
    #[error("vendor sent more than {0} bytes, more than this call can need")]
    TooLarge(u64),
}

impl UpstreamError {
    /// Worth trying again later: 429, 5xx, transport failures and timeouts.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Vendor { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            UpstreamError::Transport(_) | UpstreamError::Timeout(_) => true,
            UpstreamError::InvalidResponse(_) | UpstreamError::TooLarge(_) => false,
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
    /// What a native vendor is asked for, and the value type answered.
    pub params: &'a VendorParams,
    pub auth: &'a CallerAuth,
}

/// A checked answer: one vector per input, in input order, each as the
/// bytes an entry stores (little-endian f32, or the one-byte types).
#[derive(Debug)]
pub struct Embeddings {
    pub vectors: Vec<Vec<u8>>,
    /// Tokens the vendor billed for the call, when it says.
    pub prompt_tokens: Option<u64>,
}

/// One vendor endpoint.
pub struct Upstream {
    name: String,
    http: reqwest::Client,
    endpoint: Endpoint,
    api_key: Option<ApiKey>,
    settings: UpstreamSettings,
    metrics: Arc<Metrics>,
    /// Moving average of successful calls' duration, in microseconds (0:
    /// none yet); what waiting for the store instead of paying is weighed
    /// against.
    typical_micros: AtomicU64,
}

impl Upstream {
    pub fn new(
        name: &str,
        http: reqwest::Client,
        base_url: &str,
        api_key: &str,
        named: Option<&NamedUpstream>,
        settings: &UpstreamSettings,
        metrics: &Arc<Metrics>,
    ) -> Upstream {
        Upstream {
            name: name.to_owned(),
            http,
            endpoint: Endpoint {
                flavour: named.map_or(Flavour::Openai, |n| n.flavour),
                base_url: base_url.trim_end_matches('/').to_owned(),
                api_version: named.map_or_else(String::new, |n| n.api_version.clone()),
                deployments: named.map_or_else(HashMap::new, |n| n.deployments.clone()),
                signer: named
                    .filter(|n| n.flavour == Flavour::Bedrock)
                    .and_then(|_| super::wire::Signer::from_env()),
            },
            api_key: Some(api_key).filter(|k| !k.is_empty()).map(ApiKey::new),
            settings: settings.clone(),
            metrics: Arc::clone(metrics),
            typical_micros: AtomicU64::new(0),
        }
    }

    /// How long a successful call has recently taken; `None` before the first.
    pub fn typical_latency(&self) -> Option<Duration> {
        match self.typical_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    fn observe_success(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // An exponential moving average weighting each new call 1/8; races
        // between concurrent updates lose a sample, which is harmless.
        let old = self.typical_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.typical_micros.store(new.max(1), Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.endpoint.base_url
    }

    pub fn flavour(&self) -> Flavour {
        self.endpoint.flavour
    }

    /// The most inputs one call for `model` may carry at this vendor.
    pub fn max_inputs_per_call(&self, model: &str) -> usize {
        self.endpoint.max_inputs(model)
    }

    /// Whether calls can be made: a Bedrock upstream needs AWS credentials.
    pub fn can_call(&self) -> bool {
        self.flavour() != Flavour::Bedrock || self.endpoint.signer.is_some()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Whether the gateway pays with credentials of its own (a key, or for
    /// Bedrock its AWS credentials).
    pub fn has_own_key(&self) -> bool {
        self.api_key.is_some() || self.flavour() == Flavour::Bedrock
    }

    /// What identifies the vectors of `model` at this upstream, for the
    /// cache key ([`Endpoint::namespace`]).
    pub fn namespace(&self, model: &str) -> String {
        self.endpoint.namespace(model)
    }

    /// Whether the vendor offers the Batch API `warm --batch-api` uses.
    pub fn has_batch_api(&self) -> bool {
        matches!(self.endpoint.flavour, Flavour::Openai | Flavour::Azure)
    }

    /// `path` of the Files and Batch APIs (`files`, `batches/{id}`...).
    pub(super) fn batch_api_url(&self, path: &str) -> String {
        let e = &self.endpoint;
        match e.flavour {
            Flavour::Azure => format!("{}/openai/{path}?api-version={}", e.base_url, e.api_version),
            _ => format!("{}/{path}", e.base_url),
        }
    }

    /// The model a batch line names: for Azure, the deployment.
    pub(super) fn batch_model<'a>(&'a self, model: &'a str) -> &'a str {
        match self.endpoint.flavour {
            Flavour::Azure => self.endpoint.deployment(model),
            _ => model,
        }
    }

    pub(super) fn timeout(&self) -> Duration {
        Duration::from_secs(self.settings.timeout_secs)
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
        let probe = self.endpoint.probe(model);
        let mut req = self
            .http
            .post(probe.url)
            .timeout(timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(probe.body);
        if let Some((name, value)) = self.credential_for(key) {
            req = req.header(name, value);
        }
        let response = req.send().await.map_err(|e| transport_error(e, timeout))?;
        let status = response.status();
        let headers = Box::new(response.headers().clone());
        let body = read_capped(response, ERROR_BODY_LIMIT, timeout).await?;
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
        self.endpoint.credential_for(key)
    }

    /// Embeds `call.inputs`, retrying transient failures within the deadline.
    pub async fn embed(&self, call: &EmbedCall<'_>) -> Result<Embeddings, UpstreamError> {
        let wire = self.endpoint.request(call)?;
        self.retrying(|| self.send_once(call, &wire)).await
    }

    /// Runs `once` until it succeeds, fails for good, or the retry budget
    /// (`upstream.max_retries`, `upstream.retry_deadline_secs`) is spent.
    pub(super) async fn retrying<T, F, Fut>(&self, once: F) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        self.retrying_when(once, UpstreamError::is_retryable).await
    }

    /// [`Upstream::retrying`], trying again only the failures `again` names.
    pub(super) async fn retrying_when<T, F, Fut>(
        &self,
        mut once: F,
        again: fn(&UpstreamError) -> bool,
    ) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let deadline = Instant::now() + Duration::from_secs(self.settings.retry_deadline_secs);
        let mut attempt = 0u32;
        loop {
            let err = match once().await {
                Ok(answer) => return Ok(answer),
                Err(e) => e,
            };
            if !again(&err) || attempt >= self.settings.max_retries {
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
        wire: &WireRequest,
    ) -> Result<Embeddings, UpstreamError> {
        let timeout = Duration::from_secs(self.settings.timeout_secs);
        let mut req = self
            .http
            .post(wire.url.as_str())
            .timeout(timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .body(wire.body.clone());
        for (name, value) in &wire.headers {
            req = req.header(name.clone(), value.clone());
        }
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
        if !status.is_success() {
            let headers = Box::new(response.headers().clone());
            let body = read_capped(response, ERROR_BODY_LIMIT, timeout).await?;
            return Err(UpstreamError::Vendor {
                status,
                body,
                headers,
            });
        }
        let limit = response_limit(
            call.inputs.len(),
            call.dimensions.unwrap_or(self.settings.max_dimensions),
        );
        let headers = response.headers().clone();
        let bytes = read_capped(response, limit, timeout).await?;
        let embeddings = self.endpoint.parse(&bytes, &headers, call)?;
        self.observe_success(started.elapsed());
        Ok(embeddings)
    }
}

/// Some vendors answer a bad key with a 400 (Google's OpenAI-compatible
/// API says `API_KEY_INVALID`); such an answer is a refusal, not a pass.
fn names_invalid_key(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    text.contains("invalid_api_key") || text.contains("api_key_invalid")
}

pub(super) fn transport_error(e: reqwest::Error, timeout: Duration) -> UpstreamError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_api_paths_follow_the_flavour() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let settings = crate::config::Settings::load_from(None, None).expect("defaults");
        let azure = NamedUpstream {
            base_url: "https://res.openai.azure.com/".into(),
            api_key: "k".into(),
            flavour: Flavour::Azure,
            models: "m*".into(),
            api_version: "2024-10-21".into(),
            deployments: HashMap::from([("m1".to_owned(), "batch-dep".to_owned())]),
        };
        let http = reqwest::Client::new();
        let u = Upstream::new(
            "az",
            http.clone(),
            &azure.base_url,
            &azure.api_key,
            Some(&azure),
            &settings.upstream,
            &metrics,
        );
        assert_eq!(
            u.batch_api_url("batches/b1"),
            "https://res.openai.azure.com/openai/batches/b1?api-version=2024-10-21"
        );
        assert_eq!(u.batch_model("m1"), "batch-dep");
        let o = Upstream::new(
            "default",
            http,
            "https://api.openai.com/v1",
            "",
            None,
            &settings.upstream,
            &metrics,
        );
        assert_eq!(
            o.batch_api_url("files/f1/content"),
            "https://api.openai.com/v1/files/f1/content"
        );
        assert_eq!(o.batch_model("m1"), "m1");
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
