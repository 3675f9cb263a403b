//! `genius-engine eval`: reasoning accuracy on a benchmark file, generated in one batch on the
//! rollout engine (every question, every sample, submitted at once; continuous batching does
//! the rest), scored with [`crate::eval`]'s extraction and comparison. `--predictions` scores
//! outputs produced elsewhere with the same rules, so numbers from other engines compare.
//!
//! Output: one JSONL line per (question, sample) as it finishes (`--output`), and a summary
//! (accuracy with a 95% Wilson interval, counts, tokens/s) printed and written beside it
//! (`OUTPUT.summary.json`). [`evaluate`] is shared with `run --eval`.

use super::ModelArgs;
use super::generate::resolve_kv_budget;
use super::prompts::{Prompt, tokenize_prompt};
use crate::backend::Backend;
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{Engine, EngineConfig, FinishReason, Request, StopRules};
use crate::eval::data::{Benchmark, Question, load_predictions, load_questions, prompt_messages};
use crate::eval::score::{Accuracy, accuracy, score_output};
use crate::genius::artifacts::write_json_atomic;
use crate::model::{LoadedModel, TextTokenizer};
use crate::report::EvalRow;
use crate::transformer::Transformer;
use anyhow::{Context, Result, bail};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The bundled grade-school questions (`assets/eval/gsm8k-mini.jsonl`, written for the
/// project, GSM8K's format).
pub const BUNDLED_GSM8K_MINI: &str = include_str!("../../assets/eval/gsm8k-mini.jsonl");

/// The marker the authors' maths prompt asks the model to end its reasoning with; generation
/// stops there.
pub const END_OF_REASONING: &str = "<end_of_reasoning>";

/// How answers are generated.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalGenFlags {
    /// Sampling temperature (the paper evaluates at 1.0; 0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Samples per question (accuracy is over all samples).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Few-shot examples: a file of the benchmark's format (zero-shot without it).
    #[arg(long)]
    pub shots: Option<PathBuf>,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// KV cache capacity (tokens, bytes such as `2GiB`, or `auto`).
    #[arg(long, default_value = "auto")]
    pub kv_budget: String,
}

/// `eval`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Benchmark kind: how prompts are written and answers extracted and compared.
    #[arg(long, value_enum)]
    pub benchmark: Benchmark,
    /// Questions (JSONL): GSM8K `{question, answer "... #### N"}`, MATH `{problem, solution}`,
    /// `{question, answer}`, `{question, options, answer}`.
    #[arg(
        long,
        conflicts_with = "predictions",
        required_unless_present = "predictions"
    )]
    pub data: Option<PathBuf>,
    /// Score outputs produced elsewhere (`{"output", "answer"}` lines) instead of generating.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// Per-question results (JSONL) [default: eval-BENCHMARK.jsonl]; the summary goes to
    /// OUTPUT.summary.json.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub gen_flags: EvalGenFlags,
}

/// What one evaluation measured.
#[derive(Debug, Clone)]
pub struct EvalSummary {
    pub benchmark: Benchmark,
    pub questions: usize,
    pub samples: usize,
    pub accuracy: Accuracy,
    /// `(line, message)` of input lines that could not be used.
    pub malformed: Vec<(usize, String)>,
    pub tokens: u64,
    pub seconds: f64,
}

impl EvalSummary {
    pub fn line(&self) -> String {
        let a = &self.accuracy;
        format!(
            "{}: accuracy {:.2}% ({} / {}, 95% CI {:.2}-{:.2}%) over {} questions x {} samples; {} malformed lines; {} tokens in {:.1}s ({:.1} tokens/s, {:.2} questions/s)",
            self.benchmark.name(),
            100.0 * a.accuracy,
            a.correct,
            a.n,
            100.0 * a.ci_low,
            100.0 * a.ci_high,
            self.questions,
            self.samples,
            self.malformed.len(),
            self.tokens,
            self.seconds,
            self.tokens as f64 / self.seconds.max(1e-9),
            self.questions as f64 / self.seconds.max(1e-9)
        )
    }

    pub fn to_json(&self, data: &Path) -> serde_json::Value {
        json!({
            "benchmark": self.benchmark.name(),
            "file": data.display().to_string(),
            "questions": self.questions,
            "samples": self.samples,
            "n": self.accuracy.n,
            "correct": self.accuracy.correct,
            "accuracy": self.accuracy.accuracy,
            "ci_low": self.accuracy.ci_low,
            "ci_high": self.accuracy.ci_high,
            "malformed_lines": self.malformed.iter().map(|(l, m)| json!({"line": l, "error": m})).collect::<Vec<_>>(),
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens as f64 / self.seconds.max(1e-9),
            "questions_per_s": self.questions as f64 / self.seconds.max(1e-9),
        })
    }
}

/// The summary file beside a per-question output.
pub fn summary_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".summary.json");
    PathBuf::from(s)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("eval-{}.jsonl", args.benchmark.name())));
    if let Some(pred) = &args.predictions {
        return score_predictions(args.benchmark, pred, &output);
    }
    let data = args.data.as_ref().context("--data is required")?;
    let (model, any) = super::load_transformer(&args.model)?;
    let summary = crate::with_transformer!(any, t => {
        let kv = resolve_kv_budget(
            &args.gen_flags.kv_budget,
            &t,
            EngineConfig::default().max_batch_tokens,
            args.model.gpu_memory_fraction,
        )?;
        let mut engine = Engine::new(
            t,
            &model.tokenizer,
            EngineConfig {
                kv_budget_tokens: kv,
                ..EngineConfig::default()
            },
        )?;
        evaluate(&mut engine, &model, args.benchmark, data, &args.gen_flags, &output)?
    });
    eprintln!("{}", summary.line());
    write_json_atomic(&summary_path(&output), &summary.to_json(data))?;
    eprintln!(
        "results in {} (summary {})",
        output.display(),
        summary_path(&output).display()
    );
    Ok(())
}

/// Loads `data` (and the shots), generates every answer in one batch on `engine`, scores them,
/// and writes one line per (question, sample) to `output` as sequences finish.
pub fn evaluate<B: Backend>(
    engine: &mut Engine<'_, B>,
    model: &LoadedModel,
    bench: Benchmark,
    data: &Path,
    flags: &EvalGenFlags,
    output: &Path,
) -> Result<EvalSummary> {
    if flags.samples == 0 || flags.max_new_tokens == 0 {
        bail!("--samples and --max-new-tokens must be positive");
    }
    let sampling = SamplingParams {
        temperature: flags.temperature,
        seed: flags.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let (mut questions, mut malformed) = load_questions(data, bench)?;
    if let Some(n) = flags.limit {
        questions.truncate(n);
    }
    let shots = match &flags.shots {
        Some(p) => {
            let (s, bad) = load_questions(p, bench)?;
            if let Some((line, msg)) = bad.first() {
                bail!("{}:{line}: {msg}", p.display());
            }
            s
        }
        None => Vec::new(),
    };
    let tok: &TextTokenizer = &model.tokenizer;
    let stop = StopRules {
        max_new_tokens: flags.max_new_tokens,
        stop_strings: vec![END_OF_REASONING.to_string()],
        include_stop_str: false,
        ..StopRules::default()
    };
    let started = Instant::now();
    let generated0 = engine.tokens_generated;
    let mut owners: HashMap<crate::engine::SeqId, (usize, usize)> = HashMap::new();
    for (qi, q) in questions.iter().enumerate() {
        let prompt = Prompt::Messages(prompt_messages(bench, q, &shots));
        let ids = match tokenize_prompt(tok, &prompt) {
            Ok(ids) if !ids.is_empty() => ids,
            Ok(_) => {
                malformed.push((q.line, "the prompt has no tokens".into()));
                continue;
            }
            Err(e) => {
                malformed.push((q.line, format!("{e:#}")));
                continue;
            }
        };
        for sample in 0..flags.samples {
            let seq = engine.submit(Request {
                tokens: ids.clone(),
                parent: None,
                sampling,
                stop: stop.clone(),
                stream: super::generate::stream_id(qi, sample),
            });
            match seq {
                Ok(seq) => {
                    owners.insert(seq, (qi, sample));
                }
                Err(e) => {
                    malformed.push((q.line, format!("{e:#}")));
                    break;
                }
            }
        }
    }
    let file = std::fs::File::create(output)
        .with_context(|| format!("{}: cannot create output", output.display()))?;
    let mut out = BufWriter::new(file);
    let total = owners.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {bar:30} {pos}/{len} answers  {msg}")
            .expect("static template"),
    );
    let (mut n, mut correct) = (0usize, 0usize);
    while engine.num_active() > 0 {
        for f in engine.step()? {
            let Some(&(qi, sample)) = owners.get(&f.seq) else {
                continue;
            };
            let q: &Question = &questions[qi];
            let scored = score_output(bench.kind(), &f.text, &q.gold);
            n += 1;
            correct += usize::from(scored.correct);
            let error = match &f.finish_reason {
                FinishReason::Error(e) => Some(e.clone()),
                _ => None,
            };
            serde_json::to_writer(
                &mut out,
                &json!({
                    "line": q.line,
                    "id": q.id,
                    "sample": sample,
                    "prediction": f.text,
                    "extracted": scored.extracted,
                    "gold": q.gold,
                    "correct": scored.correct,
                    "finish_reason": f.finish_reason.as_str(),
                    "tokens": f.tokens.len(),
                    "error": error,
                }),
            )?;
            out.write_all(b"\n")?;
            engine.release(f.seq)?;
            bar.inc(1);
        }
        out.flush()
            .with_context(|| format!("{}: write failed", output.display()))?;
        bar.set_message(format!("{correct}/{n} correct"));
    }
    bar.finish_and_clear();
    Ok(EvalSummary {
        benchmark: bench,
        questions: questions.len(),
        samples: flags.samples,
        accuracy: accuracy(correct, n),
        malformed,
        tokens: engine.tokens_generated - generated0,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `eval --predictions`: outputs produced elsewhere, scored with the same rules.
fn score_predictions(bench: Benchmark, path: &Path, output: &Path) -> Result<()> {
    let started = Instant::now();
    let (lines, malformed) = load_predictions(path)?;
    let file = std::fs::File::create(output)
        .with_context(|| format!("{}: cannot create output", output.display()))?;
    let mut out = BufWriter::new(file);
    let mut correct = 0;
    for p in &lines {
        let s = score_output(bench.kind(), &p.output, &p.gold);
        correct += usize::from(s.correct);
        serde_json::to_writer(
            &mut out,
            &json!({"line": p.line, "extracted": s.extracted, "gold": p.gold, "correct": s.correct}),
        )?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("{}: write failed", output.display()))?;
    for (line, msg) in &malformed {
        eprintln!("{}:{line}: skipped: {msg}", path.display());
    }
    let summary = EvalSummary {
        benchmark: bench,
        questions: lines.len(),
        samples: 1,
        accuracy: accuracy(correct, lines.len()),
        malformed,
        tokens: 0,
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!("{}", summary.line());
    write_json_atomic(&summary_path(output), &summary.to_json(path))?;
    Ok(())
}

/// `run --eval BENCHMARK:FILE`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    pub benchmark: Benchmark,
    pub file: PathBuf,
}

impl std::str::FromStr for EvalSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (b, f) = s
            .split_once(':')
            .ok_or_else(|| format!("'{s}': expected BENCHMARK:FILE (e.g. gsm8k:test.jsonl)"))?;
        let benchmark = <Benchmark as clap::ValueEnum>::from_str(b, true)
            .map_err(|_| format!("'{s}': unknown benchmark '{b}' (gsm8k, math, choice, yesno)"))?;
        if f.is_empty() {
            return Err(format!("'{s}': no file after the ':'"));
        }
        Ok(Self {
            benchmark,
            file: PathBuf::from(f),
        })
    }
}

/// Evaluates the transformer on every spec (skipping those `log` already holds for `round`),
/// appending one line per spec to `RUN/eval.jsonl` and the answers to
/// `RUN/eval/round-R-BENCH-STEM.jsonl`. Returns the transformer.
pub fn evaluate_round<B: Backend>(
    transformer: Transformer<B>,
    model: &LoadedModel,
    specs: &[EvalSpec],
    flags: &EvalGenFlags,
    run_dir: &Path,
    round: usize,
    gpu_memory_fraction: f64,
) -> Result<Transformer<B>> {
    if specs.is_empty() {
        return Ok(transformer);
    }
    // One shared record type with `report` and `diagnose`; appended durably, a torn last
    // line from an interrupted run cut off.
    let (mut log, done) =
        crate::genius::artifacts::JsonlLog::open::<EvalRow>(&run_dir.join("eval.jsonl"))?;
    let todo: Vec<&EvalSpec> = specs
        .iter()
        .filter(|s| {
            !done.iter().any(|d| {
                d.round == round
                    && d.benchmark == s.benchmark.name()
                    && d.file.as_deref() == Some(s.file.display().to_string().as_str())
            })
        })
        .collect();
    if todo.is_empty() {
        return Ok(transformer);
    }
    let kv = resolve_kv_budget(
        &flags.kv_budget,
        &transformer,
        EngineConfig::default().max_batch_tokens,
        gpu_memory_fraction,
    )?;
    let mut engine = Engine::new(
        transformer,
        &model.tokenizer,
        EngineConfig {
            kv_budget_tokens: kv,
            ..EngineConfig::default()
        },
    )?;
    std::fs::create_dir_all(run_dir.join("eval"))
        .with_context(|| format!("{}: cannot create", run_dir.join("eval").display()))?;
    let mut result = Ok(());
    for spec in todo {
        let stem = spec
            .file
            .file_stem()
            .map_or("data".into(), |s| s.to_string_lossy().into_owned());
        let out = run_dir.join("eval").join(format!(
            "round-{round}-{}-{stem}.jsonl",
            spec.benchmark.name()
        ));
        match evaluate(&mut engine, model, spec.benchmark, &spec.file, flags, &out) {
            Ok(summary) => {
                let when = if round == 0 {
                    "before training".to_string()
                } else {
                    format!("after round {round}")
                };
                eprintln!("eval {when}: {}", summary.line());
                let mut line = summary.to_json(&spec.file);
                line["round"] = json!(round);
                log.append(&line)?;
            }
            Err(e) => {
                result = Err(e.context(format!("evaluating {}", spec.file.display())));
                break;
            }
        }
    }
    let transformer = engine.into_model();
    result.map(|_| transformer)
}
