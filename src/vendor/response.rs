//! Reading a vendor's answer only up to what the call can legitimately
//! need (the checks of its content are [`super::wire`]'s).

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::client::{UpstreamError, transport_error};

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
