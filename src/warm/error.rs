//! Why a warm run fails ([`WarmError`]) or stops part-way ([`Stop`]).

use std::path::PathBuf;

use serde_json::Value;

use crate::StartupError;
use crate::pipeline::EmbedError;
use crate::vendor::UpstreamError;

use super::WarmSummary;

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
    #[error("{} ({model}): {message}", span(*first, *last))]
    Invalid {
        first: u64,
        last: u64,
        model: String,
        message: String,
    },
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
