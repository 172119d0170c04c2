//! The one place where internal errors become HTTP answers, in OpenAI's
//! `{"error":{"message","type","param","code"}}` shape.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::passthrough::PassthroughError;
use crate::pipeline::EmbedError;
use crate::protocol::InvalidRequest;
use crate::request_id::{X_REQUEST_ID, X_VENDOR_REQUEST_ID};
use crate::vendor::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("Request body too large: at most {0} bytes are accepted.")]
    BodyTooLarge(usize),
    #[error("Could not read the request body: {0}")]
    BodyRead(String),
    #[error("Unknown route {0}: this gateway serves /v1/... only.")]
    NotFound(String),
    #[error("Method not allowed: use {0}.")]
    MethodNotAllowed(&'static str),
    #[error("model '{model}' is not served by a {api} upstream of this gateway.")]
    ModelNotServed { model: String, api: &'static str },
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Passthrough(#[from] PassthroughError),
    #[error("{0}")]
    Unavailable(String),
    #[error("The gateway is at capacity: too many requests in flight. Retry shortly.")]
    Overloaded,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// An OpenAI-shaped error response.
pub fn openai_error(
    status: StatusCode,
    kind: &str,
    message: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = Body {
        error: Detail {
            message,
            kind,
            param,
            code,
        },
    };
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":{}}".to_vec());
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            ApiError::InvalidRequest(e) => openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &e.message,
                e.param,
                None,
            ),
            ApiError::BodyTooLarge(_) => openai_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &message,
                None,
                Some("request_too_large"),
            ),
            ApiError::BodyRead(_) => openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &message,
                None,
                None,
            ),
            ApiError::NotFound(_) => openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &message,
                None,
                Some("unknown_url"),
            ),
            ApiError::ModelNotServed { .. } => openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &message,
                Some("model"),
                Some("model_not_found"),
            ),
            ApiError::MethodNotAllowed(_) => openai_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                &message,
                None,
                None,
            ),
            ApiError::Unavailable(_) => openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                &message,
                None,
                None,
            ),
            ApiError::Overloaded => {
                let mut response = openai_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    &message,
                    None,
                    Some("overloaded"),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
            ApiError::Embed(EmbedError::Upstream(e)) => upstream_error(e, false),
            ApiError::Auth(AuthError::Vendor(e)) => upstream_error(e, false),
            ApiError::Auth(AuthError::Missing) => openai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                &message,
                None,
                None,
            ),
            ApiError::Auth(AuthError::AdminOff) => openai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                &message,
                None,
                Some("admin_api_off"),
            ),
            ApiError::Auth(AuthError::Rejected(_)) => openai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                &message,
                None,
                Some("invalid_api_key"),
            ),
            ApiError::Passthrough(PassthroughError::Path(_)) => openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &message,
                None,
                Some("invalid_path"),
            ),
            ApiError::Passthrough(PassthroughError::NativeVendor(_)) => openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &message,
                Some("model"),
                Some("native_vendor"),
            ),
            ApiError::Passthrough(PassthroughError::NotAllowed) => openai_error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                &message,
                None,
                Some("passthrough_not_allowed"),
            ),
            ApiError::Embed(EmbedError::Internal(_)) => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &message,
                None,
                None,
            ),
        }
    }
}

/// Vendor errors go back as the vendor sent them when they are in OpenAI's
/// shape (or in any shape, `verbatim`, to callers of the vendor's own API);
/// anything else is wrapped in OpenAI's shape with the vendor's status.
fn upstream_error(e: UpstreamError, verbatim: bool) -> Response {
    let message = e.to_string();
    match e {
        UpstreamError::Vendor {
            status,
            body,
            headers,
        } => {
            let mut response = if verbatim || is_openai_error(&body) {
                (
                    status,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response()
            } else {
                let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                openai_error(
                    status,
                    "upstream_error",
                    &format!("The vendor answered {status}: {snippet}"),
                    None,
                    None,
                )
            };
            for name in ["retry-after", "retry-after-ms"] {
                if let Some(v) = headers.get(name) {
                    response.headers_mut().insert(name, v.clone());
                }
            }
            // `x-request-id` is the gateway's own.
            if let Some(v) = headers.get(X_REQUEST_ID) {
                response
                    .headers_mut()
                    .insert(X_VENDOR_REQUEST_ID, v.clone());
            }
            response
        }
        UpstreamError::Transport(_) => openai_error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            &message,
            None,
            Some("upstream_unreachable"),
        ),
        UpstreamError::Timeout(_) => openai_error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            &message,
            None,
            Some("upstream_timeout"),
        ),
        UpstreamError::InvalidResponse(_) => openai_error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            &message,
            None,
            Some("upstream_invalid_response"),
        ),
        UpstreamError::TooLarge(_) => openai_error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            &message,
            None,
            Some("upstream_response_too_large"),
        ),
    }
}

fn is_openai_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_object))
}

/// Whose error format an answer speaks: the API the caller called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Openai,
    Cohere,
    Voyage,
    Gemini,
    Bedrock,
}

/// An error answered in a vendor's own format.
pub struct InDialect(pub Dialect, pub ApiError);

impl<E: Into<ApiError>> From<(Dialect, E)> for InDialect {
    fn from((dialect, e): (Dialect, E)) -> Self {
        InDialect(dialect, e.into())
    }
}

impl IntoResponse for InDialect {
    fn into_response(self) -> Response {
        let InDialect(dialect, error) = self;
        if dialect == Dialect::Openai {
            return error.into_response();
        }
        let error = match error {
            // The vendor's own error reaches its own API's caller as sent.
            ApiError::Embed(EmbedError::Upstream(e @ UpstreamError::Vendor { .. }))
            | ApiError::Auth(AuthError::Vendor(e @ UpstreamError::Vendor { .. })) => {
                return upstream_error(e, true);
            }
            other => other,
        };
        let message = match &error {
            ApiError::InvalidRequest(e) => e.message.clone(),
            other => other.to_string(),
        };
        let mut response = error.into_response();
        let status = response.status();
        let body = match dialect {
            Dialect::Openai | Dialect::Voyage => serde_json::json!({ "detail": message }),
            Dialect::Cohere => serde_json::json!({
                "id": format!("{:032x}", rand::random::<u128>()),
                "message": message,
            }),
            Dialect::Gemini => serde_json::json!({ "error": {
                "code": status.as_u16(),
                "message": message,
                "status": google_status(status),
            }}),
            Dialect::Bedrock => serde_json::json!({ "message": message }),
        };
        *response.body_mut() = axum::body::Body::from(body.to_string());
        if dialect == Dialect::Bedrock {
            response.headers_mut().insert(
                axum::http::HeaderName::from_static("x-amzn-errortype"),
                HeaderValue::from_static(amazon_error_type(status)),
            );
        }
        response
    }
}

/// Amazon's error type for an HTTP status.
fn amazon_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "ValidationException",
        401 | 403 => "AccessDeniedException",
        404 => "ResourceNotFoundException",
        429 => "ThrottlingException",
        503 => "ServiceUnavailableException",
        504 => "ModelTimeoutException",
        _ => "InternalServerException",
    }
}

/// Google's canonical status name for an HTTP status.
pub fn google_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}
