//! The model's tokenizer (the `tokenizers` crate) together with its special tokens and chat
//! template. Built from HF files (`tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`, `generation_config.json`; see [`TextTokenizer::from_hf_dir`]) or from
//! GGUF metadata (see `gguf/tokenizer.rs`).

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

pub use super::chat_template::{render_chat_template, render_chat_template_with};

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
    /// The file the chat template came from, when it is not `origin`.
    chat_template_origin: Option<PathBuf>,
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
            chat_template_origin: None,
        }
    }

    /// Loads a Hugging Face tokenizer directory, with transformers' reading of its files:
    /// - `tokenizer.json` (required): vocabulary, merges, added tokens, and the post-processor
    ///   that decides what `encode(text, true)` adds (e.g. LLaMA-3's `<|begin_of_text|>`).
    /// - `tokenizer_config.json` (optional): `chat_template` (a string, or a list of
    ///   `{name, template}` of which `default` is used), `bos_token`/`eos_token` (a string or an
    ///   AddedToken object `{"content": ...}`), their ids looked up in `tokenizer.json`.
    /// - `chat_template.jinja` (optional, newer layout): the chat template; it wins over
    ///   `tokenizer_config.json`'s.
    /// - `generation_config.json` (optional): `eos_token_id` (an id or a list) joins `eos_ids`;
    ///   `eos_token_id`/`bos_token_id` also name the EOS/BOS token when `tokenizer_config.json`
    ///   does not mention them at all.
    ///
    /// The chat template is compiled here, so a syntax error fails the load and names its file.
    pub fn from_hf_dir(dir: &Path) -> Result<TextTokenizer> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            bail!(
                "{}: tokenizer.json is missing (a Hugging Face tokenizer directory needs it)",
                tokenizer_path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid tokenizer.json: {e}",
                tokenizer_path.display()
            )
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json_object(&config_path)?;
        let generation_path = dir.join("generation_config.json");
        let generation = read_optional_json_object(&generation_path)?;

        let template_file = dir.join("chat_template.jinja");
        let (chat_template, chat_template_origin) = if template_file.is_file() {
            let template = std::fs::read_to_string(&template_file)
                .with_context(|| format!("{}: cannot read", template_file.display()))?;
            (Some(template), Some(template_file))
        } else {
            match &config {
                Some(config) => match chat_template_from_config(config, &config_path)? {
                    Some(template) => (Some(template), Some(config_path.clone())),
                    None => (None, None),
                },
                None => (None, None),
            }
        };
        if let (Some(template), Some(origin)) = (&chat_template, &chat_template_origin) {
            super::chat_template::check_chat_template(template)
                .with_context(|| format!("{}: chat template", origin.display()))?;
        }

        let generation_eos_ids = match &generation {
            Some(generation) => token_ids_field(generation, "eos_token_id", &generation_path)?,
            None => Vec::new(),
        };
        let generation_bos_ids = match &generation {
            Some(generation) => token_ids_field(generation, "bos_token_id", &generation_path)?,
            None => Vec::new(),
        };
        let special_token = |field: &str, fallback_ids: &[u32]| -> Result<Option<(String, u32)>> {
            match config.as_ref().and_then(|c| c.get(field)) {
                Some(value) => {
                    let Some(text) = special_token_text(value, field, &config_path)? else {
                        return Ok(None);
                    };
                    let id = inner.token_to_id(&text).with_context(|| {
                        format!(
                            "{}: {field} '{text}' is not a token of {}",
                            config_path.display(),
                            tokenizer_path.display()
                        )
                    })?;
                    Ok(Some((text, id)))
                }
                None => Ok(fallback_ids
                    .first()
                    .and_then(|&id| inner.id_to_token(id).map(|text| (text, id)))),
            }
        };
        let bos_token = special_token("bos_token", &generation_bos_ids)?;
        let eos_token = special_token("eos_token", &generation_eos_ids)?;

        let mut tokenizer = TextTokenizer::new(
            inner,
            bos_token,
            eos_token,
            generation_eos_ids,
            chat_template,
            tokenizer_path,
        );
        tokenizer.chat_template_origin = chat_template_origin;
        Ok(tokenizer)
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
        self.apply_chat_template_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`apply_chat_template`](Self::apply_chat_template) with extra template variables, the
    /// `**kwargs` of transformers' `apply_chat_template` (`tools`, `enable_thinking`, ...).
    pub fn apply_chat_template_with(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra_variables: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template_origin = self.chat_template_origin.as_ref().unwrap_or(&self.origin);
        let template = self.chat_template.as_deref().with_context(|| {
            format!(
                "{}: the model has no chat template; give a plain 'prompt' instead of 'messages'",
                self.origin.display()
            )
        })?;
        render_chat_template_with(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_ref().map(|(t, _)| t.as_str()),
            self.eos_token.as_ref().map(|(t, _)| t.as_str()),
            extra_variables,
        )
        .with_context(|| format!("{}: chat template", template_origin.display()))
    }
}

/// The JSON object in `path`, or `None` when the file does not exist. Errors name the file.
fn read_optional_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("{}: cannot read: {e}", path.display())),
    };
    match serde_json::from_str(&text) {
        Ok(Json::Object(object)) => Ok(Some(object)),
        Ok(_) => bail!("{}: expected a JSON object", path.display()),
        Err(e) => bail!("{}: malformed JSON: {e}", path.display()),
    }
}

/// `tokenizer_config.json`'s `chat_template`: a string, or a list of `{name, template}` of
/// which the one named `default` is the chat template (as transformers picks it).
fn chat_template_from_config(
    config: &serde_json::Map<String, Json>,
    path: &Path,
) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(template)) => Ok(Some(template.clone())),
        Some(Json::Array(entries)) => {
            let mut names = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(Json::as_str);
                let template = entry.get("template").and_then(Json::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    bail!(
                        "{}: chat_template: each entry of the list needs a string 'name' and \
                         'template', got {entry}",
                        path.display()
                    );
                };
                if name == "default" {
                    return Ok(Some(template.to_owned()));
                }
                names.push(name.to_owned());
            }
            bail!(
                "{}: chat_template: the list has no template named 'default' (it has: {})",
                path.display(),
                names.join(", ")
            )
        }
        Some(other) => bail!(
            "{}: chat_template must be a string or a list of {{name, template}}, got {other}",
            path.display()
        ),
    }
}

/// A special token field of `tokenizer_config.json` (`bos_token`, `eos_token`): a string, an
/// AddedToken object `{"content": ...}`, or `null` (the model has none).
fn special_token_text(value: &Json, field: &str, path: &Path) -> Result<Option<String>> {
    match value {
        Json::Null => Ok(None),
        Json::String(text) => Ok(Some(text.clone())),
        Json::Object(object) => match object.get("content") {
            Some(Json::String(text)) => Ok(Some(text.clone())),
            _ => bail!(
                "{}: {field} is an object without a string 'content': {value}",
                path.display()
            ),
        },
        other => bail!(
            "{}: {field} must be a string or {{\"content\": ...}}, got {other}",
            path.display()
        ),
    }
}

/// A token id field of `generation_config.json` (`eos_token_id`, `bos_token_id`): an id, a list
/// of ids, `null` or absent.
fn token_ids_field(
    config: &serde_json::Map<String, Json>,
    field: &str,
    path: &Path,
) -> Result<Vec<u32>> {
    let as_id = |value: &Json| {
        value
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| {
                format!(
                    "{}: {field} must be a token id or a list of them, got {value}",
                    path.display()
                )
            })
    };
    match config.get(field) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(ids)) => ids.iter().map(as_id).collect(),
        Some(id) => Ok(vec![as_id(id)?]),
    }
}
