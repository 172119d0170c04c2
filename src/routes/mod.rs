//! HTTP routes: the cached embeddings endpoint, health, metrics, and
//! everything else passed through to the vendor.

mod track;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::auth::Auth;
use crate::body;
use crate::entry::Entry;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::passthrough::{self, Allowlist};
use crate::pipeline::{CallContext, Embedder};
use crate::protocol::{self, EmbeddingResponse, Limits};

use self::track::TrackLayer;

// Built once: a header inserted by `&str` is parsed on every call.
const X_EMBGATE_CACHE: HeaderName = HeaderName::from_static("x-embgate-cache");
const X_EMBGATE_UPSTREAM_TOKENS: HeaderName = HeaderName::from_static("x-embgate-upstream-tokens");

/// What every handler shares, behind one `Arc` so that handing it to a
/// request is one reference count, not one per field.
pub struct AppState {
    pub auth: Arc<Auth>,
    pub embedder: Arc<Embedder>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// Routes passed through when the gateway's own key pays.
    pub passthrough: Allowlist,
    /// `response.cache_headers`: send the `x-embgate-*` headers.
    pub cache_headers: bool,
}

pub fn router(state: AppState) -> Router {
    let track = TrackLayer::new(&state.metrics);
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route(
            "/v1/embeddings",
            post(embeddings).fallback(|| async { ApiError::MethodNotAllowed("POST") }),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(passthrough::forward)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(track)
        .with_state(Arc::new(state))
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.auth.identify(&headers)?;
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::BodyTooLarge(state.max_body_bytes)
        }
        other => ApiError::BodyRead(other.body_text()),
    })?;
    let request = protocol::parse_request(&body, state.limits)?;
    drop(body);
    let model = request.model.clone();
    let format = request.encoding_format;
    let upstream = Arc::clone(state.embedder.upstreams().route(&request.model));
    state.auth.admit(&caller, &upstream, &request.model).await?;
    let ctx = CallContext::new(upstream, caller, &request.model, &headers);
    let embedded = state.embedder.embed(Arc::new(request), ctx).await?;

    let (cache, upstream_tokens) = (embedded.cache, embedded.upstream_tokens);
    let vectors: Vec<Payload> = embedded.entries.into_iter().map(Payload).collect();
    let response = EmbeddingResponse::new(model, vectors, format, embedded.prompt_tokens);
    let body = body::render(response);
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if state.cache_headers {
        let h = response.headers_mut();
        h.insert(X_EMBGATE_CACHE, HeaderValue::from_static(cache.as_str()));
        h.insert(
            X_EMBGATE_UPSTREAM_TOKENS,
            HeaderValue::from(upstream_tokens),
        );
    }
    Ok(response)
}

/// An entry seen as its vector bytes, for the renderer.
struct Payload(Entry);

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.0.payload()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .render()
        .map_err(|e| ApiError::Unavailable(format!("metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Ready means the store answers. When it does not, the gateway still
/// serves (from the vendor), so this reports `degraded` with 503.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.embedder.store().ping().await {
        Ok(()) => {
            state.metrics.store_up.set(1);
            axum::Json(serde_json::json!({ "status": "ready", "store": "ok" })).into_response()
        }
        Err(e) => {
            state
                .metrics
                .store_errors
                .with_label_values(&["ping"])
                .inc();
            state.metrics.store_up.set(0);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({
                    "status": "degraded",
                    "store": e.to_string(),
                    "serving": "from the vendor, without cache",
                })),
            )
                .into_response()
        }
    }
}
