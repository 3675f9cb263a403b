//! The CPU backend: f32, the reference every other backend is checked against. Matrix
//! products go through the `gemm` crate (vectorised, multi-threaded); the other ops are plain
//! loops parallelised over rows with rayon. One file per op family.

mod attention;
mod backward;
mod elementwise;
mod matmul;
mod packed;

pub use backward::LOGPROB_BACKWARD_CHUNK_ROWS;
pub use matmul::matmul_nt;
pub use packed::PackedMatrix;

use super::{AttentionShape, Backend, PagedSeq, SeqSpan};
use crate::engine::sampler::{RowSampling, SampledToken, sample_host_rows};
use crate::model::HostTensor;
use anyhow::{Result, anyhow, bail, ensure};
use rayon::prelude::*;

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

    fn element_bytes(&self) -> usize {
        4
    }

    fn download(&self, t: &HostTensor) -> Result<HostTensor> {
        Ok(t.clone())
    }

    fn sample_rows(&self, logits: &HostTensor, rows: &[RowSampling]) -> Result<Vec<SampledToken>> {
        let vocab = logits.shape.last().copied().unwrap_or(0);
        sample_host_rows(&logits.data, vocab, rows)
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
        elementwise::rope(&mut x.data, w, positions, head_dim, inv_freq, false);
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
            if slot == crate::backend::NO_SLOT {
                continue;
            }
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

    fn zeros(&self, shape: &[usize]) -> Result<HostTensor> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| anyhow!("zeros: shape {shape:?} overflows"))?;
        Ok(HostTensor::new(shape.to_vec(), vec![0f32; n]))
    }

    fn copy(&self, x: &HostTensor) -> Result<HostTensor> {
        Ok(x.clone())
    }

    fn fill_zero(&self, x: &mut HostTensor) -> Result<()> {
        x.data.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
        Ok(())
    }

    fn scale(&self, x: &mut HostTensor, s: f32) -> Result<()> {
        x.data
            .par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
        Ok(())
    }

    fn sum_squares(&self, x: &HostTensor) -> Result<f64> {
        // Chunk sums in parallel, added in chunk order: the same bits on every run (the
        // gradient norm decides clipping, and resumed runs must repeat exactly).
        let partial: Vec<f64> = x
            .data
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
            .collect();
        Ok(partial.iter().sum())
    }

    fn assign_tensor(&self, dst: &mut HostTensor, master: &HostTensor) -> Result<()> {
        ensure!(
            dst.shape == master.shape,
            "assign_tensor: shape {:?} from a master of {:?}",
            dst.shape,
            master.shape
        );
        dst.data.copy_from_slice(&master.data);
        Ok(())
    }

    fn assign_linear(&self, dst: &mut PackedMatrix, master: &HostTensor) -> Result<()> {
        *dst = self.upload_linear(master)?;
        Ok(())
    }

    fn adamw_update(
        &self,
        master: &mut HostTensor,
        m: &mut HostTensor,
        v: &mut HostTensor,
        grad: &HostTensor,
        step: &crate::backend::AdamWStep,
    ) -> Result<()> {
        let n = master.data.len();
        ensure!(
            m.data.len() == n && v.data.len() == n && grad.data.len() == n,
            "adamw_update: parameter of {n} elements, moments of {} and {}, gradient of {}",
            m.data.len(),
            v.data.len(),
            grad.data.len()
        );
        const CHUNK: usize = 1 << 16;
        master
            .data
            .par_chunks_mut(CHUNK)
            .zip(m.data.par_chunks_mut(CHUNK))
            .zip(v.data.par_chunks_mut(CHUNK))
            .zip(grad.data.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| crate::backend::adamw_update_host(p, m, v, g, step));
        Ok(())
    }

    fn concat_columns(&self, parts: &[&HostTensor]) -> Result<HostTensor> {
        ensure!(!parts.is_empty(), "concat_columns: no tensors");
        let n = as_matrix(parts[0]).0;
        let mut widths = Vec::with_capacity(parts.len());
        for p in parts {
            let (rows, w) = as_matrix(p);
            ensure!(
                rows == n,
                "concat_columns: {rows} rows vs {n} (shapes {:?} and {:?})",
                p.shape,
                parts[0].shape
            );
            widths.push(w);
        }
        let total: usize = widths.iter().sum();
        let mut out = vec![0f32; n * total];
        out.par_chunks_mut(total).enumerate().for_each(|(r, row)| {
            let mut at = 0;
            for (p, &w) in parts.iter().zip(&widths) {
                row[at..at + w].copy_from_slice(&p.data[r * w..(r + 1) * w]);
                at += w;
            }
        });
        Ok(HostTensor::new(vec![n, total], out))
    }

    fn scatter_add_rows(
        &self,
        dst: &mut HostTensor,
        rows: &[usize],
        src: &HostTensor,
    ) -> Result<()> {
        let (m, d) = as_matrix(dst);
        ensure!(
            as_matrix(src) == (rows.len(), d),
            "scatter_add_rows: src {:?} for {} rows of width {d}",
            src.shape,
            rows.len()
        );
        if let Some(&r) = rows.iter().find(|&&r| r >= m) {
            bail!("scatter_add_rows: row {r} of {m}");
        }
        backward::scatter_add_rows(&mut dst.data, d, rows.iter().copied(), &src.data);
        Ok(())
    }

    fn linear_backward_input(&self, dy: &HostTensor, w: &PackedMatrix) -> Result<HostTensor> {
        let (n, m) = as_matrix(dy);
        let (out, inp) = (w.out_features(), w.in_features());
        ensure!(
            m == out,
            "linear_backward_input: dy has {m} columns, weight has {out} rows"
        );
        let mut dx = vec![0f32; n * inp];
        w.matmul_transposed(&mut dx, &dy.data, n);
        Ok(HostTensor::new(vec![n, inp], dx))
    }

    fn accumulate_linear_grad(
        &self,
        grad: &mut HostTensor,
        x: &HostTensor,
        dy: &HostTensor,
    ) -> Result<()> {
        let (n, inp) = as_matrix(x);
        let (n2, out) = as_matrix(dy);
        ensure!(
            n == n2,
            "accumulate_linear_grad: x has {n} rows, dy has {n2}"
        );
        ensure!(
            grad.shape == [out, inp],
            "accumulate_linear_grad: grad {:?}, want [{out}, {inp}]",
            grad.shape
        );
        backward::accumulate_linear_grad(&mut grad.data, &x.data, &dy.data, n, out, inp);
        Ok(())
    }

    fn accumulate_bias_grad(&self, grad: &mut HostTensor, dy: &HostTensor) -> Result<()> {
        let (_, out) = as_matrix(dy);
        ensure!(
            grad.numel() == out,
            "accumulate_bias_grad: grad has {} entries, dy {out} columns",
            grad.numel()
        );
        backward::accumulate_bias_grad(&mut grad.data, &dy.data);
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        x: &HostTensor,
        weight: &HostTensor,
        eps: f32,
        dy: &HostTensor,
        weight_grad: &mut HostTensor,
    ) -> Result<HostTensor> {
        let (_, d) = as_matrix(x);
        ensure!(
            weight.numel() == d && weight_grad.numel() == d,
            "rms_norm_backward: weight {:?} / grad {:?} for rows of {d}",
            weight.shape,
            weight_grad.shape
        );
        ensure!(
            dy.shape == x.shape,
            "rms_norm_backward: dy {:?} vs x {:?}",
            dy.shape,
            x.shape
        );
        let dx = backward::rms_norm_backward(
            &x.data,
            &weight.data,
            eps,
            &dy.data,
            &mut weight_grad.data,
        );
        Ok(HostTensor::new(x.shape.clone(), dx))
    }

    fn rope_backward(
        &self,
        dx: &mut HostTensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        let (n, w) = as_matrix(dx);
        ensure!(
            n == positions.len(),
            "rope_backward: {n} rows but {} positions",
            positions.len()
        );
        ensure!(
            head_dim > 0 && w % head_dim == 0 && inv_freq.len() * 2 == head_dim,
            "rope_backward: bad head_dim"
        );
        elementwise::rope(&mut dx.data, w, positions, head_dim, inv_freq, true);
        Ok(())
    }

    fn swiglu_backward(&self, gate_up: &HostTensor, dy: &HostTensor) -> Result<HostTensor> {
        let (n, w) = as_matrix(gate_up);
        ensure!(
            w.is_multiple_of(2),
            "swiglu_backward: fused width {w} is odd"
        );
        ensure!(
            as_matrix(dy) == (n, w / 2),
            "swiglu_backward: dy {:?} for gate_up {:?}",
            dy.shape,
            gate_up.shape
        );
        Ok(HostTensor::new(
            gate_up.shape.clone(),
            backward::swiglu_backward(&gate_up.data, &dy.data, w / 2),
        ))
    }

    fn embedding_backward(
        &self,
        grad: &mut HostTensor,
        ids: &[u32],
        dy: &HostTensor,
    ) -> Result<()> {
        let (vocab, dim) = as_matrix(grad);
        ensure!(
            as_matrix(dy) == (ids.len(), dim),
            "embedding_backward: dy {:?} for {} ids of width {dim}",
            dy.shape,
            ids.len()
        );
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the vocabulary ({vocab} entries)");
        }
        backward::scatter_add_rows(
            &mut grad.data,
            dim,
            ids.iter().map(|&i| i as usize),
            &dy.data,
        );
        Ok(())
    }

    fn causal_attention_backward(
        &self,
        q: &HostTensor,
        k: &HostTensor,
        v: &HostTensor,
        dout: &HostTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(HostTensor, HostTensor, HostTensor)> {
        let (n, qw) = as_matrix(q);
        ensure!(
            shape.head_dim > 0 && shape.num_kv_heads > 0,
            "attention_backward: empty heads"
        );
        ensure!(
            qw == shape.num_heads * shape.head_dim,
            "attention_backward: q width {qw}"
        );
        let kw = shape.num_kv_heads * shape.head_dim;
        ensure!(
            as_matrix(k) == (n, kw) && as_matrix(v) == (n, kw),
            "attention_backward: k/v shapes {:?} {:?}",
            k.shape,
            v.shape
        );
        ensure!(
            dout.shape == q.shape,
            "attention_backward: dout {:?} vs q {:?}",
            dout.shape,
            q.shape
        );
        ensure!(
            shape.num_heads.is_multiple_of(shape.num_kv_heads),
            "attention_backward: heads not a multiple of kv heads"
        );
        for s in seqs {
            ensure!(
                s.start + s.len <= n,
                "attention_backward: sequence past the batch"
            );
        }
        let [dq, dk, dv] = backward::causal_attention_backward(
            &q.data, &k.data, &v.data, &dout.data, n, seqs, shape,
        );
        Ok((
            HostTensor::new(vec![n, qw], dq),
            HostTensor::new(vec![n, kw], dk),
            HostTensor::new(vec![n, kw], dv),
        ))
    }

    fn target_logprobs_backward(
        &self,
        hidden: &HostTensor,
        lm_head: &PackedMatrix,
        targets: &[u32],
        d_logprob: &[f32],
        // The reference computes each row's statistics itself
        // (`target_logprobs_with_lse` hands over none here).
        _lse: Option<&[f32]>,
        lm_head_grad: &mut HostTensor,
    ) -> Result<HostTensor> {
        let (n, d) = as_matrix(hidden);
        let (vocab, d2) = (lm_head.out_features(), lm_head.in_features());
        ensure!(
            d == d2,
            "target_logprobs_backward: hidden width {d}, lm_head width {d2}"
        );
        ensure!(
            n == targets.len() && n == d_logprob.len(),
            "target_logprobs_backward: {n} rows, {} targets, {} gradients",
            targets.len(),
            d_logprob.len()
        );
        ensure!(
            lm_head_grad.shape == [vocab, d],
            "target_logprobs_backward: lm_head_grad {:?}, want [{vocab}, {d}]",
            lm_head_grad.shape
        );
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("target id {t} is outside the vocabulary ({vocab} entries)");
        }
        let dh = backward::target_logprobs_backward(
            &hidden.data,
            lm_head,
            targets,
            d_logprob,
            &mut lm_head_grad.data,
        );
        Ok(HostTensor::new(vec![n, d], dh))
    }
}
