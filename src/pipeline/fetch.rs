//! Paying for misses: vendor-sized chunks with bounded concurrency, token
//! counts, storing what came back, and recording the spend.

use futures_util::StreamExt;

use super::{CallContext, Embedder, Fetched, Miss};
use crate::entry::Entry;
use crate::inflight::Promise;
use crate::key::KeyHashMap;
use crate::protocol::{EmbeddingRequest, Input};
use crate::tokens;
use crate::upstream::{EmbedCall, UpstreamError};

impl Embedder {
    /// Fetches `items` in vendor-sized chunks, stores every vector that came
    /// back valid (even if another chunk failed: it was paid for), then
    /// fulfils the promises.
    pub(super) async fn fetch(
        &self,
        req: &EmbeddingRequest,
        ctx: &CallContext,
        items: Vec<(Miss, Option<Promise>)>,
    ) -> Result<Fetched, UpstreamError> {
        if items.is_empty() {
            return Ok(Fetched::default());
        }
        let model = req.model.as_str();
        let exact = self.exact_counts(req, &items).await;
        let weights: Vec<u64> = items
            .iter()
            .enumerate()
            .map(|(i, (m, _))| match &exact {
                Some(counts) => u64::from(counts[i]),
                None => req.inputs[m.input].byte_len() as u64,
            })
            .collect();
        let chunks = chunk(&weights, self.batch.max_inputs, self.batch.max_tokens);

        let mut results = futures_util::stream::iter(chunks)
            .map(|range| {
                let inputs: Vec<&Input> = items[range.clone()]
                    .iter()
                    .map(|(m, _)| &req.inputs[m.input])
                    .collect();
                let call = EmbedCall {
                    model,
                    inputs,
                    dimensions: req.dimensions,
                    user: req.user.as_deref(),
                    extra: &req.extra,
                    auth: &ctx.auth,
                };
                async move { (range, ctx.upstream.embed(&call).await) }
            })
            .buffer_unordered(self.batch.concurrency);

        let mut fetched = Fetched::default();
        let mut writes = Vec::new();
        let mut published = Vec::new();
        let mut first_error = None;
        while let Some((range, result)) = results.next().await {
            let answer = match result {
                Ok(answer) => answer,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let chunk_items = &items[range.clone()];
            let inputs: Vec<&Input> = chunk_items
                .iter()
                .map(|(m, _)| &req.inputs[m.input])
                .collect();
            let counts = match &exact {
                Some(counts) => counts[range].to_vec(),
                None => tokens::counts_for_call(model, &inputs, answer.prompt_tokens),
            };
            let billed = answer
                .prompt_tokens
                .unwrap_or_else(|| counts.iter().map(|c| u64::from(*c)).sum());
            self.record_spend(&ctx.tenant, model, billed, inputs.len());
            fetched.billed_tokens += billed;
            for (((miss, _), vector), tokens) in chunk_items.iter().zip(&answer.vectors).zip(counts)
            {
                let entry = Entry::encode(&miss.hash, model, vector, tokens);
                writes.push((
                    miss.hash.redis_key(&self.key_prefix),
                    entry.as_bytes().clone(),
                ));
                if let Some(l1) = &self.l1 {
                    l1.insert(miss.hash, entry.clone());
                }
                published.push((miss.hash, entry.clone()));
                fetched.entries.push((miss.slot, entry));
            }
        }
        drop(results);

        if let Err(e) = self.store.put_many(&writes).await {
            self.store_failed("set", &e);
        }

        // Publish after storing, so a request arriving once a promise is gone
        // finds the entry in Redis.
        let mut promises: KeyHashMap<Promise> = items
            .into_iter()
            .filter_map(|(m, p)| p.map(|p| (m.hash, p)))
            .collect();
        for (hash, entry) in published {
            if let Some(p) = promises.remove(&hash) {
                p.fulfil(entry);
            }
        }
        // Unfulfilled promises drop here: their waiters fetch for themselves.
        drop(promises);

        match first_error {
            Some(e) => Err(e),
            None => Ok(fetched),
        }
    }

    /// Exact token counts for OpenAI models (tokenising off the async
    /// threads), `None` for models whose counts come from the vendor.
    async fn exact_counts(
        &self,
        req: &EmbeddingRequest,
        items: &[(Miss, Option<Promise>)],
    ) -> Option<Vec<u32>> {
        if !tokens::is_cl100k_model(&req.model) {
            return None;
        }
        let inputs: Vec<Input> = items
            .iter()
            .map(|(m, _)| req.inputs[m.input].clone())
            .collect();
        let model = req.model.clone();
        let count = move || {
            inputs
                .iter()
                .map(|i| tokens::exact_count(&model, i).unwrap_or(0))
                .collect::<Vec<u32>>()
        };
        match tokio::task::spawn_blocking(count).await {
            Ok(counts) => Some(counts),
            Err(e) => {
                tracing::error!(error = %e, "token counting failed");
                None
            }
        }
    }

    fn record_spend(&self, tenant: &str, model: &str, billed: u64, inputs: usize) {
        let usd = billed as f64 * self.price(model) / 1e6;
        self.metrics
            .upstream_tokens
            .with_label_values(&[model])
            .inc_by(billed);
        self.metrics
            .upstream_spent_usd
            .with_label_values(&[model])
            .inc_by(usd);
        self.metrics
            .tenant_spent_usd
            .with_label_values(&[tenant, model])
            .inc_by(usd);
        self.ledger
            .record(tenant, model, 0, billed, self.price(model));
        self.metrics
            .upstream_inputs
            .with_label_values(&[model])
            .inc_by(inputs as u64);
    }
}

/// Splits items (by weight = tokens) into consecutive ranges holding at most
/// `max_inputs` items and `max_tokens` tokens; an item heavier than the
/// token limit travels alone and the vendor decides.
fn chunk(weights: &[u64], max_inputs: usize, max_tokens: u64) -> Vec<std::ops::Range<usize>> {
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
