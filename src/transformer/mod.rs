//! The LLaMA/Qwen2 transformer, written once against [`Backend`]: weights (checked against the
//! config as they are uploaded) and the forward pass over a packed batch of whole sequences
//! (prefill). The rollout engine's paged-KV path plugs in at the attention call: everything
//! around it (projections, RoPE, MLP, norms) is shared. [`params`] names the weights (export,
//! import, one at a time); [`train`] is the training forward and its explicit backward;
//! [`memory`] plans what training holds before it starts.

pub mod memory;
pub mod params;
pub mod train;

pub use params::Param;
pub use train::{Activations, Gradients, TrainBatch};

use crate::backend::{AttentionShape, Backend, PagedSeq, SeqSpan};
use crate::engine::sampler::{RowSampling, SampledToken};
use crate::model::{HostTensor, ModelConfig, TensorSource};
use anyhow::{Context, Result, bail};

/// One decoder layer's weights: vectors as tensors `T`, projections as linear weights `L`.
/// Projections that read the same input are stored fused, rows stacked in HF layout, so each
/// is one matrix product: `qkv_proj` is q_proj, k_proj, v_proj (`[q + 2 kv, hidden]`),
/// `gate_up_proj` is gate_proj then up_proj (`[2 ffn, hidden]`).
pub struct LayerWeights<T, L> {
    pub input_norm: T,
    pub qkv_proj: L,
    /// q, k and v biases stacked (Qwen2).
    pub qkv_bias: Option<T>,
    pub o_proj: L,
    pub post_attention_norm: T,
    pub gate_up_proj: L,
    pub down_proj: L,
}

/// All weights of the model on a backend.
pub struct Weights<T, L> {
    /// The embedding table, read by rows.
    pub embed_tokens: T,
    pub layers: Vec<LayerWeights<T, L>>,
    pub final_norm: T,
    /// The LM head as a linear weight; when the config ties it to the embedding this is a
    /// second copy of the same values in the backend's linear layout.
    pub lm_head: L,
}

/// Sequences packed token-major into one batch: `tokens[i]` sits at `positions[i]` in its
/// sequence; `seqs` say which rows belong together.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
}

impl PackedBatch {
    /// Packs whole sequences, each starting at position 0.
    pub fn from_sequences<S: AsRef<[u32]>>(sequences: &[S]) -> Self {
        let mut b = PackedBatch::default();
        for s in sequences {
            let s = s.as_ref();
            b.seqs.push(SeqSpan {
                start: b.tokens.len(),
                len: s.len(),
            });
            b.tokens.extend_from_slice(s);
            b.positions.extend(0..s.len() as u32);
        }
        b
    }
}

/// The paged KV cache of a model: per layer, K and V pools of `num_blocks * block_size` rows
/// of `num_kv_heads * head_dim` values. Which rows belong to which sequence is the block
/// manager's business (`engine/`); the cache only holds the numbers.
pub struct KvCache<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub block_size: usize,
    pub num_blocks: usize,
}

/// One sequence's part of a paged step: its new tokens are rows `q_start..q_start + q_len` of
/// the batch; after the step the cache holds `context_len` of its tokens (the new ones last) in
/// the blocks of `block_table`.
#[derive(Debug, Clone, Default)]
pub struct PagedSeqBatch {
    pub q_start: usize,
    pub q_len: usize,
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// New tokens of several sequences with cached prefixes: token `i` is at `positions[i]` and
/// its K/V go to cache row `slots[i]`.
#[derive(Debug, Clone, Default)]
pub struct PagedBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    pub seqs: Vec<PagedSeqBatch>,
}

impl PagedBatch {
    /// The sequences as the backend's paged attention takes them (borrowing the block
    /// tables).
    pub fn paged_seqs(&self) -> Vec<PagedSeq<'_>> {
        self.seqs
            .iter()
            .map(|s| PagedSeq {
                q_start: s.q_start,
                q_len: s.q_len,
                context_len: s.context_len,
                block_table: &s.block_table,
            })
            .collect()
    }
}

/// How the layers of [`Transformer::forward_layers`] attend.
pub(crate) enum AttentionMode<'a, 's, T> {
    /// Whole sequences of a packed batch, causal within each.
    Causal(&'a [SeqSpan], AttentionShape),
    /// New tokens of sequences over a paged KV cache (per-layer pools `k`, `v`): their K/V go
    /// to `slots`, then attention reads the cache through the block tables.
    Paged {
        k: &'a mut [T],
        v: &'a mut [T],
        slots: &'a [u32],
        seqs: &'a [PagedSeq<'s>],
        shape: AttentionShape,
        block_size: usize,
    },
}

/// The model on a backend.
pub struct Transformer<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    pub weights: Weights<B::Tensor, B::Linear>,
    inv_freq: Vec<f32>,
}

/// The HF names of layer `i`'s tensors, shared by every loader and writer.
pub fn layer_tensor_name(i: usize, part: &str) -> String {
    format!("model.layers.{i}.{part}")
}

impl<B: Backend> Transformer<B> {
    /// Reads every tensor from `source`, checks its shape against `config`, uploads it.
    pub fn load(backend: B, config: ModelConfig, source: &dyn TensorSource) -> Result<Self> {
        let weights = Self::load_weights(&backend, &config, source)?;
        let inv_freq = config.rope_inv_freq();
        Ok(Self {
            config,
            backend,
            weights,
            inv_freq,
        })
    }

    /// The weights of `config` read from `source` (HF names, shapes checked) and uploaded.
    fn load_weights(
        backend: &B,
        config: &ModelConfig,
        source: &dyn TensorSource,
    ) -> Result<Weights<B::Tensor, B::Linear>> {
        let c = config;
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let read = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            let t = source
                .load_f32(name)
                .with_context(|| format!("loading tensor '{name}'"))?;
            if t.shape != shape {
                bail!(
                    "tensor '{name}' has shape {:?}, the config implies {shape:?}",
                    t.shape
                );
            }
            Ok(t)
        };
        let get = |name: &str, shape: &[usize]| -> Result<B::Tensor> {
            backend.upload(&read(name, shape)?)
        };
        let get_linear = |name: &str, shape: &[usize]| -> Result<B::Linear> {
            backend.upload_linear(&read(name, shape)?)
        };
        // Tensors stacked along their first dimension, read as one.
        let stacked = |parts: &[(String, Vec<usize>)]| -> Result<HostTensor> {
            let mut rows = 0;
            let mut data = Vec::new();
            for (name, shape) in parts {
                data.extend_from_slice(&read(name, shape)?.data);
                rows += shape[0];
            }
            let mut shape = parts[0].1.clone();
            shape[0] = rows;
            Ok(HostTensor::new(shape, data))
        };
        let has = |name: &str| source.shape(name).is_some();
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |p: &str| layer_tensor_name(i, p);
            let bias_names =
                ["q_proj", "k_proj", "v_proj"].map(|p| n(&format!("self_attn.{p}.bias")));
            let qkv_bias = if c.attention_bias {
                Some(backend.upload(&stacked(&[
                    (bias_names[0].clone(), vec![q]),
                    (bias_names[1].clone(), vec![kv]),
                    (bias_names[2].clone(), vec![kv]),
                ])?)?)
            } else if let Some(name) = bias_names.iter().find(|b| has(b)) {
                bail!("tensor '{name}' present but the config says the attention has no bias")
            } else {
                None
            };
            let ffn = c.intermediate_size;
            layers.push(LayerWeights {
                input_norm: get(&n("input_layernorm.weight"), &[h])?,
                qkv_proj: backend.upload_linear(&stacked(&[
                    (n("self_attn.q_proj.weight"), vec![q, h]),
                    (n("self_attn.k_proj.weight"), vec![kv, h]),
                    (n("self_attn.v_proj.weight"), vec![kv, h]),
                ])?)?,
                qkv_bias,
                o_proj: get_linear(&n("self_attn.o_proj.weight"), &[h, q])?,
                post_attention_norm: get(&n("post_attention_layernorm.weight"), &[h])?,
                gate_up_proj: backend.upload_linear(&stacked(&[
                    (n("mlp.gate_proj.weight"), vec![ffn, h]),
                    (n("mlp.up_proj.weight"), vec![ffn, h]),
                ])?)?,
                down_proj: get_linear(&n("mlp.down_proj.weight"), &[h, ffn])?,
            });
        }
        let embed = read("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            backend.upload_linear(&embed)?
        } else {
            get_linear("lm_head.weight", &[c.vocab_size, h])?
        };
        Ok(Weights {
            embed_tokens: backend.upload(&embed)?,
            layers,
            final_norm: get("model.norm.weight", &[h])?,
            lm_head,
        })
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// The LM head matrix (`[vocab, hidden]`): the embedding's values when tied.
    pub fn lm_head(&self) -> &B::Linear {
        &self.weights.lm_head
    }

    /// Runs every layer over a packed batch; returns the final-normed hidden states
    /// `[tokens, hidden]`.
    pub fn forward_hidden(&self, batch: &PackedBatch) -> Result<B::Tensor> {
        let shape = self.attention_shape();
        self.forward_layers(
            &batch.tokens,
            &batch.positions,
            AttentionMode::Causal(&batch.seqs, shape),
            None,
        )
    }

    /// Runs every layer over new tokens of sequences whose earlier tokens are in `cache`:
    /// each layer writes the new K/V at `batch.slots`, then attends over the cache through the
    /// block tables. Returns the final-normed hidden states of the new tokens. Blocks the
    /// block manager asked to copy (copy-on-write) must be copied first, with
    /// [`Self::copy_kv_blocks`].
    pub fn forward_paged(
        &self,
        batch: &PagedBatch,
        cache: &mut KvCache<B::Tensor>,
    ) -> Result<B::Tensor> {
        let shape = self.attention_shape();
        let n = batch.tokens.len();
        if batch.slots.len() != n || batch.positions.len() != n {
            bail!(
                "paged batch: {n} tokens, {} positions, {} slots",
                batch.positions.len(),
                batch.slots.len()
            );
        }
        let seqs = batch.paged_seqs();
        let block_size = cache.block_size;
        self.forward_layers(
            &batch.tokens,
            &batch.positions,
            AttentionMode::Paged {
                k: &mut cache.k,
                v: &mut cache.v,
                slots: &batch.slots,
                seqs: &seqs,
                shape,
                block_size,
            },
            None,
        )
    }

    /// An empty paged KV cache: per layer, K and V pools of `num_blocks` blocks.
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache<B::Tensor>> {
        let width = self.config.num_kv_heads * self.config.head_dim;
        let pools = || -> Result<Vec<B::Tensor>> {
            (0..self.config.num_layers)
                .map(|_| self.backend.kv_pool(num_blocks, block_size, width))
                .collect()
        };
        Ok(KvCache {
            k: pools()?,
            v: pools()?,
            block_size,
            num_blocks,
        })
    }

    /// Copies KV blocks `(src, dst)` in every layer (copy-on-write before a shared block is
    /// written).
    pub fn copy_kv_blocks(
        &self,
        cache: &mut KvCache<B::Tensor>,
        copies: &[(u32, u32)],
    ) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        for pool in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            self.backend.copy_blocks(pool, copies, cache.block_size)?;
        }
        Ok(())
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// The layer stack, with attention supplied by the caller: `attend(layer, q, k, v)` gets
    /// RoPE'd q and k and returns `[tokens, heads * head_dim]`. The one place the transformer's
    /// maths is written; the contiguous and the paged paths differ only in `attend`, and the
    /// training forward only in passing `save`, which receives what the backward pass reads
    /// (see [`train::Saved`]).
    pub(crate) fn forward_layers(
        &self,
        tokens: &[u32],
        positions: &[u32],
        mut mode: AttentionMode<'_, '_, B::Tensor>,
        mut save: Option<&mut train::Saved<B::Tensor>>,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let c = &self.config;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            bail!(
                "token id {t} is outside the vocabulary ({} entries)",
                c.vocab_size
            );
        }
        let (q_width, kv_width) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let eps = c.rms_norm_eps;
        let mut x = be.embedding(&self.weights.embed_tokens, tokens)?;
        // The previous layer's MLP output, added to the residual stream together with the next
        // norm (one fused op where the backend has it).
        let mut pending: Option<B::Tensor> = None;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            let xn = match pending.take() {
                Some(down) => be.add_rms_norm(&mut x, &down, &layer.input_norm, eps)?,
                None => be.rms_norm(&x, &layer.input_norm, eps)?,
            };
            let x_in = save.is_some().then(|| be.copy(&x)).transpose()?;
            let qkv = be.linear(&xn, &layer.qkv_proj, layer.qkv_bias.as_ref())?;
            let (attn, qkv_rotated) = match &mut mode {
                AttentionMode::Causal(seqs, shape) => {
                    let [mut q, mut k, v]: [B::Tensor; 3] = be
                        .split_columns(&qkv, &[q_width, kv_width, kv_width])?
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("split_columns returned the wrong count"))?;
                    be.rope(&mut q, positions, c.head_dim, &self.inv_freq)?;
                    be.rope(&mut k, positions, c.head_dim, &self.inv_freq)?;
                    // Training keeps the softmax statistics where the backend gives them.
                    let (attn, stats) = if save.as_ref().is_some_and(|s| !s.recompute) {
                        be.causal_attention_for_training(&q, &k, &v, seqs, *shape)?
                    } else {
                        (be.causal_attention(&q, &k, &v, seqs, *shape)?, None)
                    };
                    (attn, Some((q, k, v, stats)))
                }
                AttentionMode::Paged {
                    k,
                    v,
                    slots,
                    seqs,
                    shape,
                    block_size,
                } => {
                    let q = be.qkv_rope_write_kv(
                        &qkv,
                        q_width,
                        kv_width,
                        positions,
                        c.head_dim,
                        &self.inv_freq,
                        &mut k[i],
                        &mut v[i],
                        slots,
                    )?;
                    let attn = be.paged_attention(&q, &k[i], &v[i], seqs, *shape, *block_size)?;
                    (attn, None)
                }
            };
            let o = be.linear(&attn, &layer.o_proj, None)?;
            let xn = be.add_rms_norm(&mut x, &o, &layer.post_attention_norm, eps)?;
            let x_mid = save.is_some().then(|| be.copy(&x)).transpose()?;
            let gate_up = be.linear(&xn, &layer.gate_up_proj, None)?;
            let act = be.swiglu(&gate_up)?;
            pending = Some(be.linear(&act, &layer.down_proj, None)?);
            // Kept for backward (the down projection's weight gradient) unless recomputing.
            let act = save.as_ref().is_some_and(|s| !s.recompute).then_some(act);
            if let Some(saved) = save.as_deref_mut() {
                let (Some(x_in), Some(x_mid), Some((q, k, v, attn_stats))) =
                    (x_in, x_mid, qkv_rotated)
                else {
                    bail!("internal: the training forward needs whole-sequence attention");
                };
                if saved.recompute {
                    // Only the layer's input is kept; backward recomputes the rest.
                    saved.inputs.push(x_in);
                    continue;
                }
                saved.layers.push(train::LayerActivations {
                    x_in,
                    q,
                    k,
                    v,
                    attn,
                    attn_stats,
                    x_mid,
                    gate_up,
                    act,
                });
            }
        }
        let hidden = match pending {
            Some(down) => be.add_rms_norm(&mut x, &down, &self.weights.final_norm, eps)?,
            None => be.rms_norm(&x, &self.weights.final_norm, eps)?,
        };
        if let Some(saved) = save {
            saved.x_final = Some(x);
        }
        Ok(hidden)
    }

    /// Full logits (`[rows.len(), vocab]`) at the given rows of the hidden states.
    pub fn logits_at(&self, hidden: &B::Tensor, rows: &[usize]) -> Result<HostTensor> {
        let h = self.backend.gather_rows(hidden, rows)?;
        let logits = self.backend.linear(&h, self.lm_head(), None)?;
        self.backend.download(&logits)
    }

    /// One token per selected row of the hidden states (`rows[i]` drawn with `sampling[i]`):
    /// LM head and sampling on the backend, so only the tokens leave the device. When `rows`
    /// is every row in order (a decode step) the hidden states are used as they are.
    pub fn sample_at(
        &self,
        hidden: &B::Tensor,
        rows: &[usize],
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledToken>> {
        let every_row = self.backend.shape(hidden).first() == Some(&rows.len())
            && rows.iter().enumerate().all(|(i, &r)| i == r);
        let gathered;
        let h = if every_row {
            hidden
        } else {
            gathered = self.backend.gather_rows(hidden, rows)?;
            &gathered
        };
        let logits = self.backend.linear(h, self.lm_head(), None)?;
        self.backend.sample_rows(&logits, sampling)
    }

    /// A decode step: [`Self::forward_paged`] over `batch`, then one token sampled for every
    /// row (`sampling[i]` for row `i`), through [`Backend::decode_step`] (which the CUDA
    /// backend replays from a CUDA graph). Copy-on-write block copies go first, with
    /// [`Self::copy_kv_blocks`].
    pub fn decode_step(
        &self,
        batch: &PagedBatch,
        cache: &mut KvCache<B::Tensor>,
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledToken>> {
        let mut run = |b: &PagedBatch,
                       rows: &[RowSampling],
                       cache: &mut KvCache<B::Tensor>|
         -> Result<Vec<SampledToken>> {
            let hidden = self.forward_paged(b, cache)?;
            let every: Vec<usize> = (0..b.tokens.len()).collect();
            self.sample_at(&hidden, &every, rows)
        };
        self.backend
            .decode_step(batch, sampling, &self.weights, cache, &mut run)
    }

    /// `log p(targets[i] | row rows[i])` from the hidden states, fused over the LM head.
    pub fn target_logprobs(
        &self,
        hidden: &B::Tensor,
        rows: &[usize],
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        let h = self.backend.gather_rows(hidden, rows)?;
        self.backend.target_logprobs(&h, self.lm_head(), targets)
    }
}
