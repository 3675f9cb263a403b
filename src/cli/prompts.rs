//! Prompts as input files give them: a plain string or chat messages, and how each becomes
//! token ids (shared by `score` and `generate`).

use crate::model::TextTokenizer;
use anyhow::{Result, bail};
use serde_json::{Map, Value};

/// What to condition on.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    /// A JSON list of chat messages.
    Messages(Value),
}

/// Reads `"prompt": str` or `"messages": [{"role", "content"}, ...]` from an input object.
pub fn parse_prompt(obj: &Map<String, Value>) -> Result<Prompt> {
    Ok(match (obj.get("prompt"), obj.get("messages")) {
        (Some(_), Some(_)) => bail!("give either 'prompt' or 'messages', not both"),
        (Some(Value::String(s)), None) => Prompt::Text(s.clone()),
        (Some(_), None) => bail!("'prompt' must be a string"),
        (None, Some(m @ Value::Array(items))) => {
            for (i, it) in items.iter().enumerate() {
                let ok = it.get("role").is_some_and(Value::is_string)
                    && it.get("content").is_some_and(Value::is_string);
                if !ok {
                    bail!("messages[{i}] must be an object with string 'role' and 'content'");
                }
            }
            Prompt::Messages(m.clone())
        }
        (None, Some(_)) => bail!("'messages' must be a list"),
        (None, None) => bail!("missing 'prompt' (or 'messages')"),
    })
}

/// A plain prompt is tokenized with special tokens recognised and BOS as the tokenizer's
/// post-processor says; messages are rendered through the chat template with the generation
/// prompt and tokenized without adding special tokens (the template writes them).
pub fn tokenize_prompt(tok: &TextTokenizer, prompt: &Prompt) -> Result<Vec<u32>> {
    match prompt {
        Prompt::Text(t) => tok.encode(t, true),
        Prompt::Messages(m) => tok.encode(&tok.apply_chat_template(m, true)?, false),
    }
}
