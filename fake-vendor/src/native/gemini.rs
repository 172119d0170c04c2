//! The Gemini API's `POST /{version}/models/{model}:batchEmbedContents` and
//! `:embedContent`; the key in `x-goog-api-key` or `?key=`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{GEMINI_MODELS, fault, find, json_answer, key_ok, latency, native_embedding, record};
use crate::Shared;

const MAX_REQUESTS: usize = 100;
const TASK_TYPES: &[&str] = &[
    "TASK_TYPE_UNSPECIFIED",
    "RETRIEVAL_QUERY",
    "RETRIEVAL_DOCUMENT",
    "SEMANTIC_SIMILARITY",
    "CLASSIFICATION",
    "CLUSTERING",
    "QUESTION_ANSWERING",
    "FACT_VERIFICATION",
    "CODE_RETRIEVAL_QUERY",
];

/// Google's error body: `{"error": {"code", "message", "status"}}`.
pub(crate) fn error(status: StatusCode, google: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": {
        "code": status.as_u16(),
        "message": message.into(),
        "status": google,
    }});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

/// One embed request as validated: text, task type, dimensions.
struct Item {
    text: String,
    task: String,
    dims: Option<u32>,
}

fn item(request: &Value, model_path: &str, field: &str) -> Result<Item, String> {
    if let Some(m) = request.get("model").and_then(Value::as_str)
        && m != model_path
    {
        return Err(format!(
            "{field}.model: the model of each request must be the batch's model ({model_path})."
        ));
    }
    let parts = request["content"]["parts"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("{field}.content: must have at least one part."))?;
    let text: Option<String> = parts
        .iter()
        .map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    let text = text
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{field}.content: only non-empty text parts are supported."))?;
    let task = match request.get("taskType") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(t)) if TASK_TYPES.contains(&t.as_str()) => t.clone(),
        Some(t) => {
            return Err(format!(
                "Invalid value at '{field}.task_type' (type.googleapis.com/google.ai.generativelanguage.v1beta.TaskType), {t}"
            ));
        }
    };
    let dims = match request.get("outputDimensionality") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .filter(|d| *d > 0)
                .ok_or_else(|| format!("{field}.output_dimensionality must be positive."))?,
        ),
    };
    Ok(Item { text, task, dims })
}

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    Path(spec): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    latency(&shared).await;
    let Some((model_id, action)) = spec.split_once(':') else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "Method not found.");
    };
    let batch = match action {
        "batchEmbedContents" => true,
        "embedContent" => false,
        _ => return error(StatusCode::NOT_FOUND, "NOT_FOUND", "Method not found."),
    };
    let key = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query.get("key").cloned());
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return invalid("Invalid JSON payload received.");
    };
    let model_path = format!("models/{model_id}");
    let requests: Vec<Value> = if batch {
        body["requests"].as_array().cloned().unwrap_or_default()
    } else {
        vec![body.clone()]
    };
    let texts: Vec<String> = requests
        .iter()
        .filter_map(|r| r["content"]["parts"][0]["text"].as_str().map(str::to_owned))
        .collect();
    let mut one_short = false;
    if !requests.is_empty() {
        let error = |status: StatusCode| {
            let (google, message) = match status.as_u16() {
                429 => (
                    "RESOURCE_EXHAUSTED",
                    "Resource has been exhausted (e.g. check quota).",
                ),
                503 => (
                    "UNAVAILABLE",
                    "The model is overloaded. Please try again later.",
                ),
                _ => ("INTERNAL", "An internal error has occurred."),
            };
            error(status, google, message)
        };
        match fault(&shared, model_id, &texts, key.clone(), error).await {
            Err(response) => return response,
            Ok(short) => one_short = short,
        }
    }
    if !key_ok(&shared, key.as_deref()) {
        let status = if key.as_deref().unwrap_or_default().is_empty() {
            403
        } else {
            400
        };
        record(&shared, model_id, &texts, None, key.clone(), status);
    }
    match key.as_deref() {
        None | Some("") => {
            return error(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            );
        }
        k if !key_ok(&shared, k) => {
            // Google names the reason in the details, as here.
            let body = json!({ "error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }],
            }});
            return json_answer(StatusCode::BAD_REQUEST, &body);
        }
        _ => {}
    }
    let response = answer(model_id, &model_path, &requests, batch, one_short);
    let dims = requests
        .first()
        .and_then(|r| r["outputDimensionality"].as_u64())
        .map(|d| d as u32);
    record(
        &shared,
        model_id,
        &texts,
        dims,
        key,
        response.status().as_u16(),
    );
    response
}

fn answer(
    model_id: &str,
    model_path: &str,
    requests: &[Value],
    batch: bool,
    one_short: bool,
) -> Response {
    let Some(model) = find(GEMINI_MODELS, model_id) else {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!(
                "models/{model_id} is not found for API version v1beta, or is not supported for embedContent."
            ),
        );
    };
    if requests.is_empty() {
        return invalid("* BatchEmbedContentsRequest.requests: at least one request is required.");
    }
    if requests.len() > MAX_REQUESTS {
        return invalid(format!(
            "* BatchEmbedContentsRequest.requests: at most {MAX_REQUESTS} requests can be in one batch."
        ));
    }
    let mut embeddings = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        let field = if batch {
            format!("requests[{i}]")
        } else {
            "request".to_owned()
        };
        let item = match item(request, model_path, &field) {
            Ok(item) => item,
            Err(message) => return invalid(message),
        };
        if item.dims.is_some_and(|d| !model.allows(d)) {
            return invalid(format!(
                "{field}.output_dimensionality must be at most {}.",
                model.native_dims
            ));
        }
        let values =
            native_embedding(model_id, &item.task, &item.text, item.dims).unwrap_or_default();
        embeddings.push(json!({ "values": values }));
    }
    if one_short {
        embeddings.pop();
    }
    let body = if batch {
        json!({ "embeddings": embeddings })
    } else {
        json!({ "embedding": embeddings.into_iter().next().unwrap_or(Value::Null) })
    };
    json_answer(StatusCode::OK, &body)
}
