//! Sending misses to the vendor in calls it accepts: at most
//! `upstream.max_inputs_per_call` inputs and `upstream.max_tokens_per_call`
//! tokens each, `upstream.max_concurrency` calls in flight per request.

use std::ops::Range;

use futures_util::{Stream, StreamExt as _};
use serde_json::value::RawValue;

use super::tokens;
use super::{CallerAuth, EmbedCall, Upstream, UpstreamError};
use crate::config::UpstreamSettings;
use crate::protocol::{Input, VendorParams};

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_inputs: usize,
    pub max_tokens: u64,
    pub concurrency: usize,
}

impl BatchLimits {
    pub fn of(settings: &UpstreamSettings) -> BatchLimits {
        BatchLimits {
            max_inputs: settings.max_inputs_per_call,
            max_tokens: settings.max_tokens_per_call,
            concurrency: settings.max_concurrency,
        }
    }
}

/// What every call of one batch shares.
pub struct Batch<'a> {
    pub upstream: &'a Upstream,
    pub model: &'a str,
    pub dimensions: Option<u32>,
    pub user: Option<&'a str>,
    pub extra: &'a [(String, Box<RawValue>)],
    pub params: &'a VendorParams,
    pub auth: &'a CallerAuth,
    pub inputs: Vec<&'a Input>,
    /// Exact token counts of `inputs`, when the model has them.
    pub exact: Option<Vec<u32>>,
}

/// One call's checked answer.
pub struct Answered {
    /// The inputs of the batch this call carried.
    pub range: Range<usize>,
    /// One vector per input of `range`, in order, as stored.
    pub vectors: Vec<Vec<u8>>,
    /// Tokens billed for each input of `range`.
    pub tokens: Vec<u32>,
    /// Tokens the vendor billed for the call.
    pub billed: u64,
}

impl Batch<'_> {
    /// Sends the batch as calls within `limits`, and yields each call's
    /// answer as it arrives (in any order).
    pub fn send(
        &self,
        limits: BatchLimits,
    ) -> impl Stream<Item = Result<Answered, UpstreamError>> + '_ {
        let weights: Vec<u64> = match &self.exact {
            Some(counts) => counts.iter().map(|c| u64::from(*c)).collect(),
            // A cl100k token is at least one byte: sizes bound the counts.
            None => self.inputs.iter().map(|i| i.byte_len() as u64).collect(),
        };
        let max_inputs = limits
            .max_inputs
            .min(self.upstream.max_inputs_per_call(self.model));
        futures_util::stream::iter(chunk(&weights, max_inputs, limits.max_tokens))
            .map(move |range| self.call(range))
            .buffer_unordered(limits.concurrency)
    }

    async fn call(&self, range: Range<usize>) -> Result<Answered, UpstreamError> {
        let inputs = &self.inputs[range.clone()];
        let call = EmbedCall {
            model: self.model,
            inputs: inputs.to_vec(),
            dimensions: self.dimensions,
            user: self.user,
            extra: self.extra,
            params: self.params,
            auth: self.auth,
        };
        let answer = self.upstream.embed(&call).await?;
        let tokens = match &self.exact {
            Some(counts) => counts[range.clone()].to_vec(),
            None => {
                let weights: Vec<u64> = inputs.iter().map(|i| i.byte_len() as u64).collect();
                tokens::apportion(answer.prompt_tokens.unwrap_or(0), &weights)
            }
        };
        let billed = answer
            .prompt_tokens
            .unwrap_or_else(|| tokens.iter().map(|c| u64::from(*c)).sum());
        Ok(Answered {
            range,
            vectors: answer.vectors,
            tokens,
            billed,
        })
    }
}

/// Splits items (by weight = tokens) into consecutive ranges holding at most
/// `max_inputs` items and `max_tokens` tokens; an item heavier than the
/// token limit travels alone and the vendor decides.
pub fn chunk(weights: &[u64], max_inputs: usize, max_tokens: u64) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut tokens = 0u64;
    for (i, w) in weights.iter().enumerate() {
        let full = i - start >= max_inputs || (i > start && tokens + w > max_tokens);
        if full {
            chunks.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += w;
    }
    if start < weights.len() {
        chunks.push(start..weights.len());
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::chunk;

    #[test]
    fn chunks_respect_both_limits() {
        assert_eq!(chunk(&[1; 5], 2, 100), vec![0..2, 2..4, 4..5]);
        assert_eq!(
            chunk(&[60, 50, 10, 200, 1], 10, 100),
            vec![0..1, 1..3, 3..4, 4..5]
        );
        assert_eq!(chunk(&[], 2, 100), Vec::<std::ops::Range<usize>>::new());
    }
}
