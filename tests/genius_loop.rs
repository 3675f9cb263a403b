//! The Genius loop through the `genius-engine` binary on a tiny random checkpoint: a whole
//! `run`, runs interrupted in the middle of sampling and of training (the process aborts
//! right after a record is written, as a kill would stop it) and resumed, training that lowers
//! the loss, checkpoints that load back with identical logits, and bad input.

mod common;

use common::{tiny_llama_config, write_tiny_checkpoint};
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::genius::pairs::{Pair, Trajectory, read_pairs, read_trajectories};
use genius_engine::genius::trainer::StepMetrics;
use genius_engine::model::load_model;
use genius_engine::model::safetensors::Dtype;
use genius_engine::transformer::{PackedBatch, Transformer};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tiny checkpoint and a query file of `n` queries in a fresh temp dir.
fn setup(n: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let mut config = tiny_llama_config();
    config.max_position_embeddings = 512;
    write_tiny_checkpoint(&model, &config, 21, Dtype::F32);
    let queries = dir.path().join("queries.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{\"id\": \"q{i}\", \"query\": \"w{} w{} w{}\"}}",
                10 + i % 40,
                11 + i % 37,
                12 + i % 31
            )
        })
        .collect();
    std::fs::write(&queries, lines.join("\n") + "\n").unwrap();
    (dir, model, queries)
}

/// Flags of a small, fast run.
fn run_args(model: &Path, queries: &Path, out: &Path) -> Vec<String> {
    [
        "run",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--queries",
        queries.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-M",
        "2",
        "-N",
        "2",
        "-K",
        "2",
        "--max-step-tokens",
        "5",
        "--max-rollout-tokens",
        "6",
        "--queries-in-flight",
        "3",
        "--pairs-per-step",
        "4",
        "--save-every",
        "1",
        "--lr",
        "1e-3",
        "--warmup-ratio",
        "0",
        "--log-pairs",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn genius(args: &[String], abort_after: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_genius-engine"));
    cmd.args(args);
    match abort_after {
        Some(spec) => cmd.env("GENIUS_ABORT_AFTER", spec),
        None => cmd.env_remove("GENIUS_ABORT_AFTER"),
    };
    cmd.output().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn metrics(path: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fields of a metrics line that do not depend on timing.
fn numbers(m: &StepMetrics) -> (u64, f64, f64, f64, f64, f64, usize) {
    (
        m.step,
        m.loss,
        m.chosen_reward,
        m.rejected_reward,
        m.lr,
        m.grad_norm,
        m.tokens,
    )
}

fn logits_of(checkpoint: &Path) -> Vec<f32> {
    let m = load_model(Some(checkpoint.to_str().unwrap())).unwrap();
    let t = Transformer::load(CpuBackend::new(), m.config.clone(), m.weights.as_ref()).unwrap();
    let ids = [3u32, 17, 9, 40, 22];
    let h = t
        .forward_hidden(&PackedBatch::from_sequences(&[&ids]))
        .unwrap();
    t.logits_at(&h, &[0, 4]).unwrap().data
}

#[test]
fn run_interrupted_in_sampling_and_in_training_resumes_to_the_same_result() {
    let (dir, model, queries) = setup(7);
    // Reference: one uninterrupted run.
    let whole = dir.path().join("whole");
    ok(&genius(&run_args(&model, &queries, &whole), None));
    let round = whole.join("round-1");
    let trajs = read_trajectories(&round.join("trajectories.jsonl")).unwrap();
    assert_eq!(trajs.len(), 7);
    let pairs = read_pairs(&round.join("pairs.jsonl")).unwrap();
    assert_eq!(pairs.len(), 14, "one pair per step, K = 2");
    let whole_metrics = metrics(&round.join("metrics.jsonl"));
    assert_eq!(whole_metrics.len(), 4, "14 pairs at 4 per step");
    assert!(round.join("checkpoint/model.safetensors").exists());
    assert!(whole.join("summary.json").exists());

    // Interrupted after the 3rd query's trajectory, then after the 2nd optimizer step's
    // metrics line (its state not yet saved: the resumed run must redo that step).
    let cut = dir.path().join("cut");
    let args = run_args(&model, &queries, &cut);
    let first = genius(&args, Some("trajectories.jsonl:3"));
    assert!(
        !first.status.success(),
        "the abort hook did not stop the run"
    );
    let partial = read_trajectories(&cut.join("round-1/trajectories.jsonl")).unwrap();
    assert_eq!(partial.len(), 3);
    let second = genius(&args, Some("metrics.jsonl:2"));
    assert!(!second.status.success());
    assert_eq!(metrics(&cut.join("round-1/metrics.jsonl")).len(), 2);
    ok(&genius(&args, None));

    // Complete, no duplicates, and the same numbers as the uninterrupted run.
    let round_cut = cut.join("round-1");
    let resumed: Vec<Trajectory> =
        read_trajectories(&round_cut.join("trajectories.jsonl")).unwrap();
    let ids: HashSet<&str> = resumed.iter().map(|t| t.id.as_str()).collect();
    assert_eq!((resumed.len(), ids.len()), (7, 7));
    let by_id = |ts: &[Trajectory]| {
        let mut v = ts.to_vec();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    assert_eq!(
        by_id(&resumed),
        by_id(&trajs),
        "resumed sampling draws the same"
    );
    let resumed_pairs: Vec<Pair> = read_pairs(&round_cut.join("pairs.jsonl")).unwrap();
    assert_eq!(resumed_pairs.len(), pairs.len());
    let m = metrics(&round_cut.join("metrics.jsonl"));
    let steps: Vec<u64> = m.iter().map(|m| m.step).collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "each step logged once");
    for (a, b) in m.iter().zip(&whole_metrics) {
        assert_eq!(numbers(a), numbers(b), "resumed training matches");
    }
    let stats = std::fs::read_to_string(round_cut.join("pair_stats.jsonl")).unwrap();
    assert_eq!(
        stats.lines().count(),
        14,
        "one pair-stats line per pair, none twice"
    );
    assert_eq!(
        logits_of(&round_cut.join("checkpoint")),
        logits_of(&round.join("checkpoint"))
    );

    // Resuming under other settings would mix results: refused, naming what differs.
    let mut other = args.clone();
    other.extend(["--tau", "0.5"].map(String::from));
    let o = genius(&other, None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("other settings") && e.contains("sampling"),
        "{e}"
    );
}

#[test]
fn training_lowers_the_loss_from_ln2_and_the_checkpoint_loads_back() {
    let (dir, model, queries) = setup(6);
    let out = dir.path().join("out");
    let mut args = run_args(&model, &queries, &out);
    // Two epochs over the pairs at a high learning rate: the loss must fall.
    args.extend(["--epochs", "3"].map(String::from));
    ok(&genius(&args, None));
    let round = out.join("round-1");
    let m = metrics(&round.join("metrics.jsonl"));
    assert!(
        (m[0].loss - std::f64::consts::LN_2).abs() < 1e-6,
        "first step: policy = reference, loss ln 2, got {}",
        m[0].loss
    );
    let last = m.last().unwrap();
    assert!(
        last.loss < m[0].loss - 0.05 && last.margin > 0.0,
        "loss {} -> {}, margin {}",
        m[0].loss,
        last.loss,
        last.margin
    );
    // The checkpoint holds the trained weights: its logits differ from the start's, and a
    // second load gives identical logits.
    let trained = logits_of(&round.join("checkpoint"));
    assert_eq!(trained, logits_of(&round.join("checkpoint")));
    assert_ne!(trained, logits_of(&model));
}

#[test]
fn bad_inputs_fail_clearly_and_write_nothing_half_way() {
    let (dir, model, queries) = setup(2);
    let m = model.to_str().unwrap().to_string();
    let run_with =
        |queries: &Path, out: &Path| -> Output { genius(&run_args(&model, queries, out), None) };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).to_string();

    // Empty and malformed query files name the file (and the line).
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let o = run_with(&empty, &dir.path().join("o1"));
    assert!(
        !o.status.success() && stderr(&o).contains("empty.jsonl"),
        "{}",
        stderr(&o)
    );
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"query\": \"w1\"}\n{\"query\": 5}\n").unwrap();
    let o = run_with(&bad, &dir.path().join("o2"));
    assert!(
        !o.status.success() && stderr(&o).contains("line 2"),
        "{}",
        stderr(&o)
    );

    // A pairs file with a missing field names the line.
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, "{\"id\": \"a\", \"step\": 1, \"prompt\": \"w3\"}\n").unwrap();
    let o = genius(
        &[
            "train",
            "--device",
            "cpu",
            "--model",
            &m,
            "--pairs",
            pairs.to_str().unwrap(),
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join("o3").to_str().unwrap().to_string()])
        .collect::<Vec<_>>(),
        None,
    );
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("line 1") && e.contains("chosen"),
        "{e}"
    );

    // Zero pairs: trajectories whose steps have one candidate each.
    let t = dir.path().join("trajectories.jsonl");
    std::fs::write(
        &t,
        "{\"id\":\"a\",\"query\":\"w1\",\"prompt\":\"p\",\"steps\":[{\"k\":1,\"candidates\":[{\"beam\":0,\"step\":\"s\",\"rollout\":\"r\",\"trajectory\":\"t\",\"rollout_logprobs\":[-1.0],\"f\":-1.0,\"advantage\":-1.0,\"finished\":false}],\"selected\":[0]}],\"final\":[\"t\"]}\n",
    )
    .unwrap();
    let out_pairs = dir.path().join("zero.jsonl");
    let o = genius(
        &[
            "pairs",
            "--trajectories",
            t.to_str().unwrap(),
            "--output",
            out_pairs.to_str().unwrap(),
        ]
        .map(String::from),
        None,
    );
    assert!(
        !o.status.success() && stderr(&o).contains("no preference pairs"),
        "{}",
        stderr(&o)
    );
    assert!(!out_pairs.exists(), "nothing written");

    // An output folder that cannot be created (under a regular file).
    let file = dir.path().join("a_file");
    std::fs::write(&file, "x").unwrap();
    let o = run_with(&queries, &file.join("out"));
    assert!(
        !o.status.success() && stderr(&o).contains("a_file"),
        "{}",
        stderr(&o)
    );

    // Invalid method parameters are refused up front.
    let mut args = run_args(&model, &queries, &dir.path().join("o4"));
    args.extend(["--tau", "0"].map(String::from));
    let o = genius(&args, None);
    assert!(
        !o.status.success() && stderr(&o).contains("tau"),
        "{}",
        stderr(&o)
    );
    assert!(
        !dir.path().join("o4").exists(),
        "nothing created before the check"
    );
}

#[test]
fn a_second_round_samples_with_the_trained_weights_and_resumes_across_rounds() {
    let (dir, model, queries) = setup(5);
    let out = dir.path().join("two");
    let mut args = run_args(&model, &queries, &out);
    args.extend(["--rounds", "2"].map(String::from));
    ok(&genius(&args, None));
    let r1 = read_trajectories(&out.join("round-1/trajectories.jsonl")).unwrap();
    let r2 = read_trajectories(&out.join("round-2/trajectories.jsonl")).unwrap();
    assert_eq!((r1.len(), r2.len()), (5, 5));
    // The random draws are keyed by seed and query only, so identical weights would give
    // identical trajectories: round 2's differ because it samples with round 1's training.
    let f = |ts: &[Trajectory]| -> Vec<f64> {
        let mut v = ts.to_vec();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v.iter()
            .flat_map(|t| t.steps[0].candidates.iter().map(|c| c.f))
            .collect()
    };
    assert_ne!(f(&r1), f(&r2));
    assert!(out.join("round-2/checkpoint/model.safetensors").exists());

    // Interrupted in round 2's sampling: the resumed run reloads round 1's checkpoint and
    // finishes with the same round-2 trajectories.
    let cut = dir.path().join("cut");
    let mut args = run_args(&model, &queries, &cut);
    args.extend(["--rounds", "2"].map(String::from));
    let o = genius(&args, Some("trajectories.jsonl:7")); // 5 in round 1, 2 in round 2
    assert!(!o.status.success());
    assert_eq!(
        read_trajectories(&cut.join("round-2/trajectories.jsonl"))
            .unwrap()
            .len(),
        2
    );
    ok(&genius(&args, None));
    let resumed = read_trajectories(&cut.join("round-2/trajectories.jsonl")).unwrap();
    assert_eq!(f(&resumed), f(&r2));
    assert_eq!(
        logits_of(&cut.join("round-2/checkpoint")),
        logits_of(&out.join("round-2/checkpoint"))
    );
}

#[test]
fn a_query_that_can_never_fit_the_kv_budget_fails_alone() {
    let (dir, model, _) = setup(1);
    let queries = dir.path().join("mixed.jsonl");
    let long: Vec<String> = (0..80).map(|i| format!("w{}", 10 + i % 50)).collect();
    std::fs::write(
        &queries,
        format!(
            "{{\"id\": \"short\", \"query\": \"w10 w11 w12\"}}\n{{\"id\": \"long\", \"query\": \"{}\"}}\n{{\"id\": \"short2\", \"query\": \"w13 w14\"}}\n",
            long.join(" ")
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let args: Vec<String> = [
        "sample",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--queries",
        queries.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-M",
        "2",
        "-N",
        "2",
        "-K",
        "2",
        "--max-step-tokens",
        "5",
        "--max-rollout-tokens",
        "6",
        "--kv-budget",
        "64",
    ]
    .map(String::from)
    .to_vec();
    let o = genius(&args, None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the failed query makes the command fail"
    );
    assert!(e.contains("query 'long'") && e.contains("KV"), "{e}");
    let done = read_trajectories(&out.join("trajectories.jsonl")).unwrap();
    let mut ids: Vec<&str> = done.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["short", "short2"], "the others complete");
}
