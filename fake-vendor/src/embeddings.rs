//! `POST /v1/embeddings`, validated the way OpenAI validates it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::error::{ApiError, check_auth, json_headers};
use crate::faults::{Corruption, Plan, corrupt};
use crate::server::{ConnectionKill, MAX_BODY};
use crate::vectors::{
    self, CL100K_VOCAB, EmbeddingModel, MAX_INPUT_TOKENS, MAX_INPUTS, MAX_REQUEST_TOKENS,
    TokenError,
};
use crate::{InputItem, RecordedRequest, Shared};

const FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

const INVALID_INPUT: &str = "'$.input' is invalid. Please check the API reference: \
                             https://platform.openai.com/docs/api-reference.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

/// A request that passed schema validation.
struct Parsed {
    model: String,
    inputs: Vec<InputItem>,
    encoding: Encoding,
    dimensions: Option<u64>,
}

/// A response ready to render.
struct Success {
    model: &'static EmbeddingModel,
    dimensions: Option<u32>,
    inputs: Vec<InputItem>,
    vectors: Vec<Vec<f32>>,
    tokens: u64,
    encoding: Encoding,
}

pub(crate) async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let kill = parts.extensions.get::<ConnectionKill>().cloned();
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    // Tokenizing and formatting a large batch takes milliseconds of CPU; off
    // the runtime threads it cannot stall a single-threaded test runtime that
    // also drives the gateway and its timers.
    let worker = shared.clone();
    let step = tokio::task::spawn_blocking(move || process(&worker, &parts.headers, body)).await;
    match step {
        Ok(Step::Respond(mut response, delay)) => {
            tokio::time::sleep(delay + shared.latency()).await;
            vendor_headers(response.headers_mut(), &shared, started);
            response
        }
        Ok(Step::Raw(response)) => {
            tokio::time::sleep(shared.latency()).await;
            response
        }
        Ok(Step::Close) => {
            tokio::time::sleep(shared.latency()).await;
            close_connection(kill).await
        }
        Err(_) => ApiError::for_status(StatusCode::INTERNAL_SERVER_ERROR, None).into_response(),
    }
}

/// What the async half of the handler does with a processed request.
enum Step {
    /// Send this after the delay, with the vendor's headers.
    Respond(Response, Duration),
    /// Send exactly this.
    Raw(Response),
    Close,
}

/// Parses, records, applies the next fault and builds the answer.
fn process(shared: &Shared, headers: &HeaderMap, body: Result<Bytes, axum::Error>) -> Step {
    let value = body
        .as_ref()
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok());
    let mut record = lenient_record(value.as_ref(), headers);
    let key_check = is_key_check(value.as_ref());
    let fault = if key_check { None } else { shared.pop_fault() };
    let keep = |record: RecordedRequest| {
        if key_check {
            shared.record_key_check(record);
        } else {
            shared.record(record);
        }
    };
    let plan = match fault {
        Some(fault) => fault.plan(record.model.as_deref()),
        None => Plan::Normal {
            delay: Duration::ZERO,
            corruption: None,
        },
    };
    let (response, delay) = match plan {
        Plan::Replace(response) => (response, Duration::ZERO),
        Plan::Raw(response) => {
            record.status = response.status().as_u16();
            keep(record);
            return Step::Raw(response);
        }
        Plan::Close => {
            record.status = 0;
            keep(record);
            return Step::Close;
        }
        Plan::Normal { delay, corruption } => match answer(shared, headers, body, value.as_ref()) {
            Ok(success) => {
                if corruption.is_none() {
                    shared.count_embedded(success.model.id, success.dimensions, &success.inputs);
                }
                (render(&success, corruption), delay)
            }
            Err(error) => (error.into_response(), delay),
        },
    };
    record.status = response.status().as_u16();
    keep(record);
    Step::Respond(response, delay)
}

/// A request with an empty `input`: refused after authentication, never
/// billed (see `FakeVendor::key_checks`).
fn is_key_check(value: Option<&Value>) -> bool {
    match value.and_then(|v| v.get("input")) {
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(items)) => items.is_empty(),
        _ => false,
    }
}

/// Asks the accept loop to drop this connection, which also drops this
/// still-pending handler, so no response is ever written. Without the loop's
/// hook the body fails instead, which makes hyper abort the connection.
async fn close_connection(kill: Option<ConnectionKill>) -> Response {
    if let Some(ConnectionKill(kill)) = kill {
        kill.notify_one();
        std::future::pending::<()>().await;
    }
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection closed by fault"))
    });
    Body::from_stream(failing).into_response()
}

/// Headers the real vendor sends on every response.
pub(crate) fn vendor_headers(headers: &mut HeaderMap, shared: &Shared, started: Instant) {
    let ms = started.elapsed().as_millis() as u64;
    let pairs = [
        (
            "openai-organization",
            HeaderValue::from_static("user-fakevendor"),
        ),
        ("openai-processing-ms", HeaderValue::from(ms)),
        ("openai-version", HeaderValue::from_static("2020-10-01")),
        ("x-request-id", shared.next_request_id()),
    ];
    for (name, value) in pairs {
        headers.insert(HeaderName::from_static(name), value);
    }
}

pub(crate) fn lenient_record(value: Option<&Value>, headers: &HeaderMap) -> RecordedRequest {
    let field = |name: &str| value.and_then(|v| v.get(name));
    RecordedRequest {
        model: field("model").and_then(Value::as_str).map(str::to_owned),
        inputs: field("input")
            .and_then(|v| parse_inputs(v).ok())
            .unwrap_or_default(),
        dimensions: field("dimensions")
            .and_then(Value::as_u64)
            .and_then(|d| u32::try_from(d).ok()),
        encoding_format: field("encoding_format")
            .and_then(Value::as_str)
            .map(str::to_owned),
        authorization: headers
            .get(AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        status: 0,
    }
}

fn answer(
    shared: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, axum::Error>,
    value: Option<&Value>,
) -> Result<Success, ApiError> {
    check_auth(headers, shared.valid_keys())?;
    if body.is_err() {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body could not be read or exceeds {MAX_BODY} bytes."),
        ));
    }
    let object = match value {
        None => return Err(ApiError::bad_json()),
        Some(Value::Object(object)) => object,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "{} is not of type 'object'",
                truncate(&other.to_string())
            )));
        }
    };
    let parsed = parse(object)?;
    embed(parsed)
}

fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

fn parse(object: &Map<String, Value>) -> Result<Parsed, ApiError> {
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(format!(
            "Unrecognized request argument supplied: {unknown}"
        )));
    }
    let model = match object.get("model") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("you must provide a model parameter"));
        }
        Some(Value::String(m)) => m.clone(),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "{} is not of type 'string' - 'model'",
                truncate(&other.to_string())
            ))
            .param("model"));
        }
    };
    let inputs = match object.get("input") {
        None => {
            return Err(ApiError::invalid("'input' is a required property").param("input"));
        }
        Some(v) => parse_inputs(v)?,
    };
    let encoding = match object.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(s)) if s == "float" => Encoding::Float,
        Some(Value::String(s)) if s == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "{} is not one of ['float', 'base64'] - 'encoding_format'",
                truncate(&other.to_string())
            ))
            .param("encoding_format"));
        }
    };
    let dimensions = match object.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(0) => {
                return Err(
                    ApiError::invalid("0 is less than the minimum of 1 - 'dimensions'")
                        .param("dimensions"),
                );
            }
            Some(d) => Some(d),
            None if v.as_i64().is_some() => {
                return Err(ApiError::invalid(format!(
                    "{v} is less than the minimum of 1 - 'dimensions'"
                ))
                .param("dimensions"));
            }
            None => {
                return Err(ApiError::invalid(format!(
                    "{} is not of type 'integer' - 'dimensions'",
                    truncate(&v.to_string())
                ))
                .param("dimensions"));
            }
        },
    };
    match object.get("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "{} is not of type 'string' - 'user'",
                truncate(&other.to_string())
            ))
            .param("user"));
        }
    }
    Ok(Parsed {
        model,
        inputs,
        encoding,
        dimensions,
    })
}

fn invalid_input() -> ApiError {
    ApiError::invalid(INVALID_INPUT).param("input")
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn token_array(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| token_id(v).ok_or_else(invalid_input))
        .collect()
}

/// Accepts a string, an array of strings, an array of token ids (one
/// input), or an array of token-id arrays; nothing may be empty or mixed.
pub(crate) fn parse_inputs(value: &Value) -> Result<Vec<InputItem>, ApiError> {
    let items = match value {
        Value::String(s) if !s.is_empty() => return Ok(vec![InputItem::Text(s.clone())]),
        Value::Array(items) if !items.is_empty() => items,
        _ => return Err(invalid_input()),
    };
    let inputs = if items.iter().all(Value::is_string) {
        items
            .iter()
            .map(|v| match v.as_str() {
                Some(s) if !s.is_empty() => Ok(InputItem::Text(s.to_owned())),
                _ => Err(invalid_input()),
            })
            .collect::<Result<Vec<_>, _>>()?
    } else if items.iter().all(Value::is_number) {
        vec![InputItem::Tokens(token_array(items)?)]
    } else if items.iter().all(Value::is_array) {
        items
            .iter()
            .map(|v| match v.as_array() {
                Some(ids) if !ids.is_empty() => token_array(ids).map(InputItem::Tokens),
                _ => Err(invalid_input()),
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        return Err(invalid_input());
    };
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(format!(
            "'$.input' is invalid: {} inputs were given but at most {MAX_INPUTS} are allowed. \
             Please check the API reference: https://platform.openai.com/docs/api-reference.",
            inputs.len()
        ))
        .param("input"));
    }
    Ok(inputs)
}

fn embed(parsed: Parsed) -> Result<Success, ApiError> {
    let model = vectors::embedding_model(&parsed.model)
        .ok_or_else(|| ApiError::model_not_found(&parsed.model))?;
    let dimensions = match parsed.dimensions {
        None => None,
        Some(_) if !model.shortening => {
            return Err(ApiError::invalid(
                "This model does not support specifying dimensions.",
            ));
        }
        Some(d) => match u32::try_from(d) {
            Ok(d) if d <= model.native_dims => Some(d),
            _ => {
                return Err(ApiError::invalid(format!(
                    "Invalid value for 'dimensions' = {d}. It must be between 1 and {} for \
                     model {}.",
                    model.native_dims, model.id
                ))
                .param("dimensions"));
            }
        },
    };

    let mut prepared = Vec::with_capacity(parsed.inputs.len());
    let mut total = 0u64;
    for input in &parsed.inputs {
        let p = vectors::prepare(model, input).map_err(|e| match e {
            TokenError::InvalidTokenId(id) => ApiError::invalid(format!(
                "Invalid token id {id} in '$.input': token ids must be less than \
                 {CL100K_VOCAB}."
            ))
            .param("input"),
            TokenError::Tokenizer => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            ),
        })?;
        if p.tokens > MAX_INPUT_TOKENS {
            return Err(ApiError::invalid(format!(
                "This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you \
                 requested {n} tokens ({n} in your prompt; 0 for the completion). Please reduce \
                 your prompt; or completion length.",
                n = p.tokens
            ))
            .param("input"));
        }
        total += p.tokens;
        prepared.push(p);
    }
    if total > MAX_REQUEST_TOKENS {
        return Err(ApiError::invalid(format!(
            "Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request"
        ))
        .param("input")
        .code("max_tokens_per_request"));
    }

    let dims = dimensions.unwrap_or(model.native_dims);
    let vectors = prepared
        .iter()
        .map(|p| vectors::vector(model, &p.material, dims))
        .collect();
    drop(prepared);
    Ok(Success {
        model,
        dimensions,
        inputs: parsed.inputs,
        vectors,
        tokens: total,
        encoding: parsed.encoding,
    })
}

/// One `/v1/embeddings` body of a batch's input file, answered as the
/// endpoint answers it (the key was checked when the batch was created):
/// the status and the JSON body.
pub(crate) fn answer_batch_line(shared: &Shared, body: &Value) -> (StatusCode, String) {
    let parsed = match body {
        Value::Object(object) => parse(object),
        other => Err(ApiError::invalid(format!(
            "{} is not of type 'object'",
            truncate(&other.to_string())
        ))),
    };
    match parsed.and_then(embed) {
        Ok(success) => {
            shared.count_embedded(success.model.id, success.dimensions, &success.inputs);
            (StatusCode::OK, render_body(&success, None))
        }
        Err(error) => (error.status, error.body()),
    }
}

fn render(success: &Success, corruption: Option<Corruption>) -> Response {
    let out = render_body(success, corruption);
    let mut headers = json_headers();
    let remaining_tokens = 10_000_000u64.saturating_sub(success.tokens);
    let pairs = [
        ("openai-model", HeaderValue::from_static(success.model.id)),
        (
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("10000"),
        ),
        (
            "x-ratelimit-limit-tokens",
            HeaderValue::from_static("10000000"),
        ),
        (
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("9999"),
        ),
        (
            "x-ratelimit-remaining-tokens",
            HeaderValue::from(remaining_tokens),
        ),
        (
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("6ms"),
        ),
        ("x-ratelimit-reset-tokens", HeaderValue::from_static("0s")),
    ];
    for (name, value) in pairs {
        headers.insert(HeaderName::from_static(name), value);
    }
    (StatusCode::OK, headers, out).into_response()
}

fn render_body(success: &Success, corruption: Option<Corruption>) -> String {
    let mut items: Vec<(usize, Vec<f32>)> = success.vectors.iter().cloned().enumerate().collect();
    if let Some(c) = corruption {
        corrupt(&mut items, c);
    }
    let per_item = match success.encoding {
        Encoding::Float => 12,
        Encoding::Base64 => 6,
    };
    let dims = items.first().map_or(0, |(_, v)| v.len());
    let mut out = String::with_capacity(128 + items.len() * (64 + dims * per_item));
    out.push_str(r#"{"object":"list","data":["#);
    let mut float = ryu::Buffer::new();
    for (n, (index, v)) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"object":"embedding","index":{index},"embedding":"#
        );
        match success.encoding {
            Encoding::Float => {
                out.push('[');
                for (j, x) in v.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    if x.is_finite() {
                        out.push_str(float.format_finite(*x));
                    } else {
                        // JSON has no NaN; this parses as a double that
                        // overflows f32 to infinity.
                        out.push_str("1e39");
                    }
                }
                out.push(']');
            }
            Encoding::Base64 => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                out.push('"');
                out.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
                out.push('"');
            }
        }
        out.push('}');
    }
    let _ = write!(
        out,
        r#"],"model":{},"usage":{{"prompt_tokens":{t},"total_tokens":{t}}}}}"#,
        Value::from(success.model.id),
        t = success.tokens
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inputs(v: Value) -> Result<Vec<InputItem>, ApiError> {
        parse_inputs(&v)
    }

    #[test]
    fn input_shapes() {
        assert_eq!(
            inputs(json!("a")).ok(),
            Some(vec![InputItem::Text("a".into())])
        );
        assert_eq!(
            inputs(json!([1, 2])).ok(),
            Some(vec![InputItem::Tokens(vec![1, 2])])
        );
        assert_eq!(
            inputs(json!([[1], [2, 3]])).ok(),
            Some(vec![
                InputItem::Tokens(vec![1]),
                InputItem::Tokens(vec![2, 3])
            ])
        );
        for bad in [
            json!(""),
            json!([]),
            json!([""]),
            json!([[]]),
            json!(["a", 1]),
            json!([1, -1]),
            json!([1.5]),
            json!([[1], 2]),
            json!(null),
            json!(5),
            json!({"a": 1}),
            json!([4294967296u64]),
        ] {
            let err = inputs(bad.clone()).expect_err("invalid input");
            assert_eq!(err.param, Some("input"), "{bad}");
        }
        let many: Vec<Value> = (0..=MAX_INPUTS).map(|_| json!("x")).collect();
        assert!(inputs(Value::Array(many)).is_err());
    }
}
