//! OpenAI's error envelope and the headers every vendor response carries.

use axum::http::header::{CONTENT_TYPE, HeaderName};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// `{"error":{"message","type","param","code"}}` with a status.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Value,
    /// Extra response headers (e.g. `retry-after`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Value::Null,
            headers: Vec::new(),
        }
    }

    /// A 400 `invalid_request_error`, the vendor's usual validation failure.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn code(mut self, code: impl Into<Value>) -> Self {
        self.code = code.into();
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The JSON body, keys in the vendor's order.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: &'a Value,
        }
        let envelope = Envelope {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param,
                code: &self.code,
            },
        };
        serde_json::to_string(&envelope).unwrap_or_default()
    }

    pub fn missing_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), \
             or as the password field (with blank username) if you're accessing the API \
             from your browser and are prompted for a username. You can obtain an API key \
             from https://platform.openai.com/account/api-keys.",
        )
    }

    pub fn incorrect_key(key: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask_key(key)
            ),
        )
        .code("invalid_api_key")
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .code("model_not_found")
    }

    pub fn bad_json() -> Self {
        Self::invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means \
             you aren't using your HTTP library correctly. The OpenAI API expects a JSON \
             payload, but what was sent was not valid JSON. If you have trouble figuring \
             out how to fix this, please contact us through our help center at \
             help.openai.com.)",
        )
    }

    /// The canonical OpenAI-shaped error for a bare status code, as used by
    /// injected faults.
    pub fn for_status(status: StatusCode, model: Option<&str>) -> Self {
        let model = model.unwrap_or("text-embedding-3-small");
        match status.as_u16() {
            400 => Self::invalid("Bad request."),
            401 => Self::incorrect_key("sk-fault-injected"),
            403 => Self::new(
                status,
                "request_forbidden",
                "Country, region, or territory not supported",
            )
            .code("unsupported_country_region_territory"),
            404 => Self::model_not_found(model),
            429 => Self::new(
                status,
                "requests",
                format!(
                    "Rate limit reached for {model} in organization org-fakevendor on \
                     requests per min (RPM): Limit 3000, Used 3000, Requested 1. Please try \
                     again in 20ms. Visit https://platform.openai.com/account/rate-limits to \
                     learn more."
                ),
            )
            .code("rate_limit_exceeded")
            .header(
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderValue::from_static("0"),
            ),
            500 => Self::new(
                status,
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            ),
            502 => Self::new(status, "cf_bad_gateway", "Bad gateway.").code(502),
            503 => Self::new(
                status,
                "server_error",
                "The server is overloaded or not ready yet.",
            ),
            504 => Self::new(status, "cf_gateway_timeout", "Gateway timeout.").code(504),
            _ => {
                let kind = if status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                };
                Self::new(
                    status,
                    kind,
                    status.canonical_reason().unwrap_or("Unexpected status."),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, json_headers(), self.body()).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// Shows only the last four characters of a key, as the vendor does.
fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let prefix = if key.starts_with("sk-") { "sk-" } else { "" };
    if chars.len() <= 4 + prefix.len() {
        return format!("{prefix}****");
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{prefix}...{tail}")
}

pub(crate) fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

/// Checks `Authorization: Bearer KEY` against the accepted keys.
pub(crate) fn check_auth(headers: &HeaderMap, valid: Option<&[String]>) -> Result<(), ApiError> {
    let Some(raw) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::missing_key());
    };
    let raw = String::from_utf8_lossy(raw.as_bytes());
    let raw = raw.trim();
    let key = match raw.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
        _ => return Err(ApiError::missing_key()),
    };
    if key.is_empty() {
        return Err(ApiError::missing_key());
    }
    match valid {
        Some(keys) if !keys.iter().any(|k| k == key) => Err(ApiError::incorrect_key(key)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_all_but_last_four() {
        assert_eq!(mask_key("sk-secretabcd"), "sk-...abcd");
        assert_eq!(mask_key("plainkey1234"), "...1234");
        assert_eq!(mask_key("sk-ab"), "sk-****");
    }

    #[test]
    fn auth_rules() {
        let mut h = HeaderMap::new();
        assert!(check_auth(&h, None).is_err());
        h.insert("authorization", HeaderValue::from_static("Bearer  "));
        assert!(check_auth(&h, None).is_err());
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert!(check_auth(&h, None).is_err());
        h.insert("authorization", HeaderValue::from_static("Bearer k1"));
        assert!(check_auth(&h, None).is_ok());
        let keys = vec!["k1".to_owned()];
        assert!(check_auth(&h, Some(&keys)).is_ok());
        let keys = vec!["k2".to_owned()];
        let err = check_auth(&h, Some(&keys)).expect_err("wrong key");
        assert_eq!(err.code, Value::from("invalid_api_key"));
    }
}
