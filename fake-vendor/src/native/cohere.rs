//! Cohere's `POST /v2/embed`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{
    COHERE_MODELS, Head, fault, find, json_answer, key_ok, latency, native_embedding,
    native_tokens, quantize, record,
};
use crate::Shared;

const MAX_TEXTS: usize = 96;
const INPUT_TYPES: &[&str] = &[
    "search_document",
    "search_query",
    "classification",
    "clustering",
    "image",
];
const TYPES: &[&str] = &["float", "int8", "uint8", "binary", "ubinary"];

/// Cohere's error body: `{"id", "message"}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let id = blake3::hash(&rand_bytes()).to_hex();
    let body = json!({ "id": &id.as_str()[..32], "message": message.into() });
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn rand_bytes() -> [u8; 16] {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_le_bytes()
}

fn invalid(message: impl std::fmt::Display) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("invalid request: {message}"),
    )
}

fn status_message(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "You are past the per minute request limit, please wait and try again later.",
        401 => "invalid api token",
        503 => "service unavailable",
        _ => "internal server error, this has been reported to our developers",
    }
}

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    latency(&shared).await;
    let Head { key, auth, body } = Head::read(&headers, &body);
    let Some(body) = body else {
        return invalid("unable to parse the request body as JSON");
    };
    let texts: Vec<String> = match body.get("texts") {
        None => Vec::new(),
        Some(Value::Array(items)) => match items
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect()
        {
            Some(t) => t,
            None => return invalid("texts must be a list of strings"),
        },
        Some(_) => return invalid("texts must be a list of strings"),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if !texts.is_empty() {
        let error = |status| error(status, status_message(status));
        match fault(&shared, &model, &texts, auth.clone(), error).await {
            Err(response) => return response,
            Ok(true) => return answer(&shared, &body, &model, &texts, auth, true),
            Ok(false) => {}
        }
    }
    if !key_ok(&shared, key.as_deref()) {
        record(&shared, &model, &texts, None, auth, 401);
        let message = match key {
            None => "no api key supplied",
            Some(_) => "invalid api token",
        };
        return error(StatusCode::UNAUTHORIZED, message);
    }
    answer(&shared, &body, &model, &texts, auth, false)
}

fn answer(
    shared: &Shared,
    body: &Map<String, Value>,
    model_id: &str,
    texts: &[String],
    auth: Option<String>,
    one_short: bool,
) -> Response {
    let dims = body.get("output_dimension").and_then(Value::as_u64);
    let refuse = |response: Response| {
        record(
            shared,
            model_id,
            texts,
            dims.map(|d| d as u32),
            auth.clone(),
            response.status().as_u16(),
        );
        response
    };
    if model_id.is_empty() {
        return refuse(invalid("model must be provided"));
    }
    let Some(model) = find(COHERE_MODELS, model_id) else {
        return refuse(error(
            StatusCode::NOT_FOUND,
            format!(
                "model '{model_id}' not found, make sure the correct model ID was used and that you have access to the model."
            ),
        ));
    };
    if texts.is_empty() {
        return refuse(invalid(
            "one of texts, images or inputs must be provided and not empty",
        ));
    }
    if texts.len() > MAX_TEXTS {
        return refuse(invalid(format!(
            "total number of texts must be at most {MAX_TEXTS} - received {}",
            texts.len()
        )));
    }
    if texts.iter().any(String::is_empty) {
        return refuse(invalid("texts must not contain empty strings"));
    }
    let input_type = match body.get("input_type").and_then(Value::as_str) {
        Some(t) if INPUT_TYPES.contains(&t) => t,
        _ => {
            return refuse(invalid(
                "valid input_type must be provided with the provided model",
            ));
        }
    };
    let types: Vec<&str> = match body.get("embedding_types") {
        None | Some(Value::Null) => vec!["float"],
        Some(Value::Array(list)) => {
            match list.iter().map(Value::as_str).collect::<Option<Vec<_>>>() {
                Some(t) if !t.is_empty() && t.iter().all(|t| TYPES.contains(t)) => t,
                _ => {
                    return refuse(invalid(
                        "embedding_types must be a list of float, int8, uint8, binary, ubinary",
                    ));
                }
            }
        }
        Some(_) => return refuse(invalid("embedding_types must be a list")),
    };
    match body.get("truncate") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if ["NONE", "START", "END"].contains(&t.as_str()) => {}
        Some(_) => return refuse(invalid("truncate must be one of NONE, START, END")),
    }
    let dims = match body.get("output_dimension") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|d| u32::try_from(d).ok()) {
            Some(d) if model.allows(d) => Some(d),
            _ => {
                return refuse(invalid(format!(
                    "output_dimension must be one of {:?} for model {model_id}",
                    model.dims
                )));
            }
        },
    };
    let mut by_type = Map::new();
    for t in &types {
        let mut list: Vec<Value> = texts
            .iter()
            .map(|text| {
                let v = native_embedding(model_id, input_type, text, dims).unwrap_or_default();
                match quantize(&v, t) {
                    Some(ints) => json!(ints),
                    None => json!(v),
                }
            })
            .collect();
        if one_short {
            list.pop();
        }
        by_type.insert((*t).to_owned(), Value::Array(list));
    }
    let tokens: u64 = texts.iter().map(|t| native_tokens(t)).sum();
    record(shared, model_id, texts, dims, auth, 200);
    let body = json!({
        "id": "6f1d6b1c-embed",
        "embeddings": by_type,
        "texts": texts,
        "meta": { "api_version": { "version": "2" }, "billed_units": { "input_tokens": tokens } },
        "response_type": "embeddings_by_type",
    });
    json_answer(StatusCode::OK, &body)
}
