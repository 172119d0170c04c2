//! `embgate warm FILE --batch-api`: the misses go through the vendor's
//! Batch API at its lower price instead of synchronous calls.
//!
//! The file is read in windows: lines looked up in the cache until their
//! distinct misses fill a vendor batch ([`window`]). Each window's misses
//! are submitted, per model and dimensions, as batches within the
//! configured limits, each recorded in the checkpoint as soon as it exists
//! ([`submit`]); up to `batch_api.max_in_flight` batches are followed at
//! once, and each one's answers are checked and stored as soon as it ends
//! ([`collect`]). Windows are finished in order: what a window's batches
//! did not answer (failed lines; an expired, failed or cancelled batch),
//! and the inputs it left to an earlier window, go through the pipeline
//! synchronously (hits by then cost nothing), then the checkpoint moves on.
//!
//! An interrupted run leaves its batches in the checkpoint; the rerun reads
//! the same windows again and collects them rather than submitting anew.

mod collect;
mod status;
mod submit;
mod window;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;

use futures_util::{FutureExt as _, StreamExt as _};
use tokio::task::JoinHandle;

use crate::cache::key::KeyHash;
use crate::protocol::Input;

use super::checkpoint::Submitted;
use super::input::{Batch, Group};
use super::run::{Finished, Spend};
use super::{Job, Stop};

pub use status::status;

use collect::{Collected, Collector};
use window::{Bounds, Window};

/// Windows in flight per batch in flight: windows of hits alone (no batch)
/// still hold their deferred inputs until the windows before them finish.
const WINDOWS_PER_BATCH: usize = 2;

/// What the Batch API did in a run, for the summary.
#[derive(Debug, Default)]
pub(super) struct Totals {
    /// Vendor batches collected.
    pub(super) batches: u64,
    /// Inputs they embedded.
    pub(super) inputs: u64,
    /// Inputs they did not, embedded synchronously instead.
    pub(super) fallbacks: u64,
}

/// A window whose batches are being followed.
struct InFlight {
    window: Window,
    batches: usize,
    task: JoinHandle<Result<Collected, Stop>>,
}

/// Reads, submits and collects windows until the file is done or
/// something stops the run. An interruption does not wait for batches: they
/// stay in the checkpoint for the next run.
pub(super) async fn drive(job: &mut Job<'_>, interrupt: impl Future<Output = ()>) -> Option<Stop> {
    let mut interrupt = std::pin::pin!(interrupt);
    let mut recorded = recorded_windows(&job.tracker.submitted, job.batcher.offset);
    let collector = Collector {
        cache: Arc::clone(job.run.pipeline.cache()),
        accounting: Arc::clone(&job.run.accounting),
        key: job.run.caller.key.clone(),
        tenant: Arc::clone(&job.run.caller.tenant),
        limits: job.settings.batch_api.clone(),
        lifetimes: job.settings.cache.clone(),
        max_dimensions: job.settings.upstream.max_dimensions,
        bar: job.bar.clone(),
    };
    let mut flying: VecDeque<InFlight> = VecDeque::new();
    let mut pending: HashSet<KeyHash> = HashSet::new();
    let mut stop = None;
    let mut exhausted = false;
    let mut seq = 0;
    loop {
        let batches_flying = |f: &VecDeque<InFlight>| f.iter().map(|w| w.batches).sum::<usize>();
        let max_in_flight = job.settings.batch_api.max_in_flight;
        while stop.is_none()
            && !exhausted
            && batches_flying(&flying) < max_in_flight
            && flying.len() < max_in_flight * WINDOWS_PER_BATCH
        {
            if interrupt.as_mut().now_or_never().is_some() {
                stop = Some(Stop::Interrupted);
                break;
            }
            let resumed = recorded.pop_front();
            let bounds = Bounds {
                max_misses: job.settings.batch_api.max_requests_per_batch,
                max_bytes: job.settings.batch_api.max_file_bytes,
                until: resumed.as_ref().map(|r| r.0),
            };
            let mut window = match window::read(job, seq, bounds, &pending).await {
                Ok(Some(window)) => window,
                Ok(None) => {
                    exhausted = true;
                    break;
                }
                Err(cause) => {
                    stop = Some(cause);
                    break;
                }
            };
            seq += 1;
            let batches = match resumed {
                Some((_, batches)) => attach(&window, batches),
                None => match submit::submit(job, &window).await {
                    Ok(batches) => batches,
                    Err(cause) => {
                        stop = Some(cause);
                        break;
                    }
                },
            };
            pending.extend(window.keys());
            let targets = Arc::new(window.parts.iter_mut().map(|p| p.target()).collect());
            let count = batches.len();
            let task = tokio::spawn(collector.clone().collect(targets, batches));
            flying.push_back(InFlight {
                window,
                batches: count,
                task,
            });
        }
        let Some(front) = flying.front_mut() else {
            break;
        };
        if stop.is_some() {
            break;
        }
        let joined = tokio::select! {
            joined = &mut front.task => joined,
            () = &mut interrupt => {
                stop = Some(Stop::Interrupted);
                break;
            }
        };
        let Some(InFlight { window, .. }) = flying.pop_front() else {
            break;
        };
        let collected = match joined {
            Ok(Ok(collected)) => collected,
            Ok(Err(cause)) => {
                stop = Some(cause);
                break;
            }
            Err(e) => {
                stop = Some(Stop::Internal(format!("batch task: {e}")));
                break;
            }
        };
        for key in window.keys() {
            pending.remove(&key);
        }
        if let Err(cause) = finish(job, window, collected).await {
            stop = Some(cause);
            break;
        }
    }
    for flight in flying {
        flight.task.abort();
    }
    stop
}

/// The windows the checkpoint records past `start`, in file order: where
/// each ends, and its batches.
fn recorded_windows(submitted: &[Submitted], start: u64) -> VecDeque<(u64, Vec<Submitted>)> {
    let mut windows: Vec<(u64, Vec<Submitted>)> = Vec::new();
    let mut sorted: Vec<Submitted> = submitted
        .iter()
        .filter(|s| s.window_end > start)
        .cloned()
        .collect();
    sorted.sort_by_key(|s| s.window_end);
    for s in sorted {
        match windows.last_mut() {
            Some((end, batches)) if *end == s.window_end => batches.push(s),
            _ => windows.push((s.window_end, vec![s])),
        }
    }
    windows.into()
}

/// A recorded window's batches, by the part of the window read again that
/// has their model and dimensions; a batch without one has nothing this
/// run would accept, and is only collected from the checkpoint.
fn attach(window: &Window, batches: Vec<Submitted>) -> Vec<(usize, Submitted)> {
    batches
        .into_iter()
        .filter_map(|b| {
            let part = window
                .parts
                .iter()
                .position(|p| p.model == b.model && p.dimensions == b.dimensions)?;
            Some((part, b))
        })
        .collect()
}

/// Finishes a window whose batches ended: what they did not answer goes
/// through the pipeline synchronously, everything is confirmed stored, and
/// the checkpoint moves past it.
async fn finish(job: &mut Job<'_>, window: Window, collected: Collected) -> Result<(), Stop> {
    let Window {
        seq,
        first_line,
        last_line,
        end,
        lines,
        inputs,
        parts,
        mut spends,
    } = window;
    let batches = job
        .tracker
        .submitted
        .iter()
        .filter(|s| s.window_end == end)
        .count();
    job.batch.batches += batches as u64;
    for part in parts {
        let spend = spends.entry(part.model.clone()).or_insert_with(|| Spend {
            model: part.model.clone(),
            ..Spend::default()
        });
        let mut stored = Vec::new();
        let mut fallback: Vec<Input> = Vec::new();
        let mut deferred: Vec<Input> = Vec::new();
        for miss in part.misses {
            match collected.answered.get(&miss.hash) {
                Some(tokens) => {
                    let tokens = u64::from(*tokens);
                    spend.batch_tokens += tokens;
                    spend.saved_tokens += tokens * (miss.occurrences - 1);
                    spend.prompt_tokens += tokens * miss.occurrences;
                    spend.fetched += 1;
                    stored.push(miss.hash);
                    job.batch.inputs += 1;
                }
                None => {
                    job.batch.fallbacks += 1;
                    fallback.extend(repeat(miss.input, miss.occurrences));
                }
            }
        }
        for (input, occurrences) in part.deferred {
            deferred.extend(repeat(input, occurrences));
        }
        job.run
            .verify_stored(&stored, first_line, last_line)
            .await?;
        let group = Group {
            model: part.model,
            dimensions: part.dimensions,
        };
        // Deferred inputs were fetched by an earlier window of this run:
        // even under `--refresh` what the store holds for them is fresh.
        let mut reading = job.run.clone();
        reading.policy.read = true;
        let mut requests = Vec::new();
        for (run, inputs) in [(&job.run, fallback), (&reading, deferred)] {
            let mut inputs = inputs.into_iter().peekable();
            while inputs.peek().is_some() {
                let batch = Batch {
                    seq,
                    first_line,
                    last_line,
                    end,
                    group: Some(group.clone()),
                    inputs: inputs.by_ref().take(job.options.batch).collect(),
                };
                requests.push(run.clone().embed(batch));
            }
        }
        let mut answers =
            futures_util::stream::iter(requests).buffer_unordered(job.options.concurrency);
        while let Some(done) = answers.next().await {
            for s in &done?.spends {
                spend.add(s);
            }
        }
    }
    job.tracker.submitted.retain(|s| s.window_end != end);
    let done = Finished {
        seq,
        end,
        last_line,
        lines,
        inputs,
        spends: spends.into_values().collect(),
    };
    job.finish(done).await
}

fn repeat(input: Input, times: u64) -> impl Iterator<Item = Input> {
    std::iter::repeat_n(input, usize::try_from(times).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitted(id: &str, window_end: u64) -> Submitted {
        Submitted {
            id: id.into(),
            window_end,
            first_line: 1,
            last_line: 2,
            model: "m".into(),
            dimensions: None,
            requests: 1,
        }
    }

    #[test]
    fn recorded_windows_come_in_file_order_past_the_start() {
        let recorded = [
            submitted("c", 300),
            submitted("a", 100),
            submitted("b", 300),
            submitted("old", 50),
        ];
        let windows = recorded_windows(&recorded, 50);
        let ids: Vec<(u64, Vec<&str>)> = windows
            .iter()
            .map(|(end, batches)| (*end, batches.iter().map(|b| b.id.as_str()).collect()))
            .collect();
        assert_eq!(ids, [(100, vec!["a"]), (300, vec!["c", "b"])]);
    }
}
