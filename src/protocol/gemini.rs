//! The Gemini API's own embeddings methods, `models/{model}:batchEmbedContents`
//! and `:embedContent`: requests validated as the API validates them,
//! answers (`embeddings[].values`, `embedding.values`) written from entries.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::native::{GEMINI_TASK_TYPES, finish};
use super::{EmbeddingRequest, EncodingFormat, Input, InvalidRequest, Limits, VendorParams};
use crate::cache::entry::{Entry, ValueType};

fn invalid(message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param: None,
    }
}

/// Which method was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Batch,
    Single,
}

/// `{model}:{method}` from the path; `None` for anything else.
pub fn method(spec: &str) -> Option<(&str, Method)> {
    let (model, method) = spec.rsplit_once(':')?;
    let method = match method {
        "batchEmbedContents" => Method::Batch,
        "embedContent" => Method::Single,
        _ => return None,
    };
    (!model.is_empty()).then_some((model.strip_prefix("models/").unwrap_or(model), method))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmbedContent {
    model: Option<String>,
    content: Option<Content>,
    task_type: Option<String>,
    title: Option<String>,
    output_dimensionality: Option<u32>,
}

#[derive(Deserialize)]
struct Content {
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    text: Option<String>,
}

#[derive(Deserialize)]
struct Batch {
    requests: Vec<EmbedContent>,
}

/// What texts of a batch must share to travel in one pipeline request:
/// task type and output dimensionality.
type Shared = (Option<String>, Option<u32>);

/// A validated call: its texts grouped by the parameters they share (one
/// pipeline request each), with each text's place in the answer.
#[derive(Debug)]
pub struct GeminiRequest {
    pub count: usize,
    pub groups: Vec<(Vec<usize>, EmbeddingRequest)>,
}

pub fn parse(
    body: &[u8],
    model: &str,
    method: Method,
    limits: Limits,
) -> Result<GeminiRequest, InvalidRequest> {
    super::check_model(model, &limits)?;
    let bad_json = |e: serde_json::Error| invalid(format!("Invalid JSON payload received. {e}"));
    let requests = match method {
        Method::Batch => {
            serde_json::from_slice::<Batch>(body)
                .map_err(bad_json)?
                .requests
        }
        Method::Single => vec![serde_json::from_slice::<EmbedContent>(body).map_err(bad_json)?],
    };
    if requests.is_empty() {
        return Err(invalid(
            "* BatchEmbedContentsRequest.requests: at least one request is required.",
        ));
    }
    if requests.len() > limits.max_inputs {
        return Err(invalid(format!(
            "* BatchEmbedContentsRequest.requests: at most {} requests are accepted.",
            limits.max_inputs
        )));
    }
    let path_model = format!("models/{model}");
    let mut groups: BTreeMap<Shared, (Vec<usize>, Vec<Input>)> = BTreeMap::new();
    for (i, r) in requests.into_iter().enumerate() {
        let field = match method {
            Method::Batch => format!("requests[{i}]"),
            Method::Single => "request".to_owned(),
        };
        if r.model
            .as_deref()
            .is_some_and(|m| m != path_model && m != model)
        {
            return Err(invalid(format!(
                "* {field}.model: the model of each request must be the batch's ({path_model})."
            )));
        }
        if r.title.is_some() {
            return Err(invalid(format!(
                "* {field}.title: titles are not served through this gateway."
            )));
        }
        let text = match r.content.map(|c| c.parts).as_deref() {
            Some([Part { text: Some(t) }]) if !t.is_empty() => t.clone(),
            _ => {
                return Err(invalid(format!(
                    "* {field}.content: exactly one non-empty text part is required."
                )));
            }
        };
        if text.len() > limits.max_input_bytes {
            return Err(invalid(format!(
                "* {field}.content: at most {} bytes per text are accepted.",
                limits.max_input_bytes
            )));
        }
        if let Some(t) = r
            .task_type
            .as_deref()
            .filter(|t| !GEMINI_TASK_TYPES.contains(t))
        {
            return Err(invalid(format!(
                "Invalid value at '{field}.task_type' (type.googleapis.com/google.ai.generativelanguage.v1beta.TaskType), \"{t}\""
            )));
        }
        if r.output_dimensionality == Some(0) {
            return Err(invalid(format!(
                "* {field}.output_dimensionality: must be positive."
            )));
        }
        let group = groups
            .entry((r.task_type, r.output_dimensionality))
            .or_default();
        group.0.push(i);
        group.1.push(Input::Text(text));
    }
    let count = groups.values().map(|g| g.0.len()).sum();
    let groups = groups
        .into_iter()
        .map(|((task_type, dimensions), (places, inputs))| {
            let mut req = EmbeddingRequest {
                model: model.to_owned(),
                inputs,
                encoding_format: EncodingFormat::Float,
                dimensions,
                user: None,
                extra: Vec::new(),
                vendor: VendorParams::default(),
            };
            let params = VendorParams {
                input_type: task_type,
                ..VendorParams::default()
            };
            finish(&mut req, params);
            (places, req)
        })
        .collect();
    Ok(GeminiRequest { count, groups })
}

/// Writes the answer of `method` for entries in the caller's order.
pub fn write_response(out: &mut Vec<u8>, method: Method, entries: &[Entry]) {
    let values = |out: &mut Vec<u8>, entry: &Entry| {
        out.extend_from_slice(b"{\"values\":");
        super::write_values(out, entry.payload(), ValueType::F32);
        out.push(b'}');
    };
    match method {
        Method::Single => {
            out.extend_from_slice(b"{\"embedding\":");
            if let Some(entry) = entries.first() {
                values(out, entry);
            }
            out.push(b'}');
        }
        Method::Batch => {
            out.extend_from_slice(b"{\"embeddings\":[");
            for (i, entry) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                values(out, entry);
            }
            out.extend_from_slice(b"]}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = crate::protocol::TEST_LIMITS;

    #[test]
    fn reads_the_method_from_the_path() {
        assert_eq!(
            method("gemini-embedding-001:batchEmbedContents"),
            Some(("gemini-embedding-001", Method::Batch))
        );
        assert_eq!(method("m:embedContent"), Some(("m", Method::Single)));
        assert_eq!(method("m:generateContent"), None);
        assert_eq!(method(":embedContent"), None);
    }

    #[test]
    fn groups_requests_by_their_parameters() {
        let body = br#"{"requests":[
            {"model":"models/g","content":{"parts":[{"text":"a"}]},"taskType":"RETRIEVAL_QUERY"},
            {"model":"models/g","content":{"parts":[{"text":"b"}]}},
            {"model":"models/g","content":{"parts":[{"text":"c"}]},"taskType":"RETRIEVAL_QUERY"}]}"#;
        let r = parse(body, "g", Method::Batch, LIMITS).expect("valid");
        assert_eq!(r.count, 3);
        assert_eq!(r.groups.len(), 2);
        let query = r
            .groups
            .iter()
            .find(|(_, g)| g.vendor.input_type.is_some())
            .expect("query group");
        assert_eq!(query.0, vec![0, 2]);
    }

    #[test]
    fn refuses_as_the_api_does() {
        for body in [
            r#"{"requests":[]}"#,
            r#"{"requests":[{"model":"models/other","content":{"parts":[{"text":"a"}]}}]}"#,
            r#"{"requests":[{"content":{"parts":[]}}]}"#,
            r#"{"requests":[{"content":{"parts":[{"text":"a"}]},"taskType":"QUERY"}]}"#,
            r#"{"requests":[{"content":{"parts":[{"text":"a"}]},"title":"t"}]}"#,
            r#"{"content":{"parts":[{"text":"a"}]}}"#,
        ] {
            assert!(
                parse(body.as_bytes(), "g", Method::Batch, LIMITS).is_err(),
                "{body}"
            );
        }
        let single = br#"{"content":{"parts":[{"text":"a"}]},"outputDimensionality":8}"#;
        let r = parse(single, "g", Method::Single, LIMITS).expect("single");
        assert_eq!(r.groups[0].1.dimensions, Some(8));
    }
}
