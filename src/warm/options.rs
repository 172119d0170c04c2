//! The `embgate warm` options and their defaults.

use std::path::PathBuf;

use crate::auth::ApiKey;
use crate::cache::control::CachePolicy;

use super::WarmError;

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";
pub const DEFAULT_BATCH: usize = 256;
pub const DEFAULT_CONCURRENCY: usize = 4;
pub const DEFAULT_TENANT: &str = "warm";
/// Appended to the input file's name for the default checkpoint path.
pub const CHECKPOINT_SUFFIX: &str = ".warm-progress";

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
    /// Fetch every input from the vendor again and overwrite its entry
    /// (as `Cache-Control: no-cache` does).
    #[arg(long)]
    pub refresh: bool,
    /// Use what is cached but store nothing new (as `Cache-Control:
    /// no-store` does).
    #[arg(long)]
    pub no_store: bool,
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
    /// Send the misses through the vendor's Batch API (half price, results
    /// within 24 hours) instead of synchronous calls; see `[batch_api]`.
    #[arg(long)]
    pub batch_api: bool,
    /// With `--batch-api`: show the state of the batches the checkpoint
    /// records, and exit.
    #[arg(long, requires = "batch_api")]
    pub status: bool,
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
    /// What the run does with the cache.
    pub fn policy(&self) -> CachePolicy {
        CachePolicy {
            read: !self.refresh,
            write: !self.no_store,
            max_age: None,
        }
    }

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
            refresh: false,
            no_store: false,
            tenant: DEFAULT_TENANT.into(),
            api_key: None,
            batch_api: false,
            status: false,
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

    pub(super) fn validate(&self) -> Result<(), WarmError> {
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
        if self.status && !self.batch_api {
            return invalid("--status goes with --batch-api");
        }
        if self.batch_api && self.no_store {
            return invalid("--batch-api pays for vectors to store: not with --no-store");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_path_defaults_beside_the_file() {
        let o = WarmOptions::new("/data/in.jsonl");
        assert_eq!(
            o.checkpoint_path(),
            PathBuf::from("/data/in.jsonl.warm-progress")
        );
    }
}
