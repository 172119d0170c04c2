//! Every route the gateway does not cache is forwarded to the vendor as is:
//! method, path, query, headers and body, streamed both ways so server-sent
//! events arrive chunk by chunk.

use std::sync::Arc;

use axum::RequestExt;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::routes::{self, AppState};

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
    let upstream = state.upstreams.default();
    let path = req.uri().path();
    let Some(rest) = path
        .strip_prefix("/v1")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return ApiError::NotFound(path.to_owned()).into_response();
    };
    let caller = match state.auth.identify(req.headers()) {
        Ok(caller) => caller,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut url = format!("{}{rest}", upstream.base_url());
    if let Some(q) = req.uri().query() {
        url.push('?');
        url.push_str(q);
    }

    // A body without a declared length is cut at the limit as it streams
    // (a declared one above it never gets here).
    let (parts, body) = req.with_limited_body().into_parts();
    let mut headers = end_to_end(&parts.headers);
    // Whatever key the caller presented, the vendor gets the one that pays.
    headers.remove(header::AUTHORIZATION);
    headers.remove("api-key");
    if let Some((name, value)) = upstream.credential(caller.key.as_ref()) {
        headers.insert(name, value);
    }
    let sent = upstream
        .http()
        .request(parts.method, url)
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await;
    match sent {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status());
            if let Some(h) = response.headers_mut() {
                *h = end_to_end(answer.headers());
            }
            response
                .body(Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|e| ApiError::Unavailable(e.to_string()).into_response())
        }
        Err(e) if routes::is_body_too_large(&e) => {
            ApiError::BodyTooLarge(state.max_body_bytes).into_response()
        }
        Err(e) => ApiError::Unavailable(format!(
            "The vendor could not be reached: {}",
            e.without_url()
        ))
        .into_response(),
    }
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
