//! The Gemini API's `POST {base}/models/{model}:batchEmbedContents`: one
//! request per text, answered with `embeddings[].values` and no usage, so
//! tokens are estimated ([`super::estimate_tokens`]).

use serde_json::{Map, Value, json};

use super::{Endpoint, Parsed, WireRequest, estimate_tokens, f32_bytes, texts};
use crate::vendor::EmbedCall;

/// Requests per batch the API accepts.
pub const MAX_REQUESTS: usize = 100;

fn url(endpoint: &Endpoint, model: &str) -> String {
    format!(
        "{}/models/{}:batchEmbedContents",
        endpoint.base_url,
        percent_encoding::utf8_percent_encode(model, super::PATH_SEGMENT)
    )
}

pub fn request(endpoint: &Endpoint, call: &EmbedCall<'_>) -> Result<WireRequest, String> {
    let model = format!("models/{}", call.model);
    let requests: Vec<Value> = texts(call)?
        .into_iter()
        .map(|text| {
            let mut r = Map::new();
            r.insert("model".into(), model.as_str().into());
            r.insert("content".into(), json!({ "parts": [{ "text": text }] }));
            if let Some(t) = &call.params.input_type {
                r.insert("taskType".into(), t.as_str().into());
            }
            if let Some(d) = call.dimensions {
                r.insert("outputDimensionality".into(), d.into());
            }
            Value::Object(r)
        })
        .collect();
    Ok(WireRequest {
        url: url(endpoint, call.model),
        body: json!({ "requests": requests }).to_string().into(),
        headers: Vec::new(),
    })
}

pub fn probe(endpoint: &Endpoint, model: &str) -> WireRequest {
    WireRequest {
        url: url(endpoint, model),
        body: json!({ "requests": [] }).to_string().into(),
        headers: Vec::new(),
    }
}

pub fn parse(body: &[u8], call: &EmbedCall<'_>) -> Result<Parsed, String> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an embed response: {e}"))?;
    let list = answer["embeddings"]
        .as_array()
        .ok_or("not an embed response: no embeddings")?;
    let vectors = list
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let values: Option<Vec<f64>> = e["values"]
                .as_array()
                .and_then(|v| v.iter().map(Value::as_f64).collect());
            values
                .map(|v| (i, f32_bytes(&v)))
                .ok_or_else(|| format!("embedding {i} has no values"))
        })
        .collect::<Result<_, String>>()?;
    let estimate = texts(call)?.into_iter().map(estimate_tokens).sum();
    Ok(Parsed {
        vectors,
        prompt_tokens: Some(estimate),
    })
}
