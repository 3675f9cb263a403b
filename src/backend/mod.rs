//! The device boundary. [`Backend`] is every operation the transformer needs, on tensors that
//! live wherever the backend keeps them; `transformer/`, `engine/` and `genius/` are written
//! once against it. [`cpu`] is the f32 reference every other backend is checked against;
//! [`cuda`] is the CUDA backend (bf16 on the GPU; every op, see [`cuda::ON_CUDA`]). A few
//! trait methods have defaults that a backend may replace with something faster giving the
//! same results: the fused layer ops, `decode_step` (CUDA graphs on the GPU),
//! `sum_squares_many`, and the attention forward/backward pair that hands over the softmax
//! statistics.

pub mod cpu;
pub mod cuda;

use crate::engine::sampler::{RowSampling, SampledToken, sample_host_rows};
use crate::genius::loss::{LossConfig, PairLogps, PairLoss};
use crate::model::HostTensor;
use crate::transformer::{KvCache, PagedBatch, Weights};
use anyhow::Result;

/// One sequence inside a packed batch: rows `start..start + len` of the token-major tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    pub start: usize,
    pub len: usize,
}

/// Shapes of an attention call: `q` is `[tokens, num_heads * head_dim]`, `k` and `v` are
/// `[tokens, num_kv_heads * head_dim]`; query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence in a paged attention call. Its new queries are rows `q_start..q_start + q_len`
/// of `q`; after this step's K/V writes the cache holds `context_len` tokens of it, the new ones
/// last, at the slots its `block_table` gives (position `p` is in block `block_table[p /
/// block_size]`, row `p % block_size`).
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    pub q_start: usize,
    pub q_len: usize,
    pub context_len: usize,
    pub block_table: &'a [u32],
}

/// A KV slot meaning "do not cache this row": the rows a backend adds to pad a decode step to a
/// fixed batch size (see [`Backend::decode_step`]) compute like the others but write no K/V.
/// `GE_NO_SLOT` in `kernels/common.cuh` is the same value.
pub const NO_SLOT: u32 = u32::MAX;

/// What a backend's decode path did so far ([`Backend::decode_graph_stats`]): on the CUDA
/// backend, decode steps captured into CUDA graphs and replayed from them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeGraphStats {
    /// Graphs captured (and instantiated).
    pub captures: u64,
    /// Decode steps replayed from a graph.
    pub replays: u64,
    /// Steps run eagerly: not plain decode steps, larger than the largest bucket, or graphs
    /// off.
    pub eager_steps: u64,
    /// Padding rows computed and dropped over all replays.
    pub padding_rows: u64,
    /// Captures that failed (each step then ran eagerly).
    pub failed_captures: u64,
    /// Why the last failed capture failed.
    pub last_failure: Option<String>,
    /// Why graphs are off, if they are.
    pub off: Option<String>,
}

impl DecodeGraphStats {
    /// What happened between `earlier` (a reading of the same backend) and this reading; the
    /// failure reason and the off state are this reading's.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            captures: self.captures.saturating_sub(earlier.captures),
            replays: self.replays.saturating_sub(earlier.replays),
            eager_steps: self.eager_steps.saturating_sub(earlier.eager_steps),
            padding_rows: self.padding_rows.saturating_sub(earlier.padding_rows),
            failed_captures: self.failed_captures.saturating_sub(earlier.failed_captures),
            last_failure: self.last_failure.clone(),
            off: self.off.clone(),
        }
    }

    /// One line for a run's log: "12 replayed steps, 3 eager, 2 captured, 0 failed captures".
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{} replayed steps, {} eager, {} captured, {} failed captures",
            self.replays, self.eager_steps, self.captures, self.failed_captures
        );
        if self.failed_captures > 0
            && let Some(why) = &self.last_failure
        {
            line.push_str(&format!(" (last: {why})"));
        }
        if let Some(why) = &self.off {
            line.push_str(&format!("; off: {why}"));
        }
        line
    }
}

/// A decode step as the transformer runs it: the forward pass over a paged batch, then one
/// token sampled per row (see [`Backend::decode_step`]).
pub type DecodeRun<'a, T> =
    dyn FnMut(&PagedBatch, &[RowSampling], &mut KvCache<T>) -> Result<Vec<SampledToken>> + 'a;

/// The operations of a LLaMA/Qwen2 forward pass. Tensors are row-major with the token as the
/// leading dimension; a linear weight is `[out, in]` (HF layout).
pub trait Backend: Send + Sync {
    /// A tensor on this backend's device.
    type Tensor: Send + Sync;
    /// A linear layer's weight (logically `[out, in]`, HF layout), stored in whatever layout
    /// this backend multiplies fastest (the CPU packs it into panels once, at upload).
    type Linear: Send + Sync;

    /// Human-readable device name ("cpu (2 threads)").
    fn name(&self) -> String;

    /// Bytes per element of this backend's weights, activations and KV cache (f32 on the
    /// CPU, bf16 on the GPU).
    fn element_bytes(&self) -> usize;

    /// Device memory `(free, total)` in bytes, where the backend has its own memory.
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    /// Discards the timing statistics collected so far, where the backend keeps any
    /// (`GENIUS_CUDA_PROFILE`): benchmarks call it after their warm-up.
    fn reset_profile(&self) {}

    /// Returns memory the backend's allocator keeps cached for reuse to the device, so that
    /// [`Backend::memory_info`] counts it free (before training after sampling). A no-op
    /// where there is no such cache.
    fn release_cached_memory(&self) -> Result<()> {
        Ok(())
    }

    fn upload(&self, t: &HostTensor) -> Result<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    fn shape<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];

    /// Uploads a `[out, in]` weight for [`Backend::linear`].
    fn upload_linear(&self, w: &HostTensor) -> Result<Self::Linear>;
    /// The `[out, in]` weight back in HF layout.
    fn download_linear(&self, w: &Self::Linear) -> Result<HostTensor>;
    /// `[out, in]` of a linear weight.
    fn linear_shape(&self, w: &Self::Linear) -> [usize; 2];

    /// Rows of `table` (`[vocab, dim]`) for each id: `[ids.len(), dim]`.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;

    /// `x / rms(x) * weight` over the last dimension.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;

    /// `x @ weight^T + bias`: `[n, in] x [out, in] -> [n, out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Linear,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// Rotary embedding in place (HF rotate-half layout): `x` is `[tokens, heads * head_dim]`,
    /// token `t` is at `positions[t]`, `inv_freq` has `head_dim / 2` entries.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()>;

    /// Causal self-attention within each sequence of a packed batch (GQA), scaled by
    /// `1/sqrt(head_dim)`. Returns `[tokens, num_heads * head_dim]`.
    fn causal_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<Self::Tensor>;

    /// A paged KV cache pool of one layer: `[num_blocks * block_size, width]`, zero-filled.
    fn kv_pool(&self, num_blocks: usize, block_size: usize, width: usize) -> Result<Self::Tensor>;

    /// Writes row `i` of `k` and `v` (`[n, width]`) into row `slots[i]` of the pools; a row
    /// whose slot is [`NO_SLOT`] is not written (padding rows of a fixed-size step).
    fn write_kv(
        &self,
        k_pool: &mut Self::Tensor,
        v_pool: &mut Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        slots: &[u32],
    ) -> Result<()>;

    /// Copies whole blocks `(src, dst)` within a pool (copy-on-write of shared blocks).
    fn copy_blocks(
        &self,
        pool: &mut Self::Tensor,
        copies: &[(u32, u32)],
        block_size: usize,
    ) -> Result<()>;

    /// The paged layer prologue: splits `qkv` (`[n, q_width + 2 kv_width]`, q then k then v)
    /// into q, k and v, applies RoPE to q and k at `positions`, writes k and v into the pools
    /// at `slots`, and returns the rotated q (`[n, q_width]`). The default is exactly that
    /// sequence of ops ([`qkv_rope_write_kv_composed`]); a backend may fuse it.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_write_kv(
        &self,
        qkv: &Self::Tensor,
        q_width: usize,
        kv_width: usize,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
        k_pool: &mut Self::Tensor,
        v_pool: &mut Self::Tensor,
        slots: &[u32],
    ) -> Result<Self::Tensor> {
        qkv_rope_write_kv_composed(
            self, qkv, q_width, kv_width, positions, head_dim, inv_freq, k_pool, v_pool, slots,
        )
    }

    /// Causal attention of each sequence's new queries over its cached K/V (GQA, scaled by
    /// `1/sqrt(head_dim)`): query `i` of a sequence sits at position
    /// `context_len - q_len + i` and sees positions up to its own. Returns
    /// `[q rows, num_heads * head_dim]`.
    fn paged_attention(
        &self,
        q: &Self::Tensor,
        k_pool: &Self::Tensor,
        v_pool: &Self::Tensor,
        seqs: &[PagedSeq<'_>],
        shape: AttentionShape,
        block_size: usize,
    ) -> Result<Self::Tensor>;

    /// SwiGLU on a fused `[n, 2 * i]` gate/up projection: `silu(x[:, ..i]) * x[:, i..]`,
    /// giving `[n, i]`.
    fn swiglu(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;

    /// Splits a `[n, sum(widths)]` tensor into `[n, widths[j]]` tensors, left to right.
    fn split_columns(&self, x: &Self::Tensor, widths: &[usize]) -> Result<Vec<Self::Tensor>>;

    /// `x += y`, elementwise.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// The residual add fused with the next norm: `x += y`, then `rms_norm(x, weight, eps)`.
    /// The default is exactly those two ops ([`add_rms_norm_composed`]).
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        add_rms_norm_composed(self, x, y, weight, eps)
    }

    /// Selected rows of a `[n, d]` tensor.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;

    /// Fused LM head + log-softmax + gather: for each row `r` of `hidden` (`[n, d]`), the
    /// log-probability of `targets[r]` under `softmax(hidden[r] @ lm_head^T)`, computed in
    /// chunks of rows so that `n x vocab` logits are never held at once.
    fn target_logprobs(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Linear,
        targets: &[u32],
    ) -> Result<Vec<f32>>;

    /// [`Backend::target_logprobs`], and, where the backend's backward can use it, each row's
    /// log-sum-exp of its logits for [`Backend::target_logprobs_backward`]'s `lse` (which
    /// then skips its own pass over every row's logits for the softmax statistics). The
    /// default returns `None`: the backward computes the statistics itself.
    fn target_logprobs_with_lse(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Linear,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        Ok((self.target_logprobs(hidden, lm_head, targets)?, None))
    }

    /// One token per row of `logits` (`[rows.len(), vocab]`), row `r` drawn with `rows[r]` as
    /// [`crate::engine::sampler::sample`] defines it (same tokens on every backend). The default
    /// downloads the logits and samples on the host.
    fn sample_rows(
        &self,
        logits: &Self::Tensor,
        rows: &[RowSampling],
    ) -> Result<Vec<SampledToken>> {
        let host = self.download(logits)?;
        let vocab = host.shape.last().copied().unwrap_or(0);
        sample_host_rows(&host.data, vocab, rows)
    }

    /// Runs a decode step: `run` is the step exactly as the transformer computes it (the
    /// forward pass over `batch` with the weights `weights` and the KV cache `cache`, then
    /// sampling row `i` with `sampling[i]`), issued through this backend's ops. The default
    /// calls it. A backend may instead replay it from a recording (the CUDA backend pads plain
    /// decode steps to a batch-size bucket and replays a CUDA graph of `run`; see
    /// `backend/cuda/graphs.rs`), so `run` must have no effect other than through the ops and
    /// its result. The tokens are those `run(batch, sampling, cache)` gives, up to the
    /// backend's rounding (a padded step multiplies matrices of another shape, which may sum in
    /// another order); reruns repeat exactly.
    fn decode_step(
        &self,
        batch: &PagedBatch,
        sampling: &[RowSampling],
        weights: &Weights<Self::Tensor, Self::Linear>,
        cache: &mut KvCache<Self::Tensor>,
        run: &mut DecodeRun<'_, Self::Tensor>,
    ) -> Result<Vec<SampledToken>> {
        let _ = weights;
        run(batch, sampling, cache)
    }

    /// Whether the rollout engine should run a step that mixes plain decodes with prefill
    /// chunks as two passes, so that the decodes go through [`Backend::decode_step`] (worth it
    /// where that path is much cheaper, as with CUDA graphs). Default: one pass.
    fn split_mixed_steps(&self) -> bool {
        false
    }

    /// What [`Backend::decode_step`] did so far, where the backend records graphs.
    fn decode_graph_stats(&self) -> Option<DecodeGraphStats> {
        None
    }

    // ---- Training: small tensor utilities ----

    /// A zero-filled tensor of `shape`.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;

    /// A copy of `x` (same shape).
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Sets every element of `x` to zero (clearing gradients).
    fn fill_zero(&self, x: &mut Self::Tensor) -> Result<()>;

    /// `x *= s`, elementwise.
    fn scale(&self, x: &mut Self::Tensor, s: f32) -> Result<()>;

    /// `sum(x^2)` over every element, accumulated in f64 (gradient norms).
    fn sum_squares(&self, x: &Self::Tensor) -> Result<f64>;

    /// `sum_squares(xs[0]) + sum_squares(xs[1]) + ...`, added in that order, with the same
    /// result bit for bit: the global gradient norm over every parameter. The default calls
    /// [`Backend::sum_squares`] per tensor; a backend may batch the work (the CUDA backend
    /// reads all the partial sums back in one copy instead of one per tensor).
    fn sum_squares_many(&self, xs: &[&Self::Tensor]) -> Result<f64> {
        let mut total = 0.0;
        for x in xs {
            total += self.sum_squares(x)?;
        }
        Ok(total)
    }

    /// Concatenates `[n, w_j]` tensors left to right into `[n, sum(w_j)]`: the inverse of
    /// [`Backend::split_columns`].
    fn concat_columns(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    /// `dst[rows[i]] += src[i]` for `src` `[rows.len(), d]` and `dst` `[m, d]`, repeated rows
    /// adding up: the adjoint of [`Backend::gather_rows`].
    fn scatter_add_rows(
        &self,
        dst: &mut Self::Tensor,
        rows: &[usize],
        src: &Self::Tensor,
    ) -> Result<()>;

    /// The preference losses of a micro-batch from its per-row log-probs: for pair `i`, the
    /// policy's log-prob sums over rows `rows[i].0` (chosen) and `rows[i].1` (rejected), then
    /// the loss, its gradients with respect to the two sums and the monitoring values, as
    /// [`crate::genius::loss::pair_loss`] defines them (`pairs[i]` gives the reference sums,
    /// token counts and advantages; its policy fields are replaced). The default computes on
    /// the host ([`crate::genius::loss::pair_losses_host`]).
    fn pair_losses(
        &self,
        row_logprobs: &[f32],
        rows: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
        pairs: &[PairLogps],
        cfg: &LossConfig,
    ) -> Result<Vec<(PairLogps, PairLoss)>> {
        crate::genius::loss::pair_losses_host(row_logprobs, rows, pairs, cfg)
    }

    // ---- Training: f32 state (gradients, master weights, AdamW moments) and the update. ----

    /// A zero-filled **f32** tensor of `shape`, whatever the backend's working precision:
    /// gradients, master weights and AdamW moments (the CPU's tensors are f32 anyway).
    fn zeros_f32(&self, shape: &[usize]) -> Result<Self::Tensor> {
        self.zeros(shape)
    }

    /// Uploads host values as an **f32** tensor (master weights, moments on resume).
    fn upload_f32(&self, t: &HostTensor) -> Result<Self::Tensor> {
        self.upload(t)
    }

    /// One AdamW update of one parameter, in place on its f32 `master` copy and moments `m`,
    /// `v`, from its f32 gradient `grad` (all the same length), as [`adamw_update_host`]
    /// defines it element by element.
    fn adamw_update(
        &self,
        master: &mut Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        grad: &Self::Tensor,
        step: &AdamWStep,
    ) -> Result<()>;

    /// [`Backend::adamw_update`], then [`Backend::assign_tensor`] of `dst` from the updated
    /// master: one optimizer step of a tensor parameter and its working copy. A backend may do
    /// both in one pass (same results).
    #[allow(clippy::too_many_arguments)]
    fn adamw_update_tensor(
        &self,
        master: &mut Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        grad: &Self::Tensor,
        step: &AdamWStep,
        dst: &mut Self::Tensor,
    ) -> Result<()> {
        self.adamw_update(master, m, v, grad, step)?;
        self.assign_tensor(dst, master)
    }

    /// [`Backend::adamw_update`], then [`Backend::assign_linear`] of `dst` from the updated
    /// master (as [`Backend::adamw_update_tensor`], for a linear weight).
    #[allow(clippy::too_many_arguments)]
    fn adamw_update_linear(
        &self,
        master: &mut Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        grad: &Self::Tensor,
        step: &AdamWStep,
        dst: &mut Self::Linear,
    ) -> Result<()> {
        self.adamw_update(master, m, v, grad, step)?;
        self.assign_linear(dst, master)
    }

    /// An f32 copy of a tensor parameter (the optimizer's master weights start from it).
    fn tensor_to_f32(&self, t: &Self::Tensor) -> Result<Self::Tensor> {
        self.upload_f32(&self.download(t)?)
    }

    /// An f32 copy of a linear weight, `[out, in]` in HF layout (a master weight).
    fn linear_to_f32(&self, w: &Self::Linear) -> Result<Self::Tensor> {
        self.upload_f32(&self.download_linear(w)?)
    }

    /// Sets a tensor parameter (a norm weight, a bias, the embedding) from its f32 master copy
    /// of the same shape, rounded to the backend's precision.
    fn assign_tensor(&self, dst: &mut Self::Tensor, master: &Self::Tensor) -> Result<()> {
        *dst = self.upload(&self.download(master)?)?;
        Ok(())
    }

    /// Sets a linear weight from its f32 master copy (`[out, in]`, HF layout), rounded to the
    /// backend's precision and stored in its layout.
    fn assign_linear(&self, dst: &mut Self::Linear, master: &Self::Tensor) -> Result<()> {
        *dst = self.upload_linear(&self.download(master)?)?;
        Ok(())
    }

    // ---- Training: backward of each forward op. Every parameter gradient is *accumulated*
    // into a caller-owned tensor (`grad += ...`), so micro-batches add up; input gradients
    // are returned. ----

    /// Input gradient of [`Backend::linear`]: `dx = dy @ W`, `dy` `[n, out]`, `w` `[out, in]`,
    /// giving `[n, in]`.
    fn linear_backward_input(&self, dy: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor>;

    /// Weight gradient of [`Backend::linear`]: `grad += dy^T @ x`, with `grad` `[out, in]`
    /// (HF layout, a plain tensor), `x` `[n, in]` and `dy` `[n, out]`.
    fn accumulate_linear_grad(
        &self,
        grad: &mut Self::Tensor,
        x: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<()>;

    /// Bias gradient of [`Backend::linear`]: `grad += column sums of dy`, `grad` `[out]`,
    /// `dy` `[n, out]`.
    fn accumulate_bias_grad(&self, grad: &mut Self::Tensor, dy: &Self::Tensor) -> Result<()>;

    /// Backward of [`Backend::rms_norm`] over rows of `x` (`[n, d]`, the norm's input) with
    /// `weight` `[d]`: returns `dx` (`[n, d]`) and adds the weight's gradient to
    /// `weight_grad` (`[d]`).
    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
        dy: &Self::Tensor,
        weight_grad: &mut Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// Backward of [`Backend::rope`], in place: rotates each pair of `dx`
    /// (`[tokens, heads * head_dim]`) by minus the forward's angle (the rotation's transpose).
    fn rope_backward(
        &self,
        dx: &mut Self::Tensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()>;

    /// Backward of [`Backend::swiglu`]: from the fused `[n, 2 i]` input and `dy` `[n, i]`,
    /// the gradient of the fused input, `[n, 2 i]` (gate columns first).
    fn swiglu_backward(&self, gate_up: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor>;

    /// Backward of [`Backend::embedding`]: `grad[ids[i]] += dy[i]`, `grad` `[vocab, dim]`,
    /// `dy` `[ids.len(), dim]`; repeated ids add up.
    fn embedding_backward(
        &self,
        grad: &mut Self::Tensor,
        ids: &[u32],
        dy: &Self::Tensor,
    ) -> Result<()>;

    /// Backward of [`Backend::causal_attention`] (same `q`, `k`, `v`, `seqs`, `shape`), given
    /// the output's gradient `dout` (`[tokens, num_heads * head_dim]`): returns
    /// `(dq, dk, dv)` shaped like `q`, `k`, `v`. The attention probabilities are recomputed;
    /// `dk` and `dv` are summed over the query heads that share each kv head (GQA). Rows that
    /// belong to no sequence get zero gradients.
    fn causal_attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;

    /// [`Backend::causal_attention`] for the training forward: the output and, where the
    /// backend gives them, the softmax statistics of its rows (a backend-defined tensor; on
    /// the GPU the log-sum-exp of each row's scaled scores per head), which
    /// [`Backend::causal_attention_backward_with`] can use instead of recomputing them. The
    /// default gives none.
    fn causal_attention_for_training(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)> {
        Ok((self.causal_attention(q, k, v, seqs, shape)?, None))
    }

    /// [`Backend::causal_attention_backward`] given what the forward computed: its output
    /// `out` and the statistics `stats` of [`Backend::causal_attention_for_training`]. The
    /// gradients are the same up to rounding; the default ignores `out` and `stats`.
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward_with(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        dout: &Self::Tensor,
        out: &Self::Tensor,
        stats: &Self::Tensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let _ = (out, stats);
        self.causal_attention_backward(q, k, v, dout, seqs, shape)
    }

    /// Backward of [`Backend::target_logprobs`]: with `logits = hidden @ lm_head^T`
    /// (`hidden` `[n, d]`, `lm_head` `[vocab, d]`), `p = softmax(logits)` per row and
    /// `dlogits[r] = d_logprob[r] * (onehot(targets[r]) - p[r])`, returns
    /// `d_hidden = dlogits @ lm_head` (`[n, d]`) and adds `dlogits^T @ hidden` to
    /// `lm_head_grad` (`[vocab, d]`, a plain tensor). Chunked over rows like the forward: the
    /// logits of all `n` rows are never held at once. `lse`: the log-sum-exp per row that
    /// [`Backend::target_logprobs_with_lse`] returned for the same `hidden`, `lm_head` and
    /// `targets` (weights unchanged since), which spares a backend that can use it a pass over
    /// the logits; `None` to compute the statistics (a backend may always ignore it).
    fn target_logprobs_backward(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Linear,
        targets: &[u32],
        d_logprob: &[f32],
        lse: Option<&[f32]>,
        lm_head_grad: &mut Self::Tensor,
    ) -> Result<Self::Tensor>;
}

/// [`Backend::add_rms_norm`] as its two ops: `add_assign`, then `rms_norm`.
pub fn add_rms_norm_composed<B: Backend + ?Sized>(
    be: &B,
    x: &mut B::Tensor,
    y: &B::Tensor,
    weight: &B::Tensor,
    eps: f32,
) -> Result<B::Tensor> {
    be.add_assign(x, y)?;
    be.rms_norm(x, weight, eps)
}

/// [`Backend::qkv_rope_write_kv`] as its ops: `split_columns`, `rope` on q and k, `write_kv`.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_write_kv_composed<B: Backend + ?Sized>(
    be: &B,
    qkv: &B::Tensor,
    q_width: usize,
    kv_width: usize,
    positions: &[u32],
    head_dim: usize,
    inv_freq: &[f32],
    k_pool: &mut B::Tensor,
    v_pool: &mut B::Tensor,
    slots: &[u32],
) -> Result<B::Tensor> {
    let [mut q, mut k, v]: [B::Tensor; 3] = be
        .split_columns(qkv, &[q_width, kv_width, kv_width])?
        .try_into()
        .map_err(|_| anyhow::anyhow!("split_columns returned the wrong count"))?;
    be.rope(&mut q, positions, head_dim, inv_freq)?;
    be.rope(&mut k, positions, head_dim, inv_freq)?;
    be.write_kv(k_pool, v_pool, &k, &v, slots)?;
    Ok(q)
}

/// The scalars of one AdamW update, derived once per optimizer step on the host
/// ([`AdamWStep::new`]) so that every backend applies the same f32 arithmetic. Element by
/// element ([`adamw_update_host`]):
///
/// ```text
/// g = grad * grad_scale
/// m = beta1 * m + one_minus_beta1 * g
/// v = beta2 * v + one_minus_beta2 * g * g
/// p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bias2 + eps)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta1`, computed in f64 then rounded (as torch does: `1 - 0.999f32` is off by 1e-5).
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bias2: f32,
    /// `1 - lr * weight_decay` (decoupled weight decay).
    pub decay: f32,
    /// Multiplies the gradient first: the global-norm clipping factor (1 when not clipping).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// The scalars of update number `t` (1-based) with learning rate `lr`, from f64
    /// hyper-parameters (torch's AdamW semantics).
    pub fn new(
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        t: u64,
        lr: f64,
        grad_scale: f32,
    ) -> Self {
        let t = t as f64;
        let bias1 = 1.0 - beta1.powf(t);
        let bias2 = 1.0 - beta2.powf(t);
        AdamWStep {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: eps as f32,
            step_size: (lr / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            grad_scale,
        }
    }
}

/// The reference AdamW update ([`AdamWStep`]'s formula) over slices of equal length.
pub fn adamw_update_host(p: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], s: &AdamWStep) {
    debug_assert!(p.len() == m.len() && p.len() == v.len() && p.len() == grad.len());
    for j in 0..p.len() {
        let g = grad[j] * s.grad_scale;
        m[j] = s.beta1 * m[j] + s.one_minus_beta1 * g;
        v[j] = s.beta2 * v[j] + s.one_minus_beta2 * g * g;
        let denom = v[j].sqrt() * s.inv_sqrt_bias2 + s.eps;
        p[j] = p[j] * s.decay - s.step_size * m[j] / denom;
    }
}
