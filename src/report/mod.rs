//! Reports on a finished (or interrupted) `genius-engine run` folder: SVG charts and a text
//! summary, written by [`write_report`] (the `genius-engine report` command).
//!
//! What is read from `RUN_DIR` (every file is optional, but at least one must be there):
//! - `summary.json` (written by `run` at the end): profile, query count, total seconds and per
//!   round `queries_sampled`, `candidates`, `mean_f`, `pairs`, and the seconds and tokens of
//!   the sample, pairs, reference and train phases (see `src/cli/run.rs`). A resumed run lists
//!   only the rounds it ran itself.
//! - `round-N/metrics.jsonl`: one [`crate::genius::trainer::StepMetrics`] per optimizer step
//!   (`step`, `loss`, `margin`, `w_mean`, `lr`, `tokens`, `seconds`, ...).
//! - `round-N/trajectories.jsonl`: one [`crate::genius::pairs::Trajectory`] per query; the
//!   foresight score of every candidate is `steps[].candidates[].f`.
//! - `round-N/pairs.jsonl`: one pair per line (only counted).
//! - `eval.jsonl`: one line per (round, benchmark): `{"round", "benchmark", "file", "n",
//!   "correct", "accuracy", "ci_low", "ci_high"}`, round 0 being the model before training.
//!
//! Malformed JSONL lines are errors naming the file and the 1-based line, except an incomplete
//! last line (no final newline and not parseable: a write cut short by an interruption), which
//! is skipped with a warning in the report, as the run itself does when it resumes.
//!
//! Written to the output folder (default `RUN_DIR/report`): `training.svg` (loss, margin, mean
//! ACO weight w and learning rate over the optimizer steps of all rounds, one panel each),
//! `accuracy.svg` (accuracy per round and benchmark with the 95% interval as error bars),
//! `foresight.svg` (histogram of the candidates' f per round), `throughput.svg` (tokens/s of
//! the sample, reference and train phases per round), and `report.txt`. A chart whose data is
//! missing is not written, and the summary says why. The SVGs need no system fonts.

mod charts;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// `summary.json`. Every field may be missing or null (a phase skipped on resume).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RunSummary {
    pub profile: Option<String>,
    pub queries: Option<u64>,
    pub seconds: Option<f64>,
    pub rounds: Vec<RoundSummary>,
}

/// One round of `summary.json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RoundSummary {
    pub round: usize,
    pub queries_sampled: Option<u64>,
    pub candidates: Option<u64>,
    pub mean_f: Option<f64>,
    pub sample_seconds: Option<f64>,
    pub sample_tokens: Option<u64>,
    pub sample_tokens_per_s: Option<f64>,
    pub pairs: Option<u64>,
    pub pairs_seconds: Option<f64>,
    pub reference_seconds: Option<f64>,
    pub reference_tokens: Option<u64>,
    pub train_steps: Option<u64>,
    pub train_seconds: Option<f64>,
    pub train_tokens: Option<u64>,
    pub loss_first: Option<f64>,
    pub loss_last: Option<f64>,
    pub margin_last: Option<f64>,
    pub checkpoint_seconds: Option<f64>,
}

impl RoundSummary {
    /// Sampling tokens/s.
    pub fn sample_rate(&self) -> Option<f64> {
        self.sample_tokens_per_s
            .filter(|r| r.is_finite() && *r > 0.0)
            .or_else(|| rate(self.sample_tokens, self.sample_seconds))
    }

    /// Reference log-prob tokens/s.
    pub fn reference_rate(&self) -> Option<f64> {
        rate(self.reference_tokens, self.reference_seconds)
    }

    /// Training (forward + backward) tokens/s.
    pub fn train_rate(&self) -> Option<f64> {
        rate(self.train_tokens, self.train_seconds)
    }
}

fn rate(tokens: Option<u64>, seconds: Option<f64>) -> Option<f64> {
    match (tokens, seconds) {
        (Some(t), Some(s)) if s > 0.0 && s.is_finite() => Some(t as f64 / s),
        _ => None,
    }
}

/// The fields of a `metrics.jsonl` line the report uses.
#[derive(Debug, Clone, Deserialize)]
pub struct StepLine {
    pub step: u64,
    pub loss: f64,
    pub margin: f64,
    pub w_mean: f64,
    pub lr: f64,
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub seconds: Option<f64>,
}

/// The part of a `trajectories.jsonl` line the report uses.
#[derive(Deserialize)]
struct TrajectoryScores {
    steps: Vec<StepScores>,
}

#[derive(Deserialize)]
struct StepScores {
    candidates: Vec<CandidateScore>,
}

#[derive(Deserialize)]
struct CandidateScore {
    f: f64,
}

/// A line of `eval.jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalRow {
    /// 0 before training, N after round N.
    pub round: usize,
    pub benchmark: String,
    #[serde(default)]
    pub file: Option<String>,
    pub n: u64,
    pub correct: u64,
    pub accuracy: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// What the run folder holds for one round.
#[derive(Debug, Clone, Default)]
pub struct RoundData {
    pub round: usize,
    /// `summary.json`'s entry, when there is one.
    pub summary: Option<RoundSummary>,
    /// `metrics.jsonl` (empty when absent).
    pub metrics: Vec<StepLine>,
    /// Every candidate's foresight score f in `trajectories.jsonl`.
    pub f: Vec<f64>,
    /// Lines of `trajectories.jsonl` (`None`: no file).
    pub trajectories: Option<usize>,
    /// Lines of `pairs.jsonl` (`None`: no file).
    pub pairs: Option<usize>,
}

impl RoundData {
    /// Mean f over the candidates in `trajectories.jsonl`, else `summary.json`'s.
    pub fn mean_f(&self) -> Option<f64> {
        mean(&self.f).or(self.summary.as_ref().and_then(|s| s.mean_f))
    }

    /// Training tokens/s: `summary.json`'s, else from the steps' tokens and seconds.
    pub fn train_rate(&self) -> Option<f64> {
        self.summary
            .as_ref()
            .and_then(RoundSummary::train_rate)
            .or_else(|| {
                let tokens: u64 = self.metrics.iter().filter_map(|m| m.tokens).sum();
                let secs: f64 = self.metrics.iter().filter_map(|m| m.seconds).sum();
                rate(Some(tokens).filter(|t| *t > 0), Some(secs))
            })
    }
}

/// Everything read from a run folder.
#[derive(Debug, Clone, Default)]
pub struct RunData {
    pub dir: PathBuf,
    pub summary: Option<RunSummary>,
    /// Rounds found (as `round-N/` or in `summary.json`), in order.
    pub rounds: Vec<RoundData>,
    /// `eval.jsonl`, when present.
    pub eval: Option<Vec<EvalRow>>,
    /// Lines skipped and similar notes.
    pub warnings: Vec<String>,
}

/// What [`write_report`] produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The text of `report.txt`.
    pub text: String,
    /// The chart files written.
    pub charts: Vec<PathBuf>,
    /// `report.txt`.
    pub summary_path: PathBuf,
}

/// Reads a run folder. Errors: the folder is missing, holds none of the run's artifacts, or a
/// file is malformed (named with its line).
pub fn load_run(dir: &Path) -> Result<RunData> {
    let meta =
        fs::metadata(dir).with_context(|| format!("{}: no such run folder", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "{}: not a folder (expected a run's --out folder)",
            dir.display()
        );
    }
    let mut data = RunData {
        dir: dir.to_path_buf(),
        ..RunData::default()
    };
    let summary_path = dir.join("summary.json");
    if summary_path.is_file() {
        let text = fs::read_to_string(&summary_path)
            .with_context(|| format!("reading {}", summary_path.display()))?;
        let summary: RunSummary = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a run summary", summary_path.display()))?;
        data.summary = Some(summary);
    }
    let mut numbers = BTreeSet::new();
    let entries =
        fs::read_dir(dir).with_context(|| format!("{}: cannot list the folder", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list the folder", dir.display()))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("round-"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            numbers.insert(n);
        }
    }
    if let Some(s) = &data.summary {
        numbers.extend(s.rounds.iter().map(|r| r.round));
    }
    for n in numbers {
        let rdir = dir.join(format!("round-{n}"));
        let mut round = RoundData {
            round: n,
            summary: data
                .summary
                .as_ref()
                .and_then(|s| s.rounds.iter().find(|r| r.round == n).cloned()),
            ..RoundData::default()
        };
        let metrics = rdir.join("metrics.jsonl");
        if metrics.is_file() {
            round.metrics = read_jsonl(&metrics, &mut data.warnings)?;
        }
        let traj = rdir.join("trajectories.jsonl");
        if traj.is_file() {
            let lines: Vec<TrajectoryScores> = read_jsonl(&traj, &mut data.warnings)?;
            round.trajectories = Some(lines.len());
            round.f = lines
                .iter()
                .flat_map(|t| &t.steps)
                .flat_map(|s| &s.candidates)
                .map(|c| c.f)
                .collect();
        }
        let pairs = rdir.join("pairs.jsonl");
        if pairs.is_file() {
            let lines: Vec<serde::de::IgnoredAny> = read_jsonl(&pairs, &mut data.warnings)?;
            round.pairs = Some(lines.len());
        }
        data.rounds.push(round);
    }
    let eval = dir.join("eval.jsonl");
    if eval.is_file() {
        data.eval = Some(read_jsonl(&eval, &mut data.warnings)?);
    }
    if data.summary.is_none() && data.rounds.is_empty() && data.eval.is_none() {
        bail!(
            "{}: no Genius run artifacts here (expected summary.json, round-N/ folders or \
             eval.jsonl, as `genius-engine run --out DIR` writes)",
            dir.display()
        );
    }
    Ok(data)
}

/// Reads a run's `eval.jsonl` (see [`read_jsonl`] for what is tolerated; warnings are added
/// to `warnings`).
pub fn read_eval_log(path: &Path, warnings: &mut Vec<String>) -> Result<Vec<EvalRow>> {
    read_jsonl(path, warnings)
}

/// Reads a JSONL file: blank lines skipped; a malformed line is an error naming the file and
/// the 1-based line, except an incomplete last line (no newline), skipped with a warning.
fn read_jsonl<T: DeserializeOwned>(path: &Path, warnings: &mut Vec<String>) -> Result<Vec<T>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading {} (not UTF-8 text?)", path.display()))?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(v) => out.push(v),
            Err(e) => {
                let mut msg = e.to_string();
                if let Some(at) = msg.rfind(" at line ") {
                    msg.truncate(at);
                }
                if i + 1 == lines.len() && !line.ends_with('\n') {
                    warnings.push(format!(
                        "{}: line {}: incomplete last line skipped ({msg}; an interrupted write?)",
                        path.display(),
                        i + 1
                    ));
                } else {
                    bail!(
                        "{}: line {}: {msg} (column {})",
                        path.display(),
                        i + 1,
                        e.column()
                    );
                }
            }
        }
    }
    Ok(out)
}

/// Reads `run_dir`, writes the charts and `report.txt` into `out_dir` (created if needed) and
/// returns the summary text.
pub fn write_report(run_dir: &Path, out_dir: &Path) -> Result<Report> {
    let data = load_run(run_dir)?;
    fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create the report folder", out_dir.display()))?;
    let mut charts = Vec::new();
    let mut notes = Vec::new();
    let mut chart =
        |name: &str, draw: fn(&RunData, &Path) -> Result<Option<String>>| -> Result<()> {
            let path = out_dir.join(name);
            match draw(&data, &path).with_context(|| format!("{}: drawing", path.display()))? {
                None => charts.push(path),
                Some(why) => notes.push(format!("{name} not written: {why}")),
            }
            Ok(())
        };
    chart("training.svg", charts::training)?;
    chart("accuracy.svg", charts::accuracy)?;
    chart("foresight.svg", charts::foresight)?;
    chart("throughput.svg", charts::throughput)?;
    let text = summary_text(&data, &charts, &notes);
    let summary_path = out_dir.join("report.txt");
    fs::write(&summary_path, &text)
        .with_context(|| format!("{}: cannot write", summary_path.display()))?;
    Ok(Report {
        text,
        charts,
        summary_path,
    })
}

fn mean(xs: &[f64]) -> Option<f64> {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn opt4(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
}

fn opt_rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

/// Whether `eval.jsonl`'s accuracies are fractions (else percentages).
pub(crate) fn accuracy_scale(rows: &[EvalRow]) -> f64 {
    if rows.iter().all(|r| r.accuracy <= 1.0 && r.ci_high <= 1.0) {
        100.0
    } else {
        1.0
    }
}

/// Benchmarks of `eval.jsonl` in first-seen order.
pub(crate) fn benchmarks(rows: &[EvalRow]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !names.contains(&r.benchmark) {
            names.push(r.benchmark.clone());
        }
    }
    names
}

/// The text of `report.txt`.
fn summary_text(data: &RunData, charts: &[PathBuf], notes: &[String]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "Genius run report: {}", data.dir.display());
    match &data.summary {
        Some(s) => {
            let _ = writeln!(
                t,
                "profile {}, {} queries, {} round(s), {} s in all (summary.json)",
                opt(s.profile.as_deref()),
                opt(s.queries),
                data.rounds.len(),
                s.seconds
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
            );
        }
        None => {
            let _ = writeln!(
                t,
                "{} round(s); no summary.json (an interrupted or unfinished run): counts and \
                 times come from the round folders only",
                data.rounds.len()
            );
        }
    }
    if !data.rounds.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "round  queries  candidates   mean f   pairs  steps  loss first -> last   margin first -> last   w mean last"
        );
        for r in &data.rounds {
            let s = r.summary.as_ref();
            let queries = r
                .trajectories
                .map(|n| n as u64)
                .or(s.and_then(|s| s.queries_sampled));
            let candidates = if r.f.is_empty() {
                s.and_then(|s| s.candidates)
            } else {
                Some(r.f.len() as u64)
            };
            let pairs = r.pairs.map(|n| n as u64).or(s.and_then(|s| s.pairs));
            let first = r.metrics.first();
            let last = r.metrics.last();
            let steps = if r.metrics.is_empty() {
                s.and_then(|s| s.train_steps)
            } else {
                Some(r.metrics.len() as u64)
            };
            let loss_first = first.map(|m| m.loss).or(s.and_then(|s| s.loss_first));
            let loss_last = last.map(|m| m.loss).or(s.and_then(|s| s.loss_last));
            let margin_first = first.map(|m| m.margin);
            let margin_last = last.map(|m| m.margin).or(s.and_then(|s| s.margin_last));
            let _ = writeln!(
                t,
                "{:>5}  {:>7}  {:>10}  {:>7}  {:>6}  {:>5}  {:>8} -> {:<8}  {:>8} -> {:<8}    {:>8}",
                r.round,
                opt(queries),
                opt(candidates),
                opt4(r.mean_f()),
                opt(pairs),
                opt(steps),
                opt4(loss_first),
                opt4(loss_last),
                opt4(margin_first),
                opt4(margin_last),
                opt4(last.map(|m| m.w_mean)),
            );
        }
        let _ = writeln!(t);
        let _ = writeln!(t, "foresight scores f (trajectories.jsonl)");
        let _ = writeln!(t, "round  candidates      min   median     mean      max");
        for r in &data.rounds {
            let mut f: Vec<f64> = r.f.iter().copied().filter(|x| x.is_finite()).collect();
            if f.is_empty() {
                let _ = writeln!(
                    t,
                    "{:>5}  {:>10}  (no trajectories.jsonl or no candidates)",
                    r.round, 0
                );
                continue;
            }
            f.sort_by(f64::total_cmp);
            let median = if f.len() % 2 == 1 {
                f[f.len() / 2]
            } else {
                (f[f.len() / 2 - 1] + f[f.len() / 2]) / 2.0
            };
            let _ = writeln!(
                t,
                "{:>5}  {:>10}  {:>7.4}  {:>7.4}  {:>7.4}  {:>7.4}",
                r.round,
                f.len(),
                f[0],
                median,
                mean(&f).unwrap_or(f64::NAN),
                f[f.len() - 1]
            );
        }
        let _ = writeln!(t);
        let _ = writeln!(t, "time per phase, seconds (tokens/s)");
        let _ = writeln!(
            t,
            "round            sample     pairs          reference              train   checkpoint"
        );
        for r in &data.rounds {
            let s = r.summary.as_ref();
            let cell = |secs: Option<f64>, rate: Option<f64>| match secs {
                Some(v) => format!("{v:.1} ({})", opt_rate(rate)),
                None => "-".to_string(),
            };
            let train_secs = s.and_then(|s| s.train_seconds).or_else(|| {
                let v: Vec<f64> = r.metrics.iter().filter_map(|m| m.seconds).collect();
                (!v.is_empty()).then(|| v.iter().sum())
            });
            let _ = writeln!(
                t,
                "{:>5}  {:>16}  {:>8}  {:>17}  {:>17}  {:>11}",
                r.round,
                cell(
                    s.and_then(|s| s.sample_seconds),
                    s.and_then(|s| s.sample_rate())
                ),
                s.and_then(|s| s.pairs_seconds)
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.1}")),
                cell(
                    s.and_then(|s| s.reference_seconds),
                    s.and_then(|s| s.reference_rate())
                ),
                cell(train_secs, r.train_rate()),
                s.and_then(|s| s.checkpoint_seconds)
                    .map_or_else(|| "-".to_string(), |v| format!("{v:.1}")),
            );
        }
    }
    let _ = writeln!(t);
    match &data.eval {
        None => {
            let _ = writeln!(
                t,
                "accuracy: no eval.jsonl in the run folder (not evaluated)"
            );
        }
        Some(rows) if rows.is_empty() => {
            let _ = writeln!(t, "accuracy: eval.jsonl is empty");
        }
        Some(rows) => {
            let scale = accuracy_scale(rows);
            let _ = writeln!(
                t,
                "accuracy (eval.jsonl; round 0 = before training), % [95% interval]"
            );
            for name in benchmarks(rows) {
                let mut mine: Vec<&EvalRow> = rows.iter().filter(|r| r.benchmark == name).collect();
                mine.sort_by_key(|r| r.round);
                let cells: Vec<String> = mine
                    .iter()
                    .map(|r| {
                        format!(
                            "round {}: {:.1} [{:.1}, {:.1}] ({}/{})",
                            r.round,
                            r.accuracy * scale,
                            r.ci_low * scale,
                            r.ci_high * scale,
                            r.correct,
                            r.n
                        )
                    })
                    .collect();
                let _ = writeln!(t, "  {name}: {}", cells.join(" -> "));
                if let (Some(a), Some(b)) = (mine.first(), mine.last())
                    && mine.len() > 1
                {
                    let _ = writeln!(
                        t,
                        "  {name}: before/after {:.1} -> {:.1} ({:+.1} points, round {} -> round {})",
                        a.accuracy * scale,
                        b.accuracy * scale,
                        (b.accuracy - a.accuracy) * scale,
                        a.round,
                        b.round
                    );
                }
            }
        }
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "charts:");
    for c in charts {
        let _ = writeln!(t, "  {}", c.display());
    }
    for n in notes {
        let _ = writeln!(t, "  {n}");
    }
    if !data.warnings.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(t, "warnings:");
        for w in &data.warnings {
            let _ = writeln!(t, "  {w}");
        }
    }
    t
}
