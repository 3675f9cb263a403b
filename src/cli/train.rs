//! `genius-engine train`: preference training on a pairs file into `--out`:
//! `pairs.ref.jsonl` (the pairs with reference log-probs, computed once before training),
//! `metrics.jsonl` (one line per optimizer step), `pair_stats.jsonl` (`--log-pairs`),
//! `train_state/` (master weights and AdamW state, for resuming) and `checkpoint/` (HF layout).
//! Started again with the same `--out`, it resumes from the last saved step.

use super::ModelArgs;
use crate::backend::Backend;
use crate::genius::artifacts::{JsonlLog, check_same_settings, create_dir};
use crate::genius::loss::{AcoClip, LossConfig, LossKind};
use crate::genius::pairs::{Pair, read_pairs, write_jsonl};
use crate::genius::sequences::{PromptMode, build_sequence, response_logprob_sums};
use crate::genius::trainer::{
    PairStat, StepMetrics, TrainConfig, TrainPair, TrainState, total_steps, train,
};
use crate::model::TextTokenizer;
use crate::model::checkpoint::save_checkpoint;
use crate::model::safetensors::Dtype;
use crate::transformer::Transformer;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which loss to train with.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LossFlag {
    /// Advantage-calibrated optimisation (Genius; default).
    #[default]
    Aco,
    Dpo,
    Simpo,
    Ipo,
    Sft,
}

/// The ACO weight's clip.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClipFlag {
    /// w = min(1, exp(-(A_l - A_w)/alpha)) (the paper; default).
    #[default]
    Min,
    /// w = max(1, ...) (the released code).
    Max,
}

/// Training flags; unset ones take the profile's value (the paper's for `train`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrainFlags {
    #[arg(long, value_enum)]
    pub loss: Option<LossFlag>,
    /// ACO weight clip [min].
    #[arg(long, value_enum)]
    pub aco_clip: Option<ClipFlag>,
    /// ACO alpha [1]; `inf` gives DPO.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Reward scale beta [0.1; SimPO 2.0].
    #[arg(long)]
    pub beta: Option<f64>,
    /// SimPO margin gamma [0.5].
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// IPO tau [0.1].
    #[arg(long)]
    pub ipo_tau: Option<f64>,
    /// Peak learning rate [paper: 5e-7].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up fraction of the steps [0.1].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Passes over the pairs [1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Pairs per optimizer step (global batch) [paper: 128].
    #[arg(long)]
    pub pairs_per_step: Option<usize>,
    /// Tokens per forward/backward pass [2048].
    #[arg(long)]
    pub micro_batch_tokens: Option<usize>,
    /// Gradient clipping norm [1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay [0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Truncate training sequences to this many tokens [1300].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// How pairs become sequences [query].
    #[arg(long, value_enum)]
    pub prompt_mode: Option<PromptMode>,
    /// Save the training state every N optimizer steps, and after any step that ends more
    /// than two minutes after the last save, and at the end [10].
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Write pair_stats.jsonl (per pair: policy and reference log-prob sums, w, loss).
    #[arg(long)]
    pub log_pairs: bool,
}

/// Longest stretch of training between two saved states.
const SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(120);

/// Resolved training settings.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub config: TrainConfig,
    pub max_len: usize,
    pub prompt_mode: PromptMode,
    pub save_every: u64,
    pub log_pairs: bool,
}

impl TrainFlags {
    /// `base` with every given flag applied.
    pub fn apply(&self, base: TrainSettings, seed: u64) -> Result<TrainSettings> {
        let mut s = base;
        let c = &mut s.config;
        if let Some(loss) = self.loss {
            c.loss = LossConfig::new(match loss {
                LossFlag::Aco => LossKind::default(),
                LossFlag::Dpo => LossKind::Dpo,
                LossFlag::Simpo => LossKind::Simpo {
                    gamma: LossKind::DEFAULT_SIMPO_GAMMA,
                },
                LossFlag::Ipo => LossKind::Ipo {
                    tau: LossKind::DEFAULT_IPO_TAU,
                },
                LossFlag::Sft => LossKind::Sft,
            });
        }
        match &mut c.loss.kind {
            LossKind::Aco { clip, alpha } => {
                if let Some(f) = self.aco_clip {
                    *clip = match f {
                        ClipFlag::Min => AcoClip::Min,
                        ClipFlag::Max => AcoClip::Max,
                    };
                }
                if let Some(a) = self.alpha {
                    *alpha = a;
                }
            }
            LossKind::Simpo { gamma } => {
                if let Some(g) = self.simpo_gamma {
                    *gamma = g;
                }
            }
            LossKind::Ipo { tau } => {
                if let Some(t) = self.ipo_tau {
                    *tau = t;
                }
            }
            _ => {}
        }
        let loss_name = c.loss.kind.name();
        for (flag, given, applies) in [
            ("--aco-clip", self.aco_clip.is_some(), loss_name == "aco"),
            ("--alpha", self.alpha.is_some(), loss_name == "aco"),
            (
                "--simpo-gamma",
                self.simpo_gamma.is_some(),
                loss_name == "simpo",
            ),
            ("--ipo-tau", self.ipo_tau.is_some(), loss_name == "ipo"),
        ] {
            if given && !applies {
                bail!("{flag} does not apply to the {loss_name} loss");
            }
        }
        if let Some(b) = self.beta {
            c.loss.beta = b;
        }
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f { c.$f = v; })* };
        }
        set!(
            lr,
            warmup_ratio,
            epochs,
            pairs_per_step,
            micro_batch_tokens,
            max_grad_norm
        );
        if let Some(wd) = self.weight_decay {
            c.adamw.weight_decay = wd;
        }
        c.seed = seed;
        if let Some(v) = self.max_len {
            s.max_len = v;
        }
        if let Some(v) = self.prompt_mode {
            s.prompt_mode = v;
        }
        if let Some(v) = self.save_every {
            s.save_every = v.max(1);
        }
        s.log_pairs |= self.log_pairs;
        s.config.validate()?;
        Ok(s)
    }
}

impl TrainSettings {
    /// The paper's setup (method.md section 3).
    pub fn paper() -> Self {
        Self {
            config: TrainConfig::default(),
            max_len: 1300,
            prompt_mode: PromptMode::Query,
            save_every: 10,
            log_pairs: false,
        }
    }
}

/// `train`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// pairs.jsonl from `pairs` (or the authors' format).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Reference model for the log-probs (default: the starting model itself).
    #[arg(long)]
    pub ref_model: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub training: TrainFlags,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let settings = args.training.apply(TrainSettings::paper(), args.seed)?;
    create_dir(&args.out)?;
    check_same_settings(
        &args.out.join("train_settings.json"),
        &serde_json::json!({
            "model": args.model.name(),
            "pairs": args.pairs.display().to_string(),
            "ref_model": args.ref_model,
            "training": format!("{settings:?}"),
        }),
    )?;
    let (loaded, any) = super::load_transformer(&args.model)?;
    let summary = crate::with_transformer!(any, model => {
        let mut model = model;
        let reference = match &args.ref_model {
            Some(name) => Some(
                super::load_transformer(&ModelArgs {
                    model: Some(name.clone()),
                    device: args.model.device,
                    gpu_memory_fraction: args.model.gpu_memory_fraction,
                })?
                .1
                .into_backend_of(&model)
                .with_context(|| format!("--ref-model {name}"))?,
            ),
            None => None,
        };
        train_phase(
            &mut model,
            &loaded.tokenizer,
            &args.pairs,
            &args.out,
            &settings,
            reference.as_ref(),
        )?
    });
    eprintln!("{}", summary.line());
    Ok(())
}

/// What a training phase did.
#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    pub pairs: usize,
    pub steps: u64,
    pub first: Option<StepMetrics>,
    pub last: Option<StepMetrics>,
    /// Seconds computing reference log-probs (0 when they were already there).
    pub reference_seconds: f64,
    pub reference_tokens: usize,
    pub train_seconds: f64,
    pub train_tokens: usize,
    pub checkpoint_seconds: f64,
    pub checkpoint: PathBuf,
}

impl TrainSummary {
    /// The first step's loss (NaN when no step ran).
    pub fn first_loss(&self) -> f64 {
        self.first.as_ref().map_or(f64::NAN, |m| m.loss)
    }

    /// The last step's loss (NaN when no step ran).
    pub fn last_loss(&self) -> f64 {
        self.last.as_ref().map_or(f64::NAN, |m| m.loss)
    }

    /// The last step's reward margin (NaN when no step ran).
    pub fn last_margin(&self) -> f64 {
        self.last.as_ref().map_or(f64::NAN, |m| m.margin)
    }

    pub fn line(&self) -> String {
        format!(
            "trained on {} pairs, {} steps: loss {:.4} -> {:.4}, margin {:.4}; checkpoint {}",
            self.pairs,
            self.steps,
            self.first_loss(),
            self.last_loss(),
            self.last_margin(),
            self.checkpoint.display()
        )
    }
}

/// Builds the training pairs: token sequences and advantages; references filled in later.
fn prepare_pairs(
    tok: &TextTokenizer,
    pairs: &[Pair],
    source: &Path,
    settings: &TrainSettings,
) -> Result<Vec<TrainPair>> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let build = |response: Result<&str>| -> Result<_> {
                build_sequence(
                    tok,
                    &p.prompt,
                    response?,
                    settings.prompt_mode,
                    settings.max_len,
                )
            };
            let chosen = build(p.chosen_response());
            let rejected = build(p.rejected_response());
            let what = || {
                format!(
                    "{}: pair {} (id '{}', step {})",
                    source.display(),
                    i + 1,
                    p.id,
                    p.step
                )
            };
            Ok(TrainPair {
                id: p.id.clone(),
                step: p.step,
                chosen: chosen.with_context(what)?,
                rejected: rejected.with_context(what)?,
                ref_chosen: p.ref_chosen_logp.unwrap_or(0.0),
                ref_rejected: p.ref_rejected_logp.unwrap_or(0.0),
                adv_chosen: p.chosen_weights,
                adv_rejected: p.rejected_weights,
            })
        })
        .collect()
}

/// Trains `model` on the pairs in `pairs_path`, writing into `out` (see the module comment);
/// resumes from `out/train_state` when present. `reference` scores the reference log-probs
/// (default: `model` itself, before any update).
pub fn train_phase<B: Backend>(
    model: &mut Transformer<B>,
    tok: &TextTokenizer,
    pairs_path: &Path,
    out: &Path,
    settings: &TrainSettings,
    reference: Option<&Transformer<B>>,
) -> Result<TrainSummary> {
    let mut cfg = settings.config.clone();
    let mut pairs = read_pairs(pairs_path)?;
    if pairs.is_empty() {
        bail!("{}: no pairs to train on", pairs_path.display());
    }
    // What training will hold at its peak, against what the host has free (the CPU backend;
    // a pass packs at least one pair, so a pair longer than the micro-batch sets its size).
    if model.backend.memory_info().is_none()
        && let Some(available) = crate::transformer::memory::host_memory_available()
    {
        let plan = crate::transformer::memory::cpu_training_plan(
            &model.config,
            crate::transformer::memory::TrainShape {
                tokens: cfg.micro_batch_tokens.max(2 * settings.max_len),
                logit_rows: crate::backend::cpu::LOGPROB_BACKWARD_CHUNK_ROWS,
            },
        );
        plan.check(available, "the host memory available")?;
    }
    cfg.recompute = choose_recompute(model, cfg.micro_batch_tokens.max(2 * settings.max_len))?;
    let cfg = &cfg;
    let state_dir = out.join("train_state");
    let ref_path = out.join("pairs.ref.jsonl");
    let mut summary = TrainSummary {
        pairs: pairs.len(),
        checkpoint: out.join("checkpoint"),
        ..TrainSummary::default()
    };
    let mut train_pairs = prepare_pairs(tok, &pairs, pairs_path, settings)?;

    // Reference log-probs: given in the pairs, saved by an earlier run, or computed now.
    let have_refs = pairs
        .iter()
        .all(|p| p.ref_chosen_logp.is_some() && p.ref_rejected_logp.is_some());
    let resumed_state = TrainState::load(&model.backend, &state_dir)?;
    if cfg.loss.kind.needs_reference() && !have_refs {
        if ref_path.exists() {
            let saved = read_pairs(&ref_path)?;
            if saved.len() != pairs.len()
                || saved
                    .iter()
                    .zip(&pairs)
                    .any(|(a, b)| a.id != b.id || a.step != b.step)
            {
                bail!(
                    "{}: the saved reference log-probs are for other pairs than {}; use a new --out",
                    ref_path.display(),
                    pairs_path.display()
                );
            }
            pairs = saved;
        } else {
            if resumed_state.is_some() {
                bail!(
                    "{}: training started but {} is missing, and the starting model is gone; use a new --out",
                    state_dir.display(),
                    ref_path.display()
                );
            }
            let started = Instant::now();
            let seqs: Vec<_> = train_pairs
                .iter()
                .flat_map(|p| [p.chosen.clone(), p.rejected.clone()])
                .collect();
            summary.reference_tokens = seqs.iter().map(|s| s.tokens.len()).sum();
            let bar = phase_bar("reference", seqs.len() as u64, "sequences");
            let sums = response_logprob_sums(
                reference.unwrap_or(model),
                &seqs,
                cfg.micro_batch_tokens.max(512),
                |n| bar.inc(n as u64),
            )?;
            bar.finish_and_clear();
            for (p, s) in pairs.iter_mut().zip(sums.chunks_exact(2)) {
                p.ref_chosen_logp = Some(s[0]);
                p.ref_rejected_logp = Some(s[1]);
            }
            write_jsonl(&ref_path, &pairs)?;
            summary.reference_seconds = started.elapsed().as_secs_f64();
        }
    }
    for (t, p) in train_pairs.iter_mut().zip(&pairs) {
        t.ref_chosen = p.ref_chosen_logp.unwrap_or(0.0);
        t.ref_rejected = p.ref_rejected_logp.unwrap_or(0.0);
    }

    // Optimizer state: resumed or fresh.
    let mut state = match resumed_state {
        Some(s) => {
            s.apply_to(model)?;
            s
        }
        None => TrainState::new(model, cfg.adamw)?,
    };
    let total = total_steps(train_pairs.len(), cfg);
    summary.steps = total;
    let (mut metrics_log, mut old_metrics) =
        reopen_at_step::<StepMetrics>(&out.join("metrics.jsonl"), state.step, |m| m.step)?;
    let mut pair_log = if settings.log_pairs {
        Some(
            reopen_at_step::<PairStat>(&out.join("pair_stats.jsonl"), state.step, |p| p.opt_step)?
                .0,
        )
    } else {
        None
    };
    summary.first = old_metrics.first().cloned();
    summary.last = old_metrics.pop();

    let bar = phase_bar("train", total, "steps");
    bar.set_position(state.step);
    let started = Instant::now();
    let mut tokens = 0;
    let mut last_save = Instant::now();
    train(
        model,
        &train_pairs,
        cfg,
        &mut state,
        |m, stats, model_ref, state| {
            metrics_log.append(m)?;
            if let Some(log) = &mut pair_log {
                for s in stats {
                    log.append(s)?;
                }
            }
            // An interruption loses at most `save_every` steps or about two minutes of work.
            // Not after the last step: the checkpoint written next marks the work done (and
            // the state is 16 bytes per parameter: 8 GB for a 0.5B model).
            if state.step < m.total_steps
                && (state.step % settings.save_every == 0 || last_save.elapsed() >= SAVE_INTERVAL)
            {
                state.save(&model_ref.backend, &state_dir)?;
                last_save = Instant::now();
            }
            tokens += m.tokens;
            bar.set_position(state.step);
            bar.set_message(format!(
                "loss {:.4}, margin {:.4}, {:.0} tokens/s",
                m.loss, m.margin, m.tokens_per_s
            ));
            if summary.first.is_none() {
                summary.first = Some(m.clone());
            }
            summary.last = Some(m.clone());
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    summary.train_seconds = started.elapsed().as_secs_f64();
    summary.train_tokens = tokens;

    let started = Instant::now();
    let weights = model.export_weights()?;
    // The weights' own precision: f32 on the CPU, bf16 on the GPU (no bits lost either way).
    let dtype = if model.backend.element_bytes() == 2 {
        Dtype::BF16
    } else {
        Dtype::F32
    };
    save_checkpoint(&summary.checkpoint, &model.config, tok, &weights, dtype)?;
    summary.checkpoint_seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Whether training passes of `tokens` tokens must recompute each layer in backward: on a
/// GPU, the device plan against free device memory (the loaded weights already counted as
/// used): saving every layer's activations when that fits, else recomputing; refused with the
/// itemised numbers when neither fits. On the CPU: no (its plan is checked separately).
pub fn choose_recompute<B: Backend>(model: &Transformer<B>, tokens: usize) -> Result<bool> {
    use crate::transformer::memory::{MemoryPlan, TrainShape, gpu_training_plan};
    model.backend.release_cached_memory()?;
    let Some((free, _)) = model.backend.memory_info() else {
        return Ok(false);
    };
    let shape = TrainShape {
        tokens,
        logit_rows: crate::backend::cuda::TARGET_LOGPROB_CHUNK_BYTES
            / (2 * model.config.vocab_size).max(1),
    };
    let weights = |p: &MemoryPlan| {
        p.items
            .iter()
            .filter(|i| i.name == "working weights")
            .map(|i| i.bytes)
            .sum::<u64>()
    };
    let saving = gpu_training_plan(&model.config, shape, 0, false);
    let available = free as u64 + weights(&saving);
    // Saving everything only with 5% to spare: the plan counts the large buffers, not the
    // allocator's fragmentation or every short-lived one.
    if saving.total() <= available / 20 * 19 {
        return Ok(false);
    }
    let recomputing = gpu_training_plan(&model.config, shape, 0, true);
    recomputing.check(available, "free device memory plus the loaded weights")?;
    eprintln!(
        "train: saving every layer's activations needs {:.2} GiB; recomputing each layer in backward instead ({:.2} GiB)",
        saving.total() as f64 / (1u64 << 30) as f64,
        recomputing.total() as f64 / (1u64 << 30) as f64
    );
    Ok(true)
}

/// Opens a per-step log for resuming at `step`: records of later steps (written after the
/// last saved state, to be redone) are dropped. Returns the log and the kept records.
fn reopen_at_step<T: serde::Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    step: u64,
    step_of: impl Fn(&T) -> u64,
) -> Result<(JsonlLog, Vec<T>)> {
    let (log, records) = JsonlLog::open::<T>(path)?;
    let total = records.len();
    let kept: Vec<T> = records.into_iter().filter(|r| step_of(r) <= step).collect();
    if kept.len() == total {
        return Ok((log, kept));
    }
    drop(log);
    write_jsonl(path, &kept)?;
    let (log, kept) = JsonlLog::open::<T>(path)?;
    Ok((log, kept))
}

/// A progress bar for one phase of a run.
pub fn phase_bar(phase: &str, len: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{phase:<9} {{bar:30}} {{pos}}/{{len}} {unit}  {{elapsed_precise}} (ETA {{eta}})  {{msg}}"
        ))
        .expect("valid template"),
    );
    bar
}
