//! Voyage AI's `POST /v1/embeddings`: OpenAI's path with its own fields
//! (`input_type`, `truncation`, `output_dimension`, `output_dtype`); asked
//! for base64, the values' exact bytes; usage is `usage.total_tokens`.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::{Endpoint, Parsed, WireRequest, texts, values_of};
use crate::cache::entry::ValueType;
use crate::vendor::EmbedCall;

/// Inputs per call Voyage accepts.
pub const MAX_INPUTS: usize = 1000;

fn url(endpoint: &Endpoint) -> String {
    format!("{}/embeddings", endpoint.base_url)
}

pub fn request(endpoint: &Endpoint, call: &EmbedCall<'_>) -> Result<WireRequest, String> {
    let mut body = Map::new();
    body.insert("input".into(), json!(texts(call)?));
    body.insert("model".into(), call.model.into());
    if let Some(t) = &call.params.input_type {
        body.insert("input_type".into(), t.as_str().into());
    }
    if let Some(t) = call.params.truncation {
        body.insert("truncation".into(), t.into());
    }
    if let Some(d) = call.dimensions {
        body.insert("output_dimension".into(), d.into());
    }
    if call.params.output != ValueType::F32 {
        body.insert("output_dtype".into(), call.params.output.name().into());
    }
    body.insert("encoding_format".into(), "base64".into());
    Ok(WireRequest {
        url: url(endpoint),
        body: Value::Object(body).to_string().into(),
        headers: Vec::new(),
    })
}

pub fn probe(endpoint: &Endpoint, model: &str) -> WireRequest {
    WireRequest {
        url: url(endpoint),
        body: json!({ "model": model, "input": [] }).to_string().into(),
        headers: Vec::new(),
    }
}

pub fn parse(body: &[u8], output: ValueType) -> Result<Parsed, String> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an embeddings response: {e}"))?;
    let data = answer["data"]
        .as_array()
        .ok_or("not an embeddings response: no data")?;
    let vectors = data
        .iter()
        .enumerate()
        .map(|(position, item)| {
            let index = item["index"]
                .as_u64()
                .map_or(position, |i| usize::try_from(i).unwrap_or(usize::MAX));
            let bytes = match &item["embedding"] {
                Value::String(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .ok(),
                numbers => values_of(numbers, output),
            };
            bytes
                .map(|b| (index, b))
                .ok_or_else(|| format!("embedding {index} is not {}", output.name()))
        })
        .collect::<Result<_, String>>()?;
    Ok(Parsed {
        vectors,
        prompt_tokens: answer["usage"]["total_tokens"].as_u64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_base64_and_numbers() {
        let body =
            br#"{"object":"list","data":[{"object":"embedding","embedding":"AX8=","index":1},
            {"object":"embedding","embedding":[-1,2],"index":0}],"model":"voyage-3.5",
            "usage":{"total_tokens":4}}"#;
        let p = parse(body, ValueType::Int8).expect("parses");
        assert_eq!(p.vectors, vec![(1, vec![1, 127]), (0, vec![0xff, 2])]);
        assert_eq!(p.prompt_tokens, Some(4));
        assert!(parse(b"{\"detail\":\"x\"}", ValueType::F32).is_err());
    }
}
