//! `genius-engine score`: log p(completion | prompt) per token, batched.
//!
//! The prompt is a plain string (tokenized with special tokens recognised and BOS as the
//! tokenizer's post-processor says) or chat messages (rendered through the model's chat template
//! with the generation prompt, then tokenized without adding special tokens: the template writes
//! them). The completion is tokenized on its own and appended.

use super::ModelArgs;
pub use super::prompts::{Prompt, parse_prompt, tokenize_prompt};
use crate::backend::Backend;
use crate::model::TextTokenizer;
use crate::transformer::{PackedBatch, Transformer};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct ScoreInput {
    pub prompt: Prompt,
    pub completion: String,
}

/// Token ids of one scoring request.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRequest {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// One output line.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreOutput {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub sum: f64,
}

/// Parses one input line.
pub fn parse_score_line(line: &str) -> Result<ScoreInput> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let obj = v.as_object().context("expected a JSON object")?;
    let completion = match obj.get("completion") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => bail!("'completion' must be a string"),
        None => bail!("missing 'completion'"),
    };
    Ok(ScoreInput {
        prompt: parse_prompt(obj)?,
        completion,
    })
}

/// Reads every line of a JSONL input; errors name the file and line. Blank lines are skipped.
pub fn read_score_inputs(path: &Path) -> Result<Vec<ScoreInput>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open input", path.display()))?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_score_line(&line) {
            Ok(x) => out.push(x),
            Err(e) => errors.push(format!("{}:{}: {e:#}", path.display(), i + 1)),
        }
    }
    if !errors.is_empty() {
        let shown = errors.len().min(5);
        bail!(
            "{} malformed input line(s), nothing was scored:\n  {}{}",
            errors.len(),
            errors[..shown].join("\n  "),
            if errors.len() > shown { "\n  ..." } else { "" }
        );
    }
    Ok(out)
}

/// Tokenizes one input as the module comment says.
pub fn tokenize_input(tok: &TextTokenizer, input: &ScoreInput) -> Result<ScoreRequest> {
    let prompt_ids = tokenize_prompt(tok, &input.prompt)?;
    let completion_ids = tok.encode(&input.completion, false)?;
    Ok(ScoreRequest {
        prompt_ids,
        completion_ids,
    })
}

impl ScoreRequest {
    /// Tokens of prompt and completion together.
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.completion_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scores requests in one packed forward pass: `logprobs[r][i]` is
/// `log p(completion_ids[i] | prompt_ids, completion_ids[..i])`.
pub fn score_packed<B: Backend>(
    model: &Transformer<B>,
    requests: &[&ScoreRequest],
) -> Result<Vec<Vec<f32>>> {
    for (i, r) in requests.iter().enumerate() {
        if r.prompt_ids.is_empty() && !r.completion_ids.is_empty() {
            bail!("request {i}: {EMPTY_PROMPT}");
        }
    }
    let seqs: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| [r.prompt_ids.as_slice(), r.completion_ids.as_slice()].concat())
        .collect();
    let batch = PackedBatch::from_sequences(&seqs);
    let hidden = model.forward_hidden(&batch)?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, span) in requests.iter().zip(&batch.seqs) {
        let p = r.prompt_ids.len();
        for (i, &t) in r.completion_ids.iter().enumerate() {
            rows.push(span.start + p + i - 1);
            targets.push(t);
        }
    }
    let flat = model.target_logprobs(&hidden, &rows, &targets)?;
    let mut out = Vec::with_capacity(requests.len());
    let mut at = 0;
    for r in requests {
        out.push(flat[at..at + r.completion_ids.len()].to_vec());
        at += r.completion_ids.len();
    }
    Ok(out)
}

const EMPTY_PROMPT: &str =
    "the prompt has no tokens, so the first completion token has nothing to condition on";

/// Checks a request can be scored by a model with this context length.
fn check_request(r: &ScoreRequest, context: usize) -> Result<()> {
    if r.prompt_ids.is_empty() && !r.completion_ids.is_empty() {
        bail!("{EMPTY_PROMPT}");
    }
    let n = r.len();
    if n > context {
        bail!("{n} tokens exceed the model's context length of {context}");
    }
    Ok(())
}

/// Scores every request, packing consecutive ones into forward passes of at most
/// `batch_tokens` tokens, and hands each batch's results to `sink` in input order.
pub fn score_all<B: Backend>(
    model: &Transformer<B>,
    requests: &[ScoreRequest],
    batch_tokens: usize,
    mut sink: impl FnMut(&[&ScoreRequest], Vec<Vec<f32>>) -> Result<()>,
) -> Result<()> {
    let mut start = 0;
    while start < requests.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < requests.len() {
            let n = requests[end].len();
            if end > start && tokens + n > batch_tokens {
                break;
            }
            tokens += n;
            end += 1;
        }
        let batch: Vec<&ScoreRequest> = requests[start..end].iter().collect();
        let lps = score_packed(model, &batch)?;
        sink(&batch, lps)?;
        start = end;
    }
    Ok(())
}

pub fn run(args: &ModelArgs, input: &Path, output: &Path, batch_tokens: usize) -> Result<()> {
    if batch_tokens == 0 {
        bail!("--batch-tokens must be positive");
    }
    let inputs = read_score_inputs(input)?;
    let (model, any) = super::load_transformer(args)?;
    crate::with_transformer!(any, t => score_on(&model, &t, &inputs, input, output, batch_tokens))
}

fn score_on<B: Backend>(
    model: &crate::model::LoadedModel,
    transformer: &crate::transformer::Transformer<B>,
    inputs: &[ScoreInput],
    input: &Path,
    output: &Path,
    batch_tokens: usize,
) -> Result<()> {
    let context = model.config.max_position_embeddings;
    let mut requests = Vec::with_capacity(inputs.len());
    for (i, inp) in inputs.iter().enumerate() {
        let r = tokenize_input(&model.tokenizer, inp)
            .and_then(|r| check_request(&r, context).map(|_| r))
            .with_context(|| format!("{}: record {}", input.display(), i + 1))?;
        requests.push(r);
    }
    let total_tokens: usize = requests.iter().map(ScoreRequest::len).sum();
    let out_file = std::fs::File::create(output)
        .with_context(|| format!("{}: cannot create output", output.display()))?;
    let mut out = BufWriter::new(out_file);
    let bar = indicatif::ProgressBar::new(total_tokens as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}",
        )
        .expect("static template"),
    );
    let started = std::time::Instant::now();
    score_all(transformer, &requests, batch_tokens, |batch, lps| {
        for (r, lp) in batch.iter().zip(lps) {
            let line = ScoreOutput {
                prompt_ids: r.prompt_ids.clone(),
                completion_ids: r.completion_ids.clone(),
                sum: lp.iter().map(|&x| x as f64).sum(),
                logprobs: lp,
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
            bar.inc(r.len() as u64);
        }
        // Each finished batch reaches the disk before the next starts.
        out.flush()
            .with_context(|| format!("{}: write failed", output.display()))
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "scored {} records ({total_tokens} tokens) in {secs:.2}s, {:.0} tokens/s -> {}",
        requests.len(),
        total_tokens as f64 / secs.max(1e-9),
        output.display()
    );
    Ok(())
}
