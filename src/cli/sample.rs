//! `genius-engine sample`: foresight re-sampling of a query file into
//! `<out>/trajectories.jsonl`, one line per query, appended as each query finishes. Started
//! again with the same `--out`, it skips the queries already there.

use super::ModelArgs;
use super::generate::resolve_kv_budget;
use crate::backend::Backend;
use crate::engine::scheduler::{Engine, EngineConfig};
use crate::genius::artifacts::{JsonlLog, check_same_settings, create_dir};
use crate::genius::pairs::Trajectory;
use crate::genius::queries::{Query, load_queries_or_bundled};
use crate::genius::sample::{
    EmptyRollout, FinishedBeams, QueryInput, SampleConfig, SampleStats, Strategy, sample_queries,
};
use crate::model::TextTokenizer;
use crate::transformer::Transformer;
use anyhow::Result;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The method's sampling flags; unset ones take the profile's value (the paper's for
/// `sample`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SamplingFlags {
    /// M: beams kept per step [paper: 2].
    #[arg(long = "beams", short = 'M')]
    pub beams: Option<usize>,
    /// N: candidate steps sampled per beam [paper: 4].
    #[arg(long = "candidates", short = 'N')]
    pub candidates: Option<usize>,
    /// K: steps per query [paper: 4].
    #[arg(long = "steps", short = 'K')]
    pub steps: Option<usize>,
    /// Softmax temperature over foresight scores [0.1].
    #[arg(long)]
    pub tau: Option<f64>,
    /// Temperature of candidate steps [0.6].
    #[arg(long)]
    pub candidate_temperature: Option<f32>,
    /// Temperature of foresight rollouts [1.0].
    #[arg(long)]
    pub rollout_temperature: Option<f32>,
    /// Token limit of a candidate step [paper: 1024].
    #[arg(long)]
    pub max_step_tokens: Option<usize>,
    /// Token limit of a rollout [paper: 1024].
    #[arg(long)]
    pub max_rollout_tokens: Option<usize>,
    /// Start of the assistant turn ["The reasoning steps are:\n\n"].
    #[arg(long)]
    pub prefix: Option<String>,
    /// How the next beams are drawn [foresight].
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// Score of a candidate that ended the answer itself [candidate-mean].
    #[arg(long, value_enum)]
    pub empty_rollout: Option<EmptyRollout>,
    /// What a beam whose step ended the answer does [stop].
    #[arg(long, value_enum)]
    pub finished_beams: Option<FinishedBeams>,
    /// Queries sampled at once [8].
    #[arg(long)]
    pub queries_in_flight: Option<usize>,
    /// KV cache capacity: tokens, bytes with a unit (`2GiB`), or `auto` (a GPU's free memory,
    /// 2 GiB on the CPU) [auto].
    #[arg(long)]
    pub kv_budget: Option<String>,
}

impl SamplingFlags {
    /// `base` with every given flag applied.
    pub fn apply(&self, mut c: SampleConfig, seed: u64) -> SampleConfig {
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f.clone() { c.$f = v; })* };
        }
        set!(
            beams,
            candidates,
            steps,
            tau,
            candidate_temperature,
            rollout_temperature,
            max_step_tokens,
            max_rollout_tokens,
            prefix,
            strategy,
            empty_rollout,
            finished_beams,
            queries_in_flight
        );
        c.seed = seed;
        c
    }

    pub fn kv_budget(&self) -> &str {
        self.kv_budget.as_deref().unwrap_or("auto")
    }
}

/// Which queries to sample.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct QueryArgs {
    /// Query file (JSONL with "query", "instruction" or "prompt"); default: the bundled set of
    /// reasoning queries.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// Only the first N queries of the file.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl QueryArgs {
    /// The queries these flags name.
    pub fn load(&self) -> Result<Vec<Query>> {
        let mut queries = load_queries_or_bundled(self.queries.as_deref())?;
        if let Some(n) = self.limit {
            queries.truncate(n);
        }
        Ok(queries)
    }
}

/// `sample`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub queries: QueryArgs,
    /// Output folder: trajectories.jsonl goes there.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SamplingFlags,
}

pub fn run(args: &SampleArgs) -> Result<()> {
    let cfg = args.sampling.apply(SampleConfig::default(), args.seed);
    cfg.validate()?;
    let queries = args.queries.load()?;
    create_dir(&args.out)?;
    check_same_settings(
        &args.out.join("sample_settings.json"),
        &serde_json::json!({
            "model": args.model.name(),
            "queries": queries.iter().map(|q| q.id.as_str()).collect::<Vec<_>>().join(","),
            "sampling": format!("{cfg:?}"),
        }),
    )?;
    let (model, any) = super::load_transformer(&args.model)?;
    let summary = crate::with_transformer!(any, transformer => {
        let mut engine = sampling_engine(
            transformer,
            &model.tokenizer,
            &args.sampling,
            args.model.gpu_memory_fraction,
        )?;
        sample_phase(
            &mut engine,
            &model.tokenizer,
            &queries,
            &cfg,
            &args.out.join("trajectories.jsonl"),
        )?
    });
    eprintln!("{}", summary.line());
    summary.check()
}

/// The rollout engine for sampling over `model`, with the flags' KV budget.
pub fn sampling_engine<'t, B: Backend>(
    model: Transformer<B>,
    tok: &'t TextTokenizer,
    flags: &SamplingFlags,
    gpu_memory_fraction: f64,
) -> Result<Engine<'t, B>> {
    let config = EngineConfig::default();
    let kv_budget_tokens = resolve_kv_budget(
        flags.kv_budget(),
        &model,
        config.max_batch_tokens,
        gpu_memory_fraction,
    )?;
    Engine::new(
        model,
        tok,
        EngineConfig {
            kv_budget_tokens,
            ..EngineConfig::default()
        },
    )
}

/// What a sampling phase did.
#[derive(Debug, Clone)]
pub struct SampleSummary {
    pub stats: SampleStats,
    /// Queries found already sampled in the output (resume).
    pub resumed: usize,
    pub seconds: f64,
    pub path: PathBuf,
}

impl SampleSummary {
    /// Tokens generated per second.
    pub fn tokens_per_s(&self) -> f64 {
        self.stats.tokens_generated as f64 / self.seconds.max(1e-9)
    }

    pub fn line(&self) -> String {
        format!(
            "sampled {} queries ({} already done) in {:.1}s: {} candidates, {} rollouts, {} tokens ({:.1} tokens/s), mean f {:.4}; {}",
            self.stats.queries,
            self.resumed,
            self.seconds,
            self.stats.candidates,
            self.stats.rollouts,
            self.stats.tokens_generated,
            self.tokens_per_s(),
            self.stats.mean_f(),
            self.path.display()
        )
    }

    /// An error listing the queries that failed, if any did.
    pub fn check(&self) -> Result<()> {
        if self.stats.failed.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = self
            .stats
            .failed
            .iter()
            .map(|(id, e)| format!("query '{id}': {e}"))
            .collect();
        anyhow::bail!(
            "{} of the queries could not be sampled:\n{}",
            list.len(),
            list.join("\n")
        )
    }
}

/// Samples every query not yet in `path` (a trajectories file, resumed), appending each as it
/// finishes, with a progress bar.
pub fn sample_phase<B: Backend>(
    engine: &mut Engine<'_, B>,
    tok: &TextTokenizer,
    queries: &[Query],
    cfg: &SampleConfig,
    path: &Path,
) -> Result<SampleSummary> {
    let (mut log, done) = JsonlLog::open::<Trajectory>(path)?;
    let done_ids: HashSet<String> = done.iter().map(|t| t.id.clone()).collect();
    let todo: Vec<QueryInput> = queries
        .iter()
        .enumerate()
        .filter(|(_, q)| !done_ids.contains(&q.id))
        .map(|(i, q)| QueryInput {
            index: i as u64,
            id: q.id.clone(),
            query: q.query.clone(),
        })
        .collect();
    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "sample {bar:30} {pos}/{len} queries  {elapsed_precise} (ETA {eta})  {msg}",
        )
        .expect("valid template"),
    );
    let started = Instant::now();
    let stats = sample_queries(
        engine,
        tok,
        todo,
        cfg,
        |t| {
            bar.inc(1);
            log.append(&t)
        },
        |s| {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.0} tokens/s, {} rollouts",
                s.tokens_generated as f64 / secs,
                s.rollouts
            ));
        },
    )?;
    bar.finish_and_clear();
    Ok(SampleSummary {
        stats,
        resumed: done_ids.len(),
        seconds: started.elapsed().as_secs_f64(),
        path: path.to_path_buf(),
    })
}
