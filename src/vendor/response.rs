//! What a vendor's answer must pass before anything is trusted: it is read
//! only up to what the call can legitimately need, and a 2xx answer must
//! hold exactly one finite vector per input, of equal (and requested)
//! dimensions.

use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::client::{Embeddings, UpstreamError, transport_error};

/// Error answers are small; anything past this is cut.
pub const ERROR_BODY_LIMIT: u64 = 1 << 20;

/// The largest answer a call for `inputs` vectors of `dimensions` values
/// can need: each value as JSON text (vendors that ignore the base64 request
/// send floats, at most about 24 characters each), each item's own fields,
/// and room for the envelope.
pub fn response_limit(inputs: usize, dimensions: u32) -> u64 {
    const PER_VALUE: u64 = 24;
    const PER_ITEM: u64 = 256;
    const ENVELOPE: u64 = 64 << 10;
    let per_input = u64::from(dimensions).saturating_mul(PER_VALUE) + PER_ITEM;
    per_input
        .saturating_mul(inputs as u64)
        .saturating_add(ENVELOPE)
}

/// Reads a body of at most `limit` bytes; a larger one (declared or sent)
/// is refused as soon as it shows, without holding more than the limit.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(UpstreamError::TooLarge(limit));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(e, timeout))?
    {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(UpstreamError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
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
enum Vector {
    Base64(String),
    // f64 so that values beyond f32's range are caught, not silently inf.
    Floats(Vec<f64>),
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u64,
}

/// Parses and checks a 2xx answer: count, indices, equal (and requested)
/// dimensions, finite values. Anything off rejects the whole answer.
pub fn check_response(
    body: &[u8],
    expected: usize,
    dimensions: Option<u32>,
) -> Result<Embeddings, UpstreamError> {
    let bad = |m: String| Err(UpstreamError::InvalidResponse(m));
    let parsed: ResponseBody = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => return bad(format!("not an embeddings response: {e}")),
    };
    if parsed.data.len() != expected {
        return bad(format!(
            "{} embeddings for {expected} inputs",
            parsed.data.len()
        ));
    }
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; expected];
    for item in parsed.data {
        let values = match item.embedding {
            Vector::Base64(s) => {
                let raw = match base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
                    Ok(raw) if raw.len() % 4 == 0 => raw,
                    _ => return bad(format!("embedding {} is not base64 f32", item.index)),
                };
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>()
            }
            Vector::Floats(v) => v.into_iter().map(|x| x as f32).collect(),
        };
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return bad(format!("embedding {} is empty or not finite", item.index));
        }
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(values),
            Some(Some(_)) => return bad(format!("index {} appears twice", item.index)),
            None => return bad(format!("index {} out of range", item.index)),
        }
    }
    let vectors: Vec<Vec<f32>> = slots.into_iter().flatten().collect();
    let dims = vectors.first().map_or(0, Vec::len);
    if vectors.iter().any(|v| v.len() != dims) {
        return bad("embeddings of different lengths".to_owned());
    }
    if let Some(wanted) = dimensions.filter(|w| *w as usize != dims) {
        return bad(format!("{dims} dimensions, {wanted} requested"));
    }
    Ok(Embeddings {
        vectors,
        prompt_tokens: parsed.usage.map(|u| u.prompt_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &[f32]) -> String {
        let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    #[test]
    fn accepts_base64_and_floats_in_any_index_order() {
        let body = format!(
            r#"{{"data":[{{"index":1,"embedding":[0.5,1.0]}},{{"index":0,"embedding":"{}"}}],"usage":{{"prompt_tokens":9}}}}"#,
            b64(&[0.25, -2.0])
        );
        let e = check_response(body.as_bytes(), 2, Some(2)).expect("valid");
        assert_eq!(e.vectors, vec![vec![0.25, -2.0], vec![0.5, 1.0]]);
        assert_eq!(e.prompt_tokens, Some(9));
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
            r#"<html>bad gateway</html>"#,
        ];
        for body in cases {
            assert!(
                matches!(
                    check_response(body.as_bytes(), 2, None),
                    Err(UpstreamError::InvalidResponse(_))
                ),
                "{body}"
            );
        }
        let ok = r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[1.0]}]}"#;
        assert!(check_response(ok.as_bytes(), 2, Some(2)).is_err());
    }
}
