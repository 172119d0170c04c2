//! Response bodies for embeddings: small ones rendered in one buffer, large
//! ones rendered in parts on the blocking pool and streamed in order.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use futures_util::StreamExt;

use crate::protocol::EmbeddingResponse;

/// Responses larger than this are streamed as they are rendered: memory
/// stays bounded and sending overlaps rendering.
const STREAM_ABOVE_BYTES: usize = 1024 * 1024;
/// Size of each streamed part.
const PART_BYTES: usize = 256 * 1024;
/// Parts rendered at once, on the blocking pool, ahead of the socket.
const PARTS_IN_FLIGHT: usize = 3;

/// The JSON body of `response`.
pub fn render<V: AsRef<[u8]> + Send + Sync + 'static>(response: EmbeddingResponse<V>) -> Body {
    if response.size_hint() > STREAM_ABOVE_BYTES {
        stream(response)
    } else {
        let mut json = Vec::with_capacity(response.size_hint());
        response.write_part(0..response.len(), &mut json);
        Body::from(json)
    }
}

/// Renders a large response in parts on the blocking pool (several at
/// once, so formatting millions of floats uses every core and never stalls
/// the async threads) and streams them in order.
fn stream<V: AsRef<[u8]> + Send + Sync + 'static>(response: EmbeddingResponse<V>) -> Body {
    let response = Arc::new(response);
    let parts = response.parts(PART_BYTES);
    let rendered = futures_util::stream::iter(parts)
        .map(move |range| {
            let response = Arc::clone(&response);
            tokio::task::spawn_blocking(move || {
                let mut part = Vec::with_capacity(response.part_size_hint(range.clone()));
                response.write_part(range, &mut part);
                Bytes::from(part)
            })
        })
        .buffered(PARTS_IN_FLIGHT)
        .map(|part| part.map_err(std::io::Error::other));
    Body::from_stream(rendered)
}
