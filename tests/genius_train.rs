//! Training sequences and the trainer's log-prob sums: prompt tokens are masked out of the
//! loss, the trainer's sums equal the scoring path's, and sequences are cut at the limit.

mod common;

use common::{tiny_llama_config, write_tiny_checkpoint};
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::genius::sequences::{PromptMode, build_sequence, response_logprob_sums};
use genius_engine::model::load_model;
use genius_engine::model::safetensors::Dtype;
use genius_engine::transformer::{TrainBatch, Transformer};

#[test]
fn only_response_tokens_are_scored_and_sums_match_the_scoring_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_llama_config();
    write_tiny_checkpoint(dir.path(), &config, 5, Dtype::F32);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let tok = &m.tokenizer;
    let model = Transformer::load(CpuBackend::new(), m.config.clone(), m.weights.as_ref()).unwrap();

    let query = "w10 w11 w12";
    let response = "w20 w21 w22 w23";
    let s = build_sequence(tok, query, response, PromptMode::Query, 1300).unwrap();
    // The prompt part is exactly the generation prompt; the response is the answer and the
    // template's end of turn.
    let prompt = tok
        .apply_chat_template(
            &serde_json::json!([{"role": "user", "content": query}]),
            true,
        )
        .unwrap();
    assert_eq!(
        s.tokens[..s.prompt_len],
        tok.encode(&prompt, false).unwrap()[..]
    );
    let rest = tok.decode(&s.tokens[s.prompt_len..]).unwrap();
    assert!(
        rest.starts_with(response) && rest.contains("</s>"),
        "{rest:?}"
    );

    // The trainer's masked sums equal the scoring path's sums over the response.
    let other = build_sequence(tok, "w30", "w31 w32", PromptMode::Query, 1300).unwrap();
    let seqs = [s.clone(), other.clone()];
    let masks: Vec<Vec<bool>> = seqs
        .iter()
        .map(|q| (0..q.tokens.len()).map(|j| j >= q.prompt_len).collect())
        .collect();
    let tokens: Vec<&[u32]> = seqs.iter().map(|q| q.tokens.as_slice()).collect();
    let batch = TrainBatch::next_token(&tokens, &masks).unwrap();
    assert_eq!(
        batch.seq_rows[0].len(),
        s.response_len(),
        "one scored row per response token"
    );
    let (lp, _) = model.forward_train(&batch).unwrap();
    let sums = response_logprob_sums(&model, &seqs, 4096, |_| {}).unwrap();
    for (i, r) in batch.seq_rows.iter().enumerate() {
        let train_sum: f64 = lp[r.clone()].iter().map(|&x| x as f64).sum();
        assert!(
            (train_sum - sums[i]).abs() < 1e-4,
            "{train_sum} vs {}",
            sums[i]
        );
    }

    // The release's mode: the assistant turn alone, everything after the first token scored.
    let d = build_sequence(tok, query, response, PromptMode::DropQuery, 1300).unwrap();
    assert_eq!(d.prompt_len, 1);
    assert!(!tok.decode(&d.tokens).unwrap().contains(query));

    // Truncation keeps the prompt and cuts the response; a prompt beyond the limit is an error.
    let cut = build_sequence(tok, query, response, PromptMode::Query, s.prompt_len + 2).unwrap();
    assert_eq!(cut.tokens, s.tokens[..s.prompt_len + 2]);
    let e = build_sequence(tok, query, response, PromptMode::Query, s.prompt_len)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt alone"), "{e}");
}
