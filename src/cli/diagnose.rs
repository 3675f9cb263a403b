//! `genius-engine diagnose`: the questions the paper leaves open.
//!
//! - **Does the foresight score predict correctness?** On a labelled set, foresight
//!   re-sampling runs as `sample` runs it (the questions as queries); every candidate's full
//!   text (earlier steps, the step, its rollout) is scored against the gold answer with
//!   `eval`'s extraction. Reported: the AUROC of `f` as a predictor of a correct answer over
//!   all candidates (ties count half), and, per (question, step), the accuracy of the top-`f`
//!   candidate against the expected accuracy of a candidate picked at random.
//! - **Noise accumulation across rounds** (`--run DIR`): mean `f`, the last pair margin and
//!   the accuracy of each `--eval` benchmark, round by round, with their change from the first.

use super::ModelArgs;
use super::sample::{SamplingFlags, sample_phase, sampling_engine};
use crate::eval::data::{Benchmark, load_questions};
use crate::eval::score::score_output;
use crate::genius::artifacts::{create_dir, write_json_atomic};
use crate::genius::pairs::read_trajectories;
use crate::genius::queries::Query;
use crate::genius::sample::SampleConfig;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `diagnose`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DiagnoseArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Benchmark kind of `--data` (how answers are extracted and compared).
    #[arg(long, value_enum, required_unless_present = "run")]
    pub benchmark: Option<Benchmark>,
    /// Labelled questions (the formats `eval` reads).
    #[arg(long, required_unless_present = "run", conflicts_with = "run")]
    pub data: Option<PathBuf>,
    /// Only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output folder (trajectories.jsonl, candidates.jsonl, diagnose.json); reuse to resume.
    #[arg(long, default_value = "diagnose")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    /// Instead: the drift of mean f, pair margins and accuracy across the rounds of a run.
    #[arg(long)]
    pub run: Option<PathBuf>,
}

pub fn run(args: &DiagnoseArgs) -> Result<()> {
    if let Some(dir) = &args.run {
        return drift(dir);
    }
    let (Some(bench), Some(data)) = (args.benchmark, args.data.as_ref()) else {
        bail!("give --benchmark and --data (or --run DIR)");
    };
    let cfg = args.sampling.apply(SampleConfig::default(), args.seed);
    cfg.validate()?;
    let (mut questions, malformed) = load_questions(data, bench)?;
    for (line, msg) in &malformed {
        eprintln!("{}:{line}: skipped: {msg}", data.display());
    }
    if let Some(n) = args.limit {
        questions.truncate(n);
    }
    let queries: Vec<Query> = questions
        .iter()
        .map(|q| Query {
            id: q.id.clone(),
            query: if q.options.is_empty() {
                q.question.clone()
            } else {
                let letters = "ABCDEFGHIJ".chars();
                let opts: Vec<String> = letters
                    .zip(&q.options)
                    .map(|(l, o)| format!("{l}. {o}"))
                    .collect();
                format!("{}\n{}", q.question, opts.join("\n"))
            },
        })
        .collect();
    create_dir(&args.out)?;
    let trajectories = args.out.join("trajectories.jsonl");
    let (model, any) = super::load_transformer(&args.model)?;
    let summary = crate::with_transformer!(any, t => {
        let mut engine = sampling_engine(t, &model.tokenizer, &args.sampling, args.model.gpu_memory_fraction)?;
        sample_phase(&mut engine, &model.tokenizer, &queries, &cfg, &trajectories)?
    });
    eprintln!("{}", summary.line());
    let gold: HashMap<&str, &str> = questions
        .iter()
        .map(|q| (q.id.as_str(), q.gold.as_str()))
        .collect();
    let mut scored = Vec::new(); // (f, correct)
    let mut groups = Vec::new(); // per (question, step): (top-f correct, mean correct)
    let mut lines = Vec::new();
    for t in read_trajectories(&trajectories)? {
        let Some(&g) = gold.get(t.id.as_str()) else {
            continue;
        };
        for step in &t.steps {
            let mut cands = Vec::new();
            for (ci, c) in step.candidates.iter().enumerate() {
                let s = score_output(bench.kind(), &c.trajectory, g);
                cands.push((c.f, s.correct));
                lines.push(json!({"id": t.id, "k": step.k, "candidate": ci, "f": c.f,
                    "extracted": s.extracted, "gold": g, "correct": s.correct}));
            }
            if let Some(&(_, top)) = cands.iter().max_by(|a, b| a.0.total_cmp(&b.0)) {
                let mean = cands.iter().filter(|c| c.1).count() as f64 / cands.len().max(1) as f64;
                groups.push((top, mean));
            }
            scored.extend(cands);
        }
    }
    let candidates_path = args.out.join("candidates.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&candidates_path, text)
        .with_context(|| format!("{}: cannot write", candidates_path.display()))?;
    let auc = auroc(&scored);
    let top_acc = groups.iter().filter(|g| g.0).count() as f64 / groups.len().max(1) as f64;
    let random_acc = groups.iter().map(|g| g.1).sum::<f64>() / groups.len().max(1) as f64;
    let positives = scored.iter().filter(|s| s.1).count();
    let result = json!({
        "benchmark": bench.name(),
        "file": data.display().to_string(),
        "questions": questions.len(),
        "candidates": scored.len(),
        "correct_candidates": positives,
        "auroc_f_predicts_correct": auc,
        "step_groups": groups.len(),
        "top_f_accuracy": top_acc,
        "random_candidate_accuracy": random_acc,
    });
    write_json_atomic(&args.out.join("diagnose.json"), &result)?;
    println!(
        "foresight vs correctness on {} ({} questions, {} candidates, {} correct): AUROC {}; top-f candidate accuracy {:.3} vs random {:.3} over {} (question, step) groups",
        bench.name(),
        questions.len(),
        scored.len(),
        positives,
        auc.map_or(
            "n/a (needs correct and wrong candidates)".into(),
            |a| format!("{a:.3}")
        ),
        top_acc,
        random_acc,
        groups.len()
    );
    eprintln!("details in {}", args.out.display());
    Ok(())
}

/// Area under the ROC curve of `score` as a predictor of `label` (Mann-Whitney: the chance a
/// random positive scores above a random negative, ties counting half); `None` without both
/// classes.
pub fn auroc(items: &[(f64, bool)]) -> Option<f64> {
    let mut v: Vec<(f64, bool)> = items.iter().filter(|x| x.0.is_finite()).copied().collect();
    let pos = v.iter().filter(|x| x.1).count();
    let neg = v.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the ranks of the positives (average ranks over ties), 1-based.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j < v.len() && v[j].0 == v[i].0 {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += avg_rank * v[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos * neg) as f64)
}

/// `(round, mean f, last margin)`.
type RoundNumbers = (u64, Option<f64>, Option<f64>);

/// Per-round numbers of a run folder, read from the round folders themselves (a resumed run's
/// `summary.json` lists only the rounds its last invocation ran): the mean foresight score of
/// all candidates (`round-N/trajectories.jsonl`) and the last optimizer step's pair margin
/// (`round-N/metrics.jsonl`).
fn round_numbers(dir: &Path) -> Result<Vec<RoundNumbers>> {
    let mut rounds: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the run folder", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("round-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    rounds.sort();
    let mut out = Vec::new();
    for (n, path) in rounds {
        let trajectories = path.join("trajectories.jsonl");
        let mean_f = if trajectories.exists() {
            let fs: Vec<f64> = read_trajectories(&trajectories)?
                .iter()
                .flat_map(|t| {
                    t.steps
                        .iter()
                        .flat_map(|s| s.candidates.iter().map(|c| c.f))
                })
                .filter(|f| f.is_finite())
                .collect();
            (!fs.is_empty()).then(|| fs.iter().sum::<f64>() / fs.len() as f64)
        } else {
            None
        };
        let metrics = path.join("metrics.jsonl");
        let margin = std::fs::read_to_string(&metrics)
            .ok()
            .and_then(|text| {
                text.lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<Value>(l).ok())
            })
            .and_then(|v| v["margin"].as_f64());
        out.push((n, mean_f, margin));
    }
    Ok(out)
}

/// `diagnose --run DIR`: per-round mean f, last margin and eval accuracies, and their drift.
fn drift(dir: &Path) -> Result<()> {
    let rounds = round_numbers(dir)?;
    if rounds.is_empty() {
        bail!(
            "{}: no round-N folders (not a `run` output folder?)",
            dir.display()
        );
    }
    let eval_path = dir.join("eval.jsonl");
    let mut evals = Vec::new();
    if eval_path.is_file() {
        let mut warnings = Vec::new();
        evals = crate::report::read_eval_log(&eval_path, &mut warnings)?;
        for w in warnings {
            eprintln!("diagnose: {w}");
        }
    }
    let label = |e: &crate::report::EvalRow| {
        format!("{} ({})", e.benchmark, e.file.as_deref().unwrap_or("?"))
    };
    let mut benches: Vec<String> = evals.iter().map(label).collect();
    benches.sort();
    benches.dedup();
    let acc = |round: usize, bench: &str| -> Option<f64> {
        evals
            .iter()
            .find(|e| e.round == round && label(e) == bench)
            .map(|e| e.accuracy)
    };
    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
    println!(
        "round   mean f    last margin   {}",
        benches
            .iter()
            .map(|b| format!("acc % {b}"))
            .collect::<Vec<_>>()
            .join("   ")
    );
    if !benches.is_empty() {
        println!(
            "before                          {}",
            benches
                .iter()
                .map(|b| fmt(acc(0, b).map(|x| 100.0 * x), 2))
                .collect::<Vec<_>>()
                .join("   ")
        );
    }
    let first_f = rounds.first().and_then(|r| r.1);
    let first_m = rounds.first().and_then(|r| r.2);
    let mut table = Vec::new();
    for &(n, f, m) in &rounds {
        let accs: Vec<Option<f64>> = benches.iter().map(|b| acc(n as usize, b)).collect();
        println!(
            "{n:>5}   {:>7}   {:>11}   {}",
            fmt(f, 4),
            fmt(m, 4),
            accs.iter()
                .map(|a| fmt(a.map(|x| 100.0 * x), 2))
                .collect::<Vec<_>>()
                .join("   ")
        );
        table.push(json!({
            "round": n,
            "mean_f": f,
            "margin_last": m,
            "mean_f_drift": f.zip(first_f).map(|(a, b)| a - b),
            "margin_drift": m.zip(first_m).map(|(a, b)| a - b),
            "accuracy": benches.iter().zip(&accs).map(|(b, a)| json!({
                "benchmark": b,
                "accuracy": a,
                "change_from_before": a.zip(acc(0, b)).map(|(x, y)| x - y),
            })).collect::<Vec<_>>(),
        }));
    }
    write_json_atomic(&dir.join("drift.json"), &json!({"rounds": table}))?;
    eprintln!("drift table in {}", dir.join("drift.json").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::auroc;

    #[test]
    fn auroc_of_known_orderings() {
        assert_eq!(auroc(&[(1.0, false), (2.0, true)]), Some(1.0));
        assert_eq!(auroc(&[(1.0, true), (2.0, false)]), Some(0.0));
        assert_eq!(auroc(&[(1.0, true), (1.0, false)]), Some(0.5));
        assert_eq!(auroc(&[(1.0, true), (2.0, true)]), None);
        // 3 positives, 2 negatives: pairs won 5 of 6 ... counted by hand.
        let v = [
            (0.1, false),
            (0.4, true),
            (0.35, false),
            (0.8, true),
            (0.7, true),
        ];
        // positives 0.4, 0.8, 0.7 vs negatives 0.1, 0.35: all 6 pairs won.
        assert_eq!(auroc(&v), Some(1.0));
        let v = [(0.1, true), (0.4, false), (0.35, true), (0.8, false)];
        // positives 0.1, 0.35 vs negatives 0.4, 0.8: 0 of 4 won.
        assert_eq!(auroc(&v), Some(0.0));
        let v = [(0.5, true), (0.2, false), (0.9, false), (0.6, true)];
        // 0.5 beats 0.2 (1), loses to 0.9; 0.6 beats 0.2, loses to 0.9: 2 of 4.
        assert_eq!(auroc(&v), Some(0.5));
    }
}
