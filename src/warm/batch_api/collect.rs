//! Following a window's vendor batches until they end (polls with growing
//! waits), then reading their output and error files: every answer line is
//! checked as a synchronous answer is, stored under the key it was
//! submitted for (and only a key of this window), and paid for at batch
//! prices. Whatever a batch did not answer is left for the synchronous
//! fallback.

use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;

use crate::accounting::Accounting;
use crate::auth::ApiKey;
use crate::cache::entry::{Entry, Origin, ValueType};
use crate::cache::key::{KeyHash, KeyHashMap};
use crate::cache::{Cache, Holds};
use crate::config::{BatchApiSettings, CacheSettings};
use crate::pipeline::EmbedError;
use crate::vendor::batch_api::{BatchState, LineResult, output_limit, read_results};
use crate::vendor::{Upstream, UpstreamError};
use crate::warm::Stop;
use crate::warm::checkpoint::Submitted;

use crate::pipeline::CallContext;

/// Entries handed to the store at once: a batch's answers can exceed what
/// the store takes in one go (`store.max_pending_write_bytes`).
const STORE_PIECE: usize = 512;
/// Failure reasons shown per batch; further ones are counted.
const SHOWN_FAILURES: usize = 3;

/// Whose answers a part's batches hold, and which keys they may answer.
pub(super) struct Target {
    pub(super) ctx: CallContext,
    pub(super) model: String,
    pub(super) dimensions: Option<u32>,
    pub(super) index: KeyHashMap<usize>,
}

/// What collecting needs besides the batches.
#[derive(Clone)]
pub(super) struct Collector {
    pub(super) cache: Arc<Cache>,
    pub(super) accounting: Arc<Accounting>,
    pub(super) key: Option<ApiKey>,
    pub(super) tenant: Arc<str>,
    pub(super) limits: BatchApiSettings,
    pub(super) lifetimes: CacheSettings,
    pub(super) max_dimensions: u32,
    pub(super) bar: ProgressBar,
}

/// What a window's batches answered: the tokens billed, by answered key.
#[derive(Default)]
pub(super) struct Collected {
    pub(super) answered: KeyHashMap<u32>,
}

impl Collector {
    /// Follows every batch to its end and stores what it answered.
    pub(super) async fn collect(
        self,
        parts: Arc<Vec<Target>>,
        batches: Vec<(usize, Submitted)>,
    ) -> Result<Collected, Stop> {
        let mut collected = Collected::default();
        for (p, batch) in batches {
            let Some(part) = parts.get(p) else {
                continue;
            };
            let vendor = |error| Stop::Vendor {
                first: batch.first_line,
                last: batch.last_line,
                model: part.model.clone(),
                error: EmbedError::Upstream(error),
            };
            let upstream = &part.ctx.upstream;
            let outcome = async {
                let state = self.follow(upstream, &batch.id).await?;
                let (results, files) = self.results(upstream, &state, &batch, part).await?;
                Ok::<_, UpstreamError>((state, results, files))
            };
            match outcome.await {
                Ok((state, results, files)) => {
                    self.keep(part, &batch, &state, results, files, &mut collected)
                        .await;
                }
                // The vendor may answer later: a rerun follows the batch again.
                Err(e) if e.is_retryable() => return Err(vendor(e)),
                // It never will (an unknown batch, an unreadable answer):
                // following it again would stop every rerun here.
                Err(e) => {
                    self.bar.suspend(|| {
                        eprintln!(
                            "batch {}: {e}; its {} inputs fall back to synchronous calls",
                            batch.id, batch.requests
                        );
                    });
                }
            }
        }
        Ok(collected)
    }

    /// Polls until the batch ends: the first look at once, then waits from
    /// `poll_min_ms` doubling up to `poll_max_ms`.
    async fn follow(&self, upstream: &Upstream, id: &str) -> Result<BatchState, UpstreamError> {
        let mut wait = Duration::from_millis(self.limits.poll_min_ms);
        let max = Duration::from_millis(self.limits.poll_max_ms);
        loop {
            let state = upstream.batch(self.key.as_ref(), id).await?;
            if state.is_terminal() {
                return Ok(state);
            }
            let counts = state.counts();
            self.bar.set_message(format!(
                "batch {id}: {}, {} of {} done",
                state.status, counts.completed, counts.total
            ));
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(max);
        }
    }

    /// The lines of its output and error files (none when it failed as a
    /// whole), and how many files there were. Each file is read only up to
    /// what the requests submitted can need, whatever the vendor counts.
    async fn results(
        &self,
        upstream: &Upstream,
        state: &BatchState,
        batch: &Submitted,
        part: &Target,
    ) -> Result<(Vec<LineResult>, usize), UpstreamError> {
        let requests = batch.requests;
        let dims = part.dimensions.unwrap_or(self.max_dimensions);
        let files = [
            (&state.output_file_id, output_limit(requests, dims)),
            (&state.error_file_id, output_limit(requests, 0)),
        ];
        let mut results = Vec::new();
        let mut read = 0;
        for (id, limit) in files {
            let Some(id) = id else { continue };
            let body = upstream.file_content(self.key.as_ref(), id, limit).await?;
            results.extend(read_results(&body, part.dimensions));
            read += 1;
        }
        Ok((results, read))
    }

    /// Stores the answers to this part's keys, pays for them, and reports.
    async fn keep(
        &self,
        part: &Target,
        batch: &Submitted,
        state: &BatchState,
        results: Vec<LineResult>,
        files: usize,
        collected: &mut Collected,
    ) {
        let origin = Origin {
            model: &part.model,
            upstream: part.ctx.upstream.base_url(),
            tenant: part.ctx.isolated_tenant.as_deref(),
        };
        let mut entries = Vec::new();
        let mut tokens_paid = 0u64;
        let mut reasons = Vec::new();
        let mut failed = 0u64;
        for result in results {
            match result {
                LineResult::Answered {
                    custom_id,
                    vector,
                    tokens,
                } => {
                    let Some(hash) = KeyHash::from_hex(&custom_id)
                        .filter(|h| part.index.contains_key(h))
                        .filter(|h| !collected.answered.contains_key(h))
                    else {
                        continue;
                    };
                    let tokens = tokens.unwrap_or(0);
                    tokens_paid += tokens;
                    let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
                    entries.push((
                        hash,
                        Entry::encode_raw(&hash, &origin, ValueType::F32, &vector, tokens),
                    ));
                    collected.answered.insert(hash, tokens);
                }
                LineResult::Failed { reason, .. } => {
                    failed += 1;
                    if reasons.len() < SHOWN_FAILURES {
                        reasons.push(reason);
                    }
                }
            }
        }
        let answered = entries.len();
        if answered > 0 {
            self.accounting
                .paid_batch(&self.tenant, &part.model, tokens_paid, answered);
        }
        let ttl = self.lifetimes.ttl(&part.model);
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let piece: Vec<_> = entries.by_ref().take(STORE_PIECE).collect();
            self.cache.keep(piece, Holds::default(), ttl);
            self.cache.settled().await;
        }
        let unanswered = batch.requests.saturating_sub(answered as u64);
        self.bar.suspend(|| {
            let mut line = format!(
                "batch {}: {}: {answered} of {} inputs answered",
                batch.id, state.status, batch.requests
            );
            if let Some(reason) = state.failure() {
                line.push_str(&format!(" ({reason})"));
            }
            if unanswered > 0 {
                line.push_str(&format!("; {unanswered} fall back to synchronous calls"));
            }
            if failed > 0 {
                line.push_str(&format!("; {failed} failed lines"));
                if !reasons.is_empty() {
                    line.push_str(&format!(" (first: {})", reasons.join("; ")));
                }
            }
            if files == 0 && state.status == "completed" {
                line.push_str("; it sent no output file");
            }
            eprintln!("{line}");
        });
    }
}
