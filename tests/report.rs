//! `genius-engine report` on a fake run folder written with the crate's own artifact types
//! (summary.json with 2 rounds, 20 optimizer steps per round, trajectories with candidate f,
//! pairs, eval.jsonl before/after): every chart exists and draws something, report.txt names
//! both rounds and the accuracies; the binary once; missing, empty and damaged folders.

use genius_engine::genius::pairs::{Candidate, Trajectory, TrajectoryStep};
use genius_engine::genius::trainer::StepMetrics;
use serde_json::json;
use std::fs;
use std::path::Path;
use std::process::Command;

const ROUNDS: usize = 2;
const STEPS: u64 = 20;
const QUERIES: usize = 4;

fn jsonl<T: serde::Serialize>(path: &Path, items: &[T]) {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item).unwrap());
        text.push('\n');
    }
    fs::write(path, text).unwrap();
}

fn candidate(beam: usize, f: f64) -> Candidate {
    Candidate {
        beam,
        step: "Let x = 2.\n".into(),
        rollout: "So the answer is 4.".into(),
        trajectory: "Let me think.\nLet x = 2.\nSo the answer is 4.".into(),
        rollout_logprobs: vec![f as f32; 3],
        f,
        advantage: f + 0.5,
        finished: false,
    }
}

/// A realistic run folder: `run --out DIR --rounds 2` followed by an evaluation.
fn fake_run(dir: &Path) {
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let rdir = dir.join(format!("round-{round}"));
        fs::create_dir_all(&rdir).unwrap();
        let shift = 0.2 * round as f64;
        let trajectories: Vec<Trajectory> = (0..QUERIES)
            .map(|q| Trajectory {
                id: format!("q{q}"),
                query: format!("What is {q} + {q}?"),
                prompt: "<|user|>...<|assistant|>Let me think.\n".into(),
                steps: (1..=2u32)
                    .map(|k| TrajectoryStep {
                        k,
                        candidates: (0..4)
                            .map(|c| {
                                candidate(
                                    c / 2,
                                    -1.5 + shift + 0.1 * c as f64 + 0.05 * q as f64
                                        - 0.02 * k as f64,
                                )
                            })
                            .collect(),
                        selected: vec![0, 3],
                    })
                    .collect(),
                final_beams: vec!["Let me think.\nLet x = 2.\nSo the answer is 4.".into(); 2],
            })
            .collect();
        jsonl(&rdir.join("trajectories.jsonl"), &trajectories);
        let pairs: Vec<serde_json::Value> = (0..QUERIES * 2)
            .map(|i| {
                json!({"id": format!("q{}", i / 2), "step": i % 2 + 1, "prompt": "p",
                       "chosen": [], "rejected": [], "chosen_weights": 0.1,
                       "rejected_weights": -0.1, "chosen_f": -1.0, "rejected_f": -1.2})
            })
            .collect();
        jsonl(&rdir.join("pairs.jsonl"), &pairs);
        let metrics: Vec<StepMetrics> = (1..=STEPS)
            .map(|step| {
                let t = step as f64 / STEPS as f64;
                StepMetrics {
                    step,
                    total_steps: STEPS,
                    epoch: 0,
                    loss: 0.69 - 0.2 * t - 0.05 * round as f64,
                    chosen_reward: 0.1 * t,
                    rejected_reward: -0.1 * t,
                    margin: 0.2 * t + 0.01 * round as f64,
                    accuracy: 0.5 + 0.3 * t,
                    w_mean: 0.8 + 0.1 * (t * 6.0).sin(),
                    lr: 2e-6 * (step as f64 / 2.0).min(1.0) * (1.0 - t * 0.5),
                    grad_norm: 1.5 - t,
                    pairs: 16,
                    tokens: 4000,
                    tokens_per_s: 800.0,
                    seconds: 5.0,
                }
            })
            .collect();
        jsonl(&rdir.join("metrics.jsonl"), &metrics);
        rounds.push(json!({
            "round": round, "queries_sampled": QUERIES, "candidates": QUERIES * 8,
            "mean_f": -1.2 + 0.2 * round as f64, "sample_seconds": 30.0, "sample_tokens": 6000,
            "sample_tokens_per_s": 200.0, "pairs": QUERIES * 2, "pairs_seconds": 0.1,
            "reference_seconds": 4.0, "reference_tokens": 2000, "train_steps": STEPS,
            "train_seconds": 100.0, "train_tokens": 80000, "loss_first": 0.69,
            "loss_last": 0.44, "margin_last": 0.21, "checkpoint_seconds": 1.5,
            "checkpoint": format!("{}/round-{round}/checkpoint", dir.display()),
        }));
    }
    fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(
            &json!({"profile": "quick", "queries": QUERIES, "seconds": 280.5, "rounds": rounds}),
        )
        .unwrap(),
    )
    .unwrap();
    let mut eval = Vec::new();
    for (benchmark, base) in [("gsm8k", 0.40), ("math500", 0.20)] {
        for round in 0..=ROUNDS {
            let n = 200u64;
            let acc = base + 0.03 * round as f64;
            let correct = (acc * n as f64).round() as u64;
            eval.push(json!({"round": round, "benchmark": benchmark,
                "file": format!("{benchmark}.jsonl"), "n": n, "correct": correct,
                "accuracy": correct as f64 / n as f64, "ci_low": acc - 0.065,
                "ci_high": acc + 0.07}));
        }
    }
    jsonl(&dir.join("eval.jsonl"), &eval);
}

/// The number after `name="` in the SVG's first tag.
fn svg_attr(svg: &str, name: &str) -> f64 {
    let head = &svg[..svg.find('>').expect("a first tag")];
    let at = head
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {head}"));
    let rest = &head[at + name.len() + 2..];
    rest[..rest.find('"').unwrap()].parse().unwrap()
}

fn check_svg(path: &Path, min_elements: usize, texts: &[&str]) {
    let svg = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let trimmed = svg.trim_start();
    assert!(
        trimmed.starts_with("<svg") || trimmed.starts_with("<?xml"),
        "{}: not SVG: {}",
        path.display(),
        &trimmed[..trimmed.len().min(80)]
    );
    assert!(
        svg.trim_end().ends_with("</svg>"),
        "{}: unterminated",
        path.display()
    );
    let (w, h) = (svg_attr(trimmed, "width"), svg_attr(trimmed, "height"));
    assert!(w > 100.0 && h > 100.0, "{}: {w}x{h}", path.display());
    // Beyond the one background <rect>.
    let drawn: usize = ["<path", "<polyline", "<line", "<rect", "<circle"]
        .iter()
        .map(|tag| svg.matches(tag).count())
        .sum();
    assert!(
        drawn > min_elements,
        "{}: only {drawn} drawing elements",
        path.display()
    );
    for t in texts {
        assert!(svg.contains(t), "{}: no text {t:?}", path.display());
    }
}

fn check_charts(out: &Path) {
    check_svg(
        &out.join("training.svg"),
        4 * 2 + 20,
        &[
            "optimizer step (all rounds)",
            "loss",
            "learning rate",
            "round 2",
        ],
    );
    check_svg(
        &out.join("accuracy.svg"),
        2 * (ROUNDS + 1) * 2,
        &["accuracy (%)", "gsm8k", "math500"],
    );
    check_svg(
        &out.join("foresight.svg"),
        10,
        &["foresight score f", "round 1", "round 2"],
    );
    check_svg(
        &out.join("throughput.svg"),
        6,
        &["tokens/s", "sample", "reference", "train"],
    );
}

#[test]
fn report_writes_charts_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    fake_run(dir.path());
    let out = dir.path().join("charts");
    let report = genius_engine::report::write_report(dir.path(), &out).unwrap();
    assert_eq!(report.charts.len(), 4, "{:?}", report.charts);
    check_charts(&out);
    let text = fs::read_to_string(out.join("report.txt")).unwrap();
    assert_eq!(text, report.text);
    for want in [
        "profile quick, 4 queries, 2 round(s)",
        // round, queries, candidates, ..., pairs, steps
        "    1        4          32",
        "    2        4          32",
        "0.6300 -> 0.4400", // round 1: first and last loss
        "0.5800 -> 0.3900", // round 2
        "gsm8k: round 0: 40.0 [33.5, 47.0] (80/200) -> round 1: 43.0",
        "gsm8k: before/after 40.0 -> 46.0 (+6.0 points, round 0 -> round 2)",
        "math500: before/after 20.0 -> 26.0",
        "(200)", // sample tokens/s
        "(800)", // train tokens/s
        "(500)", // reference tokens/s
    ] {
        assert!(text.contains(want), "report.txt lacks {want:?}:\n{text}");
    }
    assert!(!text.contains("warnings:"), "{text}");
}

#[test]
fn binary_report_defaults_to_run_dir_report() {
    let dir = tempfile::tempdir().unwrap();
    fake_run(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .arg("report")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Genius run report"), "{stdout}");
    assert!(stdout.contains("gsm8k"), "{stdout}");
    check_charts(&dir.path().join("report"));
}

#[test]
fn missing_parts_are_skipped_with_notes() {
    // An interrupted run: no summary.json, no eval.jsonl, a torn last metrics line.
    let dir = tempfile::tempdir().unwrap();
    fake_run(dir.path());
    fs::remove_file(dir.path().join("summary.json")).unwrap();
    fs::remove_file(dir.path().join("eval.jsonl")).unwrap();
    let metrics = dir.path().join("round-2/metrics.jsonl");
    let mut text = fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\": 21, \"loss\": 0.");
    fs::write(&metrics, text).unwrap();
    let out = dir.path().join("report");
    let report = genius_engine::report::write_report(dir.path(), &out).unwrap();
    assert!(!out.join("accuracy.svg").exists());
    assert!(
        report
            .text
            .contains("accuracy.svg not written: no eval.jsonl"),
        "{}",
        report.text
    );
    assert!(report.text.contains("no summary.json"), "{}", report.text);
    assert!(
        report
            .text
            .contains("round-2/metrics.jsonl: line 21: incomplete last line skipped"),
        "{}",
        report.text
    );
    // Training throughput falls back on the steps' tokens and seconds.
    check_svg(&out.join("throughput.svg"), 2, &["train"]);
    check_svg(&out.join("training.svg"), 28, &["loss"]);
}

#[test]
fn missing_empty_and_damaged_folders_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-run");
    let err = genius_engine::report::write_report(&missing, &missing.join("report")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no-such-run") && msg.contains("no such run folder"),
        "{msg}"
    );

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = genius_engine::report::write_report(&empty, &empty.join("report")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("empty") && msg.contains("no Genius run artifacts"),
        "{msg}"
    );
    assert!(!empty.join("report").exists());

    // A bad line that is not the last one: an error naming the file and line.
    let run = dir.path().join("run");
    fs::create_dir(&run).unwrap();
    fake_run(&run);
    let traj = run.join("round-1/trajectories.jsonl");
    let text = fs::read_to_string(&traj).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1] = "{\"id\": \"q1\", \"steps\": [{\"candidates\": [{\"f\": \"high\"}]}]}";
    fs::write(&traj, lines.join("\n") + "\n").unwrap();
    let err = genius_engine::report::write_report(&run, &run.join("report")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("round-1/trajectories.jsonl: line 2:"), "{msg}");

    // The binary says so too, with a failing status and no panic.
    let out = Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .arg("report")
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no-such-run") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
