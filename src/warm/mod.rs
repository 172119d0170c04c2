//! `embgate warm FILE`: fills the cache from a JSONL file of inputs, through
//! the same pipeline as the server, so that later requests for them are hits
//! (batch re-indexing).
//!
//! Each line holds one input: a JSON string, a JSON array of token ids, or an
//! object `{"input": "text" | [token ids], "model": "...", "dimensions": N}`
//! whose `model` and `dimensions` default to the command's options. Blank
//! lines are ignored; malformed ones are reported with their line number,
//! counted and skipped.
//!
//! Consecutive lines of one (model, dimensions) travel together, up to
//! `batch` inputs per request, with at most `concurrency` requests in
//! flight. Requests complete out of order; the checkpoint file records the
//! byte offset (and line count) up to which every line is done, is replaced
//! atomically whenever that contiguous prefix grows, and says when the whole
//! file is done. A rerun starts where the checkpoint ends.

mod batch_api;
mod checkpoint;
mod error;
mod input;
mod options;
mod run;
mod summary;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use futures_util::FutureExt as _;
use tokio::io::{AsyncSeekExt as _, BufReader};
use tokio::task::JoinSet;

use crate::auth::Caller;
use crate::cache::store::embedded::lock;
use crate::config::{Settings, TenantCache};

pub use batch_api::status as batch_status;
pub use checkpoint::{Checkpoint, Submitted, read_checkpoint};
pub use error::{Stop, WarmError};
pub use options::{
    CHECKPOINT_SUFFIX, DEFAULT_BATCH, DEFAULT_CONCURRENCY, DEFAULT_MODEL, DEFAULT_TENANT,
    WarmOptions,
};
pub use summary::{BadLine, WarmSummary};

use checkpoint::{CHECKPOINT_VERSION, Tracker, write_checkpoint};
use input::{BadLines, Batcher, Group, scan};
use run::{Finished, Run, Tally, progress_bar};

/// A batch run would rather wait for the store than pay the vendor again for an
/// input whose lookup timed out: lookups get at least this long.
const MIN_STORE_TIMEOUT_MS: u64 = 2000;

/// Runs until the file is done or something stops it.
pub async fn warm(settings: &Settings, options: &WarmOptions) -> Result<WarmSummary, WarmError> {
    warm_until(settings, options, std::future::pending()).await
}

/// As [`warm`]; once `interrupt` resolves, no new request starts, those in
/// flight finish, and the run stops with [`Stop::Interrupted`].
pub async fn warm_until(
    settings: &Settings,
    options: &WarmOptions,
    interrupt: impl Future<Output = ()>,
) -> Result<WarmSummary, WarmError> {
    options.validate()?;
    let limits = settings.limits.request();
    crate::protocol::check_model(&options.model, &limits)
        .map_err(|e| WarmError::Options(format!("--model: {e}")))?;
    let path = options.file.clone();
    let checkpoint_path = options.checkpoint_path();
    let io_error = |source| WarmError::Io {
        path: path.clone(),
        source,
    };
    let len = tokio::fs::metadata(&path).await.map_err(io_error)?.len();

    let previous = match options.restart {
        true => None,
        false => read_checkpoint(&checkpoint_path)?,
    };
    let mut summary = WarmSummary {
        file: path.clone(),
        checkpoint: checkpoint_path.clone(),
        ..WarmSummary::default()
    };
    let bad_checkpoint = |reason: String| WarmError::Checkpoint {
        path: checkpoint_path.clone(),
        reason,
    };
    if let Some(cp) = &previous {
        if cp.offset > len {
            return Err(bad_checkpoint(format!(
                "it covers {} bytes, the file now has {len}",
                cp.offset
            )));
        }
        if cp.offset == len && cp.batches.is_empty() {
            if !cp.complete {
                let done = Checkpoint {
                    complete: true,
                    ..cp.clone()
                };
                write_checkpoint(&checkpoint_path, &done)
                    .await
                    .map_err(|source| WarmError::Io {
                        path: checkpoint_path.clone(),
                        source,
                    })?;
            }
            summary.total_lines = cp.lines;
            summary.resumed_lines = cp.lines;
            summary.checkpoint_lines = cp.lines;
            summary.complete = true;
            summary.already_complete = true;
            return Ok(summary);
        }
    }
    if previous.as_ref().is_some_and(|cp| !cp.batches.is_empty()) && !options.batch_api {
        return Err(bad_checkpoint(
            "it records vendor batches not yet collected: run with --batch-api to collect them"
                .into(),
        ));
    }
    let start = previous.clone().unwrap_or(Checkpoint {
        version: CHECKPOINT_VERSION,
        offset: 0,
        lines: 0,
        complete: false,
        batches: Vec::new(),
    });

    let scan = {
        let path = path.clone();
        let offset = start.offset;
        tokio::task::spawn_blocking(move || scan(&path, offset))
            .await
            .map_err(|e| WarmError::Io {
                path: options.file.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_error)?
    };
    if previous.is_some() {
        let at_boundary =
            start.offset == 0 || start.offset == scan.len || scan.byte_before == Some(b'\n');
        let lines_before =
            scan.newlines_before + u64::from(start.offset > 0 && scan.byte_before != Some(b'\n'));
        if !at_boundary || lines_before != start.lines {
            return Err(bad_checkpoint(
                "it does not match the file, which changed since".into(),
            ));
        }
    }
    summary.total_lines = scan.lines;
    summary.resumed_lines = start.lines;
    summary.checkpoint_lines = start.lines;

    let mut settings = settings.clone();
    settings.store.timeout_ms = settings.store.timeout_ms.max(MIN_STORE_TIMEOUT_MS);
    settings.store.max_wait_ms = settings.store.max_wait_ms.max(MIN_STORE_TIMEOUT_MS);
    let engine = crate::Engine::new(&settings)?;
    let store = engine.store();
    store
        .ping()
        .await
        .map_err(|e| WarmError::StoreUnavailable(e.to_string()))?;
    match crate::migrate::check(store.as_ref()).await {
        Ok(()) => {}
        Err(crate::migrate::MigrateError::Store(e)) => {
            return Err(WarmError::StoreUnavailable(e.to_string()));
        }
        Err(e) => return Err(WarmError::Keyspace(e)),
    }

    let bar = progress_bar(scan.lines, start.lines, options.quiet);
    let mut file = tokio::fs::File::open(&path).await.map_err(io_error)?;
    file.seek(std::io::SeekFrom::Start(start.offset))
        .await
        .map_err(io_error)?;
    let batcher = Batcher {
        reader: BufReader::with_capacity(256 * 1024, file),
        offset: start.offset,
        line: start.lines,
        buf: Vec::new(),
        max_line: settings
            .limits
            .max_input_bytes
            .saturating_mul(6)
            .saturating_add(64 * 1024),
        limits,
        defaults: Group {
            model: options.model.clone(),
            dimensions: options.dimensions,
        },
        batch: options.batch,
        seq: 0,
        open: None,
        eof: false,
        until: u64::MAX,
        report: BadLines {
            bar: bar.clone(),
            file: path.clone(),
            count: 0,
            shown: Vec::new(),
        },
    };

    let run = Run {
        pipeline: Arc::clone(&engine.pipeline),
        upstreams: Arc::clone(&engine.upstreams),
        accounting: Arc::clone(&engine.accounting),
        caller: Caller {
            tenant: Arc::from(options.tenant.as_str()),
            isolated: settings
                .auth
                .tenants
                .get(&options.tenant)
                .is_some_and(|t| t.isolated),
            // Warming is the operator's: `--refresh` and `--no-store` say
            // what it does with the cache, not the tenant's mode.
            cache: TenantCache::ReadWrite,
            key: options.api_key.clone(),
        },
        policy: options.policy(),
        lifetimes: settings.cache.clone(),
    };
    let mut job = Job {
        settings: &settings,
        options,
        checkpoint_path: checkpoint_path.clone(),
        bar: bar.clone(),
        batcher,
        run,
        tracker: Tracker::new(start),
        tally: Tally::default(),
        batch: batch_api::Totals::default(),
    };
    let stop = match options.batch_api {
        true => batch_api::drive(&mut job, interrupt).await,
        false => drive(&mut job, interrupt).await,
    };
    let Job {
        mut batcher,
        tracker,
        tally,
        batch,
        ..
    } = job;
    // What this run paid and saved belongs in the all-time ledger too.
    engine.finish(None).await;
    bar.finish_and_clear();

    summary.lines = tally.lines;
    summary.checkpoint_lines = tracker.lines;
    summary.inputs = tally.inputs;
    summary.requests = tally.requests;
    summary.tokens_paid = tally.tokens_paid;
    summary.tokens_saved = tally.tokens_saved;
    summary.usd_paid = tally.usd_paid;
    summary.usd_saved = tally.usd_saved;
    summary.embedded = tally.embedded;
    summary.batches = batch.batches;
    summary.batch_inputs = batch.inputs;
    summary.batch_fallbacks = batch.fallbacks;
    summary.batch_tokens = tally.batch_tokens;
    summary.usd_batch_saved = tally.usd_batch_saved;
    summary.cached = summary.inputs.saturating_sub(summary.embedded);
    summary.unpriced_models = tally
        .models
        .iter()
        .filter(|m| !settings.prices.contains_key(m.as_str()))
        .cloned()
        .collect();
    summary.bad_lines = batcher.report.count;
    summary.bad = std::mem::take(&mut batcher.report.shown);
    summary.total_lines = summary.total_lines.max(tracker.lines);

    if let Some(cause) = stop {
        return Err(WarmError::Stopped {
            cause,
            summary: Box::new(summary),
        });
    }
    let done = tracker.checkpoint(true);
    if let Err(source) = write_checkpoint(&checkpoint_path, &done).await {
        return Err(WarmError::Stopped {
            cause: Stop::CheckpointWrite {
                path: checkpoint_path,
                source,
            },
            summary: Box::new(summary),
        });
    }
    summary.complete = true;
    Ok(summary)
}

/// A run under way: what reads the file, embeds, and counts.
struct Job<'a> {
    settings: &'a Settings,
    options: &'a WarmOptions,
    checkpoint_path: std::path::PathBuf,
    bar: indicatif::ProgressBar,
    batcher: Batcher,
    run: Run,
    tracker: Tracker,
    tally: Tally,
    /// `--batch-api` only.
    batch: batch_api::Totals,
}

/// Sends every batch through the pipeline, `--concurrency` at once, until
/// the file is done or something stops the run.
async fn drive(job: &mut Job<'_>, interrupt: impl Future<Output = ()>) -> Option<Stop> {
    let mut tasks: JoinSet<Result<Finished, Stop>> = JoinSet::new();
    let mut stop: Option<Stop> = None;
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;

    loop {
        while stop.is_none() && tasks.len() < job.options.concurrency {
            if !interrupted && interrupt.as_mut().now_or_never().is_some() {
                interrupted = true;
                stop = Some(Stop::Interrupted);
                break;
            }
            match job.batcher.next().await {
                Ok(Some(batch)) if batch.inputs.is_empty() => {
                    let done = Finished::empty(&batch);
                    if let Err(cause) = job.finish(done).await {
                        stop = Some(cause);
                    }
                }
                Ok(Some(batch)) => {
                    tasks.spawn(job.run.clone().embed(batch));
                }
                Ok(None) => break,
                Err(source) => {
                    stop = Some(Stop::Read {
                        path: job.options.file.clone(),
                        source,
                    });
                }
            }
        }
        if tasks.is_empty() {
            break;
        }
        tokio::select! {
            joined = tasks.join_next() => {
                let result = match joined {
                    Some(Ok(result)) => result,
                    Some(Err(e)) => Err(Stop::Internal(format!("batch task: {e}"))),
                    None => continue,
                };
                let outcome = match result {
                    Ok(done) => job.finish(done).await,
                    Err(cause) => Err(cause),
                };
                if let Err(cause) = outcome {
                    stop.get_or_insert(cause);
                }
            }
            () = &mut interrupt, if !interrupted => {
                interrupted = true;
                stop.get_or_insert(Stop::Interrupted);
            }
        }
    }
    stop
}

impl Job<'_> {
    /// Counts a done batch, and moves the checkpoint when the done prefix grew.
    async fn finish(&mut self, done: Finished) -> Result<(), Stop> {
        self.tally
            .finish(
                done,
                &mut self.tracker,
                &self.checkpoint_path,
                &self.bar,
                self.settings,
            )
            .await
    }
}

/// `embgate warm`: runs, prints the summary on stdout and errors on stderr.
/// A first SIGINT/SIGTERM lets the requests in flight finish; a second one
/// quits at once (the checkpoint stays consistent either way).
pub async fn cli(settings: &Settings, options: &WarmOptions) -> ExitCode {
    if options.status {
        return match batch_status(settings, options).await {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("embgate warm: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let batch_api = options.batch_api;
    let signals = tokio::spawn(async move {
        crate::signal::terminated().await;
        match batch_api {
            true => eprintln!(
                "embgate warm: interrupted; the batches submitted stay in the checkpoint, a rerun \
                 with --batch-api collects them (interrupt again to quit now)"
            ),
            false => eprintln!(
                "embgate warm: interrupted; finishing the requests in flight (interrupt again to \
                 quit now)"
            ),
        }
        let _ = tx.send(());
        crate::signal::terminated().await;
        std::process::exit(130);
    });
    let result = warm_until(settings, options, async {
        let _ = rx.await;
    })
    .await;
    signals.abort();
    match result {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let WarmError::Stopped { summary, .. } = &e {
                print!("{summary}");
            }
            eprintln!("embgate warm: {e}");
            if let WarmError::Startup(crate::StartupError::Store(store)) = &e
                && lock::is_held(store)
            {
                eprintln!("{}", lock::what_to_do(lock::Command::Warm));
            }
            match e {
                WarmError::Options(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
