//! Training: the forward pass that keeps what backward needs ([`Transformer::forward_train`],
//! the same maths as inference, through [`Transformer::forward_layers`]) and its explicit
//! backward ([`Transformer::backward`]), layer by layer in reverse, accumulating into
//! [`Gradients`]. No autograd: each forward op has its backward op on the [`Backend`].
//!
//! What is saved per layer (per token: `2 hidden + 2 q + 2 kv + 3 ffn` floats, ~28 KiB per
//! layer for the 135M default model): the residual stream entering the layer and after
//! attention, RoPE'd q and k, v, the attention output, the fused gate/up projection and
//! SwiGLU's output. The norms' outputs are recomputed in backward (cheap, row-wise);
//! attention probabilities are recomputed by the backend's attention backward (from the
//! forward's softmax statistics where the backend keeps them). Under per-layer recompute only
//! each layer's input is kept, and backward recomputes the rest, SwiGLU's output included.

use super::params::{LM_HEAD, Param};
use super::{PackedBatch, Transformer, Weights};
use crate::backend::{Backend, SeqSpan};
use anyhow::{Context, Result, bail, ensure};
use std::ops::Range;

/// A packed batch of whole sequences and the rows whose next token is scored: row `rows[i]`
/// of the batch predicts `targets[i]` (normally the next token of its sequence).
#[derive(Debug, Clone, Default)]
pub struct TrainBatch {
    /// The sequences, packed.
    pub batch: PackedBatch,
    /// Scored rows of the batch.
    pub rows: Vec<usize>,
    /// The token each scored row is scored on, one per entry of `rows`.
    pub targets: Vec<u32>,
    /// For each sequence of the batch, its range in `rows` / `targets` (and in the log-probs
    /// [`Transformer::forward_train`] returns): what a per-sequence loss sums over.
    pub seq_rows: Vec<Range<usize>>,
}

impl TrainBatch {
    /// Packs whole sequences (each from position 0) for next-token training: token `j` of
    /// sequence `s` is a target, predicted from row `j - 1`, when `loss_mask[s][j]` is true
    /// (e.g. the assistant turn's tokens). Token 0 has nothing before it, so its mask must be
    /// false.
    pub fn next_token<S: AsRef<[u32]>, M: AsRef<[bool]>>(
        sequences: &[S],
        loss_mask: &[M],
    ) -> Result<Self> {
        ensure!(
            sequences.len() == loss_mask.len(),
            "TrainBatch: {} sequences but {} loss masks",
            sequences.len(),
            loss_mask.len()
        );
        let batch = PackedBatch::from_sequences(sequences);
        let mut out = TrainBatch {
            batch,
            ..Default::default()
        };
        for (s, (tokens, mask)) in sequences.iter().zip(loss_mask).enumerate() {
            let (tokens, mask) = (tokens.as_ref(), mask.as_ref());
            ensure!(
                tokens.len() == mask.len(),
                "TrainBatch: sequence {s} has {} tokens but a loss mask of {}",
                tokens.len(),
                mask.len()
            );
            if mask.first() == Some(&true) {
                bail!("TrainBatch: sequence {s}: token 0 cannot be a target (nothing precedes it)");
            }
            let start = out.batch.seqs[s].start;
            let first = out.rows.len();
            for j in 1..tokens.len() {
                if mask[j] {
                    out.rows.push(start + j - 1);
                    out.targets.push(tokens[j]);
                }
            }
            out.seq_rows.push(first..out.rows.len());
        }
        Ok(out)
    }
}

/// What the training forward keeps of one layer for backward (see the module comment).
pub(crate) struct LayerActivations<T> {
    /// The residual stream entering the layer (the input norm's input).
    pub(crate) x_in: T,
    /// q and k after RoPE, and v: the attention's inputs.
    pub(crate) q: T,
    pub(crate) k: T,
    pub(crate) v: T,
    /// The attention output (o_proj's input).
    pub(crate) attn: T,
    /// The attention's softmax statistics, where the backend gives them
    /// ([`Backend::causal_attention_for_training`]): the backward then need not recompute
    /// them.
    pub(crate) attn_stats: Option<T>,
    /// The residual stream after the attention block (the post-attention norm's input).
    pub(crate) x_mid: T,
    /// The fused gate/up projection (SwiGLU's input).
    pub(crate) gate_up: T,
    /// SwiGLU's output (the down projection's input), kept by the forward when every layer's
    /// activations are saved; `None` under per-layer recompute, where backward forms it.
    pub(crate) act: Option<T>,
}

/// Filled by [`Transformer::forward_layers`] when training.
pub(crate) struct Saved<T> {
    /// Per-layer recompute: keep only each layer's input (`inputs`), not `layers`.
    pub(crate) recompute: bool,
    pub(crate) layers: Vec<LayerActivations<T>>,
    /// Each layer's input when recomputing.
    pub(crate) inputs: Vec<T>,
    /// The residual stream after the last layer (the final norm's input).
    pub(crate) x_final: Option<T>,
}

/// Everything [`Transformer::backward`] reads of a [`Transformer::forward_train`] call.
pub struct Activations<B: Backend> {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    seqs: Vec<SeqSpan>,
    rows: Vec<usize>,
    targets: Vec<u32>,
    /// Every layer's activations, or (per-layer recompute) none ...
    layers: Vec<LayerActivations<B::Tensor>>,
    /// ... and every layer's input instead, from which backward recomputes them.
    inputs: Vec<B::Tensor>,
    x_final: B::Tensor,
    /// Final-normed hidden states of the scored rows, `[rows, hidden]` (the LM head's input).
    hidden_scored: B::Tensor,
    /// The log-sum-exp of each scored row's logits, where the backend hands it from the
    /// log-prob forward to its backward ([`Backend::target_logprobs_with_lse`]).
    logit_lse: Option<Vec<f32>>,
}

impl<B: Backend> Activations<B> {
    /// Number of scored rows: the length `d_logprob` must have in backward.
    pub fn scored_rows(&self) -> usize {
        self.rows.len()
    }
}

/// Parameter gradients (f32 on every backend), in the same struct as the weights: linear weights' gradients are plain
/// `[out, in]` tensors in HF layout, fused like the weights (`qkv_proj` is q, k, v rows;
/// `gate_up_proj` is gate then up rows; `qkv_bias` present when the model has biases).
///
/// Tied embeddings: the LM head's gradient is accumulated straight into `embed_tokens` (the
/// head *is* the embedding), and `tensors.lm_head` is an empty `[0, hidden]` tensor that
/// [`Gradients::iter`] leaves out. Untied, `lm_head` is `[vocab, hidden]` and listed.
pub struct Gradients<B: Backend> {
    /// The gradients, field by field like the weights.
    pub tensors: Weights<B::Tensor, B::Tensor>,
    tied: bool,
}

impl<B: Backend> Gradients<B> {
    /// Zero gradients for every parameter of `model`.
    pub fn zeros(model: &Transformer<B>) -> Result<Self> {
        let be = &model.backend;
        let w = &model.weights;
        let tied = model.config.tie_word_embeddings;
        // f32 whatever the backend's working precision: micro-batches accumulate into them.
        let t = |x: &B::Tensor| be.zeros_f32(be.shape(x));
        let l = |x: &B::Linear| be.zeros_f32(&be.linear_shape(x));
        let layers = w
            .layers
            .iter()
            .map(|layer| {
                Ok(super::LayerWeights {
                    input_norm: t(&layer.input_norm)?,
                    qkv_proj: l(&layer.qkv_proj)?,
                    qkv_bias: layer.qkv_bias.as_ref().map(t).transpose()?,
                    o_proj: l(&layer.o_proj)?,
                    post_attention_norm: t(&layer.post_attention_norm)?,
                    gate_up_proj: l(&layer.gate_up_proj)?,
                    down_proj: l(&layer.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if tied {
            be.zeros_f32(&[0, model.config.hidden_size])?
        } else {
            l(&w.lm_head)?
        };
        Ok(Self {
            tensors: Weights {
                embed_tokens: t(&w.embed_tokens)?,
                layers,
                final_norm: t(&w.final_norm)?,
                lm_head,
            },
            tied,
        })
    }

    /// Sets every gradient to zero (after an optimizer step).
    pub fn zero(&mut self, backend: &B) -> Result<()> {
        for (_, g) in self.iter_mut() {
            backend.fill_zero(g)?;
        }
        Ok(())
    }

    /// `(name, gradient)` of every parameter, in [`Transformer::parameter_names`] order and
    /// names (fused, e.g. `model.layers.0.self_attn.qkv_proj.weight`); no `lm_head.weight`
    /// when tied.
    pub fn iter(&self) -> Vec<(String, &B::Tensor)> {
        let tied = self.tied;
        self.tensors
            .params()
            .into_iter()
            .filter(|(n, _)| !(tied && n == LM_HEAD))
            .map(|(n, p)| (n, p.into_inner()))
            .collect()
    }

    /// [`Self::iter`], mutable.
    pub fn iter_mut(&mut self) -> Vec<(String, &mut B::Tensor)> {
        let tied = self.tied;
        self.tensors
            .params_mut()
            .into_iter()
            .filter(|(n, _)| !(tied && n == LM_HEAD))
            .map(|(n, p)| (n, p.into_inner()))
            .collect()
    }

    /// `sum(g^2)` over every gradient (for the global norm used in clipping).
    pub fn sum_squares(&self, backend: &B) -> Result<f64> {
        let grads: Vec<&B::Tensor> = self.iter().into_iter().map(|(_, g)| g).collect();
        backend.sum_squares_many(&grads)
    }

    /// Multiplies every gradient by `s` (clipping, averaging over micro-batches).
    pub fn scale(&mut self, backend: &B, s: f32) -> Result<()> {
        for (_, g) in self.iter_mut() {
            backend.scale(g, s)?;
        }
        Ok(())
    }
}

impl<B: Backend> Transformer<B> {
    /// The training forward: the same layer stack as [`Self::forward_hidden`], keeping the
    /// activations backward needs. Returns `log p(targets[i] | row rows[i])` for every scored
    /// row (identical to [`Self::target_logprobs`] on [`Self::forward_hidden`]) and the saved
    /// activations.
    pub fn forward_train(&self, batch: &TrainBatch) -> Result<(Vec<f32>, Activations<B>)> {
        self.forward_train_with(batch, false)
    }

    /// [`Self::forward_train`], with per-layer activation recompute when `recompute`: only
    /// each layer's input is kept (one `[tokens, hidden]` tensor per layer) and backward runs
    /// each layer's forward again before its backward. Same gradients, an extra forward's
    /// compute, a fraction of the memory (see `memory::gpu_training_plan`).
    pub fn forward_train_with(
        &self,
        batch: &TrainBatch,
        recompute: bool,
    ) -> Result<(Vec<f32>, Activations<B>)> {
        let be = &self.backend;
        let b = &batch.batch;
        let n = b.tokens.len();
        ensure!(
            b.positions.len() == n,
            "training batch: {n} tokens but {} positions",
            b.positions.len()
        );
        ensure!(
            batch.rows.len() == batch.targets.len(),
            "training batch: {} scored rows but {} targets",
            batch.rows.len(),
            batch.targets.len()
        );
        if let Some(&r) = batch.rows.iter().find(|&&r| r >= n) {
            bail!("training batch: scored row {r} is outside the batch ({n} rows)");
        }
        for s in &b.seqs {
            ensure!(
                s.start.checked_add(s.len).is_some_and(|end| end <= n),
                "training batch: sequence {s:?} is outside the batch ({n} rows)"
            );
        }
        let shape = self.attention_shape();
        let mut saved = Saved {
            recompute,
            layers: Vec::new(),
            inputs: Vec::new(),
            x_final: None,
        };
        let hidden = self.forward_layers(
            &b.tokens,
            &b.positions,
            super::AttentionMode::Causal(&b.seqs, shape),
            Some(&mut saved),
        )?;
        let hidden_scored = be.gather_rows(&hidden, &batch.rows)?;
        let (logprobs, logit_lse) =
            be.target_logprobs_with_lse(&hidden_scored, self.lm_head(), &batch.targets)?;
        let x_final = saved
            .x_final
            .context("internal: the forward pass saved no final residual")?;
        Ok((
            logprobs,
            Activations {
                tokens: b.tokens.clone(),
                positions: b.positions.clone(),
                seqs: b.seqs.clone(),
                rows: batch.rows.clone(),
                targets: batch.targets.clone(),
                layers: saved.layers,
                inputs: saved.inputs,
                x_final,
                hidden_scored,
                logit_lse,
            },
        ))
    }

    /// The explicit backward of [`Self::forward_train`]: given `d_logprob[i]`, the gradient
    /// of the loss with respect to scored row `i`'s log-prob, *adds* every parameter's
    /// gradient into `grads` (so micro-batches accumulate; zero them between optimizer steps).
    /// The weights must be the ones `acts` was computed with (update them only after the
    /// backward passes of a step).
    pub fn backward(
        &self,
        acts: &Activations<B>,
        d_logprob: &[f32],
        grads: &mut Gradients<B>,
    ) -> Result<()> {
        ensure!(
            d_logprob.len() == acts.rows.len(),
            "backward: {} log-prob gradients for {} scored rows",
            d_logprob.len(),
            acts.rows.len()
        );
        ensure!(
            acts.layers.len() + acts.inputs.len() == self.weights.layers.len()
                && self.backend.shape(&acts.x_final)
                    == [acts.tokens.len(), self.config.hidden_size],
            "backward: the activations come from a model of another shape"
        );
        self.check_gradients(grads)?;
        let be = &self.backend;
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let w = &self.weights;
        let g = &mut grads.tensors;
        let shape = self.attention_shape();
        let n = acts.tokens.len();

        // LM head (tied: its gradient is the embedding's) and the final norm.
        let head_grad = if grads.tied {
            &mut g.embed_tokens
        } else {
            &mut g.lm_head
        };
        let d_scored = be.target_logprobs_backward(
            &acts.hidden_scored,
            &w.lm_head,
            &acts.targets,
            d_logprob,
            acts.logit_lse.as_deref(),
            head_grad,
        )?;
        let mut d_hidden = be.zeros(&[n, c.hidden_size])?;
        be.scatter_add_rows(&mut d_hidden, &acts.rows, &d_scored)?;
        // dx: the gradient of the residual stream, walked back through the layers.
        let mut dx = be.rms_norm_backward(
            &acts.x_final,
            &w.final_norm,
            eps,
            &d_hidden,
            &mut g.final_norm,
        )?;

        for (i, (layer, lg)) in w.layers.iter().zip(&mut g.layers).enumerate().rev() {
            let recomputed;
            let saved = if acts.inputs.is_empty() {
                &acts.layers[i]
            } else {
                recomputed =
                    self.recompute_layer(i, &acts.inputs[i], &acts.positions, &acts.seqs)?;
                &recomputed
            };
            // MLP block: x_out = x_mid + down(swiglu(gate_up(rms_norm(x_mid)))).
            let xn = be.rms_norm(&saved.x_mid, &layer.post_attention_norm, eps)?;
            let formed;
            let act = match &saved.act {
                Some(a) => a,
                None => {
                    formed = be.swiglu(&saved.gate_up)?;
                    &formed
                }
            };
            be.accumulate_linear_grad(&mut lg.down_proj, act, &dx)?;
            let d_act = be.linear_backward_input(&dx, &layer.down_proj)?;
            let d_gate_up = be.swiglu_backward(&saved.gate_up, &d_act)?;
            be.accumulate_linear_grad(&mut lg.gate_up_proj, &xn, &d_gate_up)?;
            let d_xn = be.linear_backward_input(&d_gate_up, &layer.gate_up_proj)?;
            let d_res = be.rms_norm_backward(
                &saved.x_mid,
                &layer.post_attention_norm,
                eps,
                &d_xn,
                &mut lg.post_attention_norm,
            )?;
            be.add_assign(&mut dx, &d_res)?;

            // Attention block: x_mid = x_in + o_proj(attention(rope(q), rope(k), v)) with
            // [q | k | v] = qkv_proj(rms_norm(x_in)) + bias.
            be.accumulate_linear_grad(&mut lg.o_proj, &saved.attn, &dx)?;
            let d_attn = be.linear_backward_input(&dx, &layer.o_proj)?;
            let (mut dq, mut dk, dv) = match &saved.attn_stats {
                Some(stats) => be.causal_attention_backward_with(
                    &saved.q,
                    &saved.k,
                    &saved.v,
                    &d_attn,
                    &saved.attn,
                    stats,
                    &acts.seqs,
                    shape,
                )?,
                None => be.causal_attention_backward(
                    &saved.q, &saved.k, &saved.v, &d_attn, &acts.seqs, shape,
                )?,
            };
            be.rope_backward(&mut dq, &acts.positions, c.head_dim, &self.inv_freq)?;
            be.rope_backward(&mut dk, &acts.positions, c.head_dim, &self.inv_freq)?;
            let d_qkv = be.concat_columns(&[&dq, &dk, &dv])?;
            if let Some(bias_grad) = &mut lg.qkv_bias {
                be.accumulate_bias_grad(bias_grad, &d_qkv)?;
            }
            let xn = be.rms_norm(&saved.x_in, &layer.input_norm, eps)?;
            be.accumulate_linear_grad(&mut lg.qkv_proj, &xn, &d_qkv)?;
            let d_xn = be.linear_backward_input(&d_qkv, &layer.qkv_proj)?;
            let d_res = be.rms_norm_backward(
                &saved.x_in,
                &layer.input_norm,
                eps,
                &d_xn,
                &mut lg.input_norm,
            )?;
            be.add_assign(&mut dx, &d_res)?;
        }
        be.embedding_backward(&mut g.embed_tokens, &acts.tokens, &dx)
    }

    /// Layer `i`'s training activations from its input `x_in`, by the same ops as
    /// [`Self::forward_layers`] (so the same values): per-layer recompute.
    fn recompute_layer(
        &self,
        i: usize,
        x_in: &B::Tensor,
        positions: &[u32],
        seqs: &[SeqSpan],
    ) -> Result<LayerActivations<B::Tensor>> {
        let be = &self.backend;
        let c = &self.config;
        let layer = &self.weights.layers[i];
        let eps = c.rms_norm_eps;
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let xn = be.rms_norm(x_in, &layer.input_norm, eps)?;
        let qkv = be.linear(&xn, &layer.qkv_proj, layer.qkv_bias.as_ref())?;
        drop(xn);
        let [mut q, mut k, v]: [B::Tensor; 3] = be
            .split_columns(&qkv, &[q_width, kv_width, kv_width])?
            .try_into()
            .map_err(|_| anyhow::anyhow!("split_columns returned the wrong count"))?;
        drop(qkv);
        be.rope(&mut q, positions, c.head_dim, &self.inv_freq)?;
        be.rope(&mut k, positions, c.head_dim, &self.inv_freq)?;
        let (attn, attn_stats) =
            be.causal_attention_for_training(&q, &k, &v, seqs, self.attention_shape())?;
        let o = be.linear(&attn, &layer.o_proj, None)?;
        let mut x_mid = be.copy(x_in)?;
        let xn = be.add_rms_norm(&mut x_mid, &o, &layer.post_attention_norm, eps)?;
        let gate_up = be.linear(&xn, &layer.gate_up_proj, None)?;
        Ok(LayerActivations {
            x_in: be.copy(x_in)?,
            q,
            k,
            v,
            attn,
            attn_stats,
            x_mid,
            gate_up,
            act: None,
        })
    }

    /// `grads` has this model's parameters (names, shapes, tying).
    fn check_gradients(&self, grads: &Gradients<B>) -> Result<()> {
        let be = &self.backend;
        ensure!(
            grads.tied == self.config.tie_word_embeddings,
            "backward: gradients were made for a model with {} embeddings",
            if grads.tied { "tied" } else { "untied" }
        );
        let weights = self.weights.params();
        let grads = grads.tensors.params();
        ensure!(
            weights.len() == grads.len(),
            "backward: the gradients hold {} tensors, the model {}",
            grads.len(),
            weights.len()
        );
        for ((name, w), (gname, gt)) in weights.iter().zip(&grads) {
            if name == LM_HEAD && self.config.tie_word_embeddings {
                continue;
            }
            let want: Vec<usize> = match w {
                Param::Tensor(t) => be.shape(t).to_vec(),
                Param::Linear(l) => be.linear_shape(l).to_vec(),
            };
            let got = be.shape(gt.as_tensor());
            ensure!(
                name == gname && got == want,
                "backward: gradient '{gname}' {got:?} does not match parameter '{name}' {want:?}"
            );
        }
        Ok(())
    }
}

impl<'a, T> Param<&'a T, &'a T> {
    /// The tensor behind a gradient entry.
    fn as_tensor(&self) -> &'a T {
        match self {
            Param::Tensor(t) | Param::Linear(t) => t,
        }
    }
}
