//! `embgate warm FILE --batch-api --status`: where the batches the
//! checkpoint records stand at the vendor, without changing anything.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::vendor::Upstreams;
use crate::warm::{WarmError, WarmOptions, read_checkpoint};

/// One line per recorded batch: id, lines, model, status and counts.
pub async fn status(settings: &Settings, options: &WarmOptions) -> Result<String, WarmError> {
    let path = options.checkpoint_path();
    let file = options.file.display();
    let Some(checkpoint) = read_checkpoint(&path)? else {
        return Ok(format!(
            "{file}: no checkpoint at {}: nothing submitted\n",
            path.display()
        ));
    };
    let mut out = format!(
        "{file}: {} lines done{}; {} batches in flight\n",
        checkpoint.lines,
        if checkpoint.complete {
            " (complete)"
        } else {
            ""
        },
        checkpoint.batches.len()
    );
    if checkpoint.batches.is_empty() {
        return Ok(out);
    }
    let metrics = Metrics::new().map_err(|e| WarmError::Options(format!("metrics: {e}")))?;
    let upstreams = Upstreams::new(settings, &Arc::new(metrics)).map_err(WarmError::Options)?;
    for batch in &checkpoint.batches {
        let upstream = upstreams.route(&batch.model);
        let _ = write!(
            out,
            "  {}  lines {}-{}  {} inputs of {}: ",
            batch.id, batch.first_line, batch.last_line, batch.requests, batch.model
        );
        let _ = match upstream.batch(options.api_key.as_ref(), &batch.id).await {
            Ok(state) => {
                let c = state.counts();
                let mut line = format!(
                    "{} ({} of {} completed, {} failed)",
                    state.status, c.completed, c.total, c.failed
                );
                if let Some(reason) = state.failure() {
                    line.push_str(&format!(": {reason}"));
                }
                writeln!(out, "{line}")
            }
            Err(e) => writeln!(out, "unknown ({e})"),
        };
    }
    Ok(out)
}
