//! Each vendor's embeddings wire format: how one call (model, inputs,
//! dimensions, [`VendorParams`]) becomes that vendor's HTTP request, and how
//! its answer becomes checked vectors and usage. Everything above this
//! module (pipeline, cache, accounting) stays vendor-agnostic.

mod bedrock;
mod cohere;
mod gemini;
mod openai;
mod voyage;

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use bytes::Bytes;

use super::client::{EmbedCall, Embeddings, UpstreamError};
use crate::auth::ApiKey;
use crate::cache::entry::ValueType;
use crate::config::Flavour;

/// One HTTP request to a vendor, ready to send (credentials apart).
pub struct WireRequest {
    pub url: String,
    pub body: Bytes,
    /// Headers the request carries besides the content type and key (a
    /// SigV4 signature).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Where and how one upstream is called.
pub struct Endpoint {
    pub flavour: Flavour,
    /// Without a trailing slash.
    pub base_url: String,
    /// Azure: the `api-version` query parameter.
    pub api_version: String,
    /// Azure: deployment by model.
    pub deployments: HashMap<String, String>,
    /// Bedrock: the AWS credentials requests are signed with.
    pub signer: Option<bedrock::Signer>,
}

pub use bedrock::Signer;

/// What is percent-encoded in a path segment: everything but RFC 3986's
/// unreserved characters, as AWS's signature and Google's paths expect.
pub(crate) const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Google's key header.
pub const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

impl Endpoint {
    /// What identifies the vectors of `model` here, for the cache key: the
    /// base URL, the API spoken (vendors differ for one model name), and
    /// for Azure the deployment.
    pub fn namespace(&self, model: &str) -> String {
        match self.flavour {
            Flavour::Openai => self.base_url.clone(),
            Flavour::Azure => format!("{}#azure:{}", self.base_url, self.deployment(model)),
            native => format!("{}#{}", self.base_url, native.name()),
        }
    }

    pub fn deployment<'a>(&'a self, model: &'a str) -> &'a str {
        self.deployments.get(model).map_or(model, String::as_str)
    }

    /// The most inputs one call for `model` may carry at this vendor.
    pub fn max_inputs(&self, model: &str) -> usize {
        match self.flavour {
            Flavour::Openai | Flavour::Azure => usize::MAX,
            Flavour::Cohere => cohere::MAX_TEXTS,
            Flavour::Voyage => voyage::MAX_INPUTS,
            Flavour::Gemini => gemini::MAX_REQUESTS,
            Flavour::Bedrock => bedrock::Family::max_inputs(model),
        }
    }

    /// The header carrying exactly `key` in this vendor's scheme.
    pub fn credential_for(&self, key: &ApiKey) -> Option<(HeaderName, HeaderValue)> {
        match self.flavour {
            Flavour::Openai | Flavour::Cohere | Flavour::Voyage => {
                Some((header::AUTHORIZATION, key.bearer()?))
            }
            Flavour::Azure => Some((crate::auth::API_KEY, key.header_value()?)),
            Flavour::Gemini => Some((X_GOOG_API_KEY, key.header_value()?)),
            // Signed per request instead.
            Flavour::Bedrock => None,
        }
    }

    /// The request embedding `call`'s inputs.
    pub fn request(&self, call: &EmbedCall<'_>) -> Result<WireRequest, UpstreamError> {
        let encoded = match self.flavour {
            Flavour::Openai | Flavour::Azure => openai::request(self, call),
            Flavour::Cohere => cohere::request(self, call),
            Flavour::Voyage => voyage::request(self, call),
            Flavour::Gemini => gemini::request(self, call),
            Flavour::Bedrock => bedrock::request(self, call),
        };
        encoded.map_err(|e| UpstreamError::InvalidResponse(format!("encoding request: {e}")))
    }

    /// A request that embeds nothing: the vendor authenticates the key,
    /// then refuses the empty input without billing (forward mode's check).
    pub fn probe(&self, model: &str) -> WireRequest {
        match self.flavour {
            Flavour::Openai | Flavour::Azure => openai::probe(self, model),
            Flavour::Bedrock => bedrock::probe(self, model),
            Flavour::Cohere => cohere::probe(self, model),
            Flavour::Voyage => voyage::probe(self, model),
            Flavour::Gemini => gemini::probe(self, model),
        }
    }

    /// Parses and checks a 2xx answer to `call`.
    pub fn parse(
        &self,
        body: &[u8],
        headers: &HeaderMap,
        call: &EmbedCall<'_>,
    ) -> Result<Embeddings, UpstreamError> {
        let parsed = match self.flavour {
            Flavour::Openai | Flavour::Azure => openai::parse(body),
            Flavour::Cohere => cohere::parse(body, call.params.output),
            Flavour::Voyage => voyage::parse(body, call.params.output),
            Flavour::Gemini => gemini::parse(body, call),
            Flavour::Bedrock => bedrock::parse(body, headers, call),
        };
        let parsed = parsed.map_err(UpstreamError::InvalidResponse)?;
        let dimensions = call.dimensions.map(|d| call.params.output.stored_values(d));
        check(parsed, call.inputs.len(), dimensions, call.params.output)
    }
}

/// Parses and checks an answer in OpenAI's format to a request for
/// `expected` float vectors (a Batch API output line is one).
pub fn check_openai_answer(
    body: &[u8],
    expected: usize,
    dimensions: Option<u32>,
) -> Result<Embeddings, UpstreamError> {
    let parsed = openai::parse(body).map_err(UpstreamError::InvalidResponse)?;
    check(parsed, expected, dimensions, ValueType::F32)
}

/// What a wire format read from an answer, before the common checks.
pub(crate) struct Parsed {
    /// By index; `None` where the answer had no vector.
    pub vectors: Vec<(usize, Vec<u8>)>,
    pub prompt_tokens: Option<u64>,
}

/// The checks every answer passes: one vector per input at distinct
/// indices, non-empty, of equal (and requested) size, finite floats.
/// `wanted`: the values each vector must hold, if the caller asked.
fn check(
    parsed: Parsed,
    expected: usize,
    wanted: Option<u32>,
    value_type: ValueType,
) -> Result<Embeddings, UpstreamError> {
    let bad = |m: String| Err(UpstreamError::InvalidResponse(m));
    if parsed.vectors.len() != expected {
        return bad(format!(
            "{} embeddings for {expected} inputs",
            parsed.vectors.len()
        ));
    }
    let mut slots: Vec<Option<Vec<u8>>> = vec![None; expected];
    for (index, bytes) in parsed.vectors {
        if bytes.is_empty() || bytes.len() % value_type.size() != 0 {
            return bad(format!("embedding {index} is empty or cut"));
        }
        if value_type == ValueType::F32
            && bytes
                .chunks_exact(4)
                .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        {
            return bad(format!("embedding {index} is not finite"));
        }
        match slots.get_mut(index) {
            Some(slot @ None) => *slot = Some(bytes),
            Some(Some(_)) => return bad(format!("index {index} appears twice")),
            None => return bad(format!("index {index} out of range")),
        }
    }
    let vectors: Vec<Vec<u8>> = slots.into_iter().flatten().collect();
    let size = vectors.first().map_or(0, Vec::len);
    if vectors.iter().any(|v| v.len() != size) {
        return bad("embeddings of different lengths".to_owned());
    }
    let values = (size / value_type.size()) as u64;
    if let Some(wanted) = wanted.filter(|w| u64::from(*w) != values) {
        return bad(format!("{values} values, {wanted} requested"));
    }
    Ok(Embeddings {
        vectors,
        prompt_tokens: parsed.prompt_tokens,
    })
}

/// f64 values (as JSON numbers) as little-endian f32 bytes; values beyond
/// f32's range become infinite and fail the finiteness check.
pub(crate) fn f32_bytes(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| (*v as f32).to_le_bytes())
        .collect()
}

/// Integer values of a one-byte type as their stored bytes; `None` when
/// one is outside the type's range.
pub(crate) fn byte_values(values: &[i64], signed: bool) -> Option<Vec<u8>> {
    let range = if signed { -128..=127 } else { 0..=255 };
    values
        .iter()
        .map(|v| range.contains(v).then_some(*v as u8))
        .collect()
}

/// The JSON numbers of one vector, read as the value type wants them.
pub(crate) fn values_of(
    value: &serde_json::Value,
    value_type: crate::cache::entry::ValueType,
) -> Option<Vec<u8>> {
    use crate::cache::entry::ValueType;
    let array = value.as_array()?;
    match value_type {
        ValueType::F32 => {
            let floats: Option<Vec<f64>> = array.iter().map(serde_json::Value::as_f64).collect();
            Some(f32_bytes(&floats?))
        }
        ValueType::Int8 | ValueType::Binary => {
            let ints: Option<Vec<i64>> = array.iter().map(serde_json::Value::as_i64).collect();
            byte_values(&ints?, true)
        }
        ValueType::Uint8 | ValueType::Ubinary => {
            let ints: Option<Vec<i64>> = array.iter().map(serde_json::Value::as_i64).collect();
            byte_values(&ints?, false)
        }
    }
}

/// Tokens of a text for a vendor that reports none (the Gemini API, Cohere
/// on Bedrock without its token header): Google documents about four
/// characters a token, so each text counts its characters / 4, rounded up,
/// at least 1. An estimate, documented as such.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// Texts of a call; native vendors take text only (checked at the edge).
pub(crate) fn texts<'a>(call: &EmbedCall<'a>) -> Result<Vec<&'a str>, String> {
    call.inputs
        .iter()
        .map(|input| match input {
            crate::protocol::Input::Text(t) => Ok(t.as_str()),
            crate::protocol::Input::Tokens(_) => Err("token arrays are OpenAI's only".to_owned()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_four_characters_a_token() {
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("éééé"), 1);
    }
}
