//! Fakes of the vendors' own embeddings APIs (Cohere, Voyage, Gemini),
//! validated as they validate, with their usage and error formats. Vectors
//! are a pure function of (model, input type, text, dimensions) so tests
//! can predict every value ([`native_embedding`], [`quantize`]).

pub(crate) mod bedrock;
pub(crate) mod cohere;
pub(crate) mod gemini;
pub(crate) mod voyage;

use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::faults::Fault;
use crate::{InputItem, RecordedRequest, Shared};

/// A model of a native vendor.
#[derive(Debug)]
pub(crate) struct NativeModel {
    pub id: &'static str,
    pub native_dims: u32,
    /// Accepted output dimensions; empty: any of 1..=native.
    pub dims: &'static [u32],
}

pub(crate) const COHERE_MODELS: &[NativeModel] = &[
    NativeModel {
        id: "embed-v4.0",
        native_dims: 1536,
        dims: &[256, 512, 1024, 1536],
    },
    NativeModel {
        id: "embed-english-v3.0",
        native_dims: 1024,
        dims: &[1024],
    },
];

pub(crate) const VOYAGE_MODELS: &[NativeModel] = &[
    NativeModel {
        id: "voyage-3.5",
        native_dims: 1024,
        dims: &[256, 512, 1024, 2048],
    },
    NativeModel {
        id: "voyage-3.5-lite",
        native_dims: 1024,
        dims: &[256, 512, 1024, 2048],
    },
];

pub(crate) const GEMINI_MODELS: &[NativeModel] = &[
    NativeModel {
        id: "gemini-embedding-001",
        native_dims: 3072,
        dims: &[],
    },
    NativeModel {
        id: "text-embedding-004",
        native_dims: 768,
        dims: &[],
    },
];

pub(crate) const BEDROCK_MODELS: &[NativeModel] = &[
    NativeModel {
        id: "amazon.titan-embed-text-v2:0",
        native_dims: 1024,
        dims: &[256, 512, 1024],
    },
    NativeModel {
        id: "cohere.embed-english-v3",
        native_dims: 1024,
        dims: &[1024],
    },
];

fn all_models() -> impl Iterator<Item = &'static NativeModel> {
    COHERE_MODELS
        .iter()
        .chain(VOYAGE_MODELS)
        .chain(GEMINI_MODELS)
        .chain(BEDROCK_MODELS)
}

pub(crate) fn find(models: &'static [NativeModel], id: &str) -> Option<&'static NativeModel> {
    models.iter().find(|m| m.id == id)
}

impl NativeModel {
    pub fn allows(&self, dims: u32) -> bool {
        match self.dims {
            [] => (1..=self.native_dims).contains(&dims),
            list => list.contains(&dims),
        }
    }
}

/// The float vector a native vendor returns for `text` embedded by `model`
/// with `input_type` (Cohere and Voyage `input_type`, Gemini `taskType`;
/// `""` for none) at `dimensions` (native when `None`); `None` for an
/// unknown model or dimensions it refuses.
pub fn native_embedding(
    model: &str,
    input_type: &str,
    text: &str,
    dimensions: Option<u32>,
) -> Option<Vec<f32>> {
    let model = all_models().find(|m| m.id == model)?;
    let dims = dimensions.unwrap_or(model.native_dims);
    if !model.allows(dims) || text.is_empty() {
        return None;
    }
    let mut hasher = blake3::Hasher::new_derive_key("embgate fake-vendor native vector v1");
    for field in [model.id, input_type, text] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    let mut bytes = vec![0u8; dims as usize * 4];
    hasher.finalize_xof().fill(&mut bytes);
    let raw: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|c| f64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) / 2_147_483_648.0 - 1.0)
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    Some(raw.iter().map(|x| (x / norm) as f32).collect())
}

/// A float vector as one of the vendors' compressed types: `int8`
/// (round(v*127)), `uint8` (round((v+1)*127.5)), `ubinary` (signs packed
/// eight a byte, first value in the top bit) and `binary` (the ubinary
/// byte minus 128); `None` for any other name.
pub fn quantize(values: &[f32], value_type: &str) -> Option<Vec<i64>> {
    let packed = || -> Vec<i64> {
        values
            .chunks(8)
            .map(|chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .fold(0i64, |acc, (i, v)| acc | (i64::from(*v > 0.0) << (7 - i)))
            })
            .collect()
    };
    Some(match value_type {
        "int8" => values
            .iter()
            .map(|v| (f64::from(*v) * 127.0).round().clamp(-128.0, 127.0) as i64)
            .collect(),
        "uint8" => values
            .iter()
            .map(|v| ((f64::from(*v) + 1.0) * 127.5).round().clamp(0.0, 255.0) as i64)
            .collect(),
        "ubinary" => packed(),
        "binary" => packed().into_iter().map(|b| b - 128).collect(),
        _ => return None,
    })
}

/// Tokens a native vendor bills for one text: its words plus one.
pub fn native_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64 + 1
}

/// Pops the next fault for a request with inputs (sleeping for a delay):
/// a status is answered in the vendor's format (`error`), a raw body as
/// is, both recorded; `Ok(true)` asks for one vector fewer than inputs.
pub(crate) async fn fault(
    shared: &Shared,
    model: &str,
    texts: &[String],
    auth: Option<String>,
    error: impl Fn(StatusCode) -> Response,
) -> Result<bool, Response> {
    let response = match shared.pop_fault() {
        Some(Fault::Status {
            status,
            retry_after_secs,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = error(status);
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            response
        }
        Some(Fault::RawBody { status, body, .. }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, body).into_response()
        }
        Some(Fault::WrongCount) => return Ok(true),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            return Ok(false);
        }
        _ => return Ok(false),
    };
    record(shared, model, texts, None, auth, response.status().as_u16());
    Err(response)
}

/// What a bearer-key vendor reads first: the key as presented, the raw
/// `Authorization` header, and the body as a JSON object.
pub(crate) struct Head {
    pub key: Option<String>,
    pub auth: Option<String>,
    pub body: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Head {
    pub fn read(headers: &HeaderMap, body: &[u8]) -> Head {
        Head {
            key: presented(headers, "authorization"),
            auth: headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: match serde_json::from_slice(body) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => None,
            },
        }
    }
}

/// A JSON answer.
pub(crate) fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The key a request presents in header `name` (`Bearer ` stripped).
pub(crate) fn presented(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?;
    Some(v.strip_prefix("Bearer ").unwrap_or(v).trim().to_owned())
}

/// Whether `key` may call: any non-empty key, or one of the valid ones.
pub(crate) fn key_ok(shared: &Shared, key: Option<&str>) -> bool {
    match (key, shared.valid_keys()) {
        (None, _) | (Some(""), _) => false,
        (Some(_), None) => true,
        (Some(k), Some(valid)) => valid.iter().any(|v| v == k),
    }
}

/// Records a request, and counts its inputs as embedded when it succeeded.
pub(crate) fn record(
    shared: &Shared,
    model: &str,
    texts: &[String],
    dimensions: Option<u32>,
    authorization: Option<String>,
    status: u16,
) {
    let inputs: Vec<InputItem> = texts.iter().cloned().map(InputItem::Text).collect();
    let request = RecordedRequest {
        model: Some(model.to_owned()),
        inputs: inputs.clone(),
        dimensions,
        encoding_format: None,
        authorization,
        status,
    };
    if inputs.is_empty() {
        shared.record_key_check(request);
        return;
    }
    shared.record(request);
    if status == 200 {
        shared.count_embedded(model, dimensions, &inputs);
    }
}

/// The added latency every vendor answer waits.
pub(crate) async fn latency(shared: &Shared) {
    let d = shared.latency();
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_depend_on_every_part() {
        let a = native_embedding("embed-v4.0", "search_query", "hi", None).expect("known");
        assert_eq!(a.len(), 1536);
        assert_ne!(
            Some(a.clone()),
            native_embedding("embed-v4.0", "search_document", "hi", None)
        );
        assert_eq!(
            native_embedding("embed-v4.0", "search_query", "hi", Some(256)).map(|v| v.len()),
            Some(256)
        );
        assert!(native_embedding("embed-v4.0", "", "hi", Some(100)).is_none());
        assert!(native_embedding("gemini-embedding-001", "", "hi", Some(100)).is_some());
    }

    #[test]
    fn quantizes() {
        let v = [0.5f32, -0.5, 1.0, -1.0, 0.1, 0.1, -0.1, 0.1, 0.9];
        assert_eq!(quantize(&v[..2], "int8"), Some(vec![64, -64]));
        assert_eq!(quantize(&v[..2], "uint8"), Some(vec![191, 64]));
        assert_eq!(
            quantize(&v, "ubinary"),
            Some(vec![0b1010_1101, 0b1000_0000])
        );
        assert_eq!(quantize(&v, "binary"), Some(vec![0b1010_1101 - 128, 0]));
        assert_eq!(quantize(&v, "float"), None);
    }
}
