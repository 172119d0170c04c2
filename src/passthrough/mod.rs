//! Every route the gateway does not cache is forwarded to the default
//! vendor as is: method, path, query, headers and body, streamed both ways
//! so server-sent events arrive chunk by chunk.
//!
//! Before a byte leaves: the caller is identified, the path must stay under
//! the vendor's base path (`path`), and when the gateway's own key would
//! pay, the route must be listed in `passthrough.allow` ([`Allowlist`]).
//! Callers whose own vendor key is forwarded pay for themselves and may use
//! every route.

mod allow;
mod path;

use std::sync::Arc;

use axum::RequestExt;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};

pub use self::allow::Allowlist;
pub use self::path::PathError;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::routes::{self, AppState};
use crate::vendor::Upstream;

/// Why a passthrough request is refused before anything is sent.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("Invalid path: {0}.")]
    Path(#[from] PathError),
    #[error(
        "This route is not passed through: the gateway's own vendor key would pay for it. \
         The operator can allow it by listing its path prefix in passthrough.allow \
         (EMBGATE__PASSTHROUGH__ALLOW)."
    )]
    NotAllowed,
    #[error(
        "This model is served by a {0} upstream, whose embeddings only are served here; \
         other routes are passed through to OpenAI-compatible upstreams."
    )]
    NativeVendor(&'static str),
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

pub async fn forward(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match forward_checked(&state, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn forward_checked(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let path = req.uri().path();
    let Some(rest) = path
        .strip_prefix("/v1")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return Err(ApiError::NotFound(path.to_owned()));
    };
    let rest = rest.to_owned();
    let caller = state.auth.identify(req.headers())?;
    let decoded = path::check(&rest).map_err(PassthroughError::from)?;
    // A body without a declared length is cut at the limit as it streams
    // (a declared one above it never gets here). A JSON body is read whole
    // to route by the model it names; anything else streams.
    let (parts, body) = req.with_limited_body().into_parts();
    let (body, model) = match is_json(&parts.headers) {
        true => {
            let bytes = axum::body::to_bytes(body, state.max_body_bytes)
                .await
                .map_err(|_| ApiError::BodyTooLarge(state.max_body_bytes))?;
            let model = model_named(&bytes);
            (reqwest::Body::from(bytes), model)
        }
        false => (reqwest::Body::wrap_stream(body.into_data_stream()), None),
    };
    let upstream = match &model {
        Some(model) => state.upstreams.route(model),
        None => state.upstreams.default(),
    };
    if upstream.flavour().is_native() {
        return Err(PassthroughError::NativeVendor(upstream.flavour().name()).into());
    }
    let url = path::join(upstream.base_url(), &rest, parts.uri.query())
        .map_err(PassthroughError::from)?;
    if gateway_pays(upstream, &caller) {
        if !state.passthrough.allows(&decoded) {
            return Err(PassthroughError::NotAllowed.into());
        }
        // Forward mode with a key of the gateway's own: the caller's key
        // must still be one the vendor accepts.
        state
            .auth
            .admit(&caller, upstream, model.as_deref().unwrap_or_default())
            .await?;
    }

    let mut headers = end_to_end(&parts.headers);
    // Whatever key the caller presented, the vendor gets the one that pays.
    headers.remove(header::AUTHORIZATION);
    headers.remove("api-key");
    headers.remove(crate::vendor::wire::X_GOOG_API_KEY);
    if let Some((name, value)) = upstream.credential(caller.key.as_ref()) {
        headers.insert(name, value);
    }
    let sent = upstream
        .http()
        .request(parts.method, url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            if let Some(h) = response.headers_mut() {
                *h = end_to_end(answer.headers());
            }
            Ok(response
                .body(Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|e| ApiError::Unavailable(e.to_string()).into_response()))
        }
        Err(e) if routes::is_body_too_large(&e) => {
            Err(ApiError::BodyTooLarge(state.max_body_bytes))
        }
        Err(e) => Err(ApiError::Unavailable(format!(
            "The vendor could not be reached: {}",
            e.without_url()
        ))),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

/// The `model` a JSON body names at its top level.
fn model_named(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body)
        .ok()?
        .model
        .filter(|m| !m.is_empty())
}

/// Whether the gateway's own key pays for `caller`'s call: it does whenever
/// the upstream holds a key (see [`Upstream::credential`]) or the caller
/// brings none (open and gateway modes).
fn gateway_pays(upstream: &Upstream, caller: &Caller) -> bool {
    upstream.has_own_key() || caller.key.is_none()
}

/// Copies `headers` without hop-by-hop ones, including any the
/// `Connection` header names.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let hop = HOP_BY_HOP.contains(name)
            || name.as_str() == "keep-alive"
            || named.iter().any(|n| n == name.as_str());
        if !hop {
            out.append(name, value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_the_model_a_body_names() {
        assert_eq!(
            model_named(br#"{"messages":[],"model":"m-1"}"#).as_deref(),
            Some("m-1")
        );
        assert_eq!(model_named(br#"{"model":""}"#), None);
        assert_eq!(model_named(br#"{"model":5}"#), None);
        assert_eq!(model_named(b"not json"), None);
    }

    #[test]
    fn drops_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("gw"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let out = end_to_end(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key(header::CONTENT_TYPE));
    }
}
