//! The `genius-engine` commands: argument parsing (clap) and one module per command.

pub mod bench;
pub mod diagnose;
pub mod eval;
pub mod generate;
pub mod info;
pub mod pairs;
pub mod prompts;
pub mod report;
pub mod run;
pub mod sample;
pub mod score;
pub mod train;

use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, probe_devices};
use crate::model::{LoadedModel, load_model};
use crate::transformer::Transformer;
use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "genius-engine",
    version,
    about = "Unsupervised LLM self-training (Genius) on a Rust engine with CUDA kernels"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Which backend runs the maths.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a usable GPU backend is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A HF checkpoint directory, a .gguf file, a known model name (default:
    /// smollm2-135m-instruct, fetched on first use into $GENIUS_HOME), or random:PRESET[@SEED]
    /// (a preset's shape with random weights: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, llama3.2-1b,
    /// llama-tiny, qwen2-tiny, qwen2-tiny-gqa7).
    #[arg(long)]
    pub model: Option<String>,
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Share of the GPU's memory the engine may hold (weights, activations and the KV cache
    /// that `--kv-budget auto` sizes from what is left).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
}

impl ModelArgs {
    /// Checks the flags that clap cannot (a share in (0, 1]).
    pub fn check(&self) -> Result<()> {
        let f = self.gpu_memory_fraction;
        if !(f > 0.0 && f <= 1.0) {
            bail!("--gpu-memory-fraction {f}: expected a share of the GPU's memory in (0, 1]");
        }
        Ok(())
    }

    /// The model as given, or the default model's name.
    pub fn name(&self) -> String {
        self.model
            .clone()
            .unwrap_or_else(|| crate::model::fetch::DEFAULT_MODEL.to_string())
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a model: architecture, size, dtypes, tokenizer, chat template, usable devices.
    Info {
        #[arg(long)]
        model: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Log-probabilities of completions given prompts (JSONL in, JSONL out).
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Lines of {"prompt": str, "completion": str} or {"messages": [...], "completion": str}.
        #[arg(long)]
        input: PathBuf,
        /// Lines of {"prompt_ids", "completion_ids", "logprobs", "sum"}, in input order.
        #[arg(long)]
        output: PathBuf,
        /// Tokens packed into one forward pass.
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
    },
    /// Sample completions of prompts on the rollout engine (JSONL in, JSONL out).
    Generate(generate::GenerateArgs),
    /// Foresight re-sampling of queries into trajectories (resumable).
    Sample(sample::SampleArgs),
    /// Preference pairs (one per step) from trajectories.
    Pairs(pairs::PairsArgs),
    /// Preference training (ACO and baselines) on pairs; writes metrics and a checkpoint.
    Train(train::TrainArgs),
    /// The whole Genius loop: sample -> pairs -> reference log-probs -> train -> checkpoint.
    Run(Box<run::RunArgs>),
    /// Reasoning accuracy on a benchmark file (or scoring of outputs made elsewhere).
    Eval(eval::EvalArgs),
    /// Does the foresight score predict correct answers? And drift across a run's rounds.
    Diagnose(diagnose::DiagnoseArgs),
    /// Throughput benchmarks.
    Bench(bench::BenchArgs),
    /// Charts (SVG) and a text summary of a `run` folder: training curves, accuracy, f, tokens/s.
    Report(report::ReportArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model, json } => info::run(model.as_deref(), json),
        Command::Score {
            model,
            input,
            output,
            batch_tokens,
        } => score::run(&model, &input, &output, batch_tokens),
        Command::Generate(args) => generate::run(&args),
        Command::Sample(args) => sample::run(&args),
        Command::Pairs(args) => pairs::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Diagnose(args) => diagnose::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Report(args) => report::run(&args),
    }
}

/// A transformer on whichever backend `--device` chose.
pub enum AnyTransformer {
    Cpu(Box<Transformer<CpuBackend>>),
    Cuda(Box<Transformer<CudaBackend>>),
}

impl AnyTransformer {
    /// The transformer as `Transformer<B>`, the backend type of `_like` (a reference model
    /// next to the policy); an error when it was loaded on another device.
    pub fn into_backend_of<B: Backend + 'static>(
        self,
        _like: &Transformer<B>,
    ) -> Result<Transformer<B>> {
        let any: Box<dyn std::any::Any> = match self {
            AnyTransformer::Cpu(t) => t,
            AnyTransformer::Cuda(t) => t,
        };
        any.downcast::<Transformer<B>>()
            .map(|t| *t)
            .map_err(|_| anyhow::anyhow!("loaded on another device than the policy model"))
    }
}

/// Runs `$body` with `$t` bound to the transformer of an [`AnyTransformer`], whatever its
/// backend (the body is compiled once per backend, so it can call generic code).
#[macro_export]
macro_rules! with_transformer {
    ($any:expr, $t:ident => $body:expr) => {
        match $any {
            $crate::cli::AnyTransformer::Cpu($t) => {
                let $t = *$t;
                $body
            }
            $crate::cli::AnyTransformer::Cuda($t) => {
                let $t = *$t;
                $body
            }
        }
    };
}

/// The CUDA backend for `--device cuda` (errors say why it cannot start) or `auto` (`None`,
/// with a note on stderr, when no usable GPU is there).
fn cuda_backend(device: Device) -> Result<Option<CudaBackend>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda => {
            let devices = probe_devices().map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?;
            if devices.is_empty() {
                bail!("--device cuda: the CUDA driver reports no device");
            }
            CudaBackend::from_env()
                .map(Some)
                .map_err(|e| anyhow::anyhow!("--device cuda: {e:#}"))
        }
        Device::Auto => match probe_devices() {
            Ok(devices) if !devices.is_empty() => match CudaBackend::from_env() {
                Ok(b) => Ok(Some(b)),
                Err(e) => {
                    eprintln!(
                        "--device auto: a GPU is present but the CUDA backend could not start ({e:#}); running on the CPU"
                    );
                    Ok(None)
                }
            },
            _ => Ok(None),
        },
    }
}

/// Loads the model named by `args` and builds the transformer on the backend `--device`
/// picks: `cuda`, `cpu`, or `auto` (the GPU when one is usable, else the CPU).
pub fn load_transformer(args: &ModelArgs) -> Result<(LoadedModel, AnyTransformer)> {
    args.check()?;
    let backend = cuda_backend(args.device)?;
    let model = load_model(args.model.as_deref())?;
    let started = std::time::Instant::now();
    let any = match backend {
        Some(cuda) => AnyTransformer::Cuda(Box::new(
            Transformer::load(cuda, model.config.clone(), model.weights.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", model.path.display()))?,
        )),
        None => AnyTransformer::Cpu(Box::new(
            Transformer::load(
                CpuBackend::new(),
                model.config.clone(),
                model.weights.as_ref(),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", model.path.display()))?,
        )),
    };
    let backend_name = match &any {
        AnyTransformer::Cpu(t) => t.backend_name(),
        AnyTransformer::Cuda(t) => t.backend_name(),
    };
    eprintln!(
        "loaded {} ({} parameters) on {} in {:.1}s",
        model.name,
        info::human_count(model.config.num_parameters()),
        backend_name,
        started.elapsed().as_secs_f64()
    );
    Ok((model, any))
}
