//! Cohere's own embeddings API, `POST /v2/embed`: its request validated as
//! Cohere validates it, and its `embeddings_by_type` answer written from
//! stored entries.

use serde_json::Value;
use serde_json::value::RawValue;

use super::native::{COHERE_INPUT_TYPES, COHERE_TRUNCATE, canonical, finish, one_of, value_type};
use super::{EmbeddingRequest, EncodingFormat, Input, InvalidRequest, Limits, VendorParams};
use crate::cache::entry::{Entry, ValueType};
use crate::config::Flavour;

fn invalid(message: impl std::fmt::Display) -> InvalidRequest {
    InvalidRequest {
        message: format!("invalid request: {message}"),
        param: None,
    }
}

/// A validated `/v2/embed` body: one pipeline request per embedding type
/// asked for (each type is its own entry), sharing model and texts.
#[derive(Debug)]
pub struct CohereRequest {
    pub texts: Vec<String>,
    pub requests: Vec<EmbeddingRequest>,
}

#[derive(serde::Deserialize)]
struct Body {
    model: Option<String>,
    texts: Option<Vec<String>>,
    images: Option<Box<RawValue>>,
    inputs: Option<Box<RawValue>>,
    input_type: Option<Box<RawValue>>,
    embedding_types: Option<Vec<Box<RawValue>>>,
    truncate: Option<Box<RawValue>>,
    output_dimension: Option<u32>,
    max_tokens: Option<Box<RawValue>>,
}

pub fn parse(body: &[u8], limits: Limits) -> Result<CohereRequest, InvalidRequest> {
    let body: Body = serde_json::from_slice(body).map_err(|e| invalid(format_args!("{e}")))?;
    let model = body
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("model must be provided"))?;
    super::check_model(&model, &limits).map_err(|e| invalid(e.message))?;
    if body.images.is_some() || body.inputs.is_some() || body.max_tokens.is_some() {
        return Err(invalid(
            "only texts are served through this gateway (images, inputs and max_tokens are not)",
        ));
    }
    let texts = body.texts.unwrap_or_default();
    if texts.is_empty() {
        return Err(invalid("texts must be provided and not be empty"));
    }
    if texts.len() > limits.max_inputs {
        return Err(invalid(format_args!(
            "total number of texts must be at most {} - received {}",
            limits.max_inputs,
            texts.len()
        )));
    }
    if let Some(i) = texts
        .iter()
        .position(|t| t.is_empty() || t.len() > limits.max_input_bytes)
    {
        return Err(invalid(format_args!(
            "texts[{i}] must be non-empty and at most {} bytes",
            limits.max_input_bytes
        )));
    }
    let mut params = VendorParams::default();
    let input_type = body
        .input_type
        .ok_or_else(|| invalid("valid input_type must be provided with the provided model"))?;
    params.input_type = Some(
        one_of(&input_type, COHERE_INPUT_TYPES, "input_type").map_err(|e| invalid(e.message))?,
    );
    if let Some(t) = body.truncate.filter(|t| t.get() != "null") {
        params.truncate =
            Some(one_of(&t, COHERE_TRUNCATE, "truncate").map_err(|e| invalid(e.message))?);
    }
    canonical(Flavour::Cohere, &model, &mut params);
    let mut types = Vec::new();
    for t in body.embedding_types.unwrap_or_default() {
        let t = value_type(&t, "embedding_types").map_err(|e| invalid(e.message))?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    if types.is_empty() {
        types.push(ValueType::F32);
    }
    if body.output_dimension == Some(0) {
        return Err(invalid("output_dimension must be a positive integer"));
    }
    let inputs: Vec<Input> = texts.iter().cloned().map(Input::Text).collect();
    let requests = types
        .into_iter()
        .map(|output| {
            let mut req = EmbeddingRequest {
                model: model.clone(),
                inputs: inputs.clone(),
                encoding_format: EncodingFormat::Float,
                dimensions: body.output_dimension,
                user: None,
                extra: Vec::new(),
                vendor: VendorParams::default(),
            };
            finish(
                &mut req,
                VendorParams {
                    output,
                    ..params.clone()
                },
            );
            req
        })
        .collect();
    Ok(CohereRequest { texts, requests })
}

/// Writes the answer: `embeddings` by type, the texts, and the tokens the
/// request is billed (`billed`) as Cohere reports them.
pub fn write_response(
    out: &mut Vec<u8>,
    texts: &[String],
    by_type: &[(ValueType, Vec<Entry>)],
    billed: u64,
) {
    out.extend_from_slice(b"{\"id\":");
    push_json(
        out,
        &Value::from(format!("{:032x}", rand::random::<u128>())),
    );
    out.extend_from_slice(b",\"embeddings\":{");
    for (i, (value_type, entries)) in by_type.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json(out, &Value::from(value_type.name()));
        out.extend_from_slice(b":[");
        for (j, entry) in entries.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            super::write_values(out, entry.payload(), *value_type);
        }
        out.push(b']');
    }
    out.extend_from_slice(b"},\"texts\":");
    push_json(out, &Value::from(texts.to_vec()));
    out.extend_from_slice(
        b",\"meta\":{\"api_version\":{\"version\":\"2\"},\"billed_units\":{\"input_tokens\":",
    );
    out.extend_from_slice(billed.to_string().as_bytes());
    out.extend_from_slice(b"}},\"response_type\":\"embeddings_by_type\"}");
}

fn push_json(out: &mut Vec<u8>, value: &Value) {
    // A Value always serialises; the fallback keeps the output valid JSON.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = crate::protocol::TEST_LIMITS;

    #[test]
    fn one_request_per_type_keyed_apart() {
        let body = br#"{"model":"embed-v4.0","texts":["a","b"],"input_type":"search_query",
            "embedding_types":["float","int8","float"],"output_dimension":256}"#;
        let r = parse(body, LIMITS).expect("valid");
        assert_eq!(r.requests.len(), 2);
        assert_eq!(r.requests[1].vendor.output, ValueType::Int8);
        assert_eq!(r.requests[0].dimensions, Some(256));
        assert_eq!(r.requests[0].vendor.truncate.as_deref(), Some("END"));
        assert_ne!(r.requests[0].extra.len(), r.requests[1].extra.len());
    }

    #[test]
    fn refuses_as_cohere_does() {
        for body in [
            r#"{"texts":["a"],"input_type":"search_query"}"#,
            r#"{"model":"m","texts":[],"input_type":"search_query"}"#,
            r#"{"model":"m","texts":["a"]}"#,
            r#"{"model":"m","texts":["a"],"input_type":"query"}"#,
            r#"{"model":"m","texts":["a"],"input_type":"search_query","embedding_types":["int4"]}"#,
            r#"{"model":"m","texts":[""],"input_type":"search_query"}"#,
            r#"{"model":"m","images":["data:"],"input_type":"image"}"#,
            r#"{"model":"m","texts":"a","input_type":"search_query"}"#,
        ] {
            let e = parse(body.as_bytes(), LIMITS).expect_err(body);
            assert!(e.message.starts_with("invalid request: "), "{}", e.message);
        }
    }

    #[test]
    fn writes_embeddings_by_type() {
        let key = crate::cache::key::KeyHash([1; 32]);
        let origin = crate::cache::entry::Origin {
            model: "m",
            upstream: "u",
            tenant: None,
        };
        let float = Entry::encode(&key, &origin, &[0.5, -1.0], 3);
        let int8 = Entry::encode_raw(&key, &origin, ValueType::Int8, &[0xff, 7], 3);
        let mut out = Vec::new();
        let by_type = [(ValueType::F32, vec![float]), (ValueType::Int8, vec![int8])];
        write_response(&mut out, &["a".to_owned()], &by_type, 3);
        let json: Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(
            json["embeddings"]["float"],
            serde_json::json!([[0.5, -1.0]])
        );
        assert_eq!(json["embeddings"]["int8"], serde_json::json!([[-1, 7]]));
        assert_eq!(json["meta"]["billed_units"]["input_tokens"], 3);
        assert_eq!(json["texts"], serde_json::json!(["a"]));
    }
}
