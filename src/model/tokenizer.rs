//! The model's tokenizer (the `tokenizers` crate) together with its special tokens and chat
//! template. Built from HF files (`tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) or from GGUF metadata (see `gguf.rs`).

use anyhow::{Context, Result};
use std::path::PathBuf;

pub use super::chat_template::render_chat_template;

/// A tokenizer plus what the engine needs to know around it.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS token text and id, when the model has one.
    pub bos_token: Option<(String, u32)>,
    /// The main EOS token text and id (`eos_token` in the template context).
    pub eos_token: Option<(String, u32)>,
    /// Every id that ends generation: the EOS token plus `generation_config.json`'s `eos_token_id`.
    pub eos_ids: Vec<u32>,
    /// The Jinja chat template, verbatim.
    pub chat_template: Option<String>,
    /// The file(s) it came from, for error messages.
    pub origin: PathBuf,
}

impl TextTokenizer {
    /// Wraps a ready `tokenizers::Tokenizer`. Its post-processor decides whether plain prompts
    /// get a BOS (HF semantics of `add_special_tokens=True`).
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_token: Option<(String, u32)>,
        eos_token: Option<(String, u32)>,
        mut eos_ids: Vec<u32>,
        chat_template: Option<String>,
        origin: PathBuf,
    ) -> Self {
        if let Some((_, id)) = &eos_token
            && !eos_ids.contains(id)
        {
            eos_ids.insert(0, *id);
        }
        Self {
            inner,
            bos_token,
            eos_token,
            eos_ids,
            chat_template,
            origin,
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text with special tokens recognised. `add_special_tokens` adds what the
    /// tokenizer's post-processor adds (BOS for LLaMA-3); pass `false` for text rendered by a
    /// chat template (the template writes BOS itself) and for completions.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("{}: tokenizer failed: {e}", self.origin.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("{}: decode failed: {e}", self.origin.display()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Renders `messages` (a JSON list of `{"role", "content"}`) through the model's chat
    /// template with HF semantics.
    pub fn apply_chat_template(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().with_context(|| {
            format!(
                "{}: the model has no chat template; give a plain 'prompt' instead of 'messages'",
                self.origin.display()
            )
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_ref().map(|(t, _)| t.as_str()),
            self.eos_token.as_ref().map(|(t, _)| t.as_str()),
        )
        .with_context(|| format!("{}: chat template", self.origin.display()))
    }
}

// PROVISIONAL (replaced by the full HF tokenizer loader when it lands).
impl TextTokenizer {
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self::new(inner, None, None, vec![], None, path))
    }
}
