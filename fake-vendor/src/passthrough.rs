//! Routes the gateway does not interpret but must forward faithfully:
//! models, chat completions (plain and streamed) and an echo endpoint.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::Shared;
use crate::embeddings::vendor_headers;
use crate::error::{ApiError, check_auth, json_headers};
use crate::server::MAX_BODY;
use crate::vectors::{EMBEDDING_MODELS, count_cl100k};

/// Chat models served, with their `created` timestamps.
const CHAT_MODELS: &[(&str, u64)] = &[
    ("gpt-4o-mini", 1_721_172_741),
    ("gpt-4o", 1_715_367_049),
    ("gpt-4.1-mini", 1_744_318_173),
    ("gpt-3.5-turbo", 1_677_610_602),
];

/// Gap between streamed chunks, long enough for a test to see that a proxy
/// forwards each one as it arrives rather than buffering the whole stream.
const CHUNK_INTERVAL: Duration = Duration::from_millis(30);

const FINGERPRINT: &str = "fp_fakevendor";

#[derive(Serialize)]
struct Model {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<Model>,
}

fn models() -> Vec<Model> {
    let embedding = EMBEDDING_MODELS
        .iter()
        .map(|m| (m.id, m.created, m.owned_by));
    let chat = CHAT_MODELS
        .iter()
        .map(|&(id, created)| (id, created, "openai"));
    embedding
        .chain(chat)
        .map(|(id, created, owned_by)| Model {
            id,
            object: "model",
            created,
            owned_by,
        })
        .collect()
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_string(value).unwrap_or_default();
    (status, json_headers(), body).into_response()
}

fn finish(mut response: Response, shared: &Shared, started: Instant) -> Response {
    vendor_headers(response.headers_mut(), shared, started);
    response
}

pub(crate) async fn list_models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let response = match check_auth(&headers, shared.valid_keys()) {
        Ok(()) => json_response(
            StatusCode::OK,
            &ModelList {
                object: "list",
                data: models(),
            },
        ),
        Err(e) => e.into_response(),
    };
    finish(response, &shared, started)
}

pub(crate) async fn get_model(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let response = match check_auth(&headers, shared.valid_keys()) {
        Err(e) => e.into_response(),
        Ok(()) => match models().into_iter().find(|m| m.id == id) {
            Some(model) => json_response(StatusCode::OK, &model),
            None => ApiError::model_not_found(&id).into_response(),
        },
    };
    finish(response, &shared, started)
}

/// The text of a message's `content`: a string, or the text parts of an
/// array of content parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    stream: bool,
    include_usage: bool,
}

fn parse_chat(value: Option<Value>) -> Result<ChatRequest, ApiError> {
    let Some(value) = value else {
        return Err(ApiError::bad_json());
    };
    let Value::Object(mut object) = value else {
        return Err(ApiError::invalid("The request body must be a JSON object."));
    };
    let model = match object.remove("model") {
        Some(Value::String(m)) => m,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("you must provide a model parameter"));
        }
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "Invalid type for 'model': expected a string, but got {}.",
                type_name(&other)
            ))
            .param("model"));
        }
    };
    let messages = match object.remove("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            )
            .param("messages")
            .code("empty_array"));
        }
        None => {
            return Err(ApiError::invalid("Missing required parameter: 'messages'.")
                .param("messages")
                .code("missing_required_parameter"));
        }
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "Invalid type for 'messages': expected an array of objects, but got {} instead.",
                type_name(&other)
            ))
            .param("messages")
            .code("invalid_type"));
        }
    };
    if messages.iter().any(|m| !m.is_object()) {
        return Err(
            ApiError::invalid("Invalid type for 'messages[0]': expected an object.")
                .param("messages")
                .code("invalid_type"),
        );
    }
    let stream = object.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = object
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    if !CHAT_MODELS.iter().any(|(id, _)| *id == model) {
        return Err(ApiError::model_not_found(&model));
    }
    Ok(ChatRequest {
        model,
        messages,
        stream,
        include_usage,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Answers with the last user message echoed back, so tests can check what
/// reached the vendor.
pub(crate) async fn chat_completions(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    if let Err(e) = check_auth(&parts.headers, shared.valid_keys()) {
        return finish(e.into_response(), &shared, started);
    }
    let value = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes).ok(),
        Err(_) => None,
    };
    let chat = match parse_chat(value) {
        Ok(chat) => chat,
        Err(e) => return finish(e.into_response(), &shared, started),
    };

    let reply = chat
        .messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default();
    let prompt_tokens: u64 = 3 + chat
        .messages
        .iter()
        .map(|m| 3 + count_cl100k(&content_text(m.get("content"))))
        .sum::<u64>();
    let completion_tokens = count_cl100k(&reply);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let id = format!(
        "chatcmpl-{}",
        &blake3::hash(format!("{created}{reply}").as_bytes()).to_hex()[..24]
    );

    if !chat.stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        });
        return finish(json_response(StatusCode::OK, &body), &shared, started);
    }

    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = Map::new();
        c.insert("id".into(), json!(id));
        c.insert("object".into(), json!("chat.completion.chunk"));
        c.insert("created".into(), json!(created));
        c.insert("model".into(), json!(chat.model));
        c.insert("service_tier".into(), json!("default"));
        c.insert("system_fingerprint".into(), json!(FINGERPRINT));
        c.insert("choices".into(), choices);
        if chat.include_usage {
            c.insert("usage".into(), usage.cloned().unwrap_or(Value::Null));
        }
        format!("data: {}\n\n", Value::Object(c))
    };
    let choice = |delta: Value, finish_reason: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]);

    // At least three content deltas, so a stream always has five or more
    // chunks to observe.
    let mut pieces: Vec<&str> = reply.split_inclusive(' ').collect();
    while pieces.len() < 3 {
        pieces.push("");
    }
    let mut events = vec![chunk(
        choice(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ),
        None,
    )];
    events.extend(
        pieces
            .iter()
            .map(|p| chunk(choice(json!({"content": p}), Value::Null), None)),
    );
    events.push(chunk(choice(json!({}), json!("stop")), None));
    if chat.include_usage {
        events.push(chunk(json!([]), Some(&usage)));
    }
    events.push("data: [DONE]\n\n".to_owned());

    let stream =
        futures_util::stream::iter(events.into_iter().enumerate()).then(|(i, event)| async move {
            if i > 0 {
                tokio::time::sleep(CHUNK_INTERVAL).await;
            }
            Ok::<_, Infallible>(event)
        });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    finish(response, &shared, started)
}

/// Reflects the request so tests can check what the gateway forwarded.
/// `x-fake-status: NNN` (200..=599) picks the response status.
pub(crate) async fn echo(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "Request body could not be read or is too large.",
            )
            .into_response();
        }
    };
    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    let status = parts
        .headers
        .get("x-fake-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u16>().ok())
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    json_response(
        status,
        &json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "headers": headers,
            "body": body,
        }),
    )
}
