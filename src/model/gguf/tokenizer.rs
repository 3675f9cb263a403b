//! [`tokenizer_from_gguf`]: the byte-level BPE [`TextTokenizer`] (special tokens, BOS/EOS
//! handling, pre-tokenizer, chat template) rebuilt from `tokenizer.ggml.*` metadata.

use super::file::GgufFile;
use crate::model::TextTokenizer;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashSet;

/// GGUF token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// LLaMA-3's pre-tokenizer regex (HF `tokenizer.json`).
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: LLaMA-3's with single digits.
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Values of `tokenizer.ggml.pre` this module understands.
const SUPPORTED_PRE_TOKENIZERS: &str = "default, gpt2, smollm, llama-bpe, llama3, qwen2";

/// Splits a GGUF merge `"a b"` at the first space after its first character (as llama.cpp does).
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let space = merge[first_len..].find(' ')? + first_len;
    Some((merge[..space].to_string(), merge[space + 1..].to_string()))
}

/// How `tokenizer.ggml.pre` configures the pipeline, as HF's `tokenizer.json` for that family.
struct PreTokenizerSpec {
    pre_tokenizer: tokenizers::PreTokenizerWrapper,
    normalizer: Option<tokenizers::NormalizerWrapper>,
    /// BPE `ignore_merges` (whole words found in the vocabulary skip merging; LLaMA-3).
    ignore_merges: bool,
}

fn pre_tokenizer_spec(pre: &str) -> Result<Option<PreTokenizerSpec>, String> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

    let regex_split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("cannot compile the pre-tokenizer regex: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    Ok(Some(match pre {
        "default" | "gpt2" => PreTokenizerSpec {
            pre_tokenizer: PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            normalizer: None,
            ignore_merges: false,
        },
        "smollm" => PreTokenizerSpec {
            pre_tokenizer: PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            normalizer: None,
            ignore_merges: false,
        },
        "llama-bpe" | "llama3" => PreTokenizerSpec {
            pre_tokenizer: regex_split(LLAMA3_SPLIT_REGEX)?,
            normalizer: None,
            ignore_merges: true,
        },
        "qwen2" => PreTokenizerSpec {
            pre_tokenizer: regex_split(QWEN2_SPLIT_REGEX)?,
            normalizer: Some(NormalizerWrapper::NFC(tokenizers::normalizers::NFC)),
            ignore_merges: false,
        },
        _ => return Ok(None),
    }))
}

/// Rebuilds the model's byte-level BPE tokenizer (`tokenizer.ggml.model` = `gpt2`) from GGUF
/// metadata, with its special tokens, BOS/EOS handling and chat template.
///
/// Control and unknown tokens become special added tokens, user-defined ones plain added
/// tokens. When a token string appears twice, its first id wins.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<TextTokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
    use tokenizers::processors::sequence::Sequence as ProcessorSequence;
    use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
    use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper};

    let path = file.path();
    let p = path.display();
    let model = file.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{p}: tokenizer model '{model}' (tokenizer.ggml.model) is not supported; supported: \
             gpt2 (byte-level BPE)"
        );
    }
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| file.missing("tokenizer.ggml.tokens"))?;
    let merges = file
        .get_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| file.missing("tokenizer.ggml.merges"))?;
    let token_types = file.get_int_array("tokenizer.ggml.token_type")?;
    if let Some(types) = &token_types
        && types.len() != tokens.len()
    {
        bail!(
            "{p}: tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
            types.len(),
            tokens.len()
        );
    }
    let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let spec = pre_tokenizer_spec(pre)
        .map_err(|e| anyhow!("{p}: tokenizer.ggml.pre '{pre}': {e}"))?
        .with_context(|| {
            format!(
                "{p}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; supported: \
                 {SUPPORTED_PRE_TOKENIZERS}"
            )
        })?;

    let mut seen = HashSet::with_capacity(tokens.len());
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| seen.insert(**t))
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            split_merge(m).with_context(|| {
                format!(
                    "{p}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| anyhow!("{p}: cannot build the BPE tokenizer from metadata: {e}"))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_normalizer(spec.normalizer)
        .map_err(|e| anyhow!("{p}: cannot set the tokenizer normalizer: {e}"))?;
    inner.with_pre_tokenizer(Some(spec.pre_tokenizer));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));

    // Added tokens, at their vocabulary ids (they are in the BPE vocabulary too).
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let kind = token_types.as_ref().map_or(1, |t| t[id]);
        if token.is_empty() {
            continue;
        }
        match kind {
            token_type::CONTROL | token_type::UNKNOWN => {
                special.push(AddedToken::from(token.to_string(), true))
            }
            token_type::USER_DEFINED => {
                user_defined.push(AddedToken::from(token.to_string(), false))
            }
            _ => {}
        }
    }
    inner
        .add_special_tokens(special)
        .map_err(|e| anyhow!("{p}: cannot add the control tokens: {e}"))?;
    inner
        .add_tokens(user_defined)
        .map_err(|e| anyhow!("{p}: cannot add the user-defined tokens: {e}"))?;

    let token_by_id = |key: &str| -> Result<Option<(String, u32)>> {
        match file.get_usize(key)? {
            None => Ok(None),
            Some(id) => match tokens.get(id) {
                Some(t) => Ok(Some((t.to_string(), id as u32))),
                None => bail!(
                    "{p}: {key} = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            },
        }
    };
    let bos = token_by_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_by_id("tokenizer.ggml.eos_token_id")?;
    let mut eos_ids: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some((_, id)) = token_by_id(key)?
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
    }

    // BOS/EOS added by `encode(text, true)`, as HF's TemplateProcessing does for LLaMA-3.
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = file
        .get_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let byte_level = PostProcessorWrapper::ByteLevel(ByteLevelProcessor::new(true, false, true));
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Vec::new();
        for (wanted, which, key, token) in [
            (add_bos, "BOS", "tokenizer.ggml.bos_token_id", &bos),
            (add_eos, "EOS", "tokenizer.ggml.eos_token_id", &eos),
        ] {
            if !wanted {
                continue;
            }
            let (text, id) = token.as_ref().with_context(|| {
                format!(
                    "{p}: tokenizer.ggml.add_{}_token is true but {key} is missing",
                    which.to_lowercase()
                )
            })?;
            specials.push(
                SpecialToken::new(which.to_string(), vec![*id], vec![text.clone()])
                    .map_err(|e| anyhow!("{p}: {which} token: {e}"))?,
            );
        }
        if add_bos {
            single.push("BOS".to_string());
            pair.push("BOS".to_string());
        }
        single.push("$A".to_string());
        pair.push("$A".to_string());
        if add_eos {
            single.push("EOS".to_string());
            pair.push("EOS".to_string());
        }
        if add_bos {
            pair.push("BOS:1".to_string());
        }
        pair.push("$B:1".to_string());
        if add_eos {
            pair.push("EOS:1".to_string());
        }
        let template = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| anyhow!("{p}: BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| anyhow!("{p}: BOS/EOS template: {e}"))?;
        PostProcessorWrapper::Sequence(ProcessorSequence::new(vec![
            byte_level,
            PostProcessorWrapper::Template(template),
        ]))
    } else {
        byte_level
    };
    inner.with_post_processor(Some(post_processor));

    let chat_template = file.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(TextTokenizer::new(
        inner,
        bos,
        eos,
        eos_ids,
        chat_template,
        path.to_path_buf(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_space_after_the_first_char() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }
}
