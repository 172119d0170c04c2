//! Sending a batch through the pipeline, and counting what is done.

use std::collections::BTreeSet;
use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::accounting::Accounting;
use crate::auth::Caller;
use crate::cache::control::CachePolicy;
use crate::cache::key::KeyHash;
use crate::config::{CacheSettings, Settings};
use crate::pipeline::{CallContext, Pipeline};
use crate::protocol::{EmbeddingRequest, EncodingFormat, Input};
use crate::vendor::Upstreams;

use super::Stop;
use super::checkpoint::{Tracker, write_checkpoint};
use super::input::{Batch, Group};

/// Attempts at confirming that a batch's entries were stored.
const VERIFY_ATTEMPTS: u32 = 3;

pub(super) fn progress_bar(total: u64, done: u64, quiet: bool) -> ProgressBar {
    let target = if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let style = ProgressStyle::with_template(
        "{spinner} {wide_bar} {human_pos}/{human_len} lines, eta {eta}, {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::with_draw_target(Some(total), target)
        .with_style(style)
        .with_position(done);
    if !bar.is_hidden() {
        bar.enable_steady_tick(Duration::from_millis(200));
    }
    bar
}

/// What a request needs besides its batch.
#[derive(Clone)]
pub(super) struct Run {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) upstreams: Arc<Upstreams>,
    pub(super) accounting: Arc<Accounting>,
    pub(super) caller: Caller,
    /// `--refresh` and `--no-store`.
    pub(super) policy: CachePolicy,
    /// How long entries live.
    pub(super) lifetimes: CacheSettings,
}

/// A batch that is done: its inputs are in the cache.
pub(super) struct Finished {
    pub(super) seq: u64,
    pub(super) end: u64,
    pub(super) last_line: u64,
    pub(super) lines: u64,
    pub(super) inputs: u64,
    /// What its inputs cost and saved, by model.
    pub(super) spends: Vec<Spend>,
}

/// What some inputs of one model cost and saved.
#[derive(Debug, Default)]
pub(super) struct Spend {
    pub(super) model: String,
    /// Requests sent through the pipeline.
    pub(super) requests: u64,
    pub(super) prompt_tokens: u64,
    /// Tokens billed by synchronous calls...
    pub(super) upstream_tokens: u64,
    /// ...and through the Batch API.
    pub(super) batch_tokens: u64,
    pub(super) saved_tokens: u64,
    /// Distinct inputs the vendor embedded.
    pub(super) fetched: u64,
}

impl Spend {
    pub(super) fn add(&mut self, other: &Spend) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.upstream_tokens += other.upstream_tokens;
        self.batch_tokens += other.batch_tokens;
        self.saved_tokens += other.saved_tokens;
        self.fetched += other.fetched;
    }
}

impl Finished {
    /// A batch with no inputs (only bad or blank lines).
    pub(super) fn empty(batch: &Batch) -> Finished {
        Finished {
            seq: batch.seq,
            end: batch.end,
            last_line: batch.last_line,
            lines: batch.lines(),
            inputs: 0,
            spends: Vec::new(),
        }
    }
}

impl Run {
    /// A group's inputs as the request a caller would send, and what it is
    /// sent with: its upstream (which must have a key to pay with) and the
    /// caller. A native vendor's defaults are written out, keyed as
    /// requests key them.
    pub(super) fn request(
        &self,
        first_line: u64,
        last_line: u64,
        group: Group,
        inputs: Vec<Input>,
    ) -> Result<(CallContext, EmbeddingRequest), Stop> {
        let upstream = Arc::clone(self.upstreams.route(&group.model));
        if !upstream.has_own_key() && self.caller.key.is_none() {
            return Err(Stop::NoKey {
                first: first_line,
                last: last_line,
                model: group.model,
            });
        }
        let ctx = CallContext::new(
            upstream,
            self.caller.clone(),
            &group.model,
            &HeaderMap::new(),
            self.policy,
        );
        let mut request = EmbeddingRequest {
            model: group.model,
            inputs,
            encoding_format: EncodingFormat::Float,
            dimensions: group.dimensions,
            user: None,
            extra: Vec::new(),
            vendor: Default::default(),
        };
        if let Err(e) = crate::protocol::native::adopt(ctx.upstream.flavour(), &mut request) {
            return Err(Stop::Invalid {
                first: first_line,
                last: last_line,
                model: request.model,
                message: e.message,
            });
        }
        Ok((ctx, request))
    }

    /// Embeds a batch through the pipeline, then makes sure its entries are
    /// in the store (the pipeline serves on when the store fails; a warm run
    /// must not count such a batch as done).
    pub(super) async fn embed(self, batch: Batch) -> Result<Finished, Stop> {
        let mut done = Finished::empty(&batch);
        let Batch {
            first_line,
            last_line,
            group,
            inputs,
            ..
        } = batch;
        let Some(group) = group else {
            return Ok(done);
        };
        let (ctx, request) = self.request(first_line, last_line, group, inputs)?;
        let request = Arc::new(request);
        let keys = Pipeline::keys(&request, &ctx);
        let tenant = Arc::clone(&ctx.tenant);
        let outcome = match self.pipeline.embed(Arc::clone(&request), ctx).await {
            Ok(outcome) => outcome,
            Err(error) => {
                self.accounting.failed(&tenant, &request.model);
                return Err(Stop::Vendor {
                    first: first_line,
                    last: last_line,
                    model: request.model.clone(),
                    error,
                });
            }
        };
        self.accounting.served(&tenant, &request.model, &outcome);
        if self.policy.write {
            self.verify_stored(&keys, first_line, last_line).await?;
        }
        done.inputs = request.inputs.len() as u64;
        done.spends.push(Spend {
            model: request.model.clone(),
            requests: 1,
            prompt_tokens: outcome.prompt_tokens,
            upstream_tokens: outcome.billed_tokens,
            batch_tokens: 0,
            saved_tokens: outcome.saved_tokens(),
            fetched: outcome.fetched as u64,
        });
        Ok(done)
    }

    /// The pipeline stores in the background and serves on when the store
    /// fails; a warm run must not count a batch as done before its entries
    /// are in the store.
    pub(super) async fn verify_stored(
        &self,
        keys: &[KeyHash],
        first: u64,
        last: u64,
    ) -> Result<(), Stop> {
        self.stored(keys).await.map_err(|reason| Stop::Store {
            first,
            last,
            reason,
        })
    }

    async fn stored(&self, keys: &[KeyHash]) -> Result<(), String> {
        self.pipeline.cache().settled().await;
        let store = self.pipeline.cache().store();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = match store.exist_many(keys).await {
                Ok(found) => match found.iter().filter(|f| !**f).count() {
                    0 => return Ok(()),
                    missing => format!("{missing} of {} entries missing", keys.len()),
                },
                Err(e) => e.to_string(),
            };
            if attempt >= VERIFY_ATTEMPTS {
                return Err(outcome);
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
    }
}

/// Running totals.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) lines: u64,
    pub(super) inputs: u64,
    pub(super) requests: u64,
    prompt_tokens: u64,
    pub(super) tokens_paid: u64,
    pub(super) tokens_saved: u64,
    pub(super) usd_paid: f64,
    pub(super) usd_saved: f64,
    pub(super) embedded: u64,
    /// Of `tokens_paid`, billed through the Batch API...
    pub(super) batch_tokens: u64,
    /// ...and what that saved over synchronous prices.
    pub(super) usd_batch_saved: f64,
    pub(super) models: BTreeSet<String>,
}

impl Tally {
    /// Counts a done batch, and moves the checkpoint when the done prefix grew.
    pub(super) async fn finish(
        &mut self,
        done: Finished,
        tracker: &mut Tracker,
        checkpoint_path: &Path,
        bar: &ProgressBar,
        settings: &Settings,
    ) -> Result<(), Stop> {
        self.lines += done.lines;
        self.inputs += done.inputs;
        for spend in done.spends {
            let price = settings.prices.get(&spend.model).copied().unwrap_or(0.0);
            let batch_price = settings.batch_price(&spend.model);
            self.requests += spend.requests;
            self.embedded += spend.fetched;
            self.prompt_tokens += spend.prompt_tokens;
            self.tokens_paid += spend.upstream_tokens + spend.batch_tokens;
            self.tokens_saved += spend.saved_tokens;
            self.batch_tokens += spend.batch_tokens;
            self.usd_paid += (spend.upstream_tokens as f64 * price
                + spend.batch_tokens as f64 * batch_price)
                / 1e6;
            self.usd_saved += spend.saved_tokens as f64 * price / 1e6;
            self.usd_batch_saved += spend.batch_tokens as f64 * (price - batch_price) / 1e6;
            self.models.insert(spend.model);
        }
        bar.inc(done.lines);
        bar.set_message(format!(
            "{} tokens, {} paid",
            HumanCount(self.prompt_tokens),
            HumanCount(self.tokens_paid)
        ));
        if tracker.done(done.seq, done.end, done.last_line) {
            write_checkpoint(checkpoint_path, &tracker.checkpoint(false))
                .await
                .map_err(|source| Stop::CheckpointWrite {
                    path: checkpoint_path.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }
}
