//! Decode steps replayed from CUDA graphs ([`crate::backend::Backend::decode_step`] on the CUDA
//! backend).
//!
//! A decode step of a 24-layer model is a few hundred launches (norms, GEMMs, RoPE and the KV
//! write, attention, SwiGLU, the LM head, sampling), each a few microseconds of host time, while
//! the GPU needs well under a millisecond for the whole step at small batches: launched one by
//! one, the step waits on the host. Captured once into a CUDA graph, it is one launch.
//!
//! A graph replays fixed launches: the same kernels, grids and argument values, so the same
//! device addresses. What changes from step to step is therefore kept in device memory the
//! graph reads: each graph owns an *input buffer* holding every upload of the step (token ids,
//! positions, KV slots, the attention work list, sequence descriptors and block tables, the
//! sampling parameters) and an *output buffer* for the sampled tokens. Before a replay the host
//! writes the step's inputs into the input buffer with one copy; after it, one copy brings the
//! tokens back.
//!
//! For the launches to be the same at every replay, a step is padded to a fixed shape:
//! - the batch to the next of [`BATCH_BUCKETS`], with padding rows that attend to one cached
//!   position and write no K/V ([`crate::backend::NO_SLOT`]); their tokens are dropped;
//! - every block table to a fixed width, the next power of two of the longest table
//!   ([`table_bucket`]), which also fixes the attention plan (see
//!   `attention::paged_work`).
//!
//! Graphs are keyed by (batch bucket, table width). The first step of a shape runs eagerly,
//! padded (which builds what the capture must find ready: cuBLASLt plans for the bucket's row
//! count, the RoPE table); the second is captured and replayed; at most
//! [`MAX_GRAPHS`] are kept (least recently used out). A graph bakes in the addresses of the
//! weights and the KV pools, so when any of them changes (new weights uploaded, a new KV
//! cache) every graph is dropped (`fingerprint`).
//!
//! The capture runs the transformer's own forward and sampling code (the caller's `run`) with
//! the backend in capture mode (`context::CaptureInputs`): each op's upload returns
//! the address of its staged copy after checking that the op asks for exactly the bytes
//! [`stage`] put there, so the staging cannot drift from what the ops upload. Any transfer that
//! is not staged, a wait, or a failed capture ends the capture; the step then runs eagerly, and
//! after [`MAX_CAPTURE_FAILURES`] such steps graphs are turned off for the backend with a
//! warning. A replay runs none of the ops' host-side checks, so the step's token ids, KV slots
//! and sampling parameters are checked before it. `$GENIUS_CUDA_GRAPHS=0` turns graphs off
//! from the start; so do `$GENIUS_CUDA_PROFILE=1` and `$GENIUS_CUDA_SYNC=1`, which time or wait
//! for each launch. One thread at a time: a capture holds the backend's graph lock, and
//! another thread's launches on the shared stream would land in the graph.

use super::backend::CudaBackend;
use super::context::CaptureInputs;
use super::sampling::{OUT_WORDS, row_args_of, unpack_outputs};
use super::tensor::{CudaLinear, CudaTensor};
use crate::backend::{DecodeGraphStats, DecodeRun, NO_SLOT};
use crate::engine::sampler::{RowSampling, SampledToken, SamplingParams};
use crate::transformer::{KvCache, PagedBatch, PagedSeqBatch, Weights};
use anyhow::{Context, Result, anyhow, ensure};
use cudarc::driver::{CudaGraph, CudaSlice};
use std::collections::{HashMap, HashSet};

/// The upload keys of the ops a decode step runs ([`super::context::GpuContext::upload_memo`]):
/// one constant per upload, shared by the ops and by [`stage`].
pub(crate) mod keys {
    pub const EMBEDDING_IDS: &str = "embedding ids";
    pub const GATHER_ROWS: &str = "gather rows";
    pub const ROPE_POSITIONS: &str = "rope positions";
    pub const WRITE_KV_SLOTS: &str = "write_kv slots";
    pub const ATTENTION_ITEMS: &str = "attention items";
    pub const ATTENTION_SEQS: &str = "attention seqs";
    pub const ATTENTION_TABLES: &str = "attention block tables";
    pub const SAMPLE_PARAMS: &str = "sample params";
}

/// Environment variable: `0` runs every decode step eagerly (no CUDA graphs).
pub const GRAPHS_ENV: &str = "GENIUS_CUDA_GRAPHS";

/// Batch sizes a decode graph is captured for; a step of `n` sequences is padded to the first
/// bucket `>= n`, and one of more than the last runs eagerly (its launches are a small share of
/// its time anyway). Fine-grained where padding would cost most.
pub const BATCH_BUCKETS: &[usize] = &[
    1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
];

/// Graphs kept at once (least recently used dropped first). A rollout's batch shrinks and
/// grows through many buckets while its contexts cross table widths, so shapes recur in
/// cycles; room for 128 (about six widths of every bucket) keeps such a cycle from evicting
/// graphs it will replay again. Graphs share their activations' physical memory; each costs
/// host memory for its few hundred nodes.
pub const MAX_GRAPHS: usize = 128;

/// Failed captures after which graphs are turned off (each failed step runs eagerly).
pub const MAX_CAPTURE_FAILURES: u64 = 2;

/// The bucket a step of `n` sequences is padded to; `None` past the largest.
pub fn batch_bucket(n: usize) -> Option<usize> {
    BATCH_BUCKETS.iter().copied().find(|&b| b >= n.max(1))
}

/// The fixed block-table width for a step whose longest table has `blocks` entries.
pub fn table_bucket(blocks: usize) -> usize {
    blocks.max(1).next_power_of_two()
}

/// Whether a step is one a graph can replay: every sequence has exactly one new token, in row
/// order, and every row is sampled.
pub fn is_plain_decode(batch: &PagedBatch, sampling: &[RowSampling]) -> bool {
    let n = batch.tokens.len();
    n > 0
        && batch.seqs.len() == n
        && sampling.len() == n
        && batch.positions.len() == n
        && batch.slots.len() == n
        && batch
            .seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.q_start == i && s.q_len == 1 && s.context_len >= 1)
}

/// The step padded to `bucket` rows: each padding row is token 0 at position 0, attends to the
/// first position of block 0 and caches nothing ([`NO_SLOT`]), and is sampled greedily.
pub fn pad_decode(
    batch: &PagedBatch,
    sampling: &[RowSampling],
    bucket: usize,
) -> (PagedBatch, Vec<RowSampling>) {
    let mut padded = batch.clone();
    let mut rows = sampling.to_vec();
    for i in batch.tokens.len()..bucket {
        padded.tokens.push(0);
        padded.positions.push(0);
        padded.slots.push(NO_SLOT);
        padded.seqs.push(PagedSeqBatch {
            q_start: i,
            q_len: 1,
            context_len: 1,
            block_table: vec![0],
        });
        rows.push(RowSampling {
            params: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            seq_id: 0,
            position: 0,
        });
    }
    (padded, rows)
}

/// The bytes of every upload a captured decode step makes, by key, in input-buffer order:
/// what the embedding, the fused QKV/RoPE/KV-write, paged attention (with tables of
/// `table_width` entries) and sampling upload for `batch` and `sampling`, computed with the
/// same functions they use.
pub fn stage(
    batch: &PagedBatch,
    sampling: &[RowSampling],
    block_size: usize,
    pool_blocks: usize,
    table_width: usize,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let seqs = batch.paged_seqs();
    let (work, tables) = super::attention::paged_work(
        batch.tokens.len(),
        &seqs,
        block_size,
        pool_blocks,
        Some(table_width),
    )?;
    let bytes = |v: &[u32]| bytemuck::cast_slice::<u32, u8>(v).to_vec();
    Ok(vec![
        (keys::EMBEDDING_IDS, bytes(&batch.tokens)),
        (keys::ROPE_POSITIONS, bytes(&batch.positions)),
        (keys::WRITE_KV_SLOTS, bytes(&batch.slots)),
        (keys::ATTENTION_ITEMS, bytes(&work.items)),
        (keys::ATTENTION_SEQS, bytes(&work.seqs)),
        (keys::ATTENTION_TABLES, bytes(&tables)),
        (
            keys::SAMPLE_PARAMS,
            bytemuck::cast_slice(&row_args_of(sampling)).to_vec(),
        ),
    ])
}

/// What the ops of a decode step check on the host before they launch (a replay launches
/// none of them): token ids inside the vocabulary, KV slots inside the pool (or [`NO_SLOT`]),
/// valid sampling parameters. Block tables are checked by [`stage`].
fn check_decode_inputs(
    batch: &PagedBatch,
    sampling: &[RowSampling],
    weights: &Weights<CudaTensor, CudaLinear>,
    cache: &KvCache<CudaTensor>,
) -> Result<()> {
    let vocab = weights.embed_tokens.matrix().0;
    if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("token id {t} is outside the vocabulary ({vocab} entries)");
    }
    let pool_rows = cache.num_blocks * cache.block_size;
    super::attention::check_slots("decode step", &batch.slots, pool_rows)?;
    super::sampling::check_rows(sampling)
}

/// Alignment of each upload inside a graph's input buffer.
const INPUT_ALIGN: usize = 256;

/// Where each staged upload sits in a graph's input buffer: `(key, offset, length)` in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputLayout {
    pub entries: Vec<(&'static str, usize, usize)>,
    pub total: usize,
}

impl InputLayout {
    /// Consecutive, `INPUT_ALIGN`-aligned (256-byte) places for `staged` (an empty upload still gets
    /// one byte, as the eager uploads do).
    pub fn of(staged: &[(&'static str, Vec<u8>)]) -> Self {
        let mut entries = Vec::with_capacity(staged.len());
        let mut at = 0;
        for (key, bytes) in staged {
            entries.push((*key, at, bytes.len()));
            at += bytes.len().max(1).next_multiple_of(INPUT_ALIGN);
        }
        Self {
            entries,
            total: at.max(1),
        }
    }

    /// The input buffer's contents for `staged`, which must have this layout's keys and
    /// lengths (a graph's shape fixes them).
    pub fn image(&self, staged: &[(&'static str, Vec<u8>)]) -> Result<Vec<u8>> {
        ensure!(
            staged.len() == self.entries.len(),
            "decode graph: {} staged uploads for a layout of {}",
            staged.len(),
            self.entries.len()
        );
        let mut image = vec![0u8; self.total];
        for ((key, bytes), &(want_key, offset, len)) in staged.iter().zip(&self.entries) {
            ensure!(
                *key == want_key && bytes.len() == len,
                "decode graph: upload '{key}' of {} bytes where the graph has '{want_key}' of {len}",
                bytes.len()
            );
            image[offset..offset + len].copy_from_slice(bytes);
        }
        Ok(image)
    }
}

/// A captured graph and its buffers.
struct DecodeGraph {
    graph: SendGraph,
    inputs: CudaSlice<u8>,
    out: CudaSlice<u32>,
    layout: InputLayout,
    last_used: u64,
}

/// A [`CudaGraph`] that may move between threads: the backend only touches it with the
/// [`DecodeGraphs`] lock held, which serialises every call on it as CUDA requires.
struct SendGraph(CudaGraph);
// SAFETY: see above; the graph's handles are plain driver handles valid in any thread that
// binds the context (cudarc's `launch` binds it).
unsafe impl Send for SendGraph {}

/// The backend's decode graphs, keyed by (batch bucket, table width).
pub(super) struct DecodeGraphs {
    /// Why graphs are off, if they are.
    off: Option<String>,
    /// [`fingerprint`] of the weights and KV pools the graphs were captured with.
    fingerprint: u64,
    graphs: HashMap<(usize, usize), DecodeGraph>,
    /// Shapes whose padded step has run eagerly once (captures come after).
    warmed: HashSet<(usize, usize)>,
    clock: u64,
    stats: DecodeGraphStats,
}

impl DecodeGraphs {
    /// Graphs on when `wanted` ([`super::CudaOptions::decode_graphs`]), unless profiling or
    /// per-launch waits are on.
    pub(super) fn new(wanted: bool, profile: bool, sync_after_launch: bool) -> Self {
        let off = if !wanted {
            Some(format!(
                "turned off (${GRAPHS_ENV}=0 or CudaOptions::decode_graphs)"
            ))
        } else if profile {
            Some("$GENIUS_CUDA_PROFILE=1 times each launch".to_string())
        } else if sync_after_launch {
            Some("$GENIUS_CUDA_SYNC=1 waits after each launch".to_string())
        } else {
            None
        };
        Self {
            off,
            fingerprint: 0,
            graphs: HashMap::new(),
            warmed: HashSet::new(),
            clock: 0,
            stats: DecodeGraphStats::default(),
        }
    }

    /// Drops every graph (their memory goes back with them); each shape warms up eagerly
    /// again before its next capture.
    pub(super) fn clear(&mut self) {
        self.graphs.clear();
        self.warmed.clear();
    }
}

/// A hash of the device addresses a decode graph reads outside its own buffers: every weight,
/// every KV pool and the RoPE frequency table, plus the cache's geometry. Equal fingerprints mean the captured graphs
/// still point at the live buffers.
pub(super) fn fingerprint(
    weights: &Weights<CudaTensor, CudaLinear>,
    cache: &KvCache<CudaTensor>,
    rope_table: Option<u64>,
    addr: impl Fn(&CudaTensor) -> u64,
    linear_addr: impl Fn(&CudaLinear) -> u64,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rope_table.hash(&mut h);
    addr(&weights.embed_tokens).hash(&mut h);
    for l in &weights.layers {
        addr(&l.input_norm).hash(&mut h);
        linear_addr(&l.qkv_proj).hash(&mut h);
        l.qkv_bias.as_ref().map(&addr).hash(&mut h);
        linear_addr(&l.o_proj).hash(&mut h);
        addr(&l.post_attention_norm).hash(&mut h);
        linear_addr(&l.gate_up_proj).hash(&mut h);
        linear_addr(&l.down_proj).hash(&mut h);
    }
    addr(&weights.final_norm).hash(&mut h);
    linear_addr(&weights.lm_head).hash(&mut h);
    for pool in cache.k.iter().chain(&cache.v) {
        addr(pool).hash(&mut h);
    }
    (cache.block_size, cache.num_blocks).hash(&mut h);
    h.finish()
}

impl CudaBackend {
    /// What the decode graphs did so far (captures, replays, eager steps) and why they are
    /// off, if they are.
    pub fn graph_stats(&self) -> DecodeGraphStats {
        self.graphs
            .lock()
            .map(|g| DecodeGraphStats {
                off: g.off.clone(),
                ..g.stats.clone()
            })
            .unwrap_or_default()
    }

    /// Whether decode steps replay from graphs (not turned off, by option or after failed
    /// captures).
    pub(super) fn graphs_on(&self) -> bool {
        self.graphs.lock().is_ok_and(|g| g.off.is_none())
    }

    /// Drops every captured decode graph and gives the memory CUDA keeps for graphs back to
    /// the device (before training, whose shapes differ).
    pub(super) fn release_graphs(&self) -> Result<()> {
        // No graph may be running when it is destroyed.
        self.gpu
            .sync("the work before releasing the decode graphs")?;
        if let Ok(mut g) = self.graphs.lock() {
            g.clear();
        }
        self.trim_graph_memory()
    }

    /// Gives the memory CUDA keeps for graph allocations and no live graph uses back to the
    /// device (after graphs were dropped; the stream must be idle, as it is after a step).
    fn trim_graph_memory(&self) -> Result<()> {
        self.gpu.ctx.bind_to_thread()?;
        // SAFETY: a valid device; trimming only releases graph memory no live graph uses.
        unsafe { cudarc::driver::sys::cuDeviceGraphMemTrim(self.gpu.ctx.cu_device()) }
            .result()
            .context("cuDeviceGraphMemTrim")
    }

    /// [`crate::backend::Backend::decode_step`]: replays the step from a graph of its shape
    /// (capturing one first if needed), or runs it eagerly when graphs do not apply.
    pub(super) fn graph_decode_step(
        &self,
        batch: &PagedBatch,
        sampling: &[RowSampling],
        weights: &Weights<CudaTensor, CudaLinear>,
        cache: &mut KvCache<CudaTensor>,
        run: &mut DecodeRun<'_, CudaTensor>,
    ) -> Result<Vec<SampledToken>> {
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| anyhow!("decode graphs lock poisoned"))?;
        let n = batch.tokens.len();
        let bucket = batch_bucket(n);
        let (Some(bucket), None, true) = (bucket, &graphs.off, is_plain_decode(batch, sampling))
        else {
            graphs.stats.eager_steps += 1;
            drop(graphs);
            return run(batch, sampling, cache);
        };
        // A replay runs none of the ops' host-side checks: make them here.
        check_decode_inputs(batch, sampling, weights, cache)?;
        let block_size = cache.block_size.max(1);
        let longest = batch
            .seqs
            .iter()
            .map(|s| s.context_len.div_ceil(block_size))
            .max()
            .unwrap_or(1);
        let width = table_bucket(longest);
        let (padded, padded_rows) = pad_decode(batch, sampling, bucket);
        let staged = stage(&padded, &padded_rows, block_size, cache.num_blocks, width)?;
        let rope_table = self
            .rope_table
            .lock()
            .map_err(|_| anyhow!("rope: the inv_freq cache lock is poisoned"))?
            .as_ref()
            .map(|(_, t)| self.gpu.ptr(t));
        let fp = fingerprint(
            weights,
            cache,
            rope_table,
            |t| self.addr(t),
            |l| self.gpu.ptr(&l.weight),
        );
        if fp != graphs.fingerprint {
            // New weights, pools or RoPE table: every shape warms up again before its capture.
            let had_graphs = !graphs.graphs.is_empty();
            graphs.clear();
            if had_graphs {
                self.trim_graph_memory()?;
            }
            graphs.fingerprint = fp;
        }
        let key = (bucket, width);
        if !graphs.graphs.contains_key(&key) && graphs.warmed.insert(key) {
            // First step of this shape: run the padded step eagerly, which builds what the
            // capture must find ready (cuBLASLt plans for the bucket's row count, the RoPE
            // table); the next step of this shape is captured.
            graphs.stats.eager_steps += 1;
            graphs.stats.padding_rows += (bucket - n) as u64;
            drop(graphs);
            // With the graph's table width, so that this step's results are the replays'
            // (cleared again however the step ends, a panic included).
            struct ClearWidth<'a>(&'a super::context::GpuContext);
            impl Drop for ClearWidth<'_> {
                fn drop(&mut self) {
                    self.0.set_warmup_table_width(None);
                }
            }
            self.gpu.set_warmup_table_width(Some(width));
            let clear = ClearWidth(&self.gpu);
            let ran = run(&padded, &padded_rows, cache);
            drop(clear);
            let mut tokens = ran?;
            tokens.truncate(n);
            return Ok(tokens);
        }
        if !graphs.graphs.contains_key(&key) {
            match self.capture_decode(&staged, width, &padded, &padded_rows, cache, run) {
                Ok(g) => {
                    if graphs.graphs.len() >= MAX_GRAPHS
                        && let Some(oldest) = graphs
                            .graphs
                            .iter()
                            .min_by_key(|(_, g)| g.last_used)
                            .map(|(k, _)| *k)
                    {
                        graphs.graphs.remove(&oldest);
                    }
                    graphs.graphs.insert(key, g);
                    graphs.stats.captures += 1;
                }
                Err(why) => {
                    // Run the step as usual; if that works the capture was the problem.
                    graphs.stats.eager_steps += 1;
                    let tokens = run(batch, sampling, cache)?;
                    graphs.stats.failed_captures += 1;
                    graphs.stats.last_failure = Some(format!("{why:#}"));
                    if graphs.stats.failed_captures >= MAX_CAPTURE_FAILURES {
                        eprintln!(
                            "warning: CUDA graphs are off for this run, decode steps run eagerly: {why:#}"
                        );
                        graphs.off = Some(format!("the capture failed: {why:#}"));
                        graphs.clear();
                    }
                    return Ok(tokens);
                }
            }
        }
        graphs.clock += 1;
        let clock = graphs.clock;
        let g = graphs
            .graphs
            .get_mut(&key)
            .expect("captured or found above");
        g.last_used = clock;
        let image = g.layout.image(&staged)?;
        self.gpu
            .stream
            .memcpy_htod(&image, &mut g.inputs)
            .context("copying a decode step's inputs to its graph")?;
        g.graph.0.launch().context("launching a decode graph")?;
        let words = self.gpu.download_slice(&g.out, n * OUT_WORDS)?;
        graphs.stats.replays += 1;
        graphs.stats.padding_rows += (bucket - n) as u64;
        unpack_outputs(&words, weights.lm_head.out_features)
    }

    /// Captures `run` over the padded step into a graph reading its inputs from a new input
    /// buffer (laid out for `staged`) and writing the sampled tokens to a new output buffer.
    /// Nothing runs during the capture.
    fn capture_decode(
        &self,
        staged: &[(&'static str, Vec<u8>)],
        table_width: usize,
        padded: &PagedBatch,
        padded_rows: &[RowSampling],
        cache: &mut KvCache<CudaTensor>,
        run: &mut DecodeRun<'_, CudaTensor>,
    ) -> Result<DecodeGraph> {
        let layout = InputLayout::of(staged);
        let inputs = self.gpu.alloc::<u8>(layout.total)?;
        let mut out = self.gpu.alloc::<u32>(padded.tokens.len() * OUT_WORDS)?;
        let base = self.gpu.ptr(&inputs);
        let staged_at = layout
            .entries
            .iter()
            .zip(staged)
            .map(|(&(key, offset, _), (_, bytes))| (key, (base + offset as u64, bytes.clone())))
            .collect();
        self.gpu.begin_capture(CaptureInputs {
            staged: staged_at,
            table_width,
            sample_out: self.gpu.ptr_mut(&mut out),
        })?;
        // Ends the capture if `run` panics, so the stream is not left capturing.
        struct EndOnUnwind<'a>(&'a super::context::GpuContext);
        impl Drop for EndOnUnwind<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let _ = self.0.end_capture();
                }
            }
        }
        let guard = EndOnUnwind(&self.gpu);
        let stepped = run(padded, padded_rows, cache);
        std::mem::forget(guard);
        let graph = self.gpu.end_capture();
        stepped.context("the decode step under capture")?;
        let graph = graph?;
        // Pre-upload the graph's resources so that its first replay is not slower.
        graph.upload().context("uploading a decode graph")?;
        Ok(DecodeGraph {
            graph: SendGraph(graph),
            inputs,
            out,
            layout,
            last_used: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_batch(contexts: &[usize], block_size: usize) -> (PagedBatch, Vec<RowSampling>) {
        let mut b = PagedBatch::default();
        let mut rows = Vec::new();
        let mut next_block = 1u32;
        for (i, &ctx) in contexts.iter().enumerate() {
            let blocks = ctx.div_ceil(block_size) as u32;
            let table: Vec<u32> = (next_block..next_block + blocks).collect();
            next_block += blocks;
            let pos = ctx - 1;
            b.tokens.push(10 + i as u32);
            b.positions.push(pos as u32);
            b.slots
                .push(table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
            b.seqs.push(PagedSeqBatch {
                q_start: i,
                q_len: 1,
                context_len: ctx,
                block_table: table,
            });
            rows.push(RowSampling {
                params: SamplingParams {
                    temperature: 0.7,
                    top_p: 0.9,
                    seed: 5,
                    ..SamplingParams::default()
                },
                seq_id: 100 + i as u64,
                position: ctx as u32,
            });
        }
        (b, rows)
    }

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn decode_graph_stats_subtract_and_summarise() {
        let earlier = DecodeGraphStats {
            captures: 2,
            replays: 10,
            eager_steps: 3,
            padding_rows: 7,
            failed_captures: 0,
            last_failure: None,
            off: None,
        };
        let now = DecodeGraphStats {
            captures: 5,
            replays: 40,
            eager_steps: 4,
            padding_rows: 19,
            failed_captures: 1,
            last_failure: Some("upload 'x' was not staged".into()),
            off: None,
        };
        let d = now.since(&earlier);
        assert_eq!(
            (
                d.captures,
                d.replays,
                d.eager_steps,
                d.padding_rows,
                d.failed_captures
            ),
            (3, 30, 1, 12, 1)
        );
        assert_eq!(
            d.summary(),
            "30 replayed steps, 1 eager, 3 captured, 1 failed captures (last: upload 'x' was not staged)"
        );
        let off = DecodeGraphStats {
            off: Some("turned off".into()),
            ..DecodeGraphStats::default()
        };
        assert_eq!(
            off.summary(),
            "0 replayed steps, 0 eager, 0 captured, 0 failed captures; off: turned off"
        );
    }

    #[test]
    fn the_kernels_no_slot_is_the_backends() {
        let header = include_str!("../../../kernels/common.cuh");
        let line = header
            .lines()
            .find_map(|l| l.trim().strip_prefix("#define GE_NO_SLOT "))
            .expect("GE_NO_SLOT in kernels/common.cuh");
        let hex = line.trim().trim_end_matches('u');
        let value = u32::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
        assert_eq!(value, NO_SLOT);
    }

    #[test]
    fn buckets_cover_every_batch_up_to_the_largest() {
        assert_eq!(batch_bucket(0), Some(1));
        assert_eq!(batch_bucket(1), Some(1));
        assert_eq!(batch_bucket(3), Some(4));
        assert_eq!(batch_bucket(256), Some(256));
        assert_eq!(batch_bucket(257), Some(320));
        assert_eq!(batch_bucket(512), Some(512));
        assert_eq!(batch_bucket(513), None);
        for n in 1..=512 {
            let b = batch_bucket(n).unwrap();
            assert!(b >= n && b < n * 2 + 2, "{n} -> {b}");
        }
        assert!(BATCH_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(table_bucket(0), 1);
        assert_eq!(table_bucket(5), 8);
        assert_eq!(table_bucket(16), 16);
    }

    #[test]
    fn only_single_token_steps_that_sample_every_row_are_plain_decode() {
        let (b, rows) = decode_batch(&[5, 17, 3], 4);
        assert!(is_plain_decode(&b, &rows));
        assert!(!is_plain_decode(&b, &rows[..2]));
        let mut prefill = b.clone();
        prefill.seqs[1].q_len = 2;
        assert!(!is_plain_decode(&prefill, &rows));
        assert!(!is_plain_decode(&PagedBatch::default(), &[]));
    }

    #[test]
    fn padding_rows_cache_nothing_and_keep_the_real_rows() {
        let (b, rows) = decode_batch(&[5, 17, 3], 4);
        let (p, prow) = pad_decode(&b, &rows, 8);
        assert_eq!(p.tokens.len(), 8);
        assert_eq!(prow.len(), 8);
        assert_eq!(&p.tokens[..3], &b.tokens[..]);
        assert_eq!(&p.slots[..3], &b.slots[..]);
        assert!(p.slots[3..].iter().all(|&s| s == NO_SLOT));
        assert!(is_plain_decode(&p, &prow));
        assert!(prow[3..].iter().all(|r| r.params.is_greedy()));
        assert!(
            p.seqs[3..]
                .iter()
                .all(|s| s.context_len == 1 && s.block_table == [0])
        );
    }

    #[test]
    fn staged_inputs_have_a_fixed_layout_per_shape() {
        let block_size = 4;
        let pool_blocks = 64;
        // Two steps of the same bucket and table width, with different contexts.
        let (a, ra) = decode_batch(&[5, 17, 3], block_size);
        let (b, rb) = decode_batch(&[9, 2, 20], block_size);
        let width = table_bucket(5);
        let (pa, pra) = pad_decode(&a, &ra, 4);
        let (pb, prb) = pad_decode(&b, &rb, 4);
        let sa = stage(&pa, &pra, block_size, pool_blocks, width).unwrap();
        let sb = stage(&pb, &prb, block_size, pool_blocks, width).unwrap();
        let la = InputLayout::of(&sa);
        assert_eq!(la, InputLayout::of(&sb));
        assert!(la.image(&sb).is_ok());
        assert!(la.entries.iter().all(|&(_, off, _)| off % INPUT_ALIGN == 0));
        // The tables: row i's blocks at i * width, padded with block 0.
        let tables = &sb
            .iter()
            .find(|(k, _)| *k == keys::ATTENTION_TABLES)
            .unwrap()
            .1;
        let tables: Vec<u32> = words(tables);
        assert_eq!(tables.len(), 4 * width);
        assert_eq!(&tables[width..width + 1], &pb.seqs[1].block_table[..1]);
        assert!(tables[width + 1..2 * width].iter().all(|&x| x == 0));
        // The descriptors' base is i * width and each work item is (row i, sequence i).
        let seqs: Vec<u32> = words(
            &sb.iter()
                .find(|(k, _)| *k == keys::ATTENTION_SEQS)
                .unwrap()
                .1,
        );
        for i in 0..4 {
            assert_eq!(seqs[4 * i + 3] as usize, i * width);
        }
        // A step whose longest table is over the width is refused, not truncated.
        assert!(stage(&pb, &prb, block_size, pool_blocks, 2).is_err());
        // A different shape has a different layout, which the image refuses.
        let (pc, prc) = pad_decode(&b, &rb, 8);
        let sc = stage(&pc, &prc, block_size, pool_blocks, width).unwrap();
        assert!(la.image(&sc).is_err());
    }

    #[test]
    fn staged_sampling_parameters_are_the_kernel_arguments() {
        let (b, rows) = decode_batch(&[5, 6], 4);
        let s = stage(&b, &rows, 4, 16, 2).unwrap();
        let params = &s.iter().find(|(k, _)| *k == keys::SAMPLE_PARAMS).unwrap().1;
        assert_eq!(
            params.len(),
            2 * std::mem::size_of::<super::super::args::SampleRowArgs>()
        );
        let args = row_args_of(&rows);
        assert_eq!(params.as_slice(), bytemuck::cast_slice::<_, u8>(&args));
    }
}
