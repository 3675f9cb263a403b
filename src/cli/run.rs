//! `genius-engine run`: the whole Genius loop. Each round samples trajectories with the
//! current weights, builds pairs, computes reference log-probs, trains, and writes a
//! checkpoint; the next round samples with the updated weights already in memory. Everything
//! lands in `--out` (`round-N/` per round, `summary.json`), and running again with the same
//! `--out` continues where an interrupted run stopped.
//!
//! Profiles: `paper` is method.md's setup; `quick` (the default on the CPU) keeps the method
//! and shrinks its sizes so the default run finishes in minutes on two cores (see
//! [`quick_sampling`] and [`quick_training`]).

use super::ModelArgs;
use super::eval::{EvalGenFlags, EvalSpec, evaluate_round};
use super::pairs::{RejectFlag, pairs_phase};
use super::sample::{QueryArgs, SampleSummary, SamplingFlags, sample_phase, sampling_engine};
use super::train::{TrainFlags, TrainSettings, TrainSummary, train_phase};
use crate::genius::artifacts::{check_same_settings, create_dir, write_json_atomic};
use crate::genius::pairs::PairOptions;
use crate::genius::sample::SampleConfig;
use crate::genius::trainer::TrainConfig;
use crate::model::load_model;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sizes of a run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// The method with small sizes: finishes in minutes on a 2-core CPU.
    Quick,
    /// The paper's values (M=2, N=4, K=4, 1024-token steps and rollouts, 128 pairs per step).
    Paper,
}

/// `run`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub queries: QueryArgs,
    /// Output folder (default: runs/<UTC timestamp>); reuse it to resume.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rounds of sample -> pairs -> train.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Sizes [default: quick on the CPU].
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How the rejected candidate of a step is picked.
    #[arg(long, value_enum, default_value_t = RejectFlag::Uniform)]
    pub rejected: RejectFlag,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    #[command(flatten)]
    pub training: TrainFlags,
    /// Evaluate before the first round and after each: BENCHMARK:FILE (repeatable), e.g.
    /// `gsm8k:test.jsonl`; results in OUT/eval.jsonl and OUT/eval/.
    #[arg(long = "eval")]
    pub eval: Vec<EvalSpec>,
    /// Evaluation: samples per question.
    #[arg(long, default_value_t = 1)]
    pub eval_samples: usize,
    /// Evaluation: new tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub eval_max_new_tokens: usize,
    /// Evaluation: sampling temperature (the paper: 1.0).
    #[arg(long, default_value_t = 1.0)]
    pub eval_temperature: f32,
    /// Evaluation: only the first N questions of each file.
    #[arg(long)]
    pub eval_limit: Option<usize>,
}

impl RunArgs {
    /// The evaluation settings of `--eval-*` (seed and KV budget shared with sampling).
    pub fn eval_flags(&self) -> EvalGenFlags {
        EvalGenFlags {
            temperature: self.eval_temperature,
            samples: self.eval_samples,
            max_new_tokens: self.eval_max_new_tokens,
            seed: self.seed,
            shots: None,
            limit: self.eval_limit,
            kv_budget: self.sampling.kv_budget().to_string(),
        }
    }
}

/// The quick profile's sampling: M = 2, N = 2, K = 2, steps of at most 40 tokens, rollouts of
/// at most 48 (the paper: 2, 4, 4, 1024, 1024).
pub fn quick_sampling() -> SampleConfig {
    SampleConfig {
        beams: 2,
        candidates: 2,
        steps: 2,
        max_step_tokens: 40,
        max_rollout_tokens: 48,
        queries_in_flight: 16,
        ..SampleConfig::default()
    }
}

/// The quick profile's training: 16 pairs per step and a learning rate of 2e-6 (the paper:
/// 128 and 5e-7, for an 8B model), sequences cut at 512 tokens.
pub fn quick_training() -> TrainSettings {
    TrainSettings {
        config: TrainConfig {
            pairs_per_step: 16,
            lr: 2e-6,
            ..TrainConfig::default()
        },
        max_len: 512,
        ..TrainSettings::paper()
    }
}

/// One round's results.
struct RoundSummary {
    round: usize,
    sample: Option<SampleSummary>,
    pairs: usize,
    pairs_seconds: f64,
    train: Option<TrainSummary>,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let profile = args.profile.unwrap_or(Profile::Quick);
    let (sample_base, train_base) = match profile {
        Profile::Quick => (quick_sampling(), quick_training()),
        Profile::Paper => (SampleConfig::default(), TrainSettings::paper()),
    };
    let sample_cfg = args.sampling.apply(sample_base, args.seed);
    sample_cfg.validate()?;
    let train_settings = args.training.apply(train_base, args.seed)?;
    let queries = args.queries.load()?;
    if args.rounds == 0 {
        anyhow::bail!("--rounds must be at least 1");
    }
    let out = match &args.out {
        Some(p) => p.clone(),
        None => PathBuf::from("runs").join(crate::model::chat_template::strftime_utc(
            "%Y%m%d-%H%M%S",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        )),
    };
    create_dir(&out)?;
    check_same_settings(
        &out.join("settings.json"),
        &json!({
            "model": args.model.name(),
            "queries": queries.iter().map(|q| q.id.as_str()).collect::<Vec<_>>().join(","),
            "profile": format!("{profile:?}"),
            "sampling": format!("{sample_cfg:?}"),
            "training": format!("{train_settings:?}"),
            "rejected": format!("{:?}", args.rejected),
        }),
    )?;
    eprintln!(
        "run: {} queries, {} round(s), profile {:?} (M={} N={} K={}, steps <= {} tokens, rollouts <= {}; {} pairs/step, lr {:e}) -> {}",
        queries.len(),
        args.rounds,
        profile,
        sample_cfg.beams,
        sample_cfg.candidates,
        sample_cfg.steps,
        sample_cfg.max_step_tokens,
        sample_cfg.max_rollout_tokens,
        train_settings.config.pairs_per_step,
        train_settings.config.lr,
        out.display()
    );
    let (loaded, any) = super::load_transformer(&args.model)?;
    crate::with_transformer!(any, model => run_rounds(
        model,
        &loaded,
        args,
        &RoundsPlan {
            queries: &queries,
            sample_cfg: &sample_cfg,
            train_settings: &train_settings,
            out: &out,
            profile,
        },
    ))
}

/// What every round of a `run` uses.
struct RoundsPlan<'a> {
    queries: &'a [crate::genius::queries::Query],
    sample_cfg: &'a SampleConfig,
    train_settings: &'a TrainSettings,
    out: &'a Path,
    profile: Profile,
}

/// The rounds of a `run` on whichever backend the model was loaded on: sample, pairs,
/// train, evaluate; the model stays in memory (and on the device) from round to round.
fn run_rounds<B: crate::backend::Backend>(
    mut model: crate::transformer::Transformer<B>,
    loaded: &crate::model::LoadedModel,
    args: &RunArgs,
    plan: &RoundsPlan<'_>,
) -> Result<()> {
    let RoundsPlan {
        queries,
        sample_cfg,
        train_settings,
        out,
        profile,
    } = *plan;
    let tok = &loaded.tokenizer;
    let pair_opts = PairOptions {
        strategy: args.rejected.into(),
        seed: args.seed,
        max_chars: None,
    };
    let mut rounds = Vec::new();
    let started = Instant::now();
    let eval_flags = args.eval_flags();
    let fraction = args.model.gpu_memory_fraction;
    model = evaluate_round(model, loaded, &args.eval, &eval_flags, out, 0, fraction)?;
    for round in 1..=args.rounds {
        let dir = out.join(format!("round-{round}"));
        create_dir(&dir)?;
        let checkpoint = dir.join("checkpoint");
        if checkpoint.join("config.json").exists() {
            eprintln!("round {round}: already complete ({})", checkpoint.display());
            if round < args.rounds || !args.eval.is_empty() {
                load_weights_into(&mut model, &checkpoint)?;
            }
            model = evaluate_round(model, loaded, &args.eval, &eval_flags, out, round, fraction)?;
            continue;
        }
        let mut summary = RoundSummary {
            round,
            sample: None,
            pairs: 0,
            pairs_seconds: 0.0,
            train: None,
        };
        // Sampling (skipped queries already in trajectories.jsonl) with the current weights.
        let trajectories = dir.join("trajectories.jsonl");
        let pairs_path = dir.join("pairs.jsonl");
        if !dir.join("train_state").exists() {
            let mut engine =
                sampling_engine(model, tok, &args.sampling, args.model.gpu_memory_fraction)?;
            let graphs_before = engine.model().backend.decode_graph_stats();
            let s = sample_phase(&mut engine, tok, queries, sample_cfg, &trajectories);
            let graphs = graphs_before
                .zip(engine.model().backend.decode_graph_stats())
                .map(|(a, b)| b.since(&a));
            model = engine.into_model();
            let s = s?;
            eprintln!("round {round}: {}", s.line());
            if let Some(g) = graphs {
                eprintln!("round {round}: decode graphs: {}", g.summary());
            }
            s.check()?;
            summary.sample = Some(s);
            let t = Instant::now();
            let (_, n) = pairs_phase(&trajectories, &pairs_path, &pair_opts)?;
            summary.pairs = n;
            summary.pairs_seconds = t.elapsed().as_secs_f64();
            eprintln!("round {round}: {n} pairs -> {}", pairs_path.display());
        }
        let t = train_phase(&mut model, tok, &pairs_path, &dir, train_settings, None)?;
        eprintln!("round {round}: {}", t.line());
        summary.pairs = t.pairs;
        summary.train = Some(t);
        rounds.push(summary);
        model = evaluate_round(model, loaded, &args.eval, &eval_flags, out, round, fraction)?;
    }
    let total = started.elapsed().as_secs_f64();
    print_summary(&rounds, total);
    write_json_atomic(
        &out.join("summary.json"),
        &json!({
            "profile": format!("{profile:?}").to_lowercase(),
            "queries": queries.len(),
            "seconds": total,
            "rounds": rounds.iter().map(round_json).collect::<Vec<_>>(),
        }),
    )?;
    eprintln!("artifacts in {}", out.display());
    Ok(())
}

/// Replaces the model's weights with a checkpoint's (resuming after a finished round).
fn load_weights_into<B: crate::backend::Backend>(
    model: &mut crate::transformer::Transformer<B>,
    checkpoint: &Path,
) -> Result<()> {
    let ckpt = load_model(Some(&checkpoint.to_string_lossy()))?;
    let tensors = ckpt
        .weights
        .tensor_names()
        .into_iter()
        .map(|n| {
            let t = ckpt.weights.load_f32(&n)?;
            Ok((n, t))
        })
        .collect::<Result<Vec<_>>>()?;
    model
        .import_weights(&tensors)
        .with_context(|| format!("{}: loading the round's weights", checkpoint.display()))
}

fn round_json(r: &RoundSummary) -> serde_json::Value {
    let s = r.sample.as_ref();
    let t = r.train.as_ref();
    json!({
        "round": r.round,
        "queries_sampled": s.map(|s| s.stats.queries),
        "candidates": s.map(|s| s.stats.candidates),
        "mean_f": s.map(|s| s.stats.mean_f()),
        "sample_seconds": s.map(|s| s.seconds),
        "sample_tokens": s.map(|s| s.stats.tokens_generated),
        "sample_tokens_per_s": s.map(|s| s.tokens_per_s()),
        "pairs": r.pairs,
        "pairs_seconds": r.pairs_seconds,
        "reference_seconds": t.map(|t| t.reference_seconds),
        "reference_tokens": t.map(|t| t.reference_tokens),
        "train_steps": t.map(|t| t.steps),
        "train_seconds": t.map(|t| t.train_seconds),
        "train_tokens": t.map(|t| t.train_tokens),
        "loss_first": t.and_then(|t| t.first.as_ref().map(|m| m.loss)),
        "loss_last": t.and_then(|t| t.last.as_ref().map(|m| m.loss)),
        "margin_last": t.and_then(|t| t.last.as_ref().map(|m| m.margin)),
        "checkpoint_seconds": t.map(|t| t.checkpoint_seconds),
        "checkpoint": t.map(|t| t.checkpoint.display().to_string()),
    })
}

fn print_summary(rounds: &[RoundSummary], total: f64) {
    let rate = |tokens: f64, secs: f64| {
        if secs > 0.0 {
            format!("{:.0} tok/s", tokens / secs)
        } else {
            "-".into()
        }
    };
    eprintln!();
    eprintln!("round  phase       seconds   throughput    result");
    for r in rounds {
        if let Some(s) = &r.sample {
            eprintln!(
                "{:>5}  sample    {:>9.1}   {:>11}   {} queries, {} candidates, mean f {:.4}",
                r.round,
                s.seconds,
                rate(s.stats.tokens_generated as f64, s.seconds),
                s.stats.queries + s.resumed,
                s.stats.candidates,
                s.stats.mean_f()
            );
        }
        eprintln!(
            "{:>5}  pairs     {:>9.1}   {:>11}   {} pairs",
            r.round, r.pairs_seconds, "-", r.pairs
        );
        if let Some(t) = &r.train {
            eprintln!(
                "{:>5}  reference {:>9.1}   {:>11}   reference log-probs",
                r.round,
                t.reference_seconds,
                rate(t.reference_tokens as f64, t.reference_seconds)
            );
            eprintln!(
                "{:>5}  train     {:>9.1}   {:>11}   {} steps, loss {:.4} -> {:.4}, margin {:.4}",
                r.round,
                t.train_seconds,
                rate(t.train_tokens as f64, t.train_seconds),
                t.steps,
                t.first_loss(),
                t.last_loss(),
                t.last_margin()
            );
            eprintln!(
                "{:>5}  checkpoint{:>9.1}   {:>11}   {}",
                r.round,
                t.checkpoint_seconds,
                "-",
                t.checkpoint.display()
            );
        }
    }
    eprintln!("total {total:.1} s");
}
