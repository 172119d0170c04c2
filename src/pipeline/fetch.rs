//! Paying for misses: token counts taken before paying, the vendor called
//! in calls within its limits, every valid answer kept (even if another
//! call failed: it was paid for) and handed to waiting requests at once.

use std::sync::Arc;

use futures_util::StreamExt;

use super::{CallContext, Fetched, Miss, Pipeline};
use crate::cache::Holds;
use crate::cache::entry::{Entry, Origin};
use crate::cache::inflight::Promise;
use crate::protocol::EmbeddingRequest;
use crate::vendor::UpstreamError;
use crate::vendor::batch::Batch;
use crate::vendor::tokens;

impl Pipeline {
    /// Fetches `items` from the vendor. Each answered call is accounted as
    /// paid, encoded, handed to the requests waiting on its keys, and kept
    /// by the cache (stored in the background, then `leases` let go).
    pub(super) async fn fetch(
        &self,
        req: &Arc<EmbeddingRequest>,
        ctx: &CallContext,
        items: Vec<(Miss, Option<Promise>)>,
        leases: Holds,
    ) -> Result<Fetched, UpstreamError> {
        if items.is_empty() {
            self.cache.keep(Vec::new(), leases, None);
            return Ok(Fetched::default());
        }
        let model = req.model.as_str();
        let (misses, mut promises): (Vec<Miss>, Vec<Option<Promise>>) = items.into_iter().unzip();
        let exact =
            tokens::exact_counts(Arc::clone(req), misses.iter().map(|m| m.input).collect()).await;
        let batch = Batch {
            upstream: &ctx.upstream,
            model,
            dimensions: req.dimensions,
            user: req.user.as_deref(),
            extra: &req.extra,
            params: &req.vendor,
            auth: &ctx.auth,
            inputs: misses.iter().map(|m| &req.inputs[m.input]).collect(),
            exact,
        };

        let mut fetched = Fetched::default();
        let mut kept = Vec::new();
        let mut holds = leases;
        let mut first_error = None;
        let origin = Origin {
            model,
            upstream: ctx.upstream.base_url(),
            tenant: ctx.isolated_tenant.as_deref(),
        };
        let mut answers = std::pin::pin!(batch.send(self.limits));
        while let Some(answer) = answers.next().await {
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            self.accounting
                .paid(&ctx.tenant, model, answer.billed, answer.range.len());
            fetched.billed_tokens += answer.billed;
            for ((i, vector), tokens) in answer.range.zip(&answer.vectors).zip(answer.tokens) {
                let miss = &misses[i];
                let entry =
                    Entry::encode_raw(&miss.hash, &origin, req.vendor.output, vector, tokens);
                if let Some(promise) = promises[i].take() {
                    promise.fulfil(entry.clone());
                    holds.claims.push(promise);
                }
                kept.push((miss.hash, entry.clone()));
                fetched.entries.push((miss.slot, entry));
            }
        }
        // Unfulfilled promises go now: their waiters fetch for themselves.
        drop(promises);
        // `no-store`: the entries were handed to waiting requests, and go no
        // further.
        if !ctx.policy.write {
            kept.clear();
        }
        self.cache.keep(kept, holds, self.lifetimes.ttl(model));

        match first_error {
            Some(e) => Err(e),
            None => Ok(fetched),
        }
    }
}
