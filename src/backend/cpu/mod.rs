//! The CPU backend: f32, the reference every other backend is checked against. Matrix
//! products go through the `gemm` crate (vectorised, multi-threaded); the other ops are plain
//! loops parallelised over rows with rayon. One file per op family.

mod attention;
mod elementwise;
mod matmul;
mod packed;

pub use matmul::matmul_nt;
pub use packed::PackedMatrix;

use super::{AttentionShape, Backend, PagedSeq, SeqSpan};
use crate::model::HostTensor;
use anyhow::{Result, bail, ensure};

/// The CPU backend. Threads come from rayon's global pool (`RAYON_NUM_THREADS`).
#[derive(Debug, Default, Clone)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}

/// Rows and columns of a tensor seen as a matrix (leading dims flattened).
fn as_matrix(t: &HostTensor) -> (usize, usize) {
    let cols = t.shape.last().copied().unwrap_or(1);
    let rows = t.numel().checked_div(cols).unwrap_or(0);
    (rows, cols)
}

impl Backend for CpuBackend {
    type Tensor = HostTensor;
    type Linear = PackedMatrix;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn upload(&self, t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }

    fn shape<'a>(&self, t: &'a HostTensor) -> &'a [usize] {
        &t.shape
    }

    fn upload_linear(&self, w: &HostTensor) -> Result<PackedMatrix> {
        ensure!(
            w.shape.len() == 2,
            "linear weight must be 2-D [out, in], got shape {:?}",
            w.shape
        );
        Ok(PackedMatrix::pack(&w.data, w.shape[0], w.shape[1]))
    }

    fn download_linear(&self, w: &PackedMatrix) -> Result<HostTensor> {
        Ok(HostTensor::new(
            vec![w.out_features(), w.in_features()],
            w.unpack(),
        ))
    }

    fn linear_shape(&self, w: &PackedMatrix) -> [usize; 2] {
        [w.out_features(), w.in_features()]
    }

    fn embedding(&self, table: &HostTensor, ids: &[u32]) -> Result<HostTensor> {
        let (vocab, dim) = as_matrix(table);
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            let id = id as usize;
            if id >= vocab {
                bail!("token id {id} is outside the vocabulary ({vocab} entries)");
            }
            out.extend_from_slice(&table.data[id * dim..(id + 1) * dim]);
        }
        Ok(HostTensor::new(vec![ids.len(), dim], out))
    }

    fn rms_norm(&self, x: &HostTensor, weight: &HostTensor, eps: f32) -> Result<HostTensor> {
        let (_, d) = as_matrix(x);
        ensure!(
            weight.numel() == d,
            "rms_norm: weight has {} entries, x rows {d}",
            weight.numel()
        );
        Ok(elementwise::rms_norm(x, &weight.data, eps))
    }

    fn linear(
        &self,
        x: &HostTensor,
        weight: &PackedMatrix,
        bias: Option<&HostTensor>,
    ) -> Result<HostTensor> {
        let (n, k) = as_matrix(x);
        let (m, k2) = (weight.out_features(), weight.in_features());
        ensure!(k == k2, "linear: x has {k} columns, weight has {k2}");
        let mut out = vec![0f32; n * m];
        weight.matmul(&mut out, &x.data, n);
        if let Some(b) = bias {
            ensure!(
                b.numel() == m,
                "linear: bias has {} entries, want {m}",
                b.numel()
            );
            for row in out.chunks_exact_mut(m) {
                for (o, bb) in row.iter_mut().zip(&b.data) {
                    *o += bb;
                }
            }
        }
        Ok(HostTensor::new(vec![n, m], out))
    }

    fn rope(
        &self,
        x: &mut HostTensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        let (n, w) = as_matrix(x);
        ensure!(
            n == positions.len(),
            "rope: {n} rows but {} positions",
            positions.len()
        );
        ensure!(
            w % head_dim == 0 && inv_freq.len() * 2 == head_dim,
            "rope: bad head_dim"
        );
        elementwise::rope(&mut x.data, w, positions, head_dim, inv_freq);
        Ok(())
    }

    fn causal_attention(
        &self,
        q: &HostTensor,
        k: &HostTensor,
        v: &HostTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<HostTensor> {
        let (n, qw) = as_matrix(q);
        ensure!(
            qw == shape.num_heads * shape.head_dim,
            "attention: q width {qw}"
        );
        ensure!(
            as_matrix(k) == (n, shape.num_kv_heads * shape.head_dim)
                && as_matrix(v) == as_matrix(k),
            "attention: k/v shapes {:?} {:?}",
            k.shape,
            v.shape
        );
        ensure!(
            shape.num_heads.is_multiple_of(shape.num_kv_heads),
            "attention: heads not a multiple of kv heads"
        );
        for s in seqs {
            ensure!(s.start + s.len <= n, "attention: sequence past the batch");
        }
        let out = attention::causal_attention(&q.data, &k.data, &v.data, n, seqs, shape);
        Ok(HostTensor::new(vec![n, qw], out))
    }

    fn kv_pool(&self, num_blocks: usize, block_size: usize, width: usize) -> Result<HostTensor> {
        let rows = num_blocks
            .checked_mul(block_size)
            .filter(|r| r.checked_mul(width).is_some())
            .ok_or_else(|| {
                anyhow::anyhow!("kv_pool: {num_blocks} x {block_size} x {width} overflows")
            })?;
        Ok(HostTensor::new(vec![rows, width], vec![0f32; rows * width]))
    }

    fn write_kv(
        &self,
        k_pool: &mut HostTensor,
        v_pool: &mut HostTensor,
        k: &HostTensor,
        v: &HostTensor,
        slots: &[u32],
    ) -> Result<()> {
        let (n, w) = as_matrix(k);
        let (pool_rows, pw) = as_matrix(k_pool);
        ensure!(
            as_matrix(v) == (n, w) && as_matrix(v_pool) == (pool_rows, pw) && pw == w,
            "write_kv: shapes"
        );
        ensure!(
            slots.len() == n,
            "write_kv: {n} rows but {} slots",
            slots.len()
        );
        for (i, &slot) in slots.iter().enumerate() {
            let slot = slot as usize;
            ensure!(
                slot < pool_rows,
                "write_kv: slot {slot} outside the pool ({pool_rows} rows)"
            );
            k_pool.data[slot * w..(slot + 1) * w].copy_from_slice(&k.data[i * w..(i + 1) * w]);
            v_pool.data[slot * w..(slot + 1) * w].copy_from_slice(&v.data[i * w..(i + 1) * w]);
        }
        Ok(())
    }

    fn copy_blocks(
        &self,
        pool: &mut HostTensor,
        copies: &[(u32, u32)],
        block_size: usize,
    ) -> Result<()> {
        let (rows, w) = as_matrix(pool);
        let block = block_size * w;
        for &(src, dst) in copies {
            let (src, dst) = (src as usize, dst as usize);
            ensure!(
                (src + 1) * block_size <= rows && (dst + 1) * block_size <= rows,
                "copy_blocks: block outside the pool"
            );
            pool.data
                .copy_within(src * block..(src + 1) * block, dst * block);
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &HostTensor,
        k_pool: &HostTensor,
        v_pool: &HostTensor,
        seqs: &[PagedSeq<'_>],
        shape: AttentionShape,
        block_size: usize,
    ) -> Result<HostTensor> {
        let (n, qw) = as_matrix(q);
        let (pool_rows, kw) = as_matrix(k_pool);
        ensure!(
            qw == shape.num_heads * shape.head_dim,
            "paged_attention: q width {qw}"
        );
        ensure!(
            kw == shape.num_kv_heads * shape.head_dim,
            "paged_attention: pool width {kw}"
        );
        ensure!(
            as_matrix(v_pool) == (pool_rows, kw),
            "paged_attention: k/v pools differ"
        );
        ensure!(
            shape.num_heads.is_multiple_of(shape.num_kv_heads),
            "paged_attention: heads"
        );
        let pool_blocks = pool_rows / block_size.max(1);
        for s in seqs {
            ensure!(
                s.q_start + s.q_len <= n,
                "paged_attention: queries past the batch"
            );
            ensure!(
                s.q_len <= s.context_len,
                "paged_attention: more queries than context"
            );
            ensure!(
                s.block_table.len() * block_size >= s.context_len,
                "paged_attention: block table covers {} of {} tokens",
                s.block_table.len() * block_size,
                s.context_len
            );
            ensure!(
                s.block_table.iter().all(|&b| (b as usize) < pool_blocks),
                "paged_attention: block id outside the pool"
            );
        }
        let out = attention::paged_attention(
            &q.data,
            n,
            &k_pool.data,
            &v_pool.data,
            seqs,
            shape,
            block_size,
        );
        Ok(HostTensor::new(vec![n, qw], out))
    }

    fn swiglu(&self, gate_up: &HostTensor) -> Result<HostTensor> {
        let (n, w) = as_matrix(gate_up);
        ensure!(w.is_multiple_of(2), "swiglu: fused width {w} is odd");
        Ok(HostTensor::new(
            vec![n, w / 2],
            elementwise::swiglu(&gate_up.data, w / 2),
        ))
    }

    fn split_columns(&self, x: &HostTensor, widths: &[usize]) -> Result<Vec<HostTensor>> {
        let (n, w) = as_matrix(x);
        ensure!(
            widths.iter().sum::<usize>() == w,
            "split_columns: widths {widths:?} vs {w}"
        );
        let mut outs: Vec<Vec<f32>> = widths.iter().map(|&c| Vec::with_capacity(n * c)).collect();
        for row in x.data.chunks_exact(w) {
            let mut at = 0;
            for (o, &c) in outs.iter_mut().zip(widths) {
                o.extend_from_slice(&row[at..at + c]);
                at += c;
            }
        }
        Ok(outs
            .into_iter()
            .zip(widths)
            .map(|(d, &c)| HostTensor::new(vec![n, c], d))
            .collect())
    }

    fn add_assign(&self, x: &mut HostTensor, y: &HostTensor) -> Result<()> {
        ensure!(
            x.shape == y.shape,
            "add: shapes {:?} and {:?} differ",
            x.shape,
            y.shape
        );
        elementwise::add_assign(&mut x.data, &y.data);
        Ok(())
    }

    fn gather_rows(&self, x: &HostTensor, rows: &[usize]) -> Result<HostTensor> {
        let (n, d) = as_matrix(x);
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            ensure!(r < n, "gather_rows: row {r} of {n}");
            out.extend_from_slice(&x.data[r * d..(r + 1) * d]);
        }
        Ok(HostTensor::new(vec![rows.len(), d], out))
    }

    fn target_logprobs(
        &self,
        hidden: &HostTensor,
        lm_head: &PackedMatrix,
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        let (n, d) = as_matrix(hidden);
        let (vocab, d2) = (lm_head.out_features(), lm_head.in_features());
        ensure!(
            d == d2,
            "target_logprobs: hidden width {d}, lm_head width {d2}"
        );
        ensure!(
            n == targets.len(),
            "target_logprobs: {n} rows but {} targets",
            targets.len()
        );
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("target id {t} is outside the vocabulary ({vocab} entries)");
        }
        Ok(elementwise::target_logprobs(&hidden.data, lm_head, targets))
    }
}
