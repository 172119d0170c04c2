//! Injected failures, popped one per embeddings request.

use std::time::Duration;

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use futures_util::StreamExt as _;

use crate::error::ApiError;

/// A misbehaviour for the next embeddings request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// An OpenAI-shaped error for `status` (429 `rate_limit_exceeded`, 500
    /// `server_error`, 503 overloaded, ...), with `Retry-After` if given.
    Status {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    /// An arbitrary response, e.g. an HTML 502 from a proxy or a 200 with
    /// garbage.
    RawBody {
        status: u16,
        content_type: String,
        body: String,
    },
    /// 200, but one embedding fewer than inputs.
    WrongCount,
    /// 200, but the last item's vector is one element short.
    WrongDimensions,
    /// 200 with a non-finite value in the first vector: NaN bits in base64,
    /// `1e39` (which overflows f32 to infinity) in float JSON.
    NonFinite,
    /// 200 with two items at index 0.
    DuplicateIndex,
    /// Sleep, then answer normally.
    Delay(Duration),
    /// Close the connection without sending any response.
    CloseConnection,
    /// 200 with a JSON body that never ends (a misbehaving vendor or
    /// something in between): the client must stop reading at some bound.
    EndlessBody,
}

/// Faults that alter an otherwise successful response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Corruption {
    WrongCount,
    WrongDimensions,
    NonFinite,
    DuplicateIndex,
}

/// What a popped fault means for the request.
pub(crate) enum Plan {
    /// Handle normally, then corrupt a successful body if asked.
    Normal {
        delay: Duration,
        corruption: Option<Corruption>,
    },
    /// Answer with this OpenAI-shaped error instead of handling the request.
    Replace(Response),
    /// Answer with exactly this response: no vendor headers are added, as
    /// it stands for something that did not come from the vendor.
    Raw(Response),
    Close,
}

impl Fault {
    pub(crate) fn plan(self, model: Option<&str>) -> Plan {
        let normal = |corruption| Plan::Normal {
            delay: Duration::ZERO,
            corruption: Some(corruption),
        };
        match self {
            Fault::Status {
                status,
                retry_after_secs,
            } => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut error = ApiError::for_status(status, model);
                if let Some(secs) = retry_after_secs {
                    error = error.header(RETRY_AFTER, HeaderValue::from(secs));
                }
                Plan::Replace(error.into_response())
            }
            Fault::RawBody {
                status,
                content_type,
                body,
            } => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut response = (status, body).into_response();
                match HeaderValue::from_str(&content_type) {
                    Ok(v) => {
                        response.headers_mut().insert(CONTENT_TYPE, v);
                    }
                    Err(_) => {
                        response.headers_mut().remove(CONTENT_TYPE);
                    }
                }
                Plan::Raw(response)
            }
            Fault::WrongCount => normal(Corruption::WrongCount),
            Fault::WrongDimensions => normal(Corruption::WrongDimensions),
            Fault::NonFinite => normal(Corruption::NonFinite),
            Fault::DuplicateIndex => normal(Corruption::DuplicateIndex),
            Fault::Delay(delay) => Plan::Normal {
                delay,
                corruption: None,
            },
            Fault::CloseConnection => Plan::Close,
            Fault::EndlessBody => Plan::Raw(endless_body()),
        }
    }
}

/// `{"data":[{"index":0,"embedding":[0.1,0.1,...` forever, in 64 KiB parts.
fn endless_body() -> Response {
    let head = axum::body::Bytes::from_static(
        b"{\"object\":\"list\",\"data\":[{\"index\":0,\"embedding\":[",
    );
    let part = axum::body::Bytes::from("0.1,".repeat(16 * 1024));
    let parts = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) })
        .chain(futures_util::stream::repeat(part).map(Ok::<_, std::io::Error>));
    let mut response = Response::new(axum::body::Body::from_stream(parts));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Applies a corruption to `(index, vector)` items.
pub(crate) fn corrupt(items: &mut Vec<(usize, Vec<f32>)>, corruption: Corruption) {
    match corruption {
        Corruption::WrongCount => {
            items.pop();
        }
        Corruption::WrongDimensions => {
            if let Some((_, v)) = items.last_mut() {
                v.pop();
            }
        }
        Corruption::NonFinite => {
            if let Some(x) = items.first_mut().and_then(|(_, v)| v.first_mut()) {
                *x = f32::NAN;
            }
        }
        Corruption::DuplicateIndex => {
            if items.len() >= 2 {
                items[1].0 = 0;
            } else if let Some(first) = items.first().cloned() {
                items.push(first);
            }
        }
    }
}
