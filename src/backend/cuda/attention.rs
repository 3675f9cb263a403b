//! The paged KV cache and attention on the CUDA backend (the kernels of
//! `kernels/paged_attention.cu`): [`CudaBackend`]'s `kv_pool`, `write_kv`, `copy_blocks`,
//! `paged_attention` and `causal_attention`.
//!
//! Attention runs one thread block per (query row, kv head, slice of at most
//! [`MAX_HEADS_PER_BLOCK`] of its query heads, context partition), on tensor cores by default
//! (the slice's heads are the rows of an mma tile; [`CudaBackend::paged_attention_tensor_cores`])
//! or on the CUDA cores (`$GENIUS_CUDA_PA_TC=0`): same grid, partitions and outputs. Decode steps with few
//! sequences would leave most SMs idle, so the context is split into partitions
//! ([`plan_attention`]) whose partial results a second kernel merges (log-sum-exp,
//! [`combine_partitions`] is the same maths on the host). Whole-sequence causal attention is the
//! same kernel reading contiguous K/V rows instead of a block table, unless the tensor-core
//! kernel of [`super::attention_tc`] applies (the default for head_dim 64 and 128).
//!
//! The host-side parts (planning, copy batching, the combine's maths) are tested on the CPU;
//! the kernels against the CPU backend in `tests/cuda_attention.rs` (skipped without a GPU).

use super::args;
use super::backend::CudaBackend;
use super::graphs::keys;
use super::tensor::{CudaTensor, DType, DeviceData};
use crate::backend::{AttentionShape, NO_SLOT, PagedSeq, SeqSpan};
use anyhow::{Result, anyhow, bail, ensure};
use cudarc::driver::LaunchConfig;
use half::bf16;

/// Threads per attention block (`GE_PA_THREADS`, and `GE_PT_THREADS` of the tensor-core
/// kernels).
pub const THREADS: u32 = 128;
/// Positions per shared-memory tile of the attention kernel (`GE_PA_TILE`).
pub const TILE: usize = 128;
/// Query heads one attention block handles at most (`GE_PA_MAX_HEADS`).
pub const MAX_HEADS_PER_BLOCK: usize = 8;
// The tensor-core kernels hold a block's heads in rows 0..7 of an m16n8k16 tile.
const _: () = assert!(MAX_HEADS_PER_BLOCK <= 8);
/// Head dimensions the kernel is compiled for.
pub const HEAD_DIMS: &[usize] = &[64, 128];
/// Smallest partition: below this, splitting costs more than it gains.
pub const MIN_PARTITION: usize = 256;
/// Blocks per SM the planner aims for before it splits contexts.
pub const BLOCKS_PER_SM: usize = 4;
/// CUDA's limit on grid y and z.
const MAX_GRID_YZ: usize = 65535;

/// How one attention launch is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Work items: query rows (grid x).
    pub work_rows: usize,
    /// Query heads per block.
    pub heads_per_block: usize,
    /// Blocks per kv head (its group's heads in slices of `heads_per_block`).
    pub head_slices: usize,
    /// Context partitions (grid z); 1 means no combine.
    pub num_partitions: usize,
    /// Positions per partition (a multiple of [`TILE`]).
    pub partition_size: usize,
}

impl AttentionPlan {
    /// `(x, y, z)` of the attention kernel's grid.
    pub fn grid(&self, num_kv_heads: usize) -> (u32, u32, u32) {
        (
            self.work_rows as u32,
            (num_kv_heads * self.head_slices) as u32,
            self.num_partitions as u32,
        )
    }

    /// f32 elements of the partial outputs (`[work, heads, partitions, head_dim]`) and of each
    /// of the max / sum buffers (`[work, heads, partitions]`); zero when not split.
    pub fn scratch(&self, num_heads: usize, head_dim: usize) -> (usize, usize) {
        if self.num_partitions == 1 {
            return (0, 0);
        }
        let stats = self.work_rows * num_heads * self.num_partitions;
        (stats * head_dim, stats)
    }
}

/// Lays out attention over `work_rows` query rows whose longest visible context is
/// `max_visible`, on a device with `num_sms` multiprocessors. Without splitting there are
/// `work_rows * num_kv_heads * head_slices` blocks; when that is under [`BLOCKS_PER_SM`] per SM
/// and contexts are longer than [`MIN_PARTITION`], contexts are split into enough partitions
/// (each at least [`MIN_PARTITION`] long, a multiple of [`TILE`]) to reach that many blocks,
/// which also bounds the scratch to about that many blocks' outputs.
pub fn plan_attention(
    work_rows: usize,
    num_heads: usize,
    num_kv_heads: usize,
    max_visible: usize,
    num_sms: usize,
) -> Result<AttentionPlan> {
    ensure!(
        num_kv_heads > 0 && num_heads.is_multiple_of(num_kv_heads),
        "attention: {num_heads} heads are not a multiple of {num_kv_heads} kv heads"
    );
    let group = num_heads / num_kv_heads;
    let head_slices = group.div_ceil(MAX_HEADS_PER_BLOCK);
    // Even slices: a group of 10 is 5 + 5, not 8 + 2.
    let heads_per_block = group.div_ceil(head_slices);
    ensure!(
        num_kv_heads * head_slices <= MAX_GRID_YZ,
        "attention: {num_kv_heads} kv heads x {head_slices} slices is over the grid limit"
    );
    ensure!(
        work_rows <= i32::MAX as usize,
        "attention: {work_rows} query rows is over the grid limit"
    );
    let blocks = work_rows * num_kv_heads * head_slices;
    let target = BLOCKS_PER_SM * num_sms.max(1);
    let max_parts = max_visible.div_ceil(MIN_PARTITION).max(1);
    let wanted = if blocks == 0 {
        1
    } else {
        target.div_ceil(blocks)
    };
    let mut num_partitions = wanted.min(max_parts).clamp(1, MAX_GRID_YZ);
    let partition_size = if num_partitions == 1 {
        max_visible.max(1).next_multiple_of(TILE)
    } else {
        max_visible
            .div_ceil(num_partitions)
            .next_multiple_of(TILE)
            .max(MIN_PARTITION)
    };
    // Rounding the size up can leave the last partitions empty for every row.
    num_partitions = max_visible.max(1).div_ceil(partition_size);
    Ok(AttentionPlan {
        work_rows,
        heads_per_block,
        head_slices,
        num_partitions,
        partition_size,
    })
}

/// The combine kernel's maths for one (query row, head): partition `z` has normalised output
/// `out[z * head_dim..]`, running maximum `max[z]` and sum of exponentials `sum[z]`; the result
/// is `sum_z w_z o_z / sum_z w_z` with `w_z = sum[z] * exp(max[z] - max_z max[z])`.
pub fn combine_partitions(max: &[f32], sum: &[f32], out: &[f32], head_dim: usize) -> Vec<f32> {
    let mx = max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = max
        .iter()
        .zip(sum)
        .map(|(&m, &s)| s * (m - mx).exp())
        .collect();
    let inv = 1.0 / weights.iter().sum::<f32>();
    (0..head_dim)
        .map(|d| {
            weights
                .iter()
                .enumerate()
                .map(|(z, w)| w * out[z * head_dim + d])
                .sum::<f32>()
                * inv
        })
        .collect()
}

/// Splits block copies into batches that can each run as one parallel launch with the result
/// of running every copy in order: within a batch no block is written twice and no block
/// written is also read. Copies of a block onto itself are dropped.
pub fn copy_batches(copies: &[(u32, u32)]) -> Vec<Vec<(u32, u32)>> {
    use std::collections::HashSet;
    let mut batches: Vec<Vec<(u32, u32)>> = Vec::new();
    let (mut reads, mut writes) = (HashSet::new(), HashSet::new());
    for &(src, dst) in copies {
        if src == dst {
            continue;
        }
        let conflict = writes.contains(&src) || writes.contains(&dst) || reads.contains(&dst);
        if conflict || batches.is_empty() || batches.last().is_some_and(|b| b.len() >= MAX_GRID_YZ)
        {
            batches.push(Vec::new());
            reads.clear();
            writes.clear();
        }
        reads.insert(src);
        writes.insert(dst);
        batches.last_mut().expect("pushed above").push((src, dst));
    }
    batches
}

/// Packed sequence descriptors and work items of one attention call.
pub(super) struct Work {
    /// `(q row, sequence)` per work item, flattened.
    pub(super) items: Vec<u32>,
    /// `(q_start, q_len, context_len, base)` per sequence, flattened.
    pub(super) seqs: Vec<u32>,
    /// Longest visible context of any work item (the plan's bound).
    pub(super) max_visible: usize,
    /// Whether every output row is written by some work item.
    pub(super) covers_all: bool,
}

/// Every KV slot below the pool's `pool_rows` rows, or [`NO_SLOT`] (a row not cached).
pub(super) fn check_slots(op: &str, slots: &[u32], pool_rows: usize) -> Result<()> {
    match slots
        .iter()
        .find(|&&s| s != NO_SLOT && s as usize >= pool_rows)
    {
        Some(s) => bail!("{op}: slot {s} outside the pool ({pool_rows} rows)"),
        None => Ok(()),
    }
}

fn u32_of(v: usize, op: &str, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow!("{op}: {what} = {v} does not fit the kernels' u32"))
}

/// Work items of sequences given as `(q_start, q_len, context_len, base)`.
fn build_work(op: &str, rows: usize, seqs: &[(usize, usize, usize, usize)]) -> Result<Work> {
    let mut items = Vec::new();
    let mut packed = Vec::with_capacity(seqs.len() * 4);
    let mut covered = vec![false; rows];
    let mut max_visible = 0;
    for (i, &(q_start, q_len, context_len, base)) in seqs.iter().enumerate() {
        for f in [q_start, q_len, context_len, base] {
            packed.push(u32_of(f, op, "sequence field")?);
        }
        for (r, c) in covered.iter_mut().enumerate().skip(q_start).take(q_len) {
            items.push(u32_of(r, op, "row")?);
            items.push(u32_of(i, op, "sequence index")?);
            *c = true;
        }
        if q_len > 0 {
            max_visible = max_visible.max(context_len);
        }
    }
    Ok(Work {
        items,
        seqs: packed,
        max_visible,
        covers_all: covered.iter().all(|&c| c),
    })
}

/// The work items, sequence descriptors and block tables of a paged attention call over `rows`
/// query rows. Each sequence's table holds the blocks its context uses; with `fixed_width`
/// (a decode step captured in a CUDA graph) every table is padded with block 0 to that many
/// entries, so that the tables' layout and the attention plan are the same for every step
/// replayed from the graph, whatever the contexts.
pub(super) fn paged_work(
    rows: usize,
    seqs: &[PagedSeq<'_>],
    block_size: usize,
    pool_blocks: usize,
    fixed_width: Option<usize>,
) -> Result<(Work, Vec<u32>)> {
    const OP: &str = "paged_attention";
    let mut tables = Vec::new();
    let mut descs = Vec::with_capacity(seqs.len());
    for s in seqs {
        ensure!(
            s.q_start + s.q_len <= rows,
            "{OP}: queries {}..{} past the batch ({rows} rows)",
            s.q_start,
            s.q_start + s.q_len
        );
        ensure!(
            s.q_len <= s.context_len,
            "{OP}: {} queries but a context of {}",
            s.q_len,
            s.context_len
        );
        ensure!(
            s.block_table.len() * block_size >= s.context_len,
            "{OP}: block table covers {} of {} tokens",
            s.block_table.len() * block_size,
            s.context_len
        );
        let used = &s.block_table[..s.context_len.div_ceil(block_size)];
        if let Some(&b) = used.iter().find(|&&b| b as usize >= pool_blocks) {
            bail!("{OP}: block id {b} outside the pool ({pool_blocks} blocks)");
        }
        descs.push((s.q_start, s.q_len, s.context_len, tables.len()));
        tables.extend_from_slice(used);
        if let Some(width) = fixed_width {
            ensure!(
                used.len() <= width,
                "{OP}: a context of {} blocks is over the step's table width {width}",
                used.len()
            );
            tables.resize(tables.len() + width - used.len(), 0);
        }
    }
    let mut work = build_work(OP, rows, &descs)?;
    if let Some(width) = fixed_width {
        // The plan (partitions, grid) follows the widest table the layout allows.
        work.max_visible = width * block_size;
    }
    Ok((work, tables))
}

impl CudaBackend {
    /// The device's SM count (queried once, when the backend was made).
    pub(super) fn num_sms(&self) -> usize {
        self.sm_count
    }

    pub(super) fn attn_kv_pool(
        &self,
        num_blocks: usize,
        block_size: usize,
        width: usize,
    ) -> Result<CudaTensor> {
        let rows = num_blocks
            .checked_mul(block_size)
            .filter(|r| r.checked_mul(width).is_some())
            .ok_or_else(|| anyhow!("kv_pool: {num_blocks} x {block_size} x {width} overflows"))?;
        let s = self.gpu.alloc_zeros::<bf16>(rows * width)?;
        CudaTensor::new(DeviceData::Bf16(s), vec![rows, width])
    }

    pub(super) fn attn_write_kv(
        &self,
        k_pool: &mut CudaTensor,
        v_pool: &mut CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        slots: &[u32],
    ) -> Result<()> {
        let (n, w) = k.matrix();
        let (pool_rows, pw) = k_pool.matrix();
        ensure!(
            v.matrix() == (n, w) && v_pool.matrix() == (pool_rows, pw) && pw == w,
            "write_kv: shapes k {:?} v {:?} pools {:?} {:?}",
            k.shape,
            v.shape,
            k_pool.shape,
            v_pool.shape
        );
        ensure!(
            slots.len() == n,
            "write_kv: {n} rows but {} slots",
            slots.len()
        );
        check_slots("write_kv", slots, pool_rows)?;
        let (ks, vs) = (k.bf16("write_kv (k)")?, v.bf16("write_kv (v)")?);
        if n == 0 || w == 0 {
            return Ok(());
        }
        let slot_addr = self.gpu.upload_memo(keys::WRITE_KV_SLOTS, slots)?;
        let a = args::WriteKvArgs {
            k_pool: self.gpu.ptr_mut(k_pool.bf16_mut("write_kv (k pool)")?),
            v_pool: self.gpu.ptr_mut(v_pool.bf16_mut("write_kv (v pool)")?),
            k: self.gpu.ptr(ks),
            v: self.gpu.ptr(vs),
            slots: slot_addr,
            rows: i32::try_from(n).map_err(|_| anyhow!("write_kv: {n} rows"))?,
            width: i32::try_from(w).map_err(|_| anyhow!("write_kv: width {w}"))?,
        };
        // SAFETY: k, v are [n, w] bf16, the pools [pool_rows, w] bf16 with every slot below
        // pool_rows, slot_addr holds n u32s until a later upload under its key.
        unsafe {
            self.gpu.launch(
                "ge_write_kv_bf16",
                super::context::grid_stride_config(n * w),
                &a,
            )
        }
    }

    pub(super) fn attn_copy_blocks(
        &self,
        pool: &mut CudaTensor,
        copies: &[(u32, u32)],
        block_size: usize,
    ) -> Result<()> {
        let (rows, w) = pool.matrix();
        for &(src, dst) in copies {
            let (src, dst) = (src as usize, dst as usize);
            ensure!(
                (src + 1) * block_size <= rows && (dst + 1) * block_size <= rows,
                "copy_blocks: block {} outside the pool ({rows} rows of {block_size}-row blocks)",
                src.max(dst)
            );
        }
        let block_elems = block_size * w;
        let p = self.gpu.ptr_mut(pool.bf16_mut("copy_blocks")?);
        if block_elems == 0 {
            return Ok(());
        }
        let threads = 256usize;
        let per_block_vectors = if block_elems.is_multiple_of(8) {
            block_elems / 8
        } else {
            block_elems
        };
        let gx = per_block_vectors.div_ceil(threads).clamp(1, 1024) as u32;
        for batch in copy_batches(copies) {
            let flat: Vec<u32> = batch.iter().flat_map(|&(s, d)| [s, d]).collect();
            let pairs = self.gpu.upload_slice(&flat)?;
            let a = args::CopyBlocksArgs {
                pool: p,
                pairs: self.gpu.ptr(&pairs),
                block_elems: block_elems as i64,
                count: batch.len() as i32,
            };
            let cfg = LaunchConfig {
                grid_dim: (gx, batch.len() as u32, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every block id is inside the pool (checked above), the batch has no
            // read/write overlap between copies (copy_batches), `pairs` holds 2 * count u32s.
            unsafe { self.gpu.launch("ge_copy_blocks_bf16", cfg, &a) }?;
        }
        Ok(())
    }

    /// Launches attention (and the combine when split) for prepared work; `out` must be
    /// `[rows, num_heads * head_dim]` bf16.
    #[allow(clippy::too_many_arguments)]
    fn attn_launch(
        &self,
        op: &str,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: &mut CudaTensor,
        work: &Work,
        tables: &[u32],
        contiguous: bool,
        shape: AttentionShape,
        block_size: usize,
    ) -> Result<()> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = shape;
        let kernel = match (head_dim, self.paged_attention_tensor_cores()) {
            (64, true) => "ge_paged_attention_tc_d64",
            (128, true) => "ge_paged_attention_tc_d128",
            (64, false) => "ge_paged_attention_d64",
            (128, false) => "ge_paged_attention_d128",
            _ => bail!("{op}: head_dim {head_dim} is not supported on CUDA (have {HEAD_DIMS:?})"),
        };
        let work_rows = work.items.len() / 2;
        if work_rows == 0 {
            return Ok(());
        }
        let plan = plan_attention(
            work_rows,
            num_heads,
            num_kv_heads,
            work.max_visible,
            self.num_sms(),
        )?;
        let (po_len, stats_len) = plan.scratch(num_heads, head_dim);
        // Scratch only when split (the kernels read it only then): no allocations per layer
        // in an unsplit decode step or its captured graph.
        let scratch = |len: usize| -> Result<Option<cudarc::driver::CudaSlice<f32>>> {
            if plan.num_partitions > 1 {
                Ok(Some(self.gpu.alloc::<f32>(len)?))
            } else {
                Ok(None)
            }
        };
        let (part_out, part_max, part_sum) =
            (scratch(po_len)?, scratch(stats_len)?, scratch(stats_len)?);
        let addr =
            |b: &Option<cudarc::driver::CudaSlice<f32>>| b.as_ref().map_or(0, |b| self.gpu.ptr(b));
        let items = self.gpu.upload_memo(keys::ATTENTION_ITEMS, &work.items)?;
        let seqs = self.gpu.upload_memo(keys::ATTENTION_SEQS, &work.seqs)?;
        // An empty table still gets a valid address; the kernel reads none of it then.
        let table_buf = self.gpu.upload_memo(keys::ATTENTION_TABLES, tables)?;
        let out_ptr = self.gpu.ptr_mut(out.bf16_mut(op)?);
        let a = args::PagedAttentionArgs {
            q: self.gpu.ptr(q.bf16(op)?),
            k_pool: self.gpu.ptr(k.bf16(op)?),
            v_pool: self.gpu.ptr(v.bf16(op)?),
            out: out_ptr,
            part_out: addr(&part_out),
            part_max: addr(&part_max),
            part_sum: addr(&part_sum),
            work: items,
            seqs,
            block_tables: table_buf,
            work_rows: work_rows as i32,
            num_heads: num_heads as i32,
            num_kv_heads: num_kv_heads as i32,
            head_dim: head_dim as i32,
            block_size: block_size.max(1) as i32,
            partition_size: plan.partition_size as i32,
            num_partitions: plan.num_partitions as i32,
            heads_per_block: plan.heads_per_block as i32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            contiguous: contiguous as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: plan.grid(num_kv_heads),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller checked q/k/v/out shapes, every row and sequence field, that
        // every visible position maps to a K/V row inside k/v (block tables checked against
        // the pool, contiguous spans against the batch); the scratch buffers have the plan's
        // sizes; all buffers outlive the queued launches (frees are stream-ordered).
        unsafe { self.gpu.launch(kernel, cfg, &a) }?;
        if plan.num_partitions > 1 {
            let c = args::PagedCombineArgs {
                out: out_ptr,
                part_out: a.part_out,
                part_max: a.part_max,
                part_sum: a.part_sum,
                work: a.work,
                seqs: a.seqs,
                work_rows: a.work_rows,
                num_heads: a.num_heads,
                head_dim: a.head_dim,
                partition_size: a.partition_size,
                num_partitions: a.num_partitions,
            };
            let cfg = LaunchConfig {
                grid_dim: (work_rows as u32, num_heads as u32, 1),
                block_dim: (head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above; the attention kernel wrote every partition holding visible
            // positions of every (work item, head), which is all the combine reads.
            unsafe { self.gpu.launch("ge_paged_attention_combine", cfg, &c) }?;
        }
        Ok(())
    }

    /// Output of an attention call: poisoned (when asked) if every row is written, zeros
    /// otherwise (rows of no sequence are zero, as on the CPU).
    fn attn_output(&self, rows: usize, width: usize, covers_all: bool) -> Result<CudaTensor> {
        if covers_all {
            self.output(DType::Bf16, vec![rows, width])
        } else {
            let s = self.gpu.alloc_zeros::<bf16>(rows * width)?;
            CudaTensor::new(DeviceData::Bf16(s), vec![rows, width])
        }
    }

    fn check_heads(op: &str, shape: AttentionShape) -> Result<()> {
        ensure!(
            shape.num_kv_heads > 0 && shape.num_heads.is_multiple_of(shape.num_kv_heads),
            "{op}: {} heads are not a multiple of {} kv heads",
            shape.num_heads,
            shape.num_kv_heads
        );
        ensure!(
            HEAD_DIMS.contains(&shape.head_dim),
            "{op}: head_dim {} is not supported on CUDA (have {HEAD_DIMS:?})",
            shape.head_dim
        );
        Ok(())
    }

    pub(super) fn attn_paged(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        seqs: &[PagedSeq<'_>],
        shape: AttentionShape,
        block_size: usize,
    ) -> Result<CudaTensor> {
        const OP: &str = "paged_attention";
        let (n, qw) = q.matrix();
        let (pool_rows, kw) = k_pool.matrix();
        ensure!(
            qw == shape.num_heads * shape.head_dim,
            "{OP}: q width {qw}, want {} heads x {}",
            shape.num_heads,
            shape.head_dim
        );
        ensure!(
            kw == shape.num_kv_heads * shape.head_dim,
            "{OP}: pool width {kw}, want {} kv heads x {}",
            shape.num_kv_heads,
            shape.head_dim
        );
        ensure!(
            v_pool.matrix() == (pool_rows, kw),
            "{OP}: k/v pools differ: {:?} {:?}",
            k_pool.shape,
            v_pool.shape
        );
        ensure!(block_size > 0, "{OP}: block_size 0");
        Self::check_heads(OP, shape)?;
        let pool_blocks = pool_rows / block_size;
        let fixed_width = self.gpu.fixed_table_width();
        let (work, tables) = paged_work(n, seqs, block_size, pool_blocks, fixed_width)?;
        let mut out = self.attn_output(n, qw, work.covers_all)?;
        self.attn_launch(
            OP, q, k_pool, v_pool, &mut out, &work, &tables, false, shape, block_size,
        )?;
        Ok(out)
    }

    pub(super) fn attn_causal(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<CudaTensor> {
        const OP: &str = "causal_attention";
        let (n, qw) = q.matrix();
        ensure!(
            qw == shape.num_heads * shape.head_dim,
            "{OP}: q width {qw}, want {} heads x {}",
            shape.num_heads,
            shape.head_dim
        );
        ensure!(
            k.matrix() == (n, shape.num_kv_heads * shape.head_dim) && v.matrix() == k.matrix(),
            "{OP}: k/v shapes {:?} {:?}",
            k.shape,
            v.shape
        );
        Self::check_heads(OP, shape)?;
        if self.attn_fwd_tc_applies(seqs, n, shape) {
            return Ok(self.attn_causal_tc(q, k, v, seqs, shape, false)?.0);
        }
        let mut descs = Vec::with_capacity(seqs.len());
        for s in seqs {
            ensure!(
                s.start + s.len <= n,
                "{OP}: sequence {}..{} past the batch ({n} rows)",
                s.start,
                s.start + s.len
            );
            // Contiguous K/V: position p of the sequence is row start + p.
            descs.push((s.start, s.len, s.len, s.start));
        }
        let work = build_work(OP, n, &descs)?;
        let mut out = self.attn_output(n, qw, work.covers_all)?;
        self.attn_launch(OP, q, k, v, &mut out, &work, &[], true, shape, 1)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The value of `#define NAME VALUE` in `kernels/paged_attention.cu`.
    fn kernel_define(name: &str) -> String {
        include_str!("../../../kernels/paged_attention.cu")
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} in kernels/paged_attention.cu"))
            .trim()
            .to_string()
    }

    #[test]
    fn launch_constants_are_the_kernels() {
        // Both kernel families run THREADS threads per block with at most
        // MAX_HEADS_PER_BLOCK heads; the CUDA-core one walks tiles of TILE positions.
        assert_eq!(kernel_define("GE_PA_THREADS"), THREADS.to_string());
        assert_eq!(kernel_define("GE_PA_TILE"), TILE.to_string());
        assert_eq!(
            kernel_define("GE_PA_MAX_HEADS"),
            MAX_HEADS_PER_BLOCK.to_string()
        );
        let warps: u32 = kernel_define("GE_PT_WARPS").parse().unwrap();
        assert_eq!(warps * 32, THREADS);
    }

    #[test]
    fn decode_of_a_few_long_sequences_is_split_to_fill_the_chip() {
        // 4 sequences, 14 heads / 2 kv heads (group 7: one slice), 4096 tokens, 132 SMs:
        // 8 blocks unsplit; 528 wanted -> 66 parts, capped by 4096 / 256 = 16.
        let p = plan_attention(4, 14, 2, 4096, 132).unwrap();
        assert_eq!((p.head_slices, p.heads_per_block), (1, 7));
        assert_eq!(p.num_partitions, 16);
        assert_eq!(p.partition_size, 256);
        assert_eq!(p.grid(2), (4, 2, 16));
        assert_eq!(p.scratch(14, 64), (4 * 14 * 16 * 64, 4 * 14 * 16));
        // Every visible position is in some partition, and the last one is not empty.
        assert!(p.partition_size * p.num_partitions >= 4096);
        assert!(p.partition_size * (p.num_partitions - 1) < 4096);
    }

    #[test]
    fn big_batches_and_short_contexts_are_not_split() {
        // 300 x 2 blocks is over 4 per SM already.
        let p = plan_attention(300, 14, 2, 4096, 132).unwrap();
        assert_eq!(p.num_partitions, 1);
        assert_eq!(p.scratch(14, 64), (0, 0));
        let p = plan_attention(1, 9, 3, 200, 132).unwrap();
        assert_eq!((p.num_partitions, p.partition_size), (1, 256));
        assert_eq!(p.heads_per_block, 3);
        let p = plan_attention(1, 9, 3, 0, 132).unwrap();
        assert_eq!((p.num_partitions, p.partition_size), (1, TILE));
    }

    #[test]
    fn partitions_cover_the_context_exactly_for_many_sizes() {
        for visible in [1, 63, 64, 65, 257, 511, 513, 1000, 4097, 100_000] {
            for rows in [1, 3, 17, 600] {
                for (h, kvh) in [(8, 8), (14, 2), (32, 8), (40, 2), (64, 4)] {
                    let p = plan_attention(rows, h, kvh, visible, 132).unwrap();
                    assert!(p.partition_size.is_multiple_of(TILE));
                    assert!(p.heads_per_block <= MAX_HEADS_PER_BLOCK);
                    assert!(p.heads_per_block * p.head_slices >= h / kvh);
                    assert!(p.partition_size * p.num_partitions >= visible);
                    assert!(p.partition_size * (p.num_partitions - 1) < visible.max(1));
                    assert!(p.num_partitions <= MAX_GRID_YZ);
                    if p.num_partitions > 1 {
                        assert!(p.partition_size >= MIN_PARTITION);
                        // Scratch stays near the block target, not the context length.
                        let blocks = rows * kvh * p.head_slices * p.num_partitions;
                        assert!(blocks < 2 * BLOCKS_PER_SM * 132 + rows * kvh * p.head_slices);
                    }
                }
            }
        }
        // Groups over 8 heads are split into even slices.
        let p = plan_attention(1, 40, 2, 10, 132).unwrap();
        assert_eq!((p.head_slices, p.heads_per_block), (3, 7));
        assert!(plan_attention(1, 10, 3, 10, 132).is_err());
    }

    #[test]
    fn copy_batches_keep_the_sequential_result() {
        let cases: Vec<Vec<(u32, u32)>> = vec![
            vec![(0, 1), (2, 3), (4, 5)],
            vec![(0, 1), (1, 2)], // chain: 2 must get the new 1, i.e. old 0
            vec![(1, 2), (0, 1)], // 2 must get old 1
            vec![(0, 1), (2, 1), (3, 3), (1, 0)],
            vec![(5, 5)],
            vec![],
        ];
        for copies in cases {
            let mut seq: Vec<u32> = (0..8).map(|b| b * 10).collect();
            for &(s, d) in &copies {
                seq[d as usize] = seq[s as usize];
            }
            let mut par: Vec<u32> = (0..8).map(|b| b * 10).collect();
            for batch in copy_batches(&copies) {
                let before = par.clone();
                let (mut r, mut w) = (vec![], vec![]);
                for &(s, d) in &batch {
                    par[d as usize] = before[s as usize];
                    r.push(s);
                    w.push(d);
                }
                for d in &w {
                    assert_eq!(w.iter().filter(|x| *x == d).count(), 1, "{batch:?}");
                    assert!(!r.contains(d), "{batch:?}");
                }
            }
            assert_eq!(seq, par, "{copies:?}");
        }
    }

    /// The attention kernel's maths on the host: online softmax over tiles of one partition,
    /// giving (normalised output, running max, running sum) for one query head.
    fn emulate_partition(
        q: &[f32],
        keys: &[Vec<f32>],
        values: &[Vec<f32>],
        range: std::ops::Range<usize>,
        scale: f32,
    ) -> (Vec<f32>, f32, f32) {
        let d = q.len();
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![0f32; d];
        let mut t0 = range.start;
        while t0 < range.end {
            let t1 = (t0 + TILE).min(range.end);
            let s: Vec<f32> = (t0..t1)
                .map(|t| q.iter().zip(&keys[t]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let m_new = s.iter().copied().fold(m, f32::max);
            let p: Vec<f32> = s.iter().map(|x| (x - m_new).exp()).collect();
            let corr = (m - m_new).exp();
            l = l * corr + p.iter().sum::<f32>();
            m = m_new;
            for (c, a) in acc.iter_mut().enumerate() {
                *a = *a * corr + (t0..t1).map(|t| p[t - t0] * values[t][c]).sum::<f32>();
            }
            t0 = t1;
        }
        (acc.iter().map(|a| a / l).collect(), m, l)
    }

    #[test]
    fn split_k_combine_matches_single_pass_softmax() {
        let mut next = rng(11);
        for (visible, d, rows, qscale) in [
            (1, 64, 1, 1.0),
            (65, 64, 1, 3.0),
            (700, 128, 1, 1.0),
            (4097, 64, 2, 6.0),
            (3000, 128, 600, 1.0),
        ] {
            let plan = plan_attention(rows, 1, 1, visible, 132).unwrap();
            let keys: Vec<Vec<f32>> = (0..visible)
                .map(|_| (0..d).map(|_| next()).collect())
                .collect();
            let values: Vec<Vec<f32>> = (0..visible)
                .map(|_| (0..d).map(|_| next()).collect())
                .collect();
            let q: Vec<f32> = (0..d).map(|_| next() * qscale).collect();
            let scale = 1.0 / (d as f32).sqrt();
            // Only the partitions holding visible positions, as the combine kernel reads.
            let parts = visible
                .div_ceil(plan.partition_size)
                .min(plan.num_partitions);
            let (mut mx, mut sm, mut out) = (vec![], vec![], vec![]);
            for z in 0..parts {
                let r = z * plan.partition_size..((z + 1) * plan.partition_size).min(visible);
                let (o, m, l) = emulate_partition(&q, &keys, &values, r, scale);
                mx.push(m);
                sm.push(l);
                out.extend(o);
            }
            let got = combine_partitions(&mx, &sm, &out, d);
            // Single pass, f64.
            let s: Vec<f64> = keys
                .iter()
                .map(|k| {
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                })
                .map(|x| x * scale as f64)
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for c in 0..d {
                let want: f64 = (0..visible)
                    .map(|t| (s[t] - m).exp() / z * values[t][c] as f64)
                    .sum();
                assert!(
                    (got[c] as f64 - want).abs() < 2e-5,
                    "visible {visible} d {d} parts {parts} [{c}]: {} vs {want}",
                    got[c]
                );
            }
            if visible > 1000 && rows < 100 {
                assert!(parts > 1, "visible {visible}: the test must split");
            }
        }
    }

    #[test]
    fn work_items_list_each_query_row_and_coverage() {
        let w = build_work("t", 6, &[(0, 2, 5, 0), (3, 1, 9, 2)]).unwrap();
        assert_eq!(w.items, vec![0, 0, 1, 0, 3, 1]);
        assert_eq!(w.seqs, vec![0, 2, 5, 0, 3, 1, 9, 2]);
        assert_eq!(w.max_visible, 9);
        assert!(!w.covers_all);
        let w = build_work("t", 2, &[(0, 2, 2, 0)]).unwrap();
        assert!(w.covers_all);
    }
}
