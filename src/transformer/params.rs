//! Named access to a model's parameters: the fused parameter names that weights and gradients
//! share ([`Weights::params`], walked by an optimizer), reading and replacing one weight from
//! host values, and the export/import of every weight in HF tensor names and layout
//! (q/k/v and gate/up unfused again, as a checkpoint writer needs them).

use super::{LayerWeights, Transformer, Weights, layer_tensor_name};
use crate::backend::Backend;
use crate::model::{HostTensor, MemoryTensors, ModelConfig};
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeSet;

/// The HF name of the embedding table.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The HF name of the final norm's weight.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The HF name of the LM head (absent from a tied model's tensors).
pub const LM_HEAD: &str = "lm_head.weight";

/// One parameter of a [`Weights`]: a tensor (embedding, norms, bias) or a linear weight.
pub enum Param<T, L> {
    /// A plain tensor: the embedding, a norm's weight, the q/k/v bias.
    Tensor(T),
    /// A linear layer's `[out, in]` weight.
    Linear(L),
}

impl<T> Param<T, T> {
    /// The tensor, whichever kind it is (gradients hold both kinds as plain tensors).
    pub fn into_inner(self) -> T {
        match self {
            Param::Tensor(t) | Param::Linear(t) => t,
        }
    }
}

/// Parameter names of layer `i`, in [`Weights::params`] order (the bias only when present).
fn layer_param_names(i: usize, has_bias: bool) -> Vec<String> {
    let mut v = vec![
        layer_tensor_name(i, "input_layernorm.weight"),
        layer_tensor_name(i, "self_attn.qkv_proj.weight"),
    ];
    if has_bias {
        v.push(layer_tensor_name(i, "self_attn.qkv_proj.bias"));
    }
    v.extend([
        layer_tensor_name(i, "self_attn.o_proj.weight"),
        layer_tensor_name(i, "post_attention_layernorm.weight"),
        layer_tensor_name(i, "mlp.gate_up_proj.weight"),
        layer_tensor_name(i, "mlp.down_proj.weight"),
    ]);
    v
}

impl<T, L> LayerWeights<T, L> {
    fn params(&self) -> Vec<Param<&T, &L>> {
        let mut v = vec![
            Param::Tensor(&self.input_norm),
            Param::Linear(&self.qkv_proj),
        ];
        if let Some(b) = &self.qkv_bias {
            v.push(Param::Tensor(b));
        }
        v.extend([
            Param::Linear(&self.o_proj),
            Param::Tensor(&self.post_attention_norm),
            Param::Linear(&self.gate_up_proj),
            Param::Linear(&self.down_proj),
        ]);
        v
    }

    fn params_mut(&mut self) -> Vec<Param<&mut T, &mut L>> {
        let mut v = vec![
            Param::Tensor(&mut self.input_norm),
            Param::Linear(&mut self.qkv_proj),
        ];
        if let Some(b) = &mut self.qkv_bias {
            v.push(Param::Tensor(b));
        }
        v.extend([
            Param::Linear(&mut self.o_proj),
            Param::Tensor(&mut self.post_attention_norm),
            Param::Linear(&mut self.gate_up_proj),
            Param::Linear(&mut self.down_proj),
        ]);
        v
    }
}

impl<T, L> Weights<T, L> {
    /// Every parameter with its name, in a fixed order: `model.embed_tokens.weight`, then per
    /// layer `input_layernorm.weight`, `self_attn.qkv_proj.weight` (q, k, v rows stacked),
    /// `self_attn.qkv_proj.bias` (when present), `self_attn.o_proj.weight`,
    /// `post_attention_layernorm.weight`, `mlp.gate_up_proj.weight` (gate rows, then up),
    /// `mlp.down_proj.weight` (each prefixed `model.layers.{i}.`), then `model.norm.weight`
    /// and `lm_head.weight`. The LM head is listed even when it is tied to the embedding;
    /// callers that treat a tied model's head as the embedding leave it out.
    pub fn params(&self) -> Vec<(String, Param<&T, &L>)> {
        let mut v = vec![(EMBED_TOKENS.to_string(), Param::Tensor(&self.embed_tokens))];
        for (i, l) in self.layers.iter().enumerate() {
            v.extend(
                layer_param_names(i, l.qkv_bias.is_some())
                    .into_iter()
                    .zip(l.params()),
            );
        }
        v.push((FINAL_NORM.to_string(), Param::Tensor(&self.final_norm)));
        v.push((LM_HEAD.to_string(), Param::Linear(&self.lm_head)));
        v
    }

    /// [`Self::params`], mutable.
    pub fn params_mut(&mut self) -> Vec<(String, Param<&mut T, &mut L>)> {
        let mut v = vec![(
            EMBED_TOKENS.to_string(),
            Param::Tensor(&mut self.embed_tokens),
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let names = layer_param_names(i, l.qkv_bias.is_some());
            v.extend(names.into_iter().zip(l.params_mut()));
        }
        v.push((FINAL_NORM.to_string(), Param::Tensor(&mut self.final_norm)));
        v.push((LM_HEAD.to_string(), Param::Linear(&mut self.lm_head)));
        v
    }
}

/// Every tensor name of a checkpoint of `config`, HF layout and order (q/k/v and gate/up
/// separate; `lm_head.weight` only when untied).
pub fn hf_tensor_names(config: &ModelConfig) -> Vec<String> {
    let mut v = vec![EMBED_TOKENS.to_string()];
    for i in 0..config.num_layers {
        let n = |p: &str| layer_tensor_name(i, p);
        v.push(n("input_layernorm.weight"));
        for p in ["q_proj", "k_proj", "v_proj"] {
            v.push(n(&format!("self_attn.{p}.weight")));
        }
        if config.attention_bias {
            for p in ["q_proj", "k_proj", "v_proj"] {
                v.push(n(&format!("self_attn.{p}.bias")));
            }
        }
        v.push(n("self_attn.o_proj.weight"));
        v.push(n("post_attention_layernorm.weight"));
        v.push(n("mlp.gate_proj.weight"));
        v.push(n("mlp.up_proj.weight"));
        v.push(n("mlp.down_proj.weight"));
    }
    v.push(FINAL_NORM.to_string());
    if !config.tie_word_embeddings {
        v.push(LM_HEAD.to_string());
    }
    v
}

/// Splits a tensor's leading dimension into consecutive parts of `rows[j]` rows each.
fn split_rows(t: &HostTensor, rows: &[usize]) -> Vec<HostTensor> {
    let row_len: usize = t.shape[1..].iter().product();
    let mut at = 0;
    rows.iter()
        .map(|&r| {
            let mut shape = t.shape.clone();
            shape[0] = r;
            let part = HostTensor::new(shape, t.data[at * row_len..(at + r) * row_len].to_vec());
            at += r;
            part
        })
        .collect()
}

impl<B: Backend> Transformer<B> {
    /// The names of the trainable parameters ([`Weights::params`] order), `lm_head.weight`
    /// only when the head is not tied to the embedding: the names [`Self::weight`],
    /// [`Self::set_weight`] and [`super::Gradients::iter`] use.
    pub fn parameter_names(&self) -> Vec<String> {
        let tied = self.config.tie_word_embeddings;
        self.weights
            .params()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !(tied && n == LM_HEAD))
            .collect()
    }

    /// One parameter (fused name, see [`Weights::params`]) downloaded in HF layout.
    pub fn weight(&self, name: &str) -> Result<HostTensor> {
        let tied = self.config.tie_word_embeddings;
        if tied && name == LM_HEAD {
            bail!("'{LM_HEAD}' is tied to '{EMBED_TOKENS}': read the embedding");
        }
        match self.weights.params().into_iter().find(|(n, _)| n == name) {
            Some((_, Param::Tensor(t))) => self.backend.download(t),
            Some((_, Param::Linear(l))) => self.backend.download_linear(l),
            None => bail!("no parameter named '{name}' in this model"),
        }
    }

    /// One parameter (fused name) as an f32 tensor on the backend, without a host round trip
    /// where the backend can help it (the optimizer's master copy).
    pub fn weight_f32(&self, name: &str) -> Result<B::Tensor> {
        let tied = self.config.tie_word_embeddings;
        if tied && name == LM_HEAD {
            bail!("'{LM_HEAD}' is tied to '{EMBED_TOKENS}': read the embedding");
        }
        match self.weights.params().into_iter().find(|(n, _)| n == name) {
            Some((_, Param::Tensor(t))) => self.backend.tensor_to_f32(t),
            Some((_, Param::Linear(l))) => self.backend.linear_to_f32(l),
            None => bail!("no parameter named '{name}' in this model"),
        }
    }

    /// Replaces one parameter (fused name, see [`Weights::params`]) with host values of the
    /// same shape, re-uploading it in the backend's layout. On a tied model, setting
    /// `model.embed_tokens.weight` updates the LM head too (and `lm_head.weight` is refused).
    pub fn set_weight(&mut self, name: &str, value: &HostTensor) -> Result<()> {
        let tied = self.config.tie_word_embeddings;
        if tied && name == LM_HEAD {
            bail!("'{LM_HEAD}' is tied to '{EMBED_TOKENS}': set the embedding instead");
        }
        let be = &self.backend;
        let mut params = self.weights.params_mut();
        let Some((_, param)) = params.iter_mut().find(|(n, _)| n == name) else {
            bail!("no parameter named '{name}' in this model");
        };
        match param {
            Param::Tensor(t) => {
                let shape = be.shape(t);
                ensure!(
                    value.shape == shape,
                    "set_weight '{name}': shape {:?}, the parameter is {shape:?}",
                    value.shape
                );
                **t = be.upload(value)?;
            }
            Param::Linear(l) => {
                let shape = be.linear_shape(l);
                ensure!(
                    value.shape == shape,
                    "set_weight '{name}': shape {:?}, the parameter is {shape:?}",
                    value.shape
                );
                **l = be.upload_linear(value)?;
            }
        }
        drop(params);
        if tied && name == EMBED_TOKENS {
            self.weights.lm_head = self.backend.upload_linear(value)?;
        }
        Ok(())
    }

    /// Walks the parameters `names` (fused names, in [`Self::parameter_names`] order; a subset
    /// is fine as long as the order holds): `f(i, param)` on the parameter named `names[i]`,
    /// after checking that its shape is `shape_of(i)` (the shape of the value it gets; errors
    /// name `op`). Returns the index of the embedding when the model's LM head is tied to it
    /// (the caller sets the head from that value after the walk).
    fn for_each_named_param(
        &mut self,
        op: &str,
        names: &[String],
        shape_of: impl Fn(&B, usize) -> Vec<usize>,
        mut f: impl FnMut(&B, usize, Param<&mut B::Tensor, &mut B::Linear>) -> Result<()>,
    ) -> Result<Option<usize>> {
        let tied = self.config.tie_word_embeddings;
        let be = &self.backend;
        let mut i = 0;
        let mut embed = None;
        for (name, param) in self.weights.params_mut() {
            if i == names.len() {
                break;
            }
            if names[i] != name {
                continue;
            }
            let shape = shape_of(be, i);
            let have = match &param {
                Param::Tensor(t) => be.shape(t).to_vec(),
                Param::Linear(l) => be.linear_shape(l).to_vec(),
            };
            ensure!(
                shape == have,
                "{op} '{name}': shape {shape:?}, the parameter is {have:?}"
            );
            f(be, i, param)?;
            if tied && name == EMBED_TOKENS {
                embed = Some(i);
            }
            i += 1;
        }
        if i < names.len() {
            bail!(
                "{op}: no parameter '{}' (or the names are out of order)",
                names[i]
            );
        }
        Ok(embed)
    }

    /// Sets the parameters `names` (as [`Self::for_each_named_param`] takes them) from f32
    /// backend tensors of the same shapes, without a host round trip where the backend can
    /// help it. On a tied model the embedding's value sets the LM head too.
    pub fn assign_weights(&mut self, names: &[String], masters: &[B::Tensor]) -> Result<()> {
        ensure!(
            names.len() == masters.len(),
            "assign_weights: {} names, {} tensors",
            names.len(),
            masters.len()
        );
        let embed = self.for_each_named_param(
            "assign_weights",
            names,
            |be, i| be.shape(&masters[i]).to_vec(),
            |be, i, param| match param {
                Param::Tensor(t) => be.assign_tensor(t, &masters[i]),
                Param::Linear(l) => be.assign_linear(l, &masters[i]),
            },
        )?;
        if let Some(e) = embed {
            self.backend
                .assign_linear(&mut self.weights.lm_head, &masters[e])?;
        }
        Ok(())
    }

    /// One AdamW step of the parameters `names` (as [`Self::assign_weights`] takes them) on
    /// their f32 `masters`, moments `m` and `v` and gradients `grads` (same order and
    /// shapes), then the parameters set from the updated masters: what
    /// [`Backend::adamw_update`] on each and [`Self::assign_weights`] would do, with the
    /// backend free to do a parameter's update and its working copy in one pass
    /// ([`Backend::adamw_update_tensor`], [`Backend::adamw_update_linear`]).
    pub fn adamw_step(
        &mut self,
        names: &[String],
        masters: &mut [B::Tensor],
        m: &mut [B::Tensor],
        v: &mut [B::Tensor],
        grads: &[&B::Tensor],
        step: &crate::backend::AdamWStep,
    ) -> Result<()> {
        let k = names.len();
        ensure!(
            masters.len() == k && m.len() == k && v.len() == k && grads.len() == k,
            "adamw_step: {k} names, {} masters, {} + {} moments, {} gradients",
            masters.len(),
            m.len(),
            v.len(),
            grads.len()
        );
        // The walk checks each parameter's shape against its master's (the masters', moments'
        // and gradients' agreement is the update's own check).
        let master_shapes: Vec<Vec<usize>> = masters
            .iter()
            .map(|t| self.backend.shape(t).to_vec())
            .collect();
        let embed = self.for_each_named_param(
            "adamw_step",
            names,
            |_, i| master_shapes[i].clone(),
            |be, i, param| match param {
                Param::Tensor(t) => {
                    be.adamw_update_tensor(&mut masters[i], &mut m[i], &mut v[i], grads[i], step, t)
                }
                Param::Linear(l) => {
                    be.adamw_update_linear(&mut masters[i], &mut m[i], &mut v[i], grads[i], step, l)
                }
            },
        )?;
        if let Some(e) = embed {
            self.backend
                .assign_linear(&mut self.weights.lm_head, &masters[e])?;
        }
        Ok(())
    }

    /// Every weight downloaded in HF tensor names and layout ([`hf_tensor_names`] order):
    /// q/k/v projections and biases and gate/up projections unfused, `lm_head.weight` only
    /// when untied. What a checkpoint writer saves.
    pub fn export_weights(&self) -> Result<Vec<(String, HostTensor)>> {
        let c = &self.config;
        let be = &self.backend;
        let (q, kv, ffn) = (
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let w = &self.weights;
        let mut out = vec![(EMBED_TOKENS.to_string(), be.download(&w.embed_tokens)?)];
        for (i, l) in w.layers.iter().enumerate() {
            let n = |p: &str| layer_tensor_name(i, p);
            out.push((n("input_layernorm.weight"), be.download(&l.input_norm)?));
            let qkv = split_rows(&be.download_linear(&l.qkv_proj)?, &[q, kv, kv]);
            let bias = match &l.qkv_bias {
                Some(b) => split_rows(&be.download(b)?, &[q, kv, kv]),
                None => Vec::new(),
            };
            for (p, t) in ["q_proj", "k_proj", "v_proj"].iter().zip(qkv) {
                out.push((n(&format!("self_attn.{p}.weight")), t));
            }
            for (p, t) in ["q_proj", "k_proj", "v_proj"].iter().zip(bias) {
                out.push((n(&format!("self_attn.{p}.bias")), t));
            }
            out.push((n("self_attn.o_proj.weight"), be.download_linear(&l.o_proj)?));
            out.push((
                n("post_attention_layernorm.weight"),
                be.download(&l.post_attention_norm)?,
            ));
            let [gate, up]: [HostTensor; 2] =
                split_rows(&be.download_linear(&l.gate_up_proj)?, &[ffn, ffn])
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("split_rows returned the wrong count"))?;
            out.push((n("mlp.gate_proj.weight"), gate));
            out.push((n("mlp.up_proj.weight"), up));
            out.push((n("mlp.down_proj.weight"), be.download_linear(&l.down_proj)?));
        }
        out.push((FINAL_NORM.to_string(), be.download(&w.final_norm)?));
        if !c.tie_word_embeddings {
            out.push((LM_HEAD.to_string(), be.download_linear(&w.lm_head)?));
        }
        Ok(out)
    }

    /// Replaces every weight from HF-named host tensors (the inverse of
    /// [`Self::export_weights`]: q/k/v and gate/up fused again). The set of names must be
    /// exactly [`hf_tensor_names`] of the model's config, each with the shape the config
    /// implies; on any error the model is unchanged.
    pub fn import_weights(&mut self, tensors: &[(String, HostTensor)]) -> Result<()> {
        let source = MemoryTensors::new(tensors)?;
        let expected: BTreeSet<String> = hf_tensor_names(&self.config).into_iter().collect();
        let given: BTreeSet<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        let missing: Vec<&String> = expected.difference(&given).collect();
        let unknown: Vec<&String> = given.difference(&expected).collect();
        if !missing.is_empty() || !unknown.is_empty() {
            bail!(
                "import_weights: {} missing tensor(s) {:?}{}; {} unknown tensor(s) {:?}{}",
                missing.len(),
                &missing[..missing.len().min(5)],
                if missing.len() > 5 { " ..." } else { "" },
                unknown.len(),
                &unknown[..unknown.len().min(5)],
                if unknown.len() > 5 { " ..." } else { "" },
            );
        }
        self.weights =
            Self::load_weights(&self.backend, &self.config, &source).context("import_weights")?;
        Ok(())
    }
}
