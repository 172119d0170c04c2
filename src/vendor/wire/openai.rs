//! OpenAI's API (and Azure's, and compatible vendors'): always asks for
//! base64, the exact f32 bytes.

use base64::Engine as _;
use serde::Deserialize;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::{Endpoint, Parsed, WireRequest, f32_bytes};
use crate::config::Flavour;
use crate::protocol::Input;
use crate::vendor::EmbedCall;

fn url(endpoint: &Endpoint, model: &str) -> String {
    match endpoint.flavour {
        Flavour::Azure => format!(
            "{}/openai/deployments/{}/embeddings?api-version={}",
            endpoint.base_url,
            endpoint.deployment(model),
            endpoint.api_version
        ),
        _ => format!("{}/embeddings", endpoint.base_url),
    }
}

pub fn request(endpoint: &Endpoint, call: &EmbedCall<'_>) -> Result<WireRequest, String> {
    let body = serde_json::to_vec(&RequestBody(call)).map_err(|e| e.to_string())?;
    Ok(WireRequest {
        url: url(endpoint, call.model),
        body: body.into(),
        headers: Vec::new(),
    })
}

pub fn probe(endpoint: &Endpoint, model: &str) -> WireRequest {
    WireRequest {
        url: url(endpoint, model),
        body: serde_json::json!({ "model": model, "input": "" })
            .to_string()
            .into(),
        headers: Vec::new(),
    }
}

/// The JSON body sent upstream.
struct RequestBody<'a>(&'a EmbedCall<'a>);

impl Serialize for RequestBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let call = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model", call.model)?;
        map.serialize_entry("input", &call.inputs)?;
        map.serialize_entry("encoding_format", "base64")?;
        if let Some(d) = call.dimensions {
            map.serialize_entry("dimensions", &d)?;
        }
        if let Some(user) = call.user {
            map.serialize_entry("user", user)?;
        }
        for (name, value) in call.extra {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl Serialize for Input {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Input::Text(t) => s.serialize_str(t),
            Input::Tokens(t) => t.serialize(s),
        }
    }
}

#[derive(Deserialize)]
struct ResponseBody {
    data: Vec<ResponseItem>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ResponseItem {
    index: usize,
    embedding: Vector,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Vector {
    Base64(String),
    // f64 so that values beyond f32's range are caught, not silently inf.
    Floats(Vec<f64>),
}

impl Vector {
    /// The stored bytes: base64 decoded as sent, floats as f32.
    pub(super) fn bytes(self, index: usize) -> Result<Vec<u8>, String> {
        match self {
            Vector::Base64(s) => base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|_| format!("embedding {index} is not base64")),
            Vector::Floats(v) => Ok(f32_bytes(&v)),
        }
    }
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
}

pub fn parse(body: &[u8]) -> Result<Parsed, String> {
    let parsed: ResponseBody =
        serde_json::from_slice(body).map_err(|e| format!("not an embeddings response: {e}"))?;
    let vectors = parsed
        .data
        .into_iter()
        .map(|item| Ok((item.index, item.embedding.bytes(item.index)?)))
        .collect::<Result<_, String>>()?;
    Ok(Parsed {
        vectors,
        prompt_tokens: parsed.usage.map(|u| u.prompt_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::super::check_openai_answer;
    use super::*;
    use crate::vendor::UpstreamError;

    fn b64(v: &[f32]) -> String {
        let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    fn checked(body: &str, dims: Option<u32>) -> Result<Vec<Vec<f32>>, UpstreamError> {
        let e = check_openai_answer(body.as_bytes(), 2, dims)?;
        Ok(e.vectors
            .iter()
            .map(|v| {
                v.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
            .collect())
    }

    #[test]
    fn accepts_base64_and_floats_in_any_index_order() {
        let body = format!(
            r#"{{"data":[{{"index":1,"embedding":[0.5,1.0]}},{{"index":0,"embedding":"{}"}}],"usage":{{"prompt_tokens":9}}}}"#,
            b64(&[0.25, -2.0])
        );
        let v = checked(&body, Some(2)).expect("valid");
        assert_eq!(v, vec![vec![0.25, -2.0], vec![0.5, 1.0]]);
        assert_eq!(
            parse(body.as_bytes()).expect("parses").prompt_tokens,
            Some(9)
        );
    }

    #[test]
    fn rejects_broken_answers() {
        let cases = [
            r#"{"data":[{"index":0,"embedding":[1.0]}]}"#, // count
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":0,"embedding":[1.0]}]}"#, // dup
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":2,"embedding":[1.0]}]}"#, // range
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0,2.0]}]}"#, // dims
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1e39]}]}"#, // inf
            r#"{"data":[{"index":0,"embedding":[]},{"index":1,"embedding":[]}]}"#, // empty
            r#"{"data":[{"index":0,"embedding":"@@"},{"index":1,"embedding":[1.0]}]}"#, // b64
            r#"{"data":[{"index":0,"embedding":"AAA="},{"index":1,"embedding":"AAA="}]}"#, // cut
            r#"<html>bad gateway</html>"#,
        ];
        for body in cases {
            assert!(
                matches!(checked(body, None), Err(UpstreamError::InvalidResponse(_))),
                "{body}"
            );
        }
        let ok = r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0]}]}"#;
        assert!(checked(ok, Some(2)).is_err());
        assert!(checked(ok, Some(1)).is_ok());
    }
}
