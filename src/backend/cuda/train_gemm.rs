//! The GEMM-shaped training ops of the CUDA backend: the input and weight gradients of
//! [`Backend::linear`], the bias gradient, `sum_squares` (gradient norms) and the fused LM
//! head + log-softmax + gather, forward and backward ([`Backend::target_logprobs`],
//! [`Backend::target_logprobs_backward`]). The
//! [`Backend`] impl in `backend.rs` delegates here.
//!
//! Precision: activations, weights and returned input gradients are bf16; parameter gradients
//! are f32 tensors (`zeros_f32`) that cuBLASLt accumulates into with `beta = 1` (bf16
//! operands, f32 compute). The row-major products as column-major cuBLASLt GEMMs
//! ([`GeneralGemm`]; a row-major `[r, c]` buffer is the column-major `[c, r]` matrix):
//!
//! - `dx[n, in] = dy[n, out] @ W[out, in]`: `D[in, n] = A[in, out] B[out, n]` with `A` = W's
//!   buffer, `B` = dy's, no transposes;
//! - `grad[out, in] += dy^T @ x`: `D[in, out] = A[in, n] op(B)` with `A` = x's buffer and
//!   `B` = dy's buffer (column-major `[out, n]`) transposed; `D` f32, `beta = 1`.
//!
//! The fused log-prob forward ([`Backend::target_logprobs`]) runs per chunk of rows: `logits =
//! h @ W^T` (bf16), then one pass of `ge_target_logprobs_bf16[_v8]` (online max and sum of
//! exponentials) writes each row's log-prob; the results stay on the device until the last
//! chunk. With several chunks that pass runs on a second stream, ordered by events, so that
//! it (memory-bound) overlaps the next chunk's GEMM (compute-bound); two chunks' logits are
//! alive at most (`GENIUS_CUDA_LOGPROB_OVERLAP=0`: all on the main stream). The backward
//! runs per chunk of rows too: the same GEMM, `ge_target_logprobs_backward_bf16[_v8]` turns
//! the logits in place into `dlogits = g (onehot - softmax)` (one read-write pass over each
//! row when the forward handed over each row's log-sum-exp,
//! [`Backend::target_logprobs_with_lse`]; else an online max/sum pass first), then
//! `d_hidden = dlogits @ W` and `lm_head_grad += dlogits^T @ h`. Row offsets into
//! `hidden` and `d_hidden` are used in place when they are 256-byte aligned (cuBLASLt's
//! heuristic assumes that alignment), else the chunk is copied.
//!
//! [`Backend`]: crate::backend::Backend
//! [`Backend::linear`]: crate::backend::Backend::linear
//! [`Backend::target_logprobs`]: crate::backend::Backend::target_logprobs
//! [`Backend::target_logprobs_backward`]: crate::backend::Backend::target_logprobs_backward
//! [`Backend::target_logprobs_with_lse`]: crate::backend::Backend::target_logprobs_with_lse

use super::args;
use super::backend::{CudaBackend, TARGET_LOGPROB_CHUNK_BYTES, int};
use super::gemm::GeneralGemm;
use super::tensor::{CudaLinear, CudaTensor, DType};
use crate::backend::Backend;
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use std::sync::atomic::Ordering;

/// Environment variable forcing the rows per chunk of the log-prob ops (tests; unset or 0:
/// sized by [`TARGET_LOGPROB_CHUNK_BYTES`]).
pub const LOGPROB_CHUNK_ROWS_ENV: &str = "GENIUS_CUDA_LOGPROB_CHUNK_ROWS";

/// `$GENIUS_CUDA_LOGPROB_CHUNK_ROWS`, read once when the backend is created (0 when unset).
pub(super) fn logprob_chunk_rows_from_env() -> Result<usize> {
    match std::env::var(LOGPROB_CHUNK_ROWS_ENV) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{LOGPROB_CHUNK_ROWS_ENV}={v:?} is not a row count")),
        _ => Ok(0),
    }
}

/// Rows per log-prob chunk for `vocab` outputs by default: at most
/// [`TARGET_LOGPROB_CHUNK_BYTES`] of bf16 logits, rounded down to a multiple of 128 rows when
/// that many fit (so that every chunk's row offset is 256-byte aligned for any width).
pub fn default_logprob_chunk_rows(vocab: usize) -> usize {
    let rows = (TARGET_LOGPROB_CHUNK_BYTES / (2 * vocab.max(1))).max(1);
    if rows >= 128 { rows / 128 * 128 } else { rows }
}

/// Threads per block of the sum-of-squares kernels, and the most blocks (partials).
const SUM_SQUARES_THREADS: usize = 256;
const SUM_SQUARES_MAX_BLOCKS: usize = 1024;

/// Whether a device address suits cuBLASLt's default (256-byte) alignment assumption.
fn aligned(addr: u64) -> bool {
    addr.is_multiple_of(256)
}

impl CudaBackend {
    /// Forces the rows per chunk of [`Backend::target_logprobs`] and
    /// [`Backend::target_logprobs_backward`] (0: back to the default, at most 256 MiB of bf16
    /// logits at once). For tests, so that small inputs run several chunks.
    pub fn set_logprob_chunk_rows(&self, rows: usize) {
        self.logprob_chunk_rows.store(rows, Ordering::Relaxed);
    }

    /// Rows per chunk of the log-prob ops for `vocab` outputs.
    pub(super) fn logprob_chunk_rows(&self, vocab: usize) -> usize {
        match self.logprob_chunk_rows.load(Ordering::Relaxed) {
            0 => default_logprob_chunk_rows(vocab),
            r => r,
        }
    }

    /// One cuBLASLt GEMM ([`GeneralGemm`]) under the handle's lock, profiled as `name`.
    ///
    /// # Safety
    /// As [`super::gemm::Gemm::run_general`]: the addresses hold live buffers of the shapes
    /// `s` states.
    unsafe fn general_gemm(
        &self,
        op: &str,
        name: &'static str,
        s: GeneralGemm,
        (a, b, d): (u64, u64, u64),
        beta: f32,
    ) -> Result<()> {
        let mut gemm = self
            .gemm
            .lock()
            .map_err(|_| anyhow!("{op}: the cuBLASLt handle's lock is poisoned"))?;
        self.gpu.ctx.bind_to_thread()?;
        let tune = self.tune_gemms && !self.gpu.capturing();
        if tune && !gemm.general_tuned(&s) {
            // Time the candidates alone: nothing may run beside them on the second stream.
            self.gpu.sync_aux()?;
        }
        let timing = self.gpu.profile_start()?;
        // SAFETY: the caller vouches for the buffers; no graph is being captured when tuning.
        let done = unsafe { gemm.run_general(s, a, b, d, beta, tune) };
        self.gpu.profile_end(timing, name)?;
        done.map_err(|e| anyhow!("{op}: {e:#}"))?;
        if self.gpu.sync_after_launch {
            self.gpu.sync(&format!("the cuBLASLt GEMM of {op}"))?;
        }
        Ok(())
    }

    /// `dx[rows, inp] = dy[rows, out] @ W[out, inp]` (bf16, written in full; `out > 0`).
    ///
    /// # Safety
    /// `dy`, `w` and `dx` hold live bf16 buffers of those shapes, `dx` apart from the others.
    unsafe fn input_grad_gemm(
        &self,
        op: &str,
        (dy, w, dx): (u64, u64, u64),
        rows: usize,
        out: usize,
        inp: usize,
    ) -> Result<()> {
        let s = GeneralGemm {
            m: inp,
            n: rows,
            k: out,
            transa: false,
            transb: false,
            out_f32: false,
        };
        // SAFETY: A = W's buffer (column-major [inp, out]), B = dy's ([out, rows]), D = dx's
        // ([inp, rows]): the caller's shapes.
        unsafe { self.general_gemm(op, "gemm backward input", s, (w, dy, dx), 0.0) }
    }

    /// `grad[out, inp] += dy[rows, out]^T @ x[rows, inp]` (`grad` f32).
    ///
    /// # Safety
    /// `x` and `dy` hold live bf16 buffers and `grad` a live f32 buffer of those shapes.
    unsafe fn weight_grad_gemm(
        &self,
        op: &str,
        (x, dy, grad): (u64, u64, u64),
        rows: usize,
        out: usize,
        inp: usize,
    ) -> Result<()> {
        let s = GeneralGemm {
            m: inp,
            n: out,
            k: rows,
            transa: false,
            transb: true,
            out_f32: true,
        };
        // SAFETY: A = x's buffer (column-major [inp, rows]), B = dy's ([out, rows], taken
        // transposed), D = grad's ([inp, out], f32): the caller's shapes.
        unsafe { self.general_gemm(op, "gemm backward weight", s, (x, dy, grad), 1.0) }
    }

    /// Copies `bytes` bytes between device addresses on the stream.
    fn copy_bytes(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.gpu.ctx.bind_to_thread()?;
        // SAFETY: callers pass addresses inside live buffers with `bytes` bytes after them,
        // not overlapping; the copy is ordered on the backend's stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.gpu.stream.cu_stream())
        }
        .context("cuMemcpyDtoDAsync")
    }

    pub(crate) fn train_linear_backward_input(
        &self,
        dy: &CudaTensor,
        w: &CudaLinear,
    ) -> Result<CudaTensor> {
        let op = "linear_backward_input";
        let (n, m) = dy.matrix();
        let (out, inp) = (w.out_features, w.in_features);
        ensure!(m == out, "{op}: dy has {m} columns, weight has {out} rows");
        let dys = self.gpu.ptr(dy.bf16(op)?);
        let mut dx = self.output(DType::Bf16, vec![n, inp])?;
        if n == 0 || inp == 0 {
            return Ok(dx);
        }
        if out == 0 {
            self.fill_zero(&mut dx)?;
            return Ok(dx);
        }
        let dxp = self.addr_mut(&mut dx);
        let wp = self.gpu.ptr(&w.weight);
        // SAFETY: dy is [n, out], w [out, inp], dx [n, inp], all bf16 and live until the
        // stream has run the GEMM (frees are stream-ordered).
        unsafe { self.input_grad_gemm(op, (dys, wp, dxp), n, out, inp) }?;
        Ok(dx)
    }

    pub(crate) fn train_accumulate_linear_grad(
        &self,
        grad: &mut CudaTensor,
        x: &CudaTensor,
        dy: &CudaTensor,
    ) -> Result<()> {
        let op = "accumulate_linear_grad";
        let (n, inp) = x.matrix();
        let (n2, out) = dy.matrix();
        ensure!(n == n2, "{op}: x has {n} rows, dy has {n2}");
        ensure!(
            grad.shape == [out, inp],
            "{op}: grad is {:?}, want [{out}, {inp}]",
            grad.shape
        );
        ensure!(
            grad.dtype() == DType::F32,
            "{op}: gradients are f32 tensors (zeros_f32), got a {} one",
            grad.dtype().name()
        );
        let xs = self.gpu.ptr(x.bf16(op)?);
        let dys = self.gpu.ptr(dy.bf16(op)?);
        if n == 0 || out == 0 || inp == 0 {
            return Ok(());
        }
        let gp = self.addr_mut(grad);
        // SAFETY: x is [n, inp] and dy [n, out] bf16, grad [out, inp] f32, all live until the
        // stream has run the GEMM.
        unsafe { self.weight_grad_gemm(op, (xs, dys, gp), n, out, inp) }
    }

    pub(crate) fn train_accumulate_bias_grad(
        &self,
        grad: &mut CudaTensor,
        dy: &CudaTensor,
    ) -> Result<()> {
        let op = "accumulate_bias_grad";
        let (n, out) = dy.matrix();
        ensure!(
            grad.numel() == out,
            "{op}: grad has {} entries, dy has {out} columns",
            grad.numel()
        );
        ensure!(
            grad.dtype() == DType::F32,
            "{op}: gradients are f32 tensors (zeros_f32), got a {} one",
            grad.dtype().name()
        );
        let dys = self.gpu.ptr(dy.bf16(op)?);
        if n == 0 || out == 0 {
            return Ok(());
        }
        let (grid, row_group, groups) = super::train_elementwise::column_sum_grid(n, out);
        let mut partial = self.gpu.alloc::<f32>(groups * out)?;
        let a = args::BiasGradArgs {
            dy: dys,
            partial: self.gpu.ptr_mut(&mut partial),
            rows: int(n, op, "rows")?,
            cols: int(out, op, "columns")?,
            row_group: int(row_group, op, "rows per group")?,
            pad_: 0,
        };
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: super::train_elementwise::COLUMN_SUM_BLOCK,
            shared_mem_bytes: 0,
        };
        // SAFETY: dy is [n, out] bf16 (a whole allocation: 256-byte aligned, as the 16-byte
        // loads need when out % 8 == 0); partial holds groups x out f32s, each group's row
        // written by its threads.
        unsafe { self.gpu.launch("ge_bias_grad_bf16", cfg, &a) }?;
        self.add_column_partials(op, &partial, groups, grad)
    }

    pub(crate) fn train_sum_squares(&self, x: &CudaTensor) -> Result<f64> {
        self.train_sum_squares_many(&[x])
    }

    /// [`crate::backend::Backend::sum_squares_many`]: one partial-sum launch per tensor into
    /// one buffer, one copy back, then each tensor's partials added in order and the tensors'
    /// sums in order (as one `sum_squares` per tensor would, bit for bit).
    pub(crate) fn train_sum_squares_many(&self, xs: &[&CudaTensor]) -> Result<f64> {
        // The grid depends on n only, so the partials (and their ordered sum) are the same on
        // every run and device.
        let blocks_of = |n: usize| {
            n.div_ceil(SUM_SQUARES_THREADS * 8)
                .clamp(1, SUM_SQUARES_MAX_BLOCKS)
        };
        let counts: Vec<usize> = xs
            .iter()
            .map(|x| {
                if x.numel() == 0 {
                    0
                } else {
                    blocks_of(x.numel())
                }
            })
            .collect();
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Ok(0.0);
        }
        let mut partials = self.gpu.alloc::<f64>(total)?;
        let base = self.gpu.ptr_mut(&mut partials);
        let mut at = 0;
        for (x, &blocks) in xs.iter().zip(&counts) {
            if blocks == 0 {
                continue;
            }
            let a = args::SumSquaresArgs {
                x: self.addr(x),
                partials: base + (at * std::mem::size_of::<f64>()) as u64,
                n: x.numel() as i64,
            };
            let kernel = match x.dtype() {
                DType::Bf16 => "ge_sum_squares_bf16",
                DType::F32 => "ge_sum_squares_f32",
            };
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (SUM_SQUARES_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x holds n elements of the kernel's type; its `blocks` partials lie at
            // `at..at + blocks` of the `total` f64s, one per block of the grid.
            unsafe { self.gpu.launch(kernel, cfg, &a) }?;
            at += blocks;
        }
        let sums = self.gpu.download_slice(&partials, total)?;
        let mut total_sum = 0.0;
        let mut at = 0;
        for &blocks in &counts {
            total_sum += sums[at..at + blocks].iter().sum::<f64>();
            at += blocks;
        }
        Ok(total_sum)
    }

    /// The bf16 logits `h @ W^T` of rows `start..start + m` of the hidden states at `hs`
    /// (`[n, d]` bf16), for a fused log-prob op's chunk. The chunk's hidden rows are used in
    /// place when aligned, else copied.
    ///
    /// # Safety
    /// `hs` holds a live bf16 `[n, d]` buffer with `start + m <= n`, and `w_p` the live bf16
    /// `[vocab, d]` LM head.
    #[allow(clippy::too_many_arguments)]
    unsafe fn chunk_logits(
        &self,
        op: &str,
        name: &'static str,
        (hs, w_p): (u64, u64),
        start: usize,
        m: usize,
        d: usize,
        vocab: usize,
    ) -> Result<ChunkLogits> {
        let row_bytes = d * 2;
        let h_at = hs + (start * row_bytes) as u64;
        let h_copy = if aligned(h_at) {
            None
        } else {
            let mut c = self.output(DType::Bf16, vec![m, d])?;
            let cp = self.addr_mut(&mut c);
            self.copy_bytes(cp, h_at, m * row_bytes)?;
            Some((c, cp))
        };
        let h_p = h_copy.as_ref().map_or(h_at, |(_, p)| *p);
        let mut logits = self.output(DType::Bf16, vec![m, vocab])?;
        let lp = self.addr_mut(&mut logits);
        let s = GeneralGemm {
            m: vocab,
            n: m,
            k: d,
            transa: true,
            transb: false,
            out_f32: false,
        };
        // SAFETY: A = W's buffer (column-major [d, vocab], transposed), B = h's rows
        // (column-major [d, m]), D = logits (column-major [vocab, m]); all live (the caller
        // vouches for hs and w_p).
        unsafe { self.general_gemm(op, name, s, (w_p, h_p, lp), 0.0) }?;
        Ok(ChunkLogits {
            _logits: logits,
            lp,
            h_p,
            _h_copy: h_copy.map(|(c, _)| c),
            start,
            rows: m,
        })
    }

    /// The threads per block and the kernel (`base` or its 16-byte `_v8` form) of a row-wise
    /// log-prob kernel over `vocab` logits. Rows start 16-byte aligned when `vocab % 8 == 0`
    /// (every chunk's logits are a fresh 256-byte aligned buffer).
    fn logprob_kernel(vocab: usize, base: &'static str, v8: &'static str) -> (u32, &'static str) {
        (
            if vocab >= 16384 { 1024 } else { 256 },
            if vocab.is_multiple_of(8) { v8 } else { base },
        )
    }

    /// Checks the log-prob kernels' per-row status words (0 ok, 1 a NaN / +inf logit, 2 every
    /// logit -inf, 3 a log-sum-exp from the forward that is not finite, 4 a target outside the
    /// vocabulary).
    fn check_logprob_status(op: &str, status: &[i32], targets: &[u32], vocab: usize) -> Result<()> {
        for (row, &st) in status.iter().enumerate() {
            match st {
                0 => {}
                1 => bail!("{op}: row {row} has a NaN or +inf logit"),
                2 => bail!("{op}: row {row}: every logit is -inf"),
                3 => bail!(
                    "{op}: row {row}: the forward's log-sum-exp handed to the backward is not finite"
                ),
                4 => bail!(
                    "{op}: row {row}: target {} is outside the vocabulary of {vocab}",
                    targets[row]
                ),
                s => bail!("{op}: row {row}: unknown kernel status {s}"),
            }
        }
        Ok(())
    }

    /// [`Backend::target_logprobs`] on the GPU: per chunk of rows, the LM-head GEMM into bf16
    /// logits and one pass of `ge_target_logprobs_bf16[_v8]` over them; the log-probs and
    /// status words stay on the device until the last chunk, so the chunks run back to back.
    /// With `want_lse`, also each row's log-sum-exp (for the backward's one-pass form).
    pub(crate) fn train_target_logprobs(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaLinear,
        targets: &[u32],
        want_lse: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let op = "target_logprobs";
        let (n, d) = hidden.matrix();
        ensure!(
            targets.len() == n,
            "{op}: {n} rows but {} targets",
            targets.len()
        );
        let (vocab, d2) = (lm_head.out_features, lm_head.in_features);
        ensure!(d == d2, "{op}: hidden width {d}, lm_head width {d2}");
        ensure!(vocab > 0, "{op}: the LM head has no outputs");
        if let Some((row, &t)) = targets
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            bail!("{op}: row {row}: target {t} is outside the vocabulary of {vocab}");
        }
        let hs = self.gpu.ptr(hidden.bf16(op)?);
        if n == 0 {
            return Ok((Vec::new(), want_lse.then(Vec::new)));
        }
        let vocab_i32 = int(vocab, op, "vocabulary")?;
        int(n, op, "rows")?;
        let chunk = self.logprob_chunk_rows(vocab);
        let t_dev = self.gpu.upload_slice(targets)?;
        let mut out = self.gpu.alloc::<f32>(n)?;
        let mut status = self.gpu.alloc::<i32>(n)?;
        let mut lse = if want_lse {
            Some(self.gpu.alloc::<f32>(n)?)
        } else {
            None
        };
        let t_base = self.gpu.ptr(&t_dev);
        let (out_base, status_base) = (self.gpu.ptr_mut(&mut out), self.gpu.ptr_mut(&mut status));
        let lse_base = lse.as_mut().map_or(0, |l| self.gpu.ptr_mut(l));
        let w_p = self.gpu.ptr(&lm_head.weight);
        let (threads, kernel) = Self::logprob_kernel(
            vocab,
            "ge_target_logprobs_bf16",
            "ge_target_logprobs_bf16_v8",
        );
        // With several chunks, each chunk's softmax pass runs on the second stream while the
        // main stream computes the next chunk's logits (memory-bound beside compute-bound);
        // at most two chunks' logits are alive at once.
        let mut in_flight = self.logprob_in_flight(n, chunk)?;
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            if in_flight.chunks.len() >= 2 {
                in_flight.retire_oldest()?;
            }
            // SAFETY: hidden is bf16 [n, d] and start + m <= n; the LM head is [vocab, d].
            let c =
                unsafe { self.chunk_logits(op, "gemm lm_head", (hs, w_p), start, m, d, vocab) }?;
            let a = args::TargetLogprobArgs {
                logits: c.lp,
                targets: t_base + (start * 4) as u64,
                out: out_base + (start * 4) as u64,
                status: status_base + (start * 4) as u64,
                lse: if lse_base == 0 {
                    0
                } else {
                    lse_base + (start * 4) as u64
                },
                rows: m as i32,
                vocab: vocab_i32,
            };
            let cfg = LaunchConfig {
                grid_dim: (m as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: logits is bf16 [m, vocab] (rows 16-byte aligned for the _v8 kernel:
            // logprob_kernel); targets, out, status (and lse when set) hold rows
            // start..start + m of their n entries; one block per row writes its row's out,
            // status and lse. Run on the main
            // stream, the chunk comes back and is freed here.
            drop(unsafe { self.launch_logprob_pass(&mut in_flight, c, kernel, cfg, &a) }?);
        }
        while !in_flight.chunks.is_empty() {
            in_flight.retire_oldest()?;
        }
        drop(in_flight);
        let lp = self.gpu.download_slice(&out, n)?;
        let status = self.gpu.download_slice(&status, n)?;
        Self::check_logprob_status(op, &status, targets, vocab)?;
        let lse = lse.map(|l| self.gpu.download_slice(&l, n)).transpose()?;
        Ok((lp, lse))
    }

    pub(crate) fn train_target_logprobs_backward(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaLinear,
        targets: &[u32],
        d_logprob: &[f32],
        lse: Option<&[f32]>,
        lm_head_grad: &mut CudaTensor,
    ) -> Result<CudaTensor> {
        let op = "target_logprobs_backward";
        let (n, d) = hidden.matrix();
        let (vocab, d2) = (lm_head.out_features, lm_head.in_features);
        ensure!(d == d2, "{op}: hidden width {d}, lm_head width {d2}");
        ensure!(
            n == targets.len() && n == d_logprob.len(),
            "{op}: {n} rows, {} targets, {} gradients",
            targets.len(),
            d_logprob.len()
        );
        if let Some(lse) = lse {
            ensure!(
                lse.len() == n,
                "{op}: {n} rows but {} log-sum-exps from the forward",
                lse.len()
            );
        }
        ensure!(
            lm_head_grad.shape == [vocab, d],
            "{op}: lm_head_grad {:?}, want [{vocab}, {d}]",
            lm_head_grad.shape
        );
        ensure!(
            lm_head_grad.dtype() == DType::F32,
            "{op}: gradients are f32 tensors (zeros_f32), got a {} lm_head_grad",
            lm_head_grad.dtype().name()
        );
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("target id {t} is outside the vocabulary ({vocab} entries)");
        }
        let hs = self.gpu.ptr(hidden.bf16(op)?);
        let mut d_hidden = self.output(DType::Bf16, vec![n, d])?;
        if n == 0 || d == 0 {
            return Ok(d_hidden);
        }
        ensure!(vocab > 0, "{op}: the LM head has no outputs");
        let vocab_i32 = int(vocab, op, "vocabulary")?;
        int(n, op, "rows")?;
        let chunk = self.logprob_chunk_rows(vocab);
        let t_dev = self.gpu.upload_slice(targets)?;
        let g_dev = self.gpu.upload_slice(d_logprob)?;
        let lse_dev = lse.map(|l| self.gpu.upload_slice(l)).transpose()?;
        let lse_base = lse_dev.as_ref().map_or(0, |l| self.gpu.ptr(l));
        let mut status = self.gpu.alloc::<i32>(n)?;
        let (t_base, g_base) = (self.gpu.ptr(&t_dev), self.gpu.ptr(&g_dev));
        let status_base = self.gpu.ptr_mut(&mut status);
        let dh_base = self.addr_mut(&mut d_hidden);
        let grad_p = self.addr_mut(lm_head_grad);
        let w_p = self.gpu.ptr(&lm_head.weight);
        let row_bytes = d * 2;
        let (threads, kernel) = Self::logprob_kernel(
            vocab,
            "ge_target_logprobs_backward_bf16",
            "ge_target_logprobs_backward_bf16_v8",
        );
        // The two gradient GEMMs of a chunk after its softmax-gradient pass: d_hidden rows =
        // dlogits @ W (in place when aligned, else through a copy), lm_head_grad += dlogits^T @ h.
        let gradient_gemms = |c: &ChunkLogits| -> Result<()> {
            let (lp, h_p, start, m) = (c.lp, c.h_p, c.start, c.rows);
            // SAFETY: h's rows are bf16 [m, d], dlogits bf16 [m, vocab], the grad f32
            // [vocab, d]; all live.
            unsafe { self.weight_grad_gemm(op, (h_p, lp, grad_p), m, vocab, d) }?;
            let dh_at = dh_base + (start * row_bytes) as u64;
            if aligned(dh_at) {
                // SAFETY: dlogits is bf16 [m, vocab], W [vocab, d], d_hidden's rows
                // start..start + m are [m, d]; all live.
                unsafe { self.input_grad_gemm(op, (lp, w_p, dh_at), m, vocab, d) }?;
            } else {
                let mut copy = self.output(DType::Bf16, vec![m, d])?;
                let cp = self.addr_mut(&mut copy);
                // SAFETY: as above, into the [m, d] copy.
                unsafe { self.input_grad_gemm(op, (lp, w_p, cp), m, vocab, d) }?;
                self.copy_bytes(dh_at, cp, m * row_bytes)?;
            }
            Ok(())
        };
        // With several chunks, a chunk's softmax-gradient pass runs on the second stream while
        // the main stream computes the next chunk's logits; the main stream then waits for it
        // and runs its two GEMMs. Two chunks' logits are alive at most.
        let mut in_flight = self.logprob_in_flight(n, chunk)?;
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            // logits = h @ W^T, bf16 [m, vocab], turned into dlogits in place.
            // SAFETY: hidden is bf16 [n, d] and start + m <= n; the LM head is [vocab, d].
            let c = unsafe {
                self.chunk_logits(op, "gemm lm_head backward", (hs, w_p), start, m, d, vocab)
            }?;
            let a = args::LogprobBackwardArgs {
                logits: c.lp,
                targets: t_base + (start * 4) as u64,
                d_logprob: g_base + (start * 4) as u64,
                status: status_base + (start * 4) as u64,
                lse: if lse_base == 0 {
                    0
                } else {
                    lse_base + (start * 4) as u64
                },
                rows: m as i32,
                vocab: vocab_i32,
            };
            let cfg = LaunchConfig {
                grid_dim: (m as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: logits is bf16 [m, vocab] (rows 16-byte aligned for the _v8 kernel:
            // logprob_kernel); targets, d_logprob, status (and lse when set) hold rows
            // start..start + m of their n entries.
            match unsafe { self.launch_logprob_pass(&mut in_flight, c, kernel, cfg, &a) }? {
                // Ran on the main stream: its GEMMs follow at once.
                Some(c) => gradient_gemms(&c)?,
                // Queued on the second stream: the previous chunk's pass ran beside this
                // chunk's logits GEMM; its GEMMs now.
                None => {
                    while in_flight.chunks.len() > 1 {
                        let prev = in_flight.retire_oldest_keep()?;
                        gradient_gemms(&prev)?;
                    }
                }
            }
        }
        while !in_flight.chunks.is_empty() {
            let last = in_flight.retire_oldest_keep()?;
            gradient_gemms(&last)?;
        }
        drop(in_flight);
        let status = self.gpu.download_slice(&status, n)?;
        Self::check_logprob_status(op, &status, targets, vocab)?;
        Ok(d_hidden)
    }

    /// The chunks in flight of a fused log-prob op over `n` rows in chunks of `chunk`: with
    /// the second stream when there are several chunks and the overlap is on (not while
    /// profiling, waiting after each launch or capturing a graph), else without (every pass
    /// then runs on the main stream).
    fn logprob_in_flight(&self, n: usize, chunk: usize) -> Result<InFlight<'_>> {
        let aux = if self.logprob_overlap
            && n > chunk
            && self.gpu.profile.is_none()
            && !self.gpu.sync_after_launch
            && !self.gpu.capturing()
        {
            Some(self.gpu.aux_stream()?.clone())
        } else {
            None
        };
        Ok(InFlight {
            stream: &self.gpu.stream,
            aux,
            chunks: std::collections::VecDeque::new(),
        })
    }

    /// Launches a chunk's row-wise pass `kernel` over its logits. With a second stream in
    /// `in_flight`, the pass runs there after the main stream's work so far (its logits GEMM),
    /// and the chunk joins `in_flight` with the event recorded after the pass: `None`. Without,
    /// it runs on the main stream and the chunk is handed back.
    ///
    /// # Safety
    /// As [`GpuContext::launch`](super::context::GpuContext::launch) for `a`, whose buffers are
    /// the chunk's or outlive `in_flight` (freed on the main stream only after it waits for
    /// the pass, or after `in_flight`'s `Drop` waits for the second stream).
    unsafe fn launch_logprob_pass<A: DeviceRepr>(
        &self,
        in_flight: &mut InFlight<'_>,
        c: ChunkLogits,
        kernel: &str,
        cfg: LaunchConfig,
        a: &A,
    ) -> Result<Option<ChunkLogits>> {
        let Some(aux) = in_flight.aux.clone() else {
            // SAFETY: forwarded from the caller.
            unsafe { self.gpu.launch(kernel, cfg, a) }?;
            return Ok(Some(c));
        };
        let logits_ready = self.gpu.record_on(&self.gpu.stream)?;
        aux.wait(&logits_ready)
            .context("ordering a log-prob chunk after its logits")?;
        // Queued before the launch, so that an error from here on leaves it to `Drop`.
        in_flight.chunks.push_back((c, None));
        // SAFETY: forwarded from the caller; ordered after the logits GEMM by the event.
        unsafe { self.gpu.launch_on(&aux, kernel, cfg, a) }?;
        let done = self.gpu.record_on(&aux)?;
        if let Some(last) = in_flight.chunks.back_mut() {
            last.1 = Some(done);
        }
        Ok(None)
    }
}

/// Chunks whose softmax pass was queued on the second stream, oldest first, each with the
/// event recorded after it (`None` until recorded). A chunk's buffers are freed (on the main
/// stream) only after the main stream waits for its event. When that cannot be done (an
/// error between the launch and the event, a failed wait, or an early return), `Drop` waits
/// on the host for the whole second stream first, so nothing it may still read is freed.
struct InFlight<'a> {
    stream: &'a cudarc::driver::CudaStream,
    aux: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
    chunks: std::collections::VecDeque<(ChunkLogits, Option<cudarc::driver::CudaEvent>)>,
}

impl InFlight<'_> {
    /// Orders the main stream after the oldest chunk's pass and frees its buffers.
    fn retire_oldest(&mut self) -> Result<()> {
        if !self.chunks.is_empty() {
            drop(self.retire_oldest_keep()?);
        }
        Ok(())
    }

    /// Orders the main stream after the oldest chunk's pass and hands the chunk over (its
    /// buffers may then be used and freed on the main stream). Called with a chunk queued.
    fn retire_oldest_keep(&mut self) -> Result<ChunkLogits> {
        let waited = match self.chunks.front() {
            None => bail!("internal: no log-prob chunk in flight"),
            Some((_, Some(done))) => self.stream.wait(done).map_err(anyhow::Error::from),
            Some((_, None)) => Err(anyhow!("a log-prob chunk was queued without its event")),
        };
        // On failure the chunk stays queued, for `Drop`.
        waited.context("waiting for a log-prob chunk")?;
        let (chunk, _) = self
            .chunks
            .pop_front()
            .ok_or_else(|| anyhow!("internal: no log-prob chunk in flight"))?;
        Ok(chunk)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        // Early exit with chunks queued: the host waits for the second stream, after which
        // freeing their buffers (and the caller's) on the main stream is safe.
        if let Some(aux) = &self.aux
            && aux.synchronize().is_err()
        {
            // The device is in error; leak rather than free what it may still read.
            for (chunk, _) in self.chunks.drain(..) {
                std::mem::forget(chunk);
            }
        }
        self.chunks.clear();
    }
}

/// One chunk's logits of the fused log-prob ops ([`CudaBackend::chunk_logits`]): the buffers
/// are held until the chunk's kernels are queued.
struct ChunkLogits {
    /// bf16 `[m, vocab]`, at `lp`.
    _logits: CudaTensor,
    lp: u64,
    /// The chunk's hidden rows: in `hidden` itself, or in `_h_copy`.
    h_p: u64,
    _h_copy: Option<CudaTensor>,
    /// The chunk's first row and its row count.
    start: usize,
    rows: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chunks_are_bounded_and_row_aligned() {
        for vocab in [1, 7, 1000, 32000, 49152, 128256, 151936] {
            let rows = default_logprob_chunk_rows(vocab);
            assert!(rows >= 1);
            assert!(rows * vocab * 2 <= TARGET_LOGPROB_CHUNK_BYTES || rows == 1);
            if rows >= 128 {
                assert_eq!(rows % 128, 0, "vocab {vocab}: {rows} rows");
            }
        }
        assert_eq!(default_logprob_chunk_rows(151936), 768);
    }
}
