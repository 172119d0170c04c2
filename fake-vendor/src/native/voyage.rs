//! Voyage AI's `POST /v1/embeddings` (served under `/voyage/v1`, apart
//! from OpenAI's path on the same fake).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::{
    Head, VOYAGE_MODELS, fault, find, json_answer, key_ok, latency, native_embedding,
    native_tokens, quantize, record,
};
use crate::Shared;

const MAX_INPUTS: usize = 1000;

/// Voyage's error body: `{"detail"}`.
pub(crate) fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = json!({ "detail": detail.into() });
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn invalid(detail: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, detail)
}

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    latency(&shared).await;
    let Head { key, auth, body } = Head::read(&headers, &body);
    let Some(body) = body else {
        return invalid("Request body is not valid JSON.");
    };
    let texts: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            match items
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect()
            {
                Some(t) => t,
                None => return invalid("Input must be a string or a list of strings."),
            }
        }
        _ => return invalid("Input must be a string or a list of strings."),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut one_short = false;
    if !texts.is_empty() {
        let error = |status: StatusCode| {
            let detail = match status.as_u16() {
                429 => "You have exceeded your rate limit. Please slow down.",
                _ => "An unexpected error occurred. Please try again.",
            };
            error(status, detail)
        };
        match fault(&shared, &model, &texts, auth.clone(), error).await {
            Err(response) => return response,
            Ok(short) => one_short = short,
        }
    }
    if !key_ok(&shared, key.as_deref()) {
        record(&shared, &model, &texts, None, auth, 401);
        return error(StatusCode::UNAUTHORIZED, "Provided API key is invalid.");
    }
    let response = answer(&body, &model, &texts, one_short);
    let dims = body
        .get("output_dimension")
        .and_then(Value::as_u64)
        .map(|d| d as u32);
    record(
        &shared,
        &model,
        &texts,
        dims,
        auth,
        response.status().as_u16(),
    );
    response
}

fn answer(
    body: &Map<String, Value>,
    model_id: &str,
    texts: &[String],
    one_short: bool,
) -> Response {
    let Some(model) = find(VOYAGE_MODELS, model_id) else {
        return invalid(format!(
            "Model {model_id} is not supported. Supported models are ['voyage-3.5', 'voyage-3.5-lite']."
        ));
    };
    if texts.is_empty() {
        return invalid("Input cannot be an empty list.");
    }
    if texts.len() > MAX_INPUTS {
        return invalid(format!(
            "The batch size limit is {MAX_INPUTS}. Your batch size is {}.",
            texts.len()
        ));
    }
    if texts.iter().any(String::is_empty) {
        return invalid("Input cannot contain empty strings.");
    }
    let input_type = match body.get("input_type") {
        None | Some(Value::Null) => "",
        Some(Value::String(t)) if t == "query" || t == "document" => t.as_str(),
        Some(_) => return invalid("Value error, input_type must be None, 'query', or 'document'."),
    };
    if !matches!(
        body.get("truncation"),
        None | Some(Value::Null) | Some(Value::Bool(_))
    ) {
        return invalid("truncation must be a boolean.");
    }
    let dims = match body.get("output_dimension") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|d| u32::try_from(d).ok()) {
            Some(d) if model.allows(d) => Some(d),
            _ => {
                return invalid(format!(
                    "Value error, output_dimension must be one of {:?} for {model_id}.",
                    model.dims
                ));
            }
        },
    };
    let dtype = match body.get("output_dtype") {
        None | Some(Value::Null) => "float",
        Some(Value::String(t))
            if ["float", "int8", "uint8", "binary", "ubinary"].contains(&t.as_str()) =>
        {
            t.as_str()
        }
        Some(_) => {
            return invalid(
                "Value error, output_dtype must be one of float, int8, uint8, binary, ubinary.",
            );
        }
    };
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return invalid("Value error, encoding_format must be None or 'base64'."),
    };
    let mut data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = native_embedding(model_id, input_type, text, dims).unwrap_or_default();
            let embedding = match (quantize(&v, dtype), base64) {
                (None, false) => json!(v),
                (None, true) => {
                    let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(raw))
                }
                (Some(ints), false) => json!(ints),
                (Some(ints), true) => {
                    let raw: Vec<u8> = ints.iter().map(|b| *b as u8).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(raw))
                }
            };
            json!({ "object": "embedding", "embedding": embedding, "index": i })
        })
        .collect();
    if one_short {
        data.pop();
    }
    let tokens: u64 = texts.iter().map(|t| native_tokens(t)).sum();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model_id,
        "usage": { "total_tokens": tokens },
    });
    json_answer(StatusCode::OK, &body)
}
