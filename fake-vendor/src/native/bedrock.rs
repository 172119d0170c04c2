//! Amazon Bedrock's InvokeModel, `POST /model/{modelId}/invoke`, for Titan
//! text embeddings v2 and Cohere on Bedrock. The SigV4 signature is checked
//! for presence and shape (the fake cannot know the secret).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{
    BEDROCK_MODELS, fault, find, json_answer, latency, native_embedding, native_tokens, quantize,
    record,
};
use crate::Shared;

/// Bedrock's error body, `{"message"}`, with its `x-amzn-ErrorType`.
pub(crate) fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let mut response = json_answer(status, &json!({ "message": message.into() }));
    if let Ok(v) = HeaderValue::from_str(kind) {
        response.headers_mut().insert("x-amzn-errortype", v);
    }
    response
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

fn status_error(status: StatusCode) -> Response {
    match status.as_u16() {
        429 => error(
            status,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        ),
        503 => error(
            status,
            "ServiceUnavailableException",
            "Service unavailable.",
        ),
        _ => error(status, "InternalServerException", "Internal server error."),
    }
}

/// Whether the request carries a SigV4 signature of the right shape for
/// the `bedrock` service, and its `x-amz-date`.
fn signed(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let date_ok = text("x-amz-date").is_some_and(|d| {
        d.len() == 16
            && d.as_bytes()[8] == b'T'
            && d.ends_with('Z')
            && d[..8].bytes().all(|b| b.is_ascii_digit())
    });
    let Some(auth) = text("authorization").and_then(|a| a.strip_prefix("AWS4-HMAC-SHA256 ")) else {
        return false;
    };
    let mut credential_ok = false;
    let mut signed_ok = false;
    let mut signature_ok = false;
    for part in auth.split(", ") {
        if let Some(c) = part.strip_prefix("Credential=") {
            let scope: Vec<&str> = c.split('/').collect();
            credential_ok = scope.len() == 5
                && !scope[0].is_empty()
                && scope[1].len() == 8
                && !scope[2].is_empty()
                && scope[3] == "bedrock"
                && scope[4] == "aws4_request";
        } else if let Some(s) = part.strip_prefix("SignedHeaders=") {
            let names: Vec<&str> = s.split(';').collect();
            signed_ok = names.contains(&"host") && names.contains(&"x-amz-date");
        } else if let Some(s) = part.strip_prefix("Signature=") {
            signature_ok = s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        }
    }
    date_ok && credential_ok && signed_ok && signature_ok
}

pub(crate) async fn handle(
    State(shared): State<Arc<Shared>>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    latency(&shared).await;
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else {
        return invalid("Malformed input request, please reformat your input and try again.");
    };
    let texts: Vec<String> = match (body.get("inputText"), body.get("texts")) {
        (Some(Value::String(t)), _) => vec![t.clone()],
        (_, Some(Value::Array(list))) => list
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let one_short = match fault(&shared, &model_id, &texts, auth.clone(), status_error).await {
        Err(response) => return response,
        Ok(short) => short,
    };
    if !signed(&headers) {
        record(&shared, &model_id, &texts, None, auth, 403);
        return error(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        );
    }
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map(|d| d as u32);
    let response = match find(BEDROCK_MODELS, &model_id) {
        None => invalid("The provided model identifier is invalid."),
        Some(_) if model_id.starts_with("amazon.titan") => titan(&body, &model_id, &texts, dims),
        Some(_) => cohere(&body, &model_id, &texts, one_short),
    };
    record(
        &shared,
        &model_id,
        &texts,
        dims,
        auth,
        response.status().as_u16(),
    );
    response
}

fn titan(body: &Map<String, Value>, model: &str, texts: &[String], dims: Option<u32>) -> Response {
    let [text] = texts else {
        return invalid("Malformed input request: #/inputText: expected type: String");
    };
    if text.is_empty() {
        return invalid("Malformed input request: #/inputText: expected minLength: 1");
    }
    if body.get("dimensions").is_some() && !dims.is_some_and(|d| [256, 512, 1024].contains(&d)) {
        return invalid("Malformed input request: #/dimensions: 256, 512 or 1024");
    }
    let normalize = match body.get("normalize") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return invalid("Malformed input request: #/normalize: expected type: Boolean"),
    };
    let mut values = native_embedding(model, "", text, dims).unwrap_or_default();
    if !normalize {
        // Unnormalised vectors are longer than one.
        values.iter_mut().for_each(|v| *v *= 2.5);
    }
    let tokens = native_tokens(text);
    json_answer(
        StatusCode::OK,
        &json!({
            "embedding": values,
            "embeddingsByType": { "float": values },
            "inputTextTokenCount": tokens,
        }),
    )
}

fn cohere(body: &Map<String, Value>, model: &str, texts: &[String], one_short: bool) -> Response {
    if texts.is_empty() || texts.len() > 96 || texts.iter().any(String::is_empty) {
        return invalid("Malformed input request: #/texts: expected 1 to 96 non-empty strings");
    }
    let Some(input_type) = body.get("input_type").and_then(Value::as_str) else {
        return invalid("Malformed input request: #: required key [input_type] not found");
    };
    let types: Option<Vec<String>> = match body.get("embedding_types") {
        None => None,
        Some(Value::Array(list)) => list.iter().map(|t| t.as_str().map(str::to_owned)).collect(),
        Some(_) => return invalid("Malformed input request: #/embedding_types"),
    };
    let vectors = |kind: &str| -> Value {
        let mut list: Vec<Value> = texts
            .iter()
            .map(|t| {
                let v = native_embedding(model, input_type, t, None).unwrap_or_default();
                quantize(&v, kind).map_or_else(|| json!(v), |ints| json!(ints))
            })
            .collect();
        if one_short {
            list.pop();
        }
        Value::Array(list)
    };
    let (embeddings, response_type) = match &types {
        None => (vectors("float"), "embeddings_floats"),
        Some(types) => {
            let by_type: Map<String, Value> =
                types.iter().map(|t| (t.clone(), vectors(t))).collect();
            (Value::Object(by_type), "embeddings_by_type")
        }
    };
    let tokens: u64 = texts.iter().map(|t| native_tokens(t)).sum();
    let mut response = json_answer(
        StatusCode::OK,
        &json!({
            "embeddings": embeddings,
            "id": "b3d1c2a0-bedrock",
            "response_type": response_type,
            "texts": texts,
        }),
    );
    response.headers_mut().insert(
        "x-amzn-bedrock-input-token-count",
        HeaderValue::from(tokens),
    );
    response
}
