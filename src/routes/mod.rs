//! HTTP routes: the cached embeddings endpoint, health, metrics, and
//! everything else passed through to the vendor.

mod admin;
mod limits;
mod native;
mod track;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;

use crate::accounting::Accounting;
use crate::auth::Auth;
use crate::auth::Caller;
use crate::body;
use crate::cache::control::{CachePolicy, Directives};
use crate::cache::entry::Entry;
use crate::cache::health::SideState;
use crate::config::Flavour;
use crate::error::{ApiError, Dialect, InDialect};
use crate::metrics::Metrics;
use crate::passthrough::{self, Allowlist};
use crate::pipeline::{CacheStatus, CallContext, Outcome, Pipeline};
use crate::protocol::{self, EmbeddingResponse, Limits};
use crate::purge;
use crate::request_id::RequestIdLayer;
use crate::vendor::{Upstream, Upstreams};

use self::limits::{DeclaredLengthLayer, ShedLayer};
use self::track::TrackLayer;

pub use self::limits::is_body_too_large;

// Built once: a header inserted by `&str` is parsed on every call.
const X_EMBGATE_CACHE: HeaderName = HeaderName::from_static("x-embgate-cache");
const X_EMBGATE_UPSTREAM_TOKENS: HeaderName = HeaderName::from_static("x-embgate-upstream-tokens");
const X_EMBGATE_CACHE_HITS: HeaderName = HeaderName::from_static("x-embgate-cache-hits");
const X_EMBGATE_CACHE_MISSES: HeaderName = HeaderName::from_static("x-embgate-cache-misses");

/// What every handler shares, behind one `Arc` so that handing it to a
/// request is one reference count, not one per field.
pub struct AppState {
    pub auth: Arc<Auth>,
    pub upstreams: Arc<Upstreams>,
    pub pipeline: Arc<Pipeline>,
    pub accounting: Arc<Accounting>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub max_body_bytes: usize,
    /// Routes passed through when the gateway's own key pays.
    pub passthrough: Allowlist,
    /// `response.cache_headers`: send the `x-embgate-*` headers.
    pub cache_headers: bool,
    /// What the admin API's purges need from the configuration.
    pub purge: purge::Context,
}

/// The routes; at most `max_requests_in_flight` embeddings and passthrough
/// requests are handled at once.
pub fn router(state: AppState, max_requests_in_flight: usize) -> Router {
    let track = TrackLayer::new(&state.metrics);
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route(
            "/v1/embeddings",
            post(embeddings).fallback(|| async { ApiError::MethodNotAllowed("POST") }),
        )
        .route(
            "/v2/embed",
            post(native::cohere).fallback(|| async { ApiError::MethodNotAllowed("POST") }),
        )
        .route(
            "/model/{model}/invoke",
            post(native::bedrock).fallback(|| async { ApiError::MethodNotAllowed("POST") }),
        )
        .route(
            "/v1beta/models/{spec}",
            post(native::gemini).fallback(passthrough::forward),
        )
        .route(
            "/v1/models/{spec}",
            post(native::gemini).fallback(passthrough::forward),
        )
        .fallback(passthrough::forward)
        // Only on the routes above: health and metrics must answer while
        // the gateway sheds load.
        .layer(ShedLayer::new(max_requests_in_flight))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin/stats", get(admin::stats))
        .route("/admin/purge", post(admin::purge))
        // One `layer` call: axum boxes each route's service once per call,
        // and clones that box on every request. Outermost first; the
        // limits inside, so refused requests are counted and carry an id.
        .layer(
            ServiceBuilder::new()
                .layer(RequestIdLayer::new())
                .layer(track)
                .layer(DeclaredLengthLayer::new(max_body_bytes))
                .layer(DefaultBodyLimit::max(max_body_bytes)),
        )
        .with_state(Arc::new(state))
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, InDialect> {
    let dialect = Dialect::Openai;
    let caller = state.auth.identify(&headers).map_err(|e| (dialect, e))?;
    let body = read_body(&state, body).map_err(|e| (dialect, e))?;
    let mut request = protocol::parse_request(&body, state.limits).map_err(|e| (dialect, e))?;
    drop(body);
    let upstream = Arc::clone(state.upstreams.route(&request.model));
    // Voyage's own API shares this path: its callers get its answers.
    let dialect = match upstream.flavour() {
        Flavour::Voyage => Dialect::Voyage,
        _ => Dialect::Openai,
    };
    protocol::native::adopt(upstream.flavour(), &mut request).map_err(|e| (dialect, e))?;
    let (model, format) = (request.model.clone(), request.encoding_format);
    let value_type = request.vendor.output;
    let served = embed(&state, &headers, caller, request, upstream).await;
    let outcome = served.map_err(|e| (dialect, e))?;
    let prompt_tokens = outcome.prompt_tokens;
    let (entries, marks) = CacheMarks::of(outcome);
    let vectors: Vec<Payload> = entries.into_iter().map(Payload).collect();
    let mut response = EmbeddingResponse::new(model, vectors, format, prompt_tokens);
    if dialect == Dialect::Voyage {
        response = response.voyage(value_type);
    }
    let body = body::render(response);
    Ok(json_response(&state, body, marks))
}

/// The request body, or why it could not be read.
pub(crate) fn read_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::BodyTooLarge(state.max_body_bytes)
        }
        other => ApiError::BodyRead(other.body_text()),
    })
}

/// Embeds a validated request for `caller` through the pipeline, whichever
/// API it came in by, and accounts for it.
pub(crate) async fn embed(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller,
    request: protocol::EmbeddingRequest,
    upstream: Arc<Upstream>,
) -> Result<Outcome, ApiError> {
    state.auth.admit(&caller, &upstream, &request.model).await?;
    let directives = Directives::of(headers);
    directives.count(&state.metrics);
    let policy = CachePolicy::new(caller.cache, &directives);
    let ctx = CallContext::new(upstream, caller, &request.model, headers, policy);
    let tenant = Arc::clone(&ctx.tenant);
    let model = request.model.clone();
    match state.pipeline.embed(Arc::new(request), ctx).await {
        Ok(outcome) => {
            state.accounting.served(&tenant, &model, &outcome);
            Ok(outcome)
        }
        Err(e) => {
            state.accounting.failed(&tenant, &model);
            Err(e.into())
        }
    }
}

/// What the `x-embgate-*` headers say about a served request.
#[derive(Default)]
pub(crate) struct CacheMarks {
    cache: CacheStatus,
    upstream_tokens: u64,
    hits: usize,
    misses: usize,
}

impl CacheMarks {
    pub(crate) fn of(outcome: Outcome) -> (Vec<Entry>, CacheMarks) {
        let marks = CacheMarks {
            cache: outcome.cache_status(),
            upstream_tokens: outcome.billed_tokens,
            hits: outcome.hits,
            misses: outcome.distinct - outcome.hits,
        };
        (outcome.entries, marks)
    }

    /// The marks of a request served in several passes.
    pub(crate) fn merge(before: Option<CacheMarks>, next: CacheMarks) -> CacheMarks {
        let Some(before) = before else { return next };
        let cache = if before.cache == next.cache {
            next.cache
        } else {
            CacheStatus::Partial
        };
        CacheMarks {
            cache,
            upstream_tokens: before.upstream_tokens + next.upstream_tokens,
            hits: before.hits + next.hits,
            misses: before.misses + next.misses,
        }
    }
}

/// A JSON answer, with the cache headers when they are on.
pub(crate) fn json_response(
    state: &AppState,
    body: impl Into<Body>,
    marks: CacheMarks,
) -> Response {
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.into(),
    )
        .into_response();
    if state.cache_headers {
        let h = response.headers_mut();
        h.insert(
            X_EMBGATE_CACHE,
            HeaderValue::from_static(marks.cache.as_str()),
        );
        h.insert(
            X_EMBGATE_UPSTREAM_TOKENS,
            HeaderValue::from(marks.upstream_tokens),
        );
        h.insert(X_EMBGATE_CACHE_HITS, HeaderValue::from(marks.hits));
        h.insert(X_EMBGATE_CACHE_MISSES, HeaderValue::from(marks.misses));
    }
    response
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

/// Ready means the store takes both reads and writes (on a cluster: every
/// node answers). When it does not, the gateway still serves (from the
/// vendor, or from the nodes still answering), so this reports `degraded`
/// with 503 and what fails, naming a cluster's failing nodes.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let readiness = state.pipeline.cache().readiness().await;
    let describe = |side: &SideState| match side {
        SideState::Ok => "ok".to_owned(),
        SideState::Failing(e) => format!("failing: {e}"),
        SideState::BreakerOpen(e) => format!("failing (not asked until the next probe): {e}"),
    };
    let mut body = serde_json::json!({
        "status": if readiness.is_ready() { "ready" } else { "degraded" },
        "store": readiness.store,
        "reads": describe(&readiness.read),
        "writes": describe(&readiness.write),
    });
    if !readiness.nodes.is_empty() {
        let nodes: serde_json::Map<String, serde_json::Value> = readiness
            .nodes
            .iter()
            .map(|n| {
                let state = match &n.error {
                    None => format!("{}, ok", n.role),
                    Some(e) => format!("{}, failing: {e}", n.role),
                };
                (n.node.clone(), state.into())
            })
            .collect();
        body["nodes"] = nodes.into();
        let failing: Vec<&str> = readiness.failing_nodes().map(|n| n.node.as_str()).collect();
        body["failing_nodes"] = failing.into();
    }
    if readiness.is_ready() {
        axum::Json(body).into_response()
    } else {
        body["serving"] = if readiness.failing_nodes().next().is_some() {
            "from the nodes that answer; the failing nodes' keys from the vendor"
        } else {
            "from the vendor; what cannot be stored is fetched again"
        }
        .into();
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}
