//! Submitting a window's misses: per model and dimensions, input files
//! within `batch_api.max_requests_per_batch` and `batch_api.max_file_bytes`,
//! each uploaded and made a vendor batch, and recorded in the checkpoint
//! at once so that no rerun pays for it again.

use bytes::Bytes;

use crate::pipeline::EmbedError;
use crate::vendor::batch::chunk;
use crate::vendor::batch_api::input_line;
use crate::warm::checkpoint::{Submitted, write_checkpoint};
use crate::warm::{Job, Stop};

use super::window::Window;

/// Submits the window's misses; the batches, by part.
pub(super) async fn submit(
    job: &mut Job<'_>,
    window: &Window,
) -> Result<Vec<(usize, Submitted)>, Stop> {
    let limits = &job.settings.batch_api;
    let key = job.run.caller.key.clone();
    let mut submitted = Vec::new();
    for (p, part) in window.parts.iter().enumerate() {
        let upstream = &part.ctx.upstream;
        let lines: Vec<Vec<u8>> = part
            .misses
            .iter()
            .map(|m| {
                let id = m.hash.to_hex();
                input_line(upstream, &id, &part.model, part.dimensions, &m.input)
            })
            .collect();
        let sizes: Vec<u64> = lines.iter().map(|l| l.len() as u64).collect();
        for range in chunk(&sizes, limits.max_requests_per_batch, limits.max_file_bytes) {
            let requests = range.len() as u64;
            let file = Bytes::from(lines[range].concat());
            let vendor = |error| Stop::Vendor {
                first: window.first_line,
                last: window.last_line,
                model: part.model.clone(),
                error: EmbedError::Upstream(error),
            };
            let file_id = upstream
                .upload_batch_file(key.as_ref(), file)
                .await
                .map_err(vendor)?;
            let batch = upstream
                .create_batch(key.as_ref(), &file_id)
                .await
                .map_err(vendor)?;
            let record = Submitted {
                id: batch.id,
                window_end: window.end,
                first_line: window.first_line,
                last_line: window.last_line,
                model: part.model.clone(),
                dimensions: part.dimensions,
                requests,
            };
            job.tracker.submitted.push(record.clone());
            write_checkpoint(&job.checkpoint_path, &job.tracker.checkpoint(false))
                .await
                .map_err(|source| Stop::CheckpointWrite {
                    path: job.checkpoint_path.clone(),
                    source,
                })?;
            job.bar.suspend(|| {
                eprintln!(
                    "{}: lines {}-{}: submitted batch {} ({requests} inputs of {})",
                    job.options.file.display(),
                    window.first_line,
                    window.last_line,
                    record.id,
                    part.model
                );
            });
            submitted.push((p, record));
        }
    }
    Ok(submitted)
}
