//! What a run did, and how it is printed.

use std::fmt;
use std::path::PathBuf;

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
    /// USD, at `settings.prices` (and batch prices for batch tokens).
    pub usd_paid: f64,
    pub usd_saved: f64,
    /// `--batch-api`: vendor batches collected...
    pub batches: u64,
    /// ...the inputs they embedded...
    pub batch_inputs: u64,
    /// ...and the tokens they billed (part of `tokens_paid`, at batch prices
    /// in `usd_paid`).
    pub batch_tokens: u64,
    /// What those tokens would have cost more through synchronous calls.
    pub usd_batch_saved: f64,
    /// Inputs a batch did not answer (failed lines, an expired, failed or
    /// cancelled batch), embedded by synchronous calls instead.
    pub batch_fallbacks: u64,
    /// Models without a price in `settings.prices` (counted at 0 USD).
    pub unpriced_models: Vec<String>,
    /// Every line of the file is done.
    pub complete: bool,
    /// The checkpoint said the file was done already: nothing was read.
    pub already_complete: bool,
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
        if self.batches > 0 || self.batch_fallbacks > 0 {
            writeln!(
                f,
                "  batch:    {} inputs through {} batches, {} tokens at batch prices: {} saved \
                 over synchronous calls; {} fell back to synchronous calls",
                self.batch_inputs,
                self.batches,
                self.batch_tokens,
                Usd(self.usd_batch_saved),
                self.batch_fallbacks
            )?;
        }
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
