//! The vendors' own embeddings APIs, served from the same cache: Cohere's
//! `POST /v2/embed` and the Gemini API's `models/{model}:batchEmbedContents`
//! and `:embedContent` (under `/v1beta` and `/v1`). Each answers in its
//! vendor's format, errors included. Voyage's own API shares OpenAI's path
//! (see [`super::embeddings`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;

use super::{AppState, CacheMarks, embed, json_response, read_body};
use crate::auth::Caller;
use crate::cache::entry::{Entry, ValueType};
use crate::config::Flavour;
use crate::error::{ApiError, Dialect, InDialect};
use crate::protocol::{self, EmbeddingRequest, gemini};
use crate::vendor::Upstream;
use crate::vendor::wire::X_GOOG_API_KEY;

/// The upstream serving `model`, when it speaks `flavour`'s API.
fn native_upstream(
    state: &AppState,
    model: &str,
    flavour: Flavour,
) -> Result<Arc<Upstream>, ApiError> {
    let upstream = state.upstreams.route(model);
    if upstream.flavour() != flavour {
        return Err(ApiError::ModelNotServed {
            model: model.to_owned(),
            api: flavour.name(),
        });
    }
    Ok(Arc::clone(upstream))
}

pub(super) async fn cohere(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, InDialect> {
    let d = Dialect::Cohere;
    let caller = state.auth.identify(&headers).map_err(|e| (d, e))?;
    let body = read_body(&state, body).map_err(|e| (d, e))?;
    let parsed = protocol::cohere::parse(&body, state.limits).map_err(|e| (d, e))?;
    drop(body);
    let model = parsed.requests.first().map(|r| r.model.clone());
    let upstream = native_upstream(
        &state,
        model.as_deref().unwrap_or_default(),
        Flavour::Cohere,
    )
    .map_err(|e| (d, e))?;
    let (by_type, marks, billed) =
        embed_types(&state, &headers, &caller, parsed.requests, &upstream, d).await?;
    let mut out = Vec::new();
    protocol::cohere::write_response(&mut out, &parsed.texts, &by_type, billed);
    Ok(json_response(&state, out, marks))
}

/// Serves Cohere's requests, one per embedding type (each type is its own
/// entry): the entries by type, the marks, and the tokens billed once.
async fn embed_types(
    state: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    requests: Vec<EmbeddingRequest>,
    upstream: &Arc<Upstream>,
    d: Dialect,
) -> Result<(Vec<(ValueType, Vec<Entry>)>, CacheMarks, u64), InDialect> {
    let mut by_type = Vec::with_capacity(requests.len());
    let mut marks: Option<CacheMarks> = None;
    let mut billed = None;
    for request in requests {
        let output = request.vendor.output;
        let served = embed(
            state,
            headers,
            caller.clone(),
            request,
            Arc::clone(upstream),
        )
        .await;
        let outcome = served.map_err(|e| (d, e))?;
        billed.get_or_insert(outcome.prompt_tokens);
        let (entries, these) = CacheMarks::of(outcome);
        marks = Some(CacheMarks::merge(marks, these));
        by_type.push((output, entries));
    }
    Ok((by_type, marks.unwrap_or_default(), billed.unwrap_or(0)))
}

/// `POST /{v1beta,v1}/models/{model}:{method}`; anything but the two embed
/// methods is passed through like every other route.
pub(super) async fn gemini(
    State(state): State<Arc<AppState>>,
    Path(spec): Path<String>,
    req: Request,
) -> Response {
    let Some((model, method)) = gemini::method(&spec) else {
        return crate::passthrough::forward(State(state), req).await;
    };
    let model = model.to_owned();
    match gemini_embed(&state, &model, method, req).await {
        Ok(response) => response,
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

async fn gemini_embed(
    state: &AppState,
    model: &str,
    method: gemini::Method,
    req: Request,
) -> Result<Response, InDialect> {
    let d = Dialect::Gemini;
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    // The key may come as `?key=`, as Google's API takes it.
    if !headers.contains_key(X_GOOG_API_KEY)
        && let Ok(Query(query)) = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        && let Some(key) = query.get("key")
        && let Ok(mut value) = HeaderValue::from_str(key)
    {
        value.set_sensitive(true);
        headers.insert(X_GOOG_API_KEY, value);
    }
    let caller = state.auth.identify(&headers).map_err(|e| (d, e))?;
    let body = axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| (d, ApiError::BodyTooLarge(state.max_body_bytes)))?;
    let parsed = gemini::parse(&body, model, method, state.limits).map_err(|e| (d, e))?;
    drop(body);
    let upstream = native_upstream(state, model, Flavour::Gemini).map_err(|e| (d, e))?;
    let mut placed: Vec<Option<Entry>> = vec![None; parsed.count];
    let mut marks: Option<CacheMarks> = None;
    for (places, request) in parsed.groups {
        let served = embed(
            state,
            &headers,
            caller.clone(),
            request,
            Arc::clone(&upstream),
        )
        .await;
        let (entries, these) = CacheMarks::of(served.map_err(|e| (d, e))?);
        marks = Some(CacheMarks::merge(marks, these));
        for (place, entry) in places.into_iter().zip(entries) {
            if let Some(slot) = placed.get_mut(place) {
                *slot = Some(entry);
            }
        }
    }
    let entries: Vec<Entry> = placed.into_iter().flatten().collect();
    let mut out = Vec::new();
    gemini::write_response(&mut out, method, &entries);
    Ok(json_response(state, out, marks.unwrap_or_default()))
}

/// Bedrock's `POST /model/{modelId}/invoke` for its embedding models. The
/// caller's SigV4 signature is not checked (its secret is the caller's):
/// in gateway mode the tenant presents its key as a Bedrock API key
/// (`Authorization: Bearer`, as `AWS_BEARER_TOKEN_BEDROCK` makes the AWS
/// SDKs send it).
pub(super) async fn bedrock(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, InDialect> {
    use protocol::bedrock::{BedrockRequest, write_cohere, write_titan};
    let d = Dialect::Bedrock;
    let caller = state.auth.identify(&headers).map_err(|e| (d, e))?;
    let body = read_body(&state, body).map_err(|e| (d, e))?;
    let parsed = protocol::bedrock::parse(&model, &body, state.limits).map_err(|e| (d, e))?;
    drop(body);
    let upstream = native_upstream(&state, &model, Flavour::Bedrock).map_err(|e| (d, e))?;
    let mut out = Vec::new();
    match parsed {
        BedrockRequest::Titan(request) => {
            let served = embed(&state, &headers, caller, request, upstream).await;
            let outcome = served.map_err(|e| (d, e))?;
            let tokens = outcome.prompt_tokens;
            let (entries, marks) = CacheMarks::of(outcome);
            if let Some(entry) = entries.first() {
                write_titan(&mut out, entry, tokens);
            }
            Ok(json_response(&state, out, marks))
        }
        BedrockRequest::Cohere { request, by_type } => {
            let (typed, marks, billed) =
                embed_types(&state, &headers, &caller, request.requests, &upstream, d).await?;
            write_cohere(&mut out, &request.texts, &typed, by_type);
            let mut response = json_response(&state, out, marks);
            response.headers_mut().insert(
                "x-amzn-bedrock-input-token-count",
                HeaderValue::from(billed),
            );
            Ok(response)
        }
    }
}
