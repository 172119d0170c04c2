//! Cohere's `POST /v2/embed`: `texts`, `input_type`, one of
//! `embedding_types`; usage in `meta.billed_units.input_tokens`.

use serde_json::{Map, Value, json};

use super::{Endpoint, Parsed, WireRequest, texts, values_of};
use crate::cache::entry::ValueType;
use crate::vendor::EmbedCall;

/// Texts per call Cohere accepts.
pub const MAX_TEXTS: usize = 96;

/// The `input_type` a call without one is sent with (Cohere requires one
/// for its current models); it is keyed as if the caller had sent it.
pub const DEFAULT_INPUT_TYPE: &str = "search_document";

fn url(endpoint: &Endpoint) -> String {
    format!("{}/v2/embed", endpoint.base_url)
}

/// The body of a call: shared with Cohere on Bedrock, which takes the same
/// fields but the model in its path.
pub fn body(call: &EmbedCall<'_>, with_model: bool) -> Result<Value, String> {
    let mut body = Map::new();
    if with_model {
        body.insert("model".into(), call.model.into());
    }
    body.insert("texts".into(), json!(texts(call)?));
    let input_type = call.params.input_type.as_deref();
    body.insert(
        "input_type".into(),
        input_type.unwrap_or(DEFAULT_INPUT_TYPE).into(),
    );
    body.insert("embedding_types".into(), json!([call.params.output.name()]));
    if let Some(t) = &call.params.truncate {
        body.insert("truncate".into(), t.as_str().into());
    }
    if let Some(d) = call.dimensions {
        body.insert("output_dimension".into(), d.into());
    }
    Ok(Value::Object(body))
}

pub fn request(endpoint: &Endpoint, call: &EmbedCall<'_>) -> Result<WireRequest, String> {
    Ok(WireRequest {
        url: url(endpoint),
        body: body(call, true)?.to_string().into(),
        headers: Vec::new(),
    })
}

pub fn probe(endpoint: &Endpoint, model: &str) -> WireRequest {
    let body = json!({
        "model": model,
        "texts": [],
        "input_type": DEFAULT_INPUT_TYPE,
        "embedding_types": ["float"],
    });
    WireRequest {
        url: url(endpoint),
        body: body.to_string().into(),
        headers: Vec::new(),
    }
}

/// The vectors of `output` in `embeddings` (an object by type, or the
/// legacy bare list of float vectors).
pub fn vectors(embeddings: &Value, output: ValueType) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let list = match embeddings {
        Value::Object(by_type) => by_type.get(output.name()),
        Value::Array(_) if output == ValueType::F32 => Some(embeddings),
        _ => None,
    }
    .and_then(Value::as_array)
    .ok_or_else(|| format!("no {} embeddings in the answer", output.name()))?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            values_of(v, output)
                .map(|bytes| (i, bytes))
                .ok_or_else(|| format!("embedding {i} is not a list of {}", output.name()))
        })
        .collect()
}

pub fn parse(body: &[u8], output: ValueType) -> Result<Parsed, String> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an embed response: {e}"))?;
    let vectors = vectors(&answer["embeddings"], output)?;
    let prompt_tokens = answer["meta"]["billed_units"]["input_tokens"].as_f64();
    Ok(Parsed {
        vectors,
        prompt_tokens: prompt_tokens.map(|t| t.max(0.0) as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_value_type() {
        let body = br#"{"id":"x","embeddings":{"float":[[0.5,-1.0]],"int8":[[-128,127]],
            "ubinary":[[255]]},"meta":{"billed_units":{"input_tokens":7}}}"#;
        let p = parse(body, ValueType::F32).expect("float");
        assert_eq!(p.prompt_tokens, Some(7));
        let floats: Vec<u8> = [0.5f32, -1.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(p.vectors, vec![(0, floats)]);
        let p = parse(body, ValueType::Int8).expect("int8");
        assert_eq!(p.vectors, vec![(0, vec![0x80, 0x7f])]);
        let p = parse(body, ValueType::Ubinary).expect("ubinary");
        assert_eq!(p.vectors, vec![(0, vec![255])]);
        assert!(parse(body, ValueType::Uint8).is_err());
        let out_of_range = br#"{"embeddings":{"int8":[[128]]}}"#;
        assert!(parse(out_of_range, ValueType::Int8).is_err());
    }
}
