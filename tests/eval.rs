//! `genius-engine eval` end to end: the default model on the bundled questions (deterministic
//! for a fixed seed, every line scored, the summary consistent with the lines), scoring of
//! outputs made elsewhere (`--predictions`, malformed lines reported), bad flags, and
//! `run --eval` recording accuracy before training and after each round.

mod common;

use common::{tiny_llama_config, write_tiny_checkpoint};
use genius_engine::model::safetensors::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn genius(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .args(args)
        .env_remove("GENIUS_ABORT_AFTER")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed: {err}");
    err
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/eval/gsm8k-mini.jsonl")
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn default_model_on_the_bundled_questions_is_deterministic_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = dir.path().join(name);
        ok(&genius(&[
            "eval",
            "--device",
            "cpu",
            "--benchmark",
            "gsm8k",
            "--data",
            bundled().to_str().unwrap(),
            "--limit",
            "3",
            "--samples",
            "2",
            "--max-new-tokens",
            "24",
            "--seed",
            "5",
            "--output",
            out.to_str().unwrap(),
        ]));
        out
    };
    let a = run("a.jsonl");
    let b = run("b.jsonl");
    let (la, lb) = (jsonl(&a), jsonl(&b));
    assert_eq!(la.len(), 6, "3 questions x 2 samples");
    let key = |v: &Value| (v["line"].as_u64().unwrap(), v["sample"].as_u64().unwrap());
    let mut sa: Vec<_> = la.iter().map(|v| (key(v), v.clone())).collect();
    let mut sb: Vec<_> = lb.iter().map(|v| (key(v), v.clone())).collect();
    sa.sort_by_key(|(k, _)| *k);
    sb.sort_by_key(|(k, _)| *k);
    for ((ka, va), (kb, vb)) in sa.iter().zip(&sb) {
        assert_eq!(ka, kb);
        for field in ["prediction", "extracted", "correct", "gold"] {
            assert_eq!(va[field], vb[field], "{field} differs between seeded runs");
        }
        assert!(va["tokens"].as_u64().unwrap() <= 24);
    }
    // Gold answers come from the "#### N" lines.
    let golds: Vec<&str> = sa
        .iter()
        .map(|(_, v)| v["gold"].as_str().unwrap())
        .collect();
    assert_eq!(golds, ["7", "7", "36", "36", "180", "180"]);
    let summary = json(&PathBuf::from(format!("{}.summary.json", a.display())));
    let correct = la.iter().filter(|v| v["correct"] == true).count();
    assert_eq!(summary["n"], 6);
    assert_eq!(summary["correct"].as_u64().unwrap() as usize, correct);
    assert_eq!(summary["questions"], 3);
    let acc = summary["accuracy"].as_f64().unwrap();
    let (lo, hi) = (
        summary["ci_low"].as_f64().unwrap(),
        summary["ci_high"].as_f64().unwrap(),
    );
    assert!(lo <= acc && acc <= hi && (0.0..=1.0).contains(&lo) && hi <= 1.0);
    assert!(summary["tokens"].as_u64().unwrap() > 0);
}

#[test]
fn predictions_are_scored_with_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let pred = dir.path().join("pred.jsonl");
    std::fs::write(
        &pred,
        concat!(
            "{\"output\": \"So the total is \\\\boxed{1,234}.\", \"answer\": \"1234\"}\n",
            "{\"output\": \"The answer is 12 apples.\", \"answer\": 12}\n",
            "{\"output\": \"I think it is 5\", \"answer\": \"6\"}\n",
            "not json\n",
            "{\"answer\": \"3\"}\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("scored.jsonl");
    let err = ok(&genius(&[
        "eval",
        "--benchmark",
        "gsm8k",
        "--predictions",
        pred.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("pred.jsonl:4"), "{err}");
    assert!(err.contains("pred.jsonl:5"), "{err}");
    let lines = jsonl(&out);
    let correct: Vec<bool> = lines.iter().map(|v| v["correct"] == true).collect();
    assert_eq!(correct, [true, true, false]);
    let summary = json(&PathBuf::from(format!("{}.summary.json", out.display())));
    assert_eq!(summary["n"], 3);
    assert_eq!(summary["correct"], 2);
    assert_eq!(summary["malformed_lines"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_eval_input_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Neither --data nor --predictions.
    let out = genius(&["eval", "--benchmark", "gsm8k"]);
    assert_eq!(out.status.code(), Some(2));
    // A data file with no usable question names the file.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"no answer field\"}\n").unwrap();
    let out = genius(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        "random:llama-tiny",
        "--benchmark",
        "gsm8k",
        "--data",
        bad.to_str().unwrap(),
        "--output",
        dir.path().join("o.jsonl").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.jsonl"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // run --eval with a malformed spec.
    let out = genius(&["run", "--eval", "gsm8k-no-colon"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BENCHMARK:FILE"), "{err}");
}

#[test]
fn run_with_eval_records_accuracy_before_and_after_each_round() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let mut config = tiny_llama_config();
    config.max_position_embeddings = 512;
    write_tiny_checkpoint(&model, &config, 21, Dtype::F32);
    let queries = dir.path().join("queries.jsonl");
    std::fs::write(
        &queries,
        "{\"id\": \"q0\", \"query\": \"w10 w11 w12\"}\n{\"id\": \"q1\", \"query\": \"w13 w14\"}\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let spec = format!("gsm8k:{}", bundled().display());
    let args: Vec<String> = [
        "run",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--queries",
        queries.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--rounds",
        "2",
        "-M",
        "2",
        "-N",
        "2",
        "-K",
        "2",
        "--max-step-tokens",
        "4",
        "--max-rollout-tokens",
        "4",
        "--pairs-per-step",
        "4",
        "--eval",
        &spec,
        "--eval-limit",
        "3",
        "--eval-max-new-tokens",
        "6",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&genius(&argv));
    let log = jsonl(&out.join("eval.jsonl"));
    let rounds: Vec<u64> = log.iter().map(|v| v["round"].as_u64().unwrap()).collect();
    assert_eq!(
        rounds,
        [0, 1, 2],
        "before training, after round 1, after round 2"
    );
    for v in &log {
        assert_eq!(v["benchmark"], "gsm8k");
        assert_eq!(v["n"], 3);
    }
    for r in 0..=2 {
        let f = out
            .join("eval")
            .join(format!("round-{r}-gsm8k-gsm8k-mini.jsonl"));
        assert_eq!(jsonl(&f).len(), 3, "{}", f.display());
    }
    // Running again (everything done) evaluates nothing new.
    ok(&genius(&argv));
    assert_eq!(jsonl(&out.join("eval.jsonl")).len(), 3);
    // The drift across rounds.
    ok(&genius(&["diagnose", "--run", out.to_str().unwrap()]));
    let drift = json(&out.join("drift.json"));
    let rounds = drift["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        assert!(r["mean_f"].is_number(), "{r}");
        let acc = &r["accuracy"][0];
        assert!(
            acc["accuracy"].is_number() && acc["change_from_before"].is_number(),
            "{r}"
        );
    }
}

#[test]
fn diagnose_scores_every_foresight_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("diag");
    ok(&genius(&[
        "diagnose",
        "--device",
        "cpu",
        "--model",
        "random:llama-tiny",
        "--benchmark",
        "gsm8k",
        "--data",
        bundled().to_str().unwrap(),
        "--limit",
        "2",
        "-M",
        "2",
        "-N",
        "2",
        "-K",
        "2",
        "--max-step-tokens",
        "4",
        "--max-rollout-tokens",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]));
    let result = json(&out.join("diagnose.json"));
    let candidates = jsonl(&out.join("candidates.jsonl"));
    assert_eq!(result["questions"], 2);
    assert_eq!(
        result["candidates"].as_u64().unwrap() as usize,
        candidates.len()
    );
    assert!(!candidates.is_empty());
    for c in &candidates {
        assert!(c["f"].is_number() && c["correct"].is_boolean(), "{c}");
    }
    // A random tiny model answers nothing right: AUROC needs both classes.
    if result["correct_candidates"] == 0 {
        assert!(result["auroc_f_predicts_correct"].is_null());
    }
    let acc = result["top_f_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
}
