//! The progress file, and the contiguous done prefix it records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;

use super::WarmError;

pub(super) const CHECKPOINT_VERSION: u32 = 1;

/// The progress file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// Every line before this byte offset is done.
    pub offset: u64,
    /// How many lines that is.
    pub lines: u64,
    /// The whole file was done (as long as it was then).
    pub complete: bool,
    /// `--batch-api`: vendor batches submitted and not yet collected, so
    /// that a rerun collects them instead of paying again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batches: Vec<Submitted>,
}

/// A vendor batch holding misses of the lines up to `window_end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// The vendor's batch id.
    pub id: String,
    /// Byte offset just past the last line whose misses it may hold; the
    /// lines start where the previous window (or the done prefix) ends.
    pub window_end: u64,
    /// 1-based, for reports.
    pub first_line: u64,
    pub last_line: u64,
    pub model: String,
    pub dimensions: Option<u32>,
    /// Inputs it holds (one request each).
    pub requests: u64,
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
pub(super) async fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
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

/// Which batches are done, and the contiguous done prefix they make.
pub(super) struct Tracker {
    /// The first batch not yet done.
    next: u64,
    pub(super) offset: u64,
    pub(super) lines: u64,
    /// Done out of order: (end offset, last line) by batch.
    ahead: BTreeMap<u64, (u64, u64)>,
    /// Vendor batches submitted and not yet collected.
    pub(super) submitted: Vec<Submitted>,
}

impl Tracker {
    pub(super) fn new(start: Checkpoint) -> Tracker {
        Tracker {
            next: 0,
            offset: start.offset,
            lines: start.lines,
            ahead: BTreeMap::new(),
            submitted: start.batches,
        }
    }

    /// The checkpoint as things stand.
    pub(super) fn checkpoint(&self, complete: bool) -> Checkpoint {
        Checkpoint {
            version: CHECKPOINT_VERSION,
            offset: self.offset,
            lines: self.lines,
            complete,
            batches: self.submitted.clone(),
        }
    }

    /// Records a done batch; true when the done prefix grew.
    pub(super) fn done(&mut self, seq: u64, end: u64, last_line: u64) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_done_prefix_only_grows_contiguously() {
        let mut t = Tracker::new(Checkpoint {
            version: CHECKPOINT_VERSION,
            offset: 10,
            lines: 2,
            complete: false,
            batches: Vec::new(),
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
}
