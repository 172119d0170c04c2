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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use futures_util::FutureExt as _;
use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _, BufReader};
use tokio::task::JoinSet;

use crate::StartupError;
use crate::auth::{ApiKey, Caller};
use crate::config::Settings;
use crate::key::KeyScope;
use crate::pipeline::{CallContext, EmbedError, Embedder};
use crate::protocol::{EmbeddingRequest, EncodingFormat, Input};
use crate::upstream::UpstreamError;

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";
pub const DEFAULT_BATCH: usize = 256;
pub const DEFAULT_CONCURRENCY: usize = 4;
pub const DEFAULT_TENANT: &str = "warm";
/// Appended to the input file's name for the default checkpoint path.
pub const CHECKPOINT_SUFFIX: &str = ".warm-progress";
const CHECKPOINT_VERSION: u32 = 1;
/// Bad lines kept in the summary and printed; further ones are only counted.
const SHOWN_BAD_LINES: usize = 100;
/// A batch run would rather wait for Redis than pay the vendor again for an
/// input whose lookup timed out: lookups get at least this long.
const MIN_STORE_TIMEOUT_MS: u64 = 2000;
/// Attempts at confirming that a batch's entries were stored.
const VERIFY_ATTEMPTS: u32 = 3;

/// What to warm and how. Also the `embgate warm` command line.
#[derive(Debug, Clone, clap::Args)]
pub struct WarmOptions {
    /// JSONL file, one input per line: "text", [token ids], or
    /// {"input": ..., "model": "...", "dimensions": N}.
    pub file: PathBuf,
    /// Model for lines that name none.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// `dimensions` for lines that give none [default: the model's own].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub dimensions: Option<u32>,
    /// Inputs per request.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Progress file [default: FILE.warm-progress].
    #[arg(long, value_name = "PATH")]
    pub checkpoint: Option<PathBuf>,
    /// Ignore the checkpoint and start from the first line.
    #[arg(long)]
    pub restart: bool,
    /// Tenant the spend is recorded under; an isolated tenant (see
    /// `auth.tenants`) gets its own cache entries, as when it calls.
    #[arg(long, default_value = DEFAULT_TENANT)]
    pub tenant: String,
    /// Vendor key paying for misses when the upstream has no key of its own.
    #[arg(
        long,
        env = "OPENAI_API_KEY",
        hide_env_values = true,
        value_parser = parse_api_key
    )]
    pub api_key: Option<ApiKey>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_api_key(s: &str) -> Result<ApiKey, String> {
    match s.trim() {
        "" => Err("the key is empty".into()),
        key => Ok(ApiKey::new(key)),
    }
}

impl WarmOptions {
    /// The command's defaults, for `file`.
    pub fn new(file: impl Into<PathBuf>) -> WarmOptions {
        WarmOptions {
            file: file.into(),
            model: DEFAULT_MODEL.into(),
            dimensions: None,
            batch: DEFAULT_BATCH,
            concurrency: DEFAULT_CONCURRENCY,
            checkpoint: None,
            restart: false,
            tenant: DEFAULT_TENANT.into(),
            api_key: None,
            quiet: false,
        }
    }

    /// `--checkpoint`, else the file's name with [`CHECKPOINT_SUFFIX`].
    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint.clone().unwrap_or_else(|| {
            let mut name = self.file.clone().into_os_string();
            name.push(CHECKPOINT_SUFFIX);
            PathBuf::from(name)
        })
    }

    fn validate(&self) -> Result<(), WarmError> {
        let invalid = |m: &str| Err(WarmError::Options(m.to_owned()));
        if self.batch == 0 {
            return invalid("--batch must be at least 1");
        }
        if self.concurrency == 0 {
            return invalid("--concurrency must be at least 1");
        }
        if self.model.is_empty() {
            return invalid("--model must not be empty");
        }
        if self.dimensions == Some(0) {
            return invalid("--dimensions must be positive");
        }
        if self.tenant.is_empty() {
            return invalid("--tenant must not be empty");
        }
        Ok(())
    }
}

/// The progress file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// Every line before this byte offset is done.
    pub offset: u64,
    /// How many lines that is.
    pub lines: u64,
    /// The whole file was done (as long as it was then).
    pub complete: bool,
}

/// A line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based.
    pub line: u64,
    pub reason: String,
}

/// What a run did. On a stop part-way it covers the requests that completed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WarmSummary {
    pub file: PathBuf,
    pub checkpoint: PathBuf,
    /// Lines in the file.
    pub total_lines: u64,
    /// Lines done by earlier runs (per the checkpoint), not read again.
    pub resumed_lines: u64,
    /// Lines this run finished: embedded, found cached, bad or blank.
    pub lines: u64,
    /// Lines the checkpoint now covers.
    pub checkpoint_lines: u64,
    /// Valid inputs among `lines`.
    pub inputs: u64,
    /// Inputs the vendor embedded (and billed) for this run.
    pub embedded: u64,
    /// Inputs served without a vendor call: already cached, or repeats.
    pub cached: u64,
    pub bad_lines: u64,
    /// The first bad lines, with why.
    pub bad: Vec<BadLine>,
    /// Requests sent through the pipeline.
    pub requests: u64,
    /// Tokens the vendor billed.
    pub tokens_paid: u64,
    /// Tokens of the inputs minus those billed.
    pub tokens_saved: u64,
    /// USD, at `settings.prices`.
    pub usd_paid: f64,
    pub usd_saved: f64,
    /// Models without a price in `settings.prices` (counted at 0 USD).
    pub unpriced_models: Vec<String>,
    /// Every line of the file is done.
    pub complete: bool,
    /// The checkpoint said the file was done already: nothing was read.
    pub already_complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {}: {reason}; --restart starts over", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("the cache store is unavailable ({0}); nothing was sent to the vendor")]
    StoreUnavailable(String),
    #[error(transparent)]
    Keyspace(crate::migrate::MigrateError),
    /// The run stopped part-way; the checkpoint covers `summary.checkpoint_lines`.
    #[error(
        "{cause}; the checkpoint covers the first {} of {} lines, a rerun resumes after them",
        summary.checkpoint_lines,
        summary.total_lines
    )]
    Stopped {
        cause: Stop,
        summary: Box<WarmSummary>,
    },
}

/// Why a run stopped part-way.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("{} ({model}): {}", span(*first, *last), describe(error))]
    Vendor {
        first: u64,
        last: u64,
        model: String,
        error: EmbedError,
    },
    #[error(
        "{} ({model}): no vendor key: the upstream has none of its own; pass --api-key or set \
         OPENAI_API_KEY",
        span(*first, *last)
    )]
    NoKey {
        first: u64,
        last: u64,
        model: String,
    },
    #[error(
        "{}: the cache store did not keep the vectors ({reason})",
        span(*first, *last)
    )]
    Store {
        first: u64,
        last: u64,
        reason: String,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing checkpoint {}: {source}", path.display())]
    CheckpointWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Stop {
    /// The vendor's HTTP status, when the vendor refused a request.
    pub fn vendor_status(&self) -> Option<u16> {
        match self {
            Stop::Vendor {
                error: EmbedError::Upstream(UpstreamError::Vendor { status, .. }),
                ..
            } => Some(status.as_u16()),
            _ => None,
        }
    }
}

/// "line 3" or "lines 3-9".
fn span(first: u64, last: u64) -> String {
    match first == last {
        true => format!("line {first}"),
        false => format!("lines {first}-{last}"),
    }
}

/// The vendor's own message when it sent one.
fn describe(error: &EmbedError) -> String {
    match error {
        EmbedError::Upstream(UpstreamError::Vendor { status, body, .. }) => {
            let message = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| {
                    String::from_utf8_lossy(&body[..body.len().min(500)])
                        .trim()
                        .to_owned()
                });
            format!("the vendor answered {status}: {message}")
        }
        other => other.to_string(),
    }
}

/// Reads a checkpoint; `None` when there is none.
pub fn read_checkpoint(path: &Path) -> Result<Option<Checkpoint>, WarmError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WarmError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let checkpoint: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|e| WarmError::Checkpoint {
            path: path.to_owned(),
            reason: format!("unreadable ({e})"),
        })?;
    if checkpoint.version != CHECKPOINT_VERSION {
        return Err(WarmError::Checkpoint {
            path: path.to_owned(),
            reason: format!("unknown version {}", checkpoint.version),
        });
    }
    Ok(Some(checkpoint))
}

/// Replaces the checkpoint atomically: a temporary file beside it, synced,
/// then renamed over it.
async fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let json = serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?;
    let written = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        file.write_all(&json).await?;
        file.write_all(b"\n").await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    written
}

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
    if let Some(cp) = previous {
        if cp.offset > len {
            return Err(bad_checkpoint(format!(
                "it covers {} bytes, the file now has {len}",
                cp.offset
            )));
        }
        if cp.offset == len {
            if !cp.complete {
                let done = Checkpoint {
                    complete: true,
                    ..cp
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
    let start = previous.unwrap_or(Checkpoint {
        version: CHECKPOINT_VERSION,
        offset: 0,
        lines: 0,
        complete: false,
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
    let gateway = crate::Gateway::new(&settings)?;
    let store = gateway.embedder.store();
    store
        .ping()
        .await
        .map_err(|e| WarmError::StoreUnavailable(e.to_string()))?;
    match crate::migrate::check(store, &settings.store.key_prefix).await {
        Ok(()) => {}
        Err(crate::migrate::MigrateError::Redis(e)) => {
            return Err(WarmError::StoreUnavailable(e.to_string()));
        }
        Err(e) => return Err(WarmError::Keyspace(e)),
    }

    let bar = progress_bar(scan.lines, start.lines, options.quiet);
    let mut file = tokio::fs::File::open(&path).await.map_err(io_error)?;
    file.seek(std::io::SeekFrom::Start(start.offset))
        .await
        .map_err(io_error)?;
    let mut batcher = Batcher {
        reader: BufReader::with_capacity(256 * 1024, file),
        offset: start.offset,
        line: start.lines,
        buf: Vec::new(),
        max_line: settings
            .limits
            .max_input_bytes
            .saturating_mul(6)
            .saturating_add(64 * 1024),
        max_input_bytes: settings.limits.max_input_bytes,
        defaults: Group {
            model: options.model.clone(),
            dimensions: options.dimensions,
        },
        batch: options.batch,
        seq: 0,
        open: None,
        eof: false,
        report: BadLines {
            bar: bar.clone(),
            file: path.clone(),
            count: 0,
            shown: Vec::new(),
        },
    };

    let run = Run {
        embedder: Arc::clone(&gateway.embedder),
        caller: Caller {
            tenant: Arc::from(options.tenant.as_str()),
            isolated: settings
                .auth
                .tenants
                .get(&options.tenant)
                .is_some_and(|t| t.isolated),
            key: options.api_key.clone(),
        },
        key_prefix: Arc::from(settings.store.key_prefix.as_str()),
    };
    let mut tracker = Tracker::new(start);
    let mut tally = Tally::default();
    let mut tasks: JoinSet<Result<Finished, Stop>> = JoinSet::new();
    let mut stop: Option<Stop> = None;
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;

    loop {
        while stop.is_none() && tasks.len() < options.concurrency {
            if !interrupted && interrupt.as_mut().now_or_never().is_some() {
                interrupted = true;
                stop = Some(Stop::Interrupted);
                break;
            }
            match batcher.next().await {
                Ok(Some(batch)) if batch.inputs.is_empty() => {
                    let done = Finished::empty(&batch);
                    if let Err(cause) = tally
                        .finish(done, &mut tracker, &checkpoint_path, &bar, &settings)
                        .await
                    {
                        stop = Some(cause);
                    }
                }
                Ok(Some(batch)) => {
                    tasks.spawn(run.clone().embed(batch));
                }
                Ok(None) => break,
                Err(source) => {
                    stop = Some(Stop::Read {
                        path: path.clone(),
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
                    Ok(done) => {
                        tally
                            .finish(done, &mut tracker, &checkpoint_path, &bar, &settings)
                            .await
                    }
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
    gateway.embedder.drain().await;
    bar.finish_and_clear();

    summary.lines = tally.lines;
    summary.checkpoint_lines = tracker.lines;
    summary.inputs = tally.inputs;
    summary.requests = tally.requests;
    summary.tokens_paid = tally.tokens_paid;
    summary.tokens_saved = tally.tokens_saved;
    summary.usd_paid = tally.usd_paid;
    summary.usd_saved = tally.usd_saved;
    summary.embedded = tally
        .models
        .iter()
        .map(|m| {
            gateway
                .metrics
                .upstream_inputs
                .with_label_values(&[m.as_str()])
                .get()
        })
        .sum();
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
    let done = Checkpoint {
        version: CHECKPOINT_VERSION,
        offset: tracker.offset,
        lines: tracker.lines,
        complete: true,
    };
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

/// `embgate warm`: runs, prints the summary on stdout and errors on stderr.
/// A first SIGINT/SIGTERM lets the requests in flight finish; a second one
/// quits at once (the checkpoint stays consistent either way).
pub async fn cli(settings: &Settings, options: &WarmOptions) -> ExitCode {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        crate::signal::terminated().await;
        eprintln!(
            "embgate warm: interrupted; finishing the requests in flight (interrupt again to quit now)"
        );
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
            match e {
                WarmError::Options(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

impl fmt::Display for WarmSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if self.already_complete {
            return writeln!(
                f,
                "{file}: already complete ({} lines, per {}); nothing to do (--restart runs it again)",
                self.total_lines,
                self.checkpoint.display()
            );
        }
        let state = if self.complete { "complete" } else { "stopped" };
        writeln!(
            f,
            "{file}: {state}: {} of {} lines done",
            self.checkpoint_lines, self.total_lines
        )?;
        write!(f, "  lines:    {} this run", self.lines)?;
        if self.resumed_lines > 0 {
            write!(f, ", {} by earlier runs", self.resumed_lines)?;
        }
        if self.bad_lines > 0 {
            write!(f, ", {} bad (skipped)", self.bad_lines)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  inputs:   {}: {} embedded by the vendor, {} already cached ({} requests)",
            self.inputs, self.embedded, self.cached, self.requests
        )?;
        writeln!(
            f,
            "  tokens:   {} paid, {} saved",
            self.tokens_paid, self.tokens_saved
        )?;
        writeln!(
            f,
            "  dollars:  {} paid, {} saved",
            Usd(self.usd_paid),
            Usd(self.usd_saved)
        )?;
        if !self.unpriced_models.is_empty() {
            writeln!(
                f,
                "  note:     no price in [prices] for {}: counted at 0",
                self.unpriced_models.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Dollars: cents, or finer for small amounts.
struct Usd(f64);

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            x if x == 0.0 || x >= 1.0 => write!(f, "${x:.2}"),
            x => write!(f, "${x:.6}"),
        }
    }
}

fn progress_bar(total: u64, done: u64, quiet: bool) -> ProgressBar {
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

/// What the file scan found.
struct Scan {
    len: u64,
    lines: u64,
    /// Newlines before `offset`.
    newlines_before: u64,
    /// The byte at `offset - 1`.
    byte_before: Option<u8>,
}

/// Counts the file's lines, and checks where `offset` falls.
fn scan(path: &Path, offset: u64) -> std::io::Result<Scan> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut scan = Scan {
        len: 0,
        lines: 0,
        newlines_before: 0,
        byte_before: None,
    };
    let mut newlines = 0u64;
    let mut last = None;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        let start = scan.len;
        let end = start + n as u64;
        if offset > start && offset <= end {
            let before = (offset - start) as usize;
            scan.byte_before = chunk.get(before - 1).copied();
            scan.newlines_before =
                newlines + chunk[..before].iter().filter(|b| **b == b'\n').count() as u64;
        }
        newlines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        last = chunk.last().copied();
        scan.len = end;
    }
    scan.lines = newlines + u64::from(last.is_some_and(|b| b != b'\n'));
    Ok(scan)
}

/// Inputs that can share a request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    model: String,
    dimensions: Option<u32>,
}

/// Consecutive lines: the inputs they hold, and where they end.
#[derive(Debug)]
struct Batch {
    seq: u64,
    /// 1-based.
    first_line: u64,
    last_line: u64,
    /// Byte offset just past the last line.
    end: u64,
    group: Option<Group>,
    inputs: Vec<Input>,
}

impl Batch {
    fn lines(&self) -> u64 {
        (self.last_line + 1).saturating_sub(self.first_line)
    }
}

/// One classified line.
#[derive(Debug, PartialEq)]
enum Line {
    Blank,
    Bad(String),
    Input(Group, Input),
}

/// Reports bad lines (above the progress bar) and keeps the first ones.
struct BadLines {
    bar: ProgressBar,
    file: PathBuf,
    count: u64,
    shown: Vec<BadLine>,
}

impl BadLines {
    fn add(&mut self, line: u64, reason: String) {
        self.count += 1;
        if self.shown.len() < SHOWN_BAD_LINES {
            self.bar.suspend(|| {
                eprintln!("{}:{line}: {reason}; skipped", self.file.display());
                if self.shown.len() + 1 == SHOWN_BAD_LINES {
                    eprintln!(
                        "{}: further bad lines are counted but not shown",
                        self.file.display()
                    );
                }
            });
            self.shown.push(BadLine { line, reason });
        }
    }
}

/// Reads lines and cuts them into batches.
struct Batcher {
    reader: BufReader<tokio::fs::File>,
    /// Byte offset of the next line.
    offset: u64,
    /// Lines read so far (from the file's start).
    line: u64,
    buf: Vec<u8>,
    /// Longer lines are bad, and not held in memory.
    max_line: usize,
    max_input_bytes: usize,
    defaults: Group,
    batch: usize,
    seq: u64,
    /// The batch being filled.
    open: Option<Batch>,
    eof: bool,
    report: BadLines,
}

impl Batcher {
    /// The next batch; `None` once the file is exhausted.
    async fn next(&mut self) -> std::io::Result<Option<Batch>> {
        loop {
            if self.eof
                || self
                    .open
                    .as_ref()
                    .is_some_and(|b| b.inputs.len() >= self.batch)
            {
                return Ok(self.open.take());
            }
            let (consumed, truncated) = self.read_line().await?;
            if consumed == 0 {
                self.eof = true;
                continue;
            }
            self.offset += consumed;
            self.line += 1;
            let parsed = if truncated {
                Line::Bad(format!("longer than {} bytes", self.max_line))
            } else {
                let mut bytes = self.buf.as_slice();
                if self.line == 1 {
                    bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
                }
                parse_line(bytes, &self.defaults, self.max_input_bytes)
            };
            let (group, input) = match parsed {
                Line::Input(group, input) => (group, input),
                Line::Blank => {
                    self.extend();
                    continue;
                }
                Line::Bad(reason) => {
                    self.report.add(self.line, reason);
                    self.extend();
                    continue;
                }
            };
            let switch = self
                .open
                .as_ref()
                .and_then(|b| b.group.as_ref())
                .is_some_and(|g| *g != group);
            let ready = if switch { self.open.take() } else { None };
            let open = self.extend();
            open.group = Some(group);
            open.inputs.push(input);
            if ready.is_some() {
                return Ok(ready);
            }
        }
    }

    /// Adds the line just read to the open batch (opening one if needed).
    fn extend(&mut self) -> &mut Batch {
        let (line, end) = (self.line, self.offset);
        let seq = &mut self.seq;
        let batch = self.open.get_or_insert_with(|| {
            *seq += 1;
            Batch {
                seq: *seq - 1,
                first_line: line,
                last_line: line,
                end,
                group: None,
                inputs: Vec::new(),
            }
        });
        batch.last_line = line;
        batch.end = end;
        batch
    }

    /// Reads one line into `buf` (at most `max_line` bytes of it); returns
    /// the bytes consumed, 0 at the end of the file, and whether it was cut.
    async fn read_line(&mut self) -> std::io::Result<(u64, bool)> {
        self.buf.clear();
        let mut consumed = 0u64;
        let mut truncated = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Ok((consumed, truncated));
            }
            let (take, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            let room = self.max_line.saturating_sub(self.buf.len());
            if take > room {
                truncated = true;
            }
            self.buf.extend_from_slice(&available[..take.min(room)]);
            self.reader.consume(take);
            consumed += take as u64;
            if done {
                return Ok((consumed, truncated));
            }
        }
    }
}

/// Classifies one line (without its newline, or with it: whitespace is
/// trimmed).
fn parse_line(raw: &[u8], defaults: &Group, max_input_bytes: usize) -> Line {
    let text = raw.trim_ascii();
    if text.is_empty() {
        return Line::Blank;
    }
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return Line::Bad(format!("not JSON ({e})")),
    };
    match interpret(value, defaults, max_input_bytes) {
        Ok((group, input)) => Line::Input(group, input),
        Err(reason) => Line::Bad(reason),
    }
}

fn interpret(
    value: Value,
    defaults: &Group,
    max_input_bytes: usize,
) -> Result<(Group, Input), String> {
    let (input, model, dimensions) = match value {
        Value::Object(mut fields) => {
            let input = fields
                .remove("input")
                .ok_or("no \"input\" field".to_owned())?;
            let model = match fields.remove("model") {
                None | Some(Value::Null) => None,
                Some(Value::String(m)) if !m.is_empty() => Some(m),
                Some(_) => return Err("\"model\" must be a non-empty string".into()),
            };
            let dimensions = match fields.remove("dimensions") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .and_then(|d| u32::try_from(d).ok())
                        .filter(|d| *d > 0)
                        .ok_or("\"dimensions\" must be a positive integer".to_owned())?,
                ),
            };
            if let Some(name) = fields.keys().next() {
                return Err(format!(
                    "unknown field {name:?} (a line has \"input\", and may have \"model\" and \
                     \"dimensions\")"
                ));
            }
            (input, model, dimensions)
        }
        other => (other, None, None),
    };
    let input = match input {
        Value::String(s) if s.is_empty() => return Err("empty input".into()),
        Value::String(s) => Input::Text(s),
        Value::Array(items) if items.is_empty() => return Err("empty input".into()),
        Value::Array(items) => Input::Tokens(
            items
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or(
                    "an input array must hold token ids (integers below 2^32); one input per line"
                        .to_owned(),
                )?,
        ),
        other => {
            return Err(format!(
                "the input must be a string or an array of token ids, not {}",
                kind(&other)
            ));
        }
    };
    if input.byte_len() > max_input_bytes {
        return Err(format!(
            "input too long: at most {max_input_bytes} bytes (4 per token id)"
        ));
    }
    let group = Group {
        model: model.unwrap_or_else(|| defaults.model.clone()),
        dimensions: dimensions.or(defaults.dimensions),
    };
    Ok((group, input))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a request needs besides its batch.
#[derive(Clone)]
struct Run {
    embedder: Arc<Embedder>,
    caller: Caller,
    key_prefix: Arc<str>,
}

/// A batch that is done: its inputs are in the cache.
struct Finished {
    seq: u64,
    end: u64,
    last_line: u64,
    lines: u64,
    inputs: u64,
    model: Option<String>,
    prompt_tokens: u64,
    upstream_tokens: u64,
}

impl Finished {
    /// A batch with no inputs (only bad or blank lines).
    fn empty(batch: &Batch) -> Finished {
        Finished {
            seq: batch.seq,
            end: batch.end,
            last_line: batch.last_line,
            lines: batch.lines(),
            inputs: 0,
            model: None,
            prompt_tokens: 0,
            upstream_tokens: 0,
        }
    }
}

impl Run {
    /// Embeds a batch through the pipeline, then makes sure its entries are
    /// in the store (the pipeline serves on when Redis fails; a warm run
    /// must not count such a batch as done).
    async fn embed(self, batch: Batch) -> Result<Finished, Stop> {
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
        let upstream = Arc::clone(self.embedder.upstreams().route(&group.model));
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
        );
        let request = Arc::new(EmbeddingRequest {
            model: group.model,
            inputs,
            encoding_format: EncodingFormat::Float,
            dimensions: group.dimensions,
            user: None,
            extra: Vec::new(),
        });
        let keys: Vec<String> = {
            let hasher = KeyScope::of(&ctx.namespace, &request).hasher();
            let distinct: BTreeSet<_> = request.inputs.iter().map(|i| hasher.key(i)).collect();
            distinct
                .iter()
                .map(|h| h.redis_key(&self.key_prefix))
                .collect()
        };
        let embedded = self
            .embedder
            .embed(Arc::clone(&request), ctx)
            .await
            .map_err(|error| Stop::Vendor {
                first: first_line,
                last: last_line,
                model: request.model.clone(),
                error,
            })?;
        self.verify_stored(&keys)
            .await
            .map_err(|reason| Stop::Store {
                first: first_line,
                last: last_line,
                reason,
            })?;
        done.inputs = request.inputs.len() as u64;
        done.model = Some(request.model.clone());
        done.prompt_tokens = embedded.prompt_tokens;
        done.upstream_tokens = embedded.upstream_tokens;
        Ok(done)
    }

    async fn verify_stored(&self, keys: &[String]) -> Result<(), String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = match self.embedder.store().exist_many(keys).await {
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

/// Which batches are done, and the contiguous done prefix they make.
struct Tracker {
    /// The first batch not yet done.
    next: u64,
    offset: u64,
    lines: u64,
    /// Done out of order: (end offset, last line) by batch.
    ahead: BTreeMap<u64, (u64, u64)>,
}

impl Tracker {
    fn new(start: Checkpoint) -> Tracker {
        Tracker {
            next: 0,
            offset: start.offset,
            lines: start.lines,
            ahead: BTreeMap::new(),
        }
    }

    /// Records a done batch; true when the done prefix grew.
    fn done(&mut self, seq: u64, end: u64, last_line: u64) -> bool {
        self.ahead.insert(seq, (end, last_line));
        let mut grew = false;
        while let Some((end, last_line)) = self.ahead.remove(&self.next) {
            self.offset = end;
            self.lines = last_line;
            self.next += 1;
            grew = true;
        }
        grew
    }
}

/// Running totals.
#[derive(Default)]
struct Tally {
    lines: u64,
    inputs: u64,
    requests: u64,
    prompt_tokens: u64,
    tokens_paid: u64,
    tokens_saved: u64,
    usd_paid: f64,
    usd_saved: f64,
    models: BTreeSet<String>,
}

impl Tally {
    /// Counts a done batch, and moves the checkpoint when the done prefix grew.
    async fn finish(
        &mut self,
        done: Finished,
        tracker: &mut Tracker,
        checkpoint_path: &Path,
        bar: &ProgressBar,
        settings: &Settings,
    ) -> Result<(), Stop> {
        self.lines += done.lines;
        self.inputs += done.inputs;
        if let Some(model) = done.model {
            let price = settings.prices.get(&model).copied().unwrap_or(0.0);
            let saved = done.prompt_tokens.saturating_sub(done.upstream_tokens);
            self.requests += 1;
            self.prompt_tokens += done.prompt_tokens;
            self.tokens_paid += done.upstream_tokens;
            self.tokens_saved += saved;
            self.usd_paid += done.upstream_tokens as f64 * price / 1e6;
            self.usd_saved += saved as f64 * price / 1e6;
            self.models.insert(model);
        }
        bar.inc(done.lines);
        bar.set_message(format!(
            "{} tokens, {} paid",
            HumanCount(self.prompt_tokens),
            HumanCount(self.tokens_paid)
        ));
        if tracker.done(done.seq, done.end, done.last_line) {
            let checkpoint = Checkpoint {
                version: CHECKPOINT_VERSION,
                offset: tracker.offset,
                lines: tracker.lines,
                complete: false,
            };
            write_checkpoint(checkpoint_path, &checkpoint)
                .await
                .map_err(|source| Stop::CheckpointWrite {
                    path: checkpoint_path.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Group {
        Group {
            model: "m".into(),
            dimensions: Some(8),
        }
    }

    fn parse(line: &str) -> Line {
        parse_line(line.as_bytes(), &defaults(), 100)
    }

    fn bad(line: &str) -> String {
        match parse(line) {
            Line::Bad(reason) => reason,
            other => panic!("{line}: expected bad, got {other:?}"),
        }
    }

    #[test]
    fn reads_the_line_shapes() {
        assert_eq!(
            parse("\"hello\"\n"),
            Line::Input(defaults(), Input::Text("hello".into()))
        );
        assert_eq!(
            parse("[1, 2]"),
            Line::Input(defaults(), Input::Tokens(vec![1, 2]))
        );
        assert_eq!(
            parse(r#"{"input": "x"}"#),
            Line::Input(defaults(), Input::Text("x".into()))
        );
        assert_eq!(
            parse(r#"{"input": [7], "model": "other", "dimensions": 3}"#),
            Line::Input(
                Group {
                    model: "other".into(),
                    dimensions: Some(3)
                },
                Input::Tokens(vec![7])
            )
        );
        assert_eq!(
            parse(r#"{"input": "x", "model": null, "dimensions": null}"#),
            Line::Input(defaults(), Input::Text("x".into()))
        );
        assert_eq!(parse("   \r\n"), Line::Blank);
        assert_eq!(parse(""), Line::Blank);
    }

    #[test]
    fn names_what_is_wrong_with_a_line() {
        assert!(bad("{not json").starts_with("not JSON"));
        assert_eq!(bad("\"\""), "empty input");
        assert_eq!(bad(r#"{"input": []}"#), "empty input");
        assert!(bad(r#"{"model": "m"}"#).contains("no \"input\""));
        assert!(bad(r#"{"input": "x", "model": ""}"#).contains("model"));
        assert!(bad(r#"{"input": "x", "model": 3}"#).contains("model"));
        assert!(bad(r#"{"input": "x", "dimensions": 0}"#).contains("dimensions"));
        assert!(bad(r#"{"input": "x", "dimensions": "8"}"#).contains("dimensions"));
        assert!(bad(r#"{"input": "x", "input_type": "query"}"#).contains("input_type"));
        assert!(bad(r#"["a", "b"]"#).contains("token ids"));
        assert!(bad("[-1]").contains("token ids"));
        assert!(bad("[4294967296]").contains("token ids"));
        assert!(bad("[1.5]").contains("token ids"));
        assert!(bad("42").contains("a number"));
        assert!(bad(r#"{"input": {"a": 1}}"#).contains("an object"));
        assert!(bad(&format!("\"{}\"", "a".repeat(101))).contains("too long"));
    }

    #[test]
    fn the_done_prefix_only_grows_contiguously() {
        let mut t = Tracker::new(Checkpoint {
            version: CHECKPOINT_VERSION,
            offset: 10,
            lines: 2,
            complete: false,
        });
        assert!(!t.done(1, 30, 6));
        assert!(!t.done(2, 40, 8));
        assert_eq!((t.offset, t.lines), (10, 2));
        assert!(t.done(0, 20, 4));
        assert_eq!((t.offset, t.lines, t.next), (40, 8, 3));
        assert!(t.ahead.is_empty());
        assert!(!t.done(4, 60, 12));
        assert!(t.done(3, 50, 10));
        assert_eq!((t.offset, t.lines), (60, 12));
    }

    #[test]
    fn scan_counts_lines_and_places_the_offset() {
        let dir = std::env::temp_dir().join(format!("embgate-scan-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("f");
        std::fs::write(&path, b"a\nbb\nccc").expect("write");
        let s = scan(&path, 5).expect("scan");
        assert_eq!((s.len, s.lines, s.newlines_before), (8, 3, 2));
        assert_eq!(s.byte_before, Some(b'\n'));
        let s = scan(&path, 0).expect("scan");
        assert_eq!((s.newlines_before, s.byte_before), (0, None));
        let s = scan(&path, 8).expect("scan");
        assert_eq!((s.newlines_before, s.byte_before), (2, Some(b'c')));
        std::fs::write(&path, b"").expect("write");
        assert_eq!(scan(&path, 0).expect("scan").lines, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn checkpoint_path_defaults_beside_the_file() {
        let o = WarmOptions::new("/data/in.jsonl");
        assert_eq!(
            o.checkpoint_path(),
            PathBuf::from("/data/in.jsonl.warm-progress")
        );
    }
}
