//! Training sequences built from pairs (method.md section 3), and the reference model's
//! log-probs of their responses.
//!
//! **Default** (`query`): the model's chat template with the query as the user turn and the
//! trajectory as the assistant turn. The prompt part is the template rendered with the
//! generation prompt; the response part is everything after it (the trajectory and the
//! template's end-of-turn tokens): only response tokens are scored. `drop-query` reproduces
//! the release: the template with the assistant turn alone, every token scored but the first
//! (header tokens included). Sequences are cut to `max_len` tokens (the paper: 1300) from the
//! end of the response.

use crate::backend::Backend;
use crate::cli::score::{ScoreRequest, score_all};
use crate::model::TextTokenizer;
use crate::transformer::Transformer;
use anyhow::{Context, Result, bail};
use serde_json::json;

/// How a pair's texts become token sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PromptMode {
    /// User turn = query, assistant turn = trajectory, loss on the assistant tokens (default).
    #[default]
    Query,
    /// Assistant turn alone, header tokens unmasked (the release).
    DropQuery,
}

/// One training sequence: `tokens[prompt_len..]` is the scored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSequence {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

impl TrainSequence {
    /// Scored tokens.
    pub fn response_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// The token sequence of `query` answered by `response`.
pub fn build_sequence(
    tok: &TextTokenizer,
    query: &str,
    response: &str,
    mode: PromptMode,
    max_len: usize,
) -> Result<TrainSequence> {
    if max_len < 2 {
        bail!("the maximum training sequence length must be at least 2 tokens");
    }
    let (tokens, prompt_len) = match mode {
        PromptMode::Query => {
            let prompt =
                tok.apply_chat_template(&json!([{"role": "user", "content": query}]), true)?;
            let full = tok.apply_chat_template(
                &json!([
                    {"role": "user", "content": query},
                    {"role": "assistant", "content": response}
                ]),
                false,
            )?;
            let rest = full.strip_prefix(&prompt).with_context(|| {
                "the chat template renders the user turn differently with and without an assistant answer; cannot separate the prompt from the response"
            })?;
            let mut tokens = tok.encode(&prompt, false)?;
            let prompt_len = tokens.len();
            tokens.extend(tok.encode(rest, false)?);
            (tokens, prompt_len)
        }
        PromptMode::DropQuery => {
            let full = tok
                .apply_chat_template(&json!([{"role": "assistant", "content": response}]), false)?;
            (tok.encode(&full, false)?, 1)
        }
    };
    if prompt_len >= max_len.min(tokens.len()) {
        bail!(
            "the prompt alone takes {prompt_len} tokens, leaving no response tokens within {} tokens",
            max_len.min(tokens.len())
        );
    }
    let mut tokens = tokens;
    tokens.truncate(max_len);
    Ok(TrainSequence { tokens, prompt_len })
}

/// Sum of the response tokens' log-probs of every sequence under `model` (the reference),
/// batched by `batch_tokens`; `progress(done)` after each batch.
pub fn response_logprob_sums<B: Backend>(
    model: &Transformer<B>,
    seqs: &[TrainSequence],
    batch_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let requests: Vec<ScoreRequest> = seqs
        .iter()
        .map(|s| ScoreRequest {
            prompt_ids: s.tokens[..s.prompt_len].to_vec(),
            completion_ids: s.tokens[s.prompt_len..].to_vec(),
        })
        .collect();
    let mut sums = Vec::with_capacity(seqs.len());
    score_all(model, &requests, batch_tokens, |batch, lps| {
        sums.extend(
            lps.iter()
                .map(|l| l.iter().map(|&x| f64::from(x)).sum::<f64>()),
        );
        progress(batch.len());
        Ok(())
    })?;
    Ok(sums)
}
