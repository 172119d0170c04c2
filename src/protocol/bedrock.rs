//! Amazon Bedrock's InvokeModel for embedding models, as the gateway serves
//! it (`POST /model/{modelId}/invoke`): Titan text embeddings' and Cohere on
//! Bedrock's bodies validated, answers written from entries.

use serde_json::Value;

use super::native::{canonical, finish};
use super::{EmbeddingRequest, EncodingFormat, Input, InvalidRequest, Limits, VendorParams};
use crate::cache::entry::{Entry, ValueType};
use crate::config::Flavour;

fn invalid(message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: format!("Malformed input request: {}", message.into()),
        param: None,
    }
}

/// A validated InvokeModel body.
#[derive(Debug)]
pub enum BedrockRequest {
    /// Titan: one text.
    Titan(EmbeddingRequest),
    /// Cohere on Bedrock: as Cohere's own API, whether types were named.
    Cohere {
        request: super::cohere::CohereRequest,
        by_type: bool,
    },
}

pub fn parse(model: &str, body: &[u8], limits: Limits) -> Result<BedrockRequest, InvalidRequest> {
    super::check_model(model, &limits)?;
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(invalid("expected a JSON object"));
    };
    if model.starts_with("cohere.embed") {
        let by_type = fields.contains_key("embedding_types");
        fields.insert("model".into(), model.into());
        let bytes = serde_json::to_vec(&fields).map_err(|e| invalid(e.to_string()))?;
        let request = super::cohere::parse(&bytes, limits).map_err(|e| InvalidRequest {
            message: e
                .message
                .replacen("invalid request: ", "Malformed input request: ", 1),
            param: None,
        })?;
        return Ok(BedrockRequest::Cohere { request, by_type });
    }
    if !model.starts_with("amazon.titan-embed") {
        return Err(invalid(format!(
            "{model} is not an embeddings model served here"
        )));
    }
    let text = match fields.remove("inputText") {
        Some(Value::String(t)) if !t.is_empty() && t.len() <= limits.max_input_bytes => t,
        _ => return Err(invalid("#/inputText: a non-empty string is required")),
    };
    let dimensions = match fields.remove("dimensions") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|d| u32::try_from(d).ok())
                .filter(|d| *d > 0)
                .ok_or_else(|| invalid("#/dimensions: expected a positive integer"))?,
        ),
    };
    let mut params = VendorParams::default();
    match fields.remove("normalize") {
        None => {}
        Some(Value::Bool(b)) => params.normalize = Some(b),
        Some(_) => return Err(invalid("#/normalize: expected type: Boolean")),
    }
    match fields.remove("embeddingTypes") {
        None => {}
        Some(v) if v == serde_json::json!(["float"]) => {}
        Some(_) => return Err(invalid("#/embeddingTypes: only [\"float\"] is served")),
    }
    if let Some(name) = fields.keys().next() {
        return Err(invalid(format!("extraneous key [{name}] is not permitted")));
    }
    canonical(Flavour::Bedrock, model, &mut params);
    let mut request = EmbeddingRequest {
        model: model.to_owned(),
        inputs: vec![Input::Text(text)],
        encoding_format: EncodingFormat::Float,
        dimensions,
        user: None,
        extra: Vec::new(),
        vendor: VendorParams::default(),
    };
    finish(&mut request, params);
    Ok(BedrockRequest::Titan(request))
}

/// Titan's answer: the vector and the input's token count.
pub fn write_titan(out: &mut Vec<u8>, entry: &Entry, tokens: u64) {
    out.extend_from_slice(b"{\"embedding\":");
    super::write_values(out, entry.payload(), ValueType::F32);
    out.extend_from_slice(b",\"inputTextTokenCount\":");
    out.extend_from_slice(tokens.to_string().as_bytes());
    out.push(b'}');
}

/// Cohere on Bedrock's answer: a bare list of float vectors unless types
/// were `named`; its tokens travel in a header.
pub fn write_cohere(
    out: &mut Vec<u8>,
    texts: &[String],
    by_type: &[(ValueType, Vec<Entry>)],
    named: bool,
) {
    out.extend_from_slice(b"{\"embeddings\":");
    let list = |out: &mut Vec<u8>, value_type: ValueType, entries: &[Entry]| {
        out.push(b'[');
        for (i, entry) in entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            super::write_values(out, entry.payload(), value_type);
        }
        out.push(b']');
    };
    match by_type {
        [(ValueType::F32, entries)] if !named => list(out, ValueType::F32, entries),
        _ => {
            out.push(b'{');
            for (i, (value_type, entries)) in by_type.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(format!("\"{}\":", value_type.name()).as_bytes());
                list(out, *value_type, entries);
            }
            out.push(b'}');
        }
    }
    out.extend_from_slice(b",\"id\":\"");
    out.extend_from_slice(format!("{:032x}", rand::random::<u128>()).as_bytes());
    out.extend_from_slice(b"\",\"response_type\":");
    let response_type = match named {
        false => "\"embeddings_floats\"",
        true => "\"embeddings_by_type\"",
    };
    out.extend_from_slice(response_type.as_bytes());
    out.extend_from_slice(b",\"texts\":");
    if serde_json::to_writer(&mut *out, texts).is_err() {
        out.extend_from_slice(b"[]");
    }
    out.push(b'}');
}
