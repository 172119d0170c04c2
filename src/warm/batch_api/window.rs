//! A window: consecutive lines read and looked up, whose distinct misses
//! (by model and dimensions) make the vendor batches of the window.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::cache::key::{KeyHash, KeyHashMap, KeyScope};
use crate::pipeline::CallContext;
use crate::protocol::Input;
use crate::warm::Stop;
use crate::warm::input::Batch;
use crate::warm::run::{Run, Spend};

use super::collect::Target;

/// A window also closes after this many inputs (hits included) per request
/// a batch may hold, so that a long run of hits still moves the checkpoint on.
const INPUTS_PER_MISS: u64 = 10;
/// What a batch line adds to its input's size, for the file size limit.
pub(super) const LINE_OVERHEAD: u64 = 256;

/// One distinct input to fetch, and how often the window holds it.
pub(super) struct Miss {
    pub(super) hash: KeyHash,
    pub(super) input: Input,
    pub(super) occurrences: u64,
}

/// The misses of one model and dimensions: what its vendor batches hold.
pub(super) struct Part {
    pub(super) ctx: CallContext,
    pub(super) model: String,
    pub(super) dimensions: Option<u32>,
    pub(super) misses: Vec<Miss>,
    /// Where each miss is in `misses`: results are accepted only for these.
    pub(super) index: KeyHashMap<usize>,
    /// Inputs an earlier window in flight is fetching: looked up again
    /// once it is done.
    pub(super) deferred: Vec<(Input, u64)>,
}

impl Part {
    /// What following this part's batches needs. The index goes along: once
    /// the window is read, nothing else looks keys up in it.
    pub(super) fn target(&mut self) -> Target {
        Target {
            ctx: self.ctx.clone(),
            model: self.model.clone(),
            dimensions: self.dimensions,
            index: std::mem::take(&mut self.index),
        }
    }
}

pub(super) struct Window {
    pub(super) seq: u64,
    pub(super) first_line: u64,
    pub(super) last_line: u64,
    /// Byte offset just past its last line.
    pub(super) end: u64,
    pub(super) lines: u64,
    pub(super) inputs: u64,
    pub(super) parts: Vec<Part>,
    /// What its hits saved, by model.
    pub(super) spends: BTreeMap<String, Spend>,
}

impl Window {
    pub(super) fn misses(&self) -> usize {
        self.parts.iter().map(|p| p.misses.len()).sum()
    }

    /// Every key a batch of this window may answer.
    pub(super) fn keys(&self) -> impl Iterator<Item = KeyHash> + '_ {
        self.parts
            .iter()
            .flat_map(|p| p.misses.iter().map(|m| m.hash))
    }
}

/// Limits a window is read within.
pub(super) struct Bounds {
    pub(super) max_misses: usize,
    pub(super) max_bytes: u64,
    /// A recorded window ends exactly here; a new one where the limits say.
    pub(super) until: Option<u64>,
}

/// Reads and looks up lines until the window is full; `None` once the file
/// is exhausted. Misses that `pending` (earlier windows in flight) holds
/// are deferred, not fetched twice.
pub(super) async fn read(
    job: &mut crate::warm::Job<'_>,
    seq: u64,
    bounds: Bounds,
    pending: &HashSet<KeyHash>,
) -> Result<Option<Window>, Stop> {
    let mut window = Window {
        seq,
        first_line: job.batcher.line + 1,
        last_line: job.batcher.line,
        end: job.batcher.offset,
        lines: 0,
        inputs: 0,
        parts: Vec::new(),
        spends: BTreeMap::new(),
    };
    let mut bytes = 0u64;
    job.batcher.until = bounds.until.unwrap_or(u64::MAX);
    let max_inputs = (bounds.max_misses as u64).saturating_mul(INPUTS_PER_MISS);
    loop {
        let chunk = job.batcher.next().await.map_err(|source| Stop::Read {
            path: job.options.file.clone(),
            source,
        });
        let chunk = match chunk {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(stop) => {
                job.batcher.until = u64::MAX;
                return Err(stop);
            }
        };
        if window.lines == 0 {
            window.first_line = chunk.first_line;
        }
        window.last_line = chunk.last_line;
        window.end = chunk.end;
        window.lines += chunk.lines();
        window.inputs += chunk.inputs.len() as u64;
        bytes += look_up(&job.run, chunk, &mut window, pending).await?;
        let full = window.misses() >= bounds.max_misses
            || bytes >= bounds.max_bytes
            || window.inputs >= max_inputs;
        if bounds.until.is_none() && full {
            break;
        }
    }
    job.batcher.until = u64::MAX;
    Ok((window.lines > 0).then_some(window))
}

/// Looks a chunk's inputs up; adds its misses to the window, and what its
/// hits saved. The bytes of the misses added.
async fn look_up(
    run: &Run,
    chunk: Batch,
    window: &mut Window,
    pending: &HashSet<KeyHash>,
) -> Result<u64, Stop> {
    let Batch {
        first_line,
        last_line,
        group,
        inputs,
        ..
    } = chunk;
    let Some(group) = group else {
        return Ok(0);
    };
    let (ctx, request) = run.request(first_line, last_line, group, inputs)?;
    let upstream = Arc::clone(&ctx.upstream);
    if !upstream.has_batch_api() {
        return Err(Stop::Invalid {
            first: first_line,
            last: last_line,
            message: format!(
                "upstream {} ({:?}) has no Batch API (only OpenAI's and Azure OpenAI's are \
                 used): warm these lines without --batch-api",
                upstream.name(),
                upstream.flavour()
            ),
            model: request.model,
        });
    }
    let hasher = KeyScope::of(&ctx.namespace, &request).hasher();
    let keys: Vec<KeyHash> = request.inputs.iter().map(|i| hasher.key(i)).collect();
    let mut distinct: Vec<KeyHash> = Vec::new();
    let mut seen = HashSet::new();
    for key in &keys {
        if seen.insert(*key) {
            distinct.push(*key);
        }
    }
    let cache = run.pipeline.cache();
    let found = match run.policy.read {
        true => {
            let wait = cache.lookup_wait(upstream.typical_latency());
            cache
                .lookup(&distinct, request.dimensions, wait, false)
                .await
        }
        false => vec![None; distinct.len()],
    };
    let hits: KeyHashMap<u32> = distinct
        .iter()
        .zip(&found)
        .filter_map(|(k, e)| e.as_ref().map(|e| (*k, e.tokens())))
        .collect();
    let lifetimes = &run.lifetimes;
    if let Some(ttl) = lifetimes.ttl(&request.model)
        && lifetimes.refresh_ttl_on_hit
    {
        cache.refresh(hits.keys().copied(), ttl);
    }

    let model = request.model.clone();
    let dimensions = request.dimensions;
    let part = match window
        .parts
        .iter()
        .position(|p| p.model == model && p.dimensions == dimensions)
    {
        Some(i) => &mut window.parts[i],
        None => {
            window.parts.push(Part {
                ctx,
                model: model.clone(),
                dimensions,
                misses: Vec::new(),
                index: KeyHashMap::default(),
                deferred: Vec::new(),
            });
            let last = window.parts.len() - 1;
            &mut window.parts[last]
        }
    };
    let mut saved = 0u64;
    let mut bytes = 0u64;
    let mut deferred: KeyHashMap<usize> = KeyHashMap::default();
    for (key, input) in keys.into_iter().zip(request.inputs) {
        if let Some(tokens) = hits.get(&key) {
            saved += u64::from(*tokens);
        } else if let Some(&i) = part.index.get(&key) {
            part.misses[i].occurrences += 1;
        } else if pending.contains(&key) {
            match deferred.get(&key) {
                Some(&i) => part.deferred[i].1 += 1,
                None => {
                    deferred.insert(key, part.deferred.len());
                    part.deferred.push((input, 1));
                }
            }
        } else {
            bytes += input.byte_len() as u64 + LINE_OVERHEAD;
            part.index.insert(key, part.misses.len());
            part.misses.push(Miss {
                hash: key,
                input,
                occurrences: 1,
            });
        }
    }
    let misses = distinct.len() - hits.len();
    run.accounting
        .looked_up(&run.caller.tenant, &model, hits.len(), misses, saved);
    let spend = window.spends.entry(model.clone()).or_insert_with(|| Spend {
        model,
        ..Spend::default()
    });
    spend.saved_tokens += saved;
    spend.prompt_tokens += saved;
    Ok(bytes)
}
