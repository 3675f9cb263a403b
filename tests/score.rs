//! `score` on tiny checkpoints: the output format, batching that does not change results,
//! and agreement with a direct forward pass of each sequence on its own.

mod common;

use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::cli::score::{ScoreRequest, score_all, score_packed};
use genius_engine::model::load_model;
use genius_engine::model::safetensors::Dtype;
use genius_engine::transformer::{PackedBatch, Transformer};
use std::process::Command;

fn random_requests(n: usize, vocab: usize, seed: u64) -> Vec<ScoreRequest> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let p = 1 + rng.below(20);
            let c = rng.below(12);
            ScoreRequest {
                prompt_ids: (0..p).map(|_| rng.below(vocab) as u32).collect(),
                completion_ids: (0..c).map(|_| rng.below(vocab) as u32).collect(),
            }
        })
        .collect()
}

#[test]
fn batching_does_not_change_scores() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_qwen2_config();
    write_tiny_checkpoint(dir.path(), &cfg, 3, Dtype::F32);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let model = Transformer::load(CpuBackend::new(), cfg.clone(), m.weights.as_ref()).unwrap();
    let reqs = random_requests(9, cfg.vocab_size, 4);

    // Each request alone, straight through the transformer.
    let alone: Vec<Vec<f32>> = reqs
        .iter()
        .map(|r| {
            let seq = [r.prompt_ids.clone(), r.completion_ids.clone()].concat();
            let hidden = model
                .forward_hidden(&PackedBatch::from_sequences(&[&seq]))
                .unwrap();
            let p = r.prompt_ids.len();
            let rows: Vec<usize> = (p - 1..seq.len() - 1).collect();
            model
                .target_logprobs(&hidden, &rows, &r.completion_ids)
                .unwrap()
        })
        .collect();
    for budget in [1, 17, 64, 10_000] {
        let mut got = Vec::new();
        score_all(&model, &reqs, budget, |_, lps| {
            got.extend(lps);
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), reqs.len());
        for (g, a) in got.iter().zip(&alone) {
            assert_eq!(g.len(), a.len());
            for (x, y) in g.iter().zip(a) {
                assert!((x - y).abs() < 1e-4, "budget {budget}: {x} vs {y}");
            }
        }
    }
    let refs: Vec<&ScoreRequest> = reqs.iter().collect();
    assert_eq!(score_packed(&model, &refs).unwrap().len(), reqs.len());
}

#[test]
fn score_command_writes_one_line_per_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    write_tiny_checkpoint(&model, &tiny_llama_config(), 7, Dtype::BF16);
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"w5 w6 w7\", \"completion\": \"w8 w9\"}\n{\"prompt\": \"<s> w10\", \"completion\": \"\"}\n{\"prompt\": \"w11\", \"completion\": \"w12 <|user|> w13\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .args([
            "score",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .args([
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&lines[0]["prompt_ids"]), vec![5, 6, 7]);
    assert_eq!(ids(&lines[0]["completion_ids"]), vec![8, 9]);
    // special tokens are recognised in the prompt and the completion
    assert_eq!(ids(&lines[1]["prompt_ids"]), vec![0, 10]);
    assert!(ids(&lines[1]["completion_ids"]).is_empty());
    assert_eq!(ids(&lines[2]["completion_ids"]), vec![12, 2, 13]);
    for l in &lines {
        let lp: Vec<f64> = l["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(lp.len(), l["completion_ids"].as_array().unwrap().len());
        assert!(lp.iter().all(|&x| x <= 0.0 && x.is_finite()));
        let sum: f64 = lp.iter().sum();
        assert!((sum - l["sum"].as_f64().unwrap()).abs() < 1e-4);
    }
}

#[test]
fn messages_are_rendered_through_the_chat_template() {
    use genius_engine::cli::score::{parse_score_line, tokenize_input};
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &tiny_llama_config(), 8, Dtype::F32);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let input = parse_score_line(
        r#"{"messages": [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}, {"role": "user", "content": "w8"}], "completion": "w9 </s>"}"#,
    )
    .unwrap();
    let r = tokenize_input(&m.tokenizer, &input).unwrap();
    // <|user|> w5 w6 <|assistant|> w7 </s> <|user|> w8 <|assistant|>  (generation prompt)
    assert_eq!(r.prompt_ids, vec![2, 5, 6, 3, 7, 1, 2, 8, 3]);
    assert_eq!(r.completion_ids, vec![9, 1]);
}

#[test]
fn an_empty_prompt_is_refused_not_misscored() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_llama_config();
    write_tiny_checkpoint(dir.path(), &cfg, 3, Dtype::F32);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let model = Transformer::load(CpuBackend::new(), cfg, m.weights.as_ref()).unwrap();
    let ok = ScoreRequest {
        prompt_ids: vec![5, 6],
        completion_ids: vec![7],
    };
    let empty = ScoreRequest {
        prompt_ids: vec![],
        completion_ids: vec![8],
    };
    let err = score_packed(&model, &[&ok, &empty]).unwrap_err();
    assert!(
        format!("{err:#}").contains("request 1: the prompt has no tokens"),
        "{err:#}"
    );
}
