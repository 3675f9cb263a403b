//! Incremental detokenisation and stop strings, per sequence.
//!
//! # Stable text ([`IncrementalDetokenizer`])
//!
//! After each new token the detokenizer reports the newly *stable* text: text that no later token
//! can change. Decoding a prefix of a byte-level BPE sequence that ends inside a multi-byte UTF-8
//! character yields a trailing U+FFFD; such trailing U+FFFD characters are held back until a
//! later token completes the character (or [`IncrementalDetokenizer::finish`] flushes them).
//!
//! It decodes a window of tokens, not the whole sequence (as vLLM's incremental detokenizer and
//! HF's `TextStreamer` do): `prefix_offset..read_offset` is the last fully emitted chunk, kept as
//! context so that tokenizers whose decoding depends on the previous token (leading-space
//! handling) decode the new tokens correctly, and the new text is
//! `decode(ids[prefix_offset..])` minus `decode(ids[prefix_offset..read_offset])`. The cost per
//! push is O(tokens since the last fully stable point), not O(sequence length).
//!
//! The concatenation of everything emitted (including [`IncrementalDetokenizer::finish`]) equals
//! `decode(all ids)` for byte-level BPE tokenizers.
//!
//! # Stop strings ([`StopChecker`])
//!
//! Stop strings are matched on the stable text, across token boundaries. The text of a sequence
//! is cut at the stop occurrence that *ends first* (ties: the one that starts first), i.e. the
//! one a character-by-character scan would hit first; the result therefore does not depend on
//! how the text is split into tokens. Text emitted before a stop never contains any part of it:
//! the longest suffix of the not-yet-emitted text that is a proper prefix of some stop string is
//! held back until it either completes a stop or stops being a possible start.
//!
//! When a stop matches, [`StopEvent::Stop`] carries the remaining text before the stop (plus the
//! stop string itself when `include_stop_str`), and the sequence ends: text after the stop,
//! even inside the same token, is discarded. When generation ends for another reason (EOS, max
//! tokens), [`StopChecker::finish`] returns the held-back text (stop-checked once more).
//!
//! Invariant: the concatenation of all `new_text` (and `finish`) equals the full decode of the
//! tokens, truncated just before the first stop (just after it with `include_stop_str`).

use crate::model::TextTokenizer;
use anyhow::{Result, bail};

/// Decodes token ids to text (special tokens included). Implemented for [`TextTokenizer`] and
/// for any `Fn(&[u32]) -> Result<String>`.
pub trait Detokenize {
    fn detokenize(&self, ids: &[u32]) -> Result<String>;
}

impl Detokenize for TextTokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self.decode(ids)
    }
}

impl<F: Fn(&[u32]) -> Result<String> + ?Sized> Detokenize for F {
    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        self(ids)
    }
}

const REPLACEMENT: char = '\u{FFFD}';

/// Turns a growing token sequence into newly stable text; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    /// Start of the context window (a character boundary).
    prefix_offset: usize,
    /// End of the fully emitted chunk; tokens from here on are (partly) new.
    read_offset: usize,
    /// Bytes of the new tokens' text already emitted (stable text before a trailing U+FFFD).
    partial_emitted: usize,
    /// Decoded but not yet stable text (trailing U+FFFD characters).
    unstable_tail: String,
    /// Number of tokens seen by the last push.
    seen: usize,
}

impl IncrementalDetokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes all token ids of the sequence so far (the previous ones plus any new ones) and
    /// returns the text that became stable. Errors if the ids shrank or decoding fails.
    pub fn push<D: Detokenize + ?Sized>(
        &mut self,
        token_ids: &[u32],
        decoder: &D,
    ) -> Result<String> {
        if token_ids.len() < self.seen {
            bail!(
                "token ids shrank from {} to {}: pass all ids of the sequence so far",
                self.seen,
                token_ids.len()
            );
        }
        self.seen = token_ids.len();
        let prefix_text = if self.read_offset > self.prefix_offset {
            decoder.detokenize(&token_ids[self.prefix_offset..self.read_offset])?
        } else {
            String::new()
        };
        let full = decoder.detokenize(&token_ids[self.prefix_offset..])?;
        let base = prefix_text.len() + self.partial_emitted;
        if !full.is_char_boundary(base) {
            // Only possible for tokenizers whose window decodes are not prefix-consistent; wait
            // for more tokens rather than emit text we cannot place.
            self.unstable_tail.clear();
            return Ok(String::new());
        }
        let stable_end = full.trim_end_matches(REPLACEMENT).len().max(base);
        let new_text = full[base..stable_end].to_string();
        if stable_end == full.len() {
            // Everything decoded so far is emitted: the new chunk becomes the context window.
            self.prefix_offset = self.read_offset;
            self.read_offset = token_ids.len();
            self.partial_emitted = 0;
            self.unstable_tail.clear();
        } else {
            self.partial_emitted = stable_end - prefix_text.len();
            self.unstable_tail = full[stable_end..].to_string();
        }
        Ok(new_text)
    }

    /// Decoded text that is not yet stable (trailing U+FFFD from an incomplete character).
    pub fn unstable_tail(&self) -> &str {
        &self.unstable_tail
    }

    /// Flushes the not-yet-stable text when the sequence ends.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.unstable_tail)
    }
}

/// What a new token did to the sequence's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEvent {
    /// No stop: `new_text` is the newly emitted text (possibly empty while text is held back).
    Continue { new_text: String },
    /// A stop string matched; the sequence ends. `new_text` is the remaining text before the
    /// stop (followed by `matched` when `include_stop_str`).
    Stop { new_text: String, matched: String },
}

impl StopEvent {
    pub fn new_text(&self) -> &str {
        match self {
            StopEvent::Continue { new_text } | StopEvent::Stop { new_text, .. } => new_text,
        }
    }

    pub fn is_stop(&self) -> bool {
        matches!(self, StopEvent::Stop { .. })
    }
}

/// Per-sequence incremental detokenisation with stop strings; see the module documentation.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stop_strings: Vec<String>,
    include_stop_str: bool,
    detokenizer: IncrementalDetokenizer,
    /// Stable text not yet emitted: a suffix that may be the start of a stop string.
    held: String,
    /// The stop string that ended the sequence, if any.
    matched: Option<String>,
    /// Set once the sequence has ended (stop matched or `finish` called).
    done: bool,
}

impl StopChecker {
    /// Empty stop strings are ignored (they would match before any text); duplicates are merged.
    pub fn new(stop_strings: Vec<String>, include_stop_str: bool) -> Self {
        let mut stops: Vec<String> = stop_strings.into_iter().filter(|s| !s.is_empty()).collect();
        stops.sort();
        stops.dedup();
        Self {
            stop_strings: stops,
            include_stop_str,
            detokenizer: IncrementalDetokenizer::new(),
            held: String::new(),
            matched: None,
            done: false,
        }
    }

    /// The (non-empty, deduplicated) stop strings.
    pub fn stop_strings(&self) -> &[String] {
        &self.stop_strings
    }

    /// Takes all token ids of the sequence so far after a new token was appended. Errors if the
    /// sequence already ended, the ids shrank, or decoding fails.
    pub fn push<D: Detokenize + ?Sized>(
        &mut self,
        token_ids: &[u32],
        decoder: &D,
    ) -> Result<StopEvent> {
        if self.done {
            bail!("push after the sequence ended (stop matched or finish called)");
        }
        let stable = self.detokenizer.push(token_ids, decoder)?;
        Ok(self.process(&stable))
    }

    /// Ends the sequence for a reason other than a stop string (EOS, max tokens) and returns the
    /// text still held back. If that text completes a stop string, it is cut there as in
    /// [`StopChecker::push`] (see [`StopChecker::matched`]). Returns `""` once the sequence ended.
    pub fn finish(&mut self) -> String {
        if self.done {
            return String::new();
        }
        let tail = self.detokenizer.finish();
        let out = match self.process(&tail) {
            StopEvent::Stop { new_text, .. } => new_text,
            StopEvent::Continue { mut new_text } => {
                new_text.push_str(&self.held);
                new_text
            }
        };
        self.held.clear();
        self.done = true;
        out
    }

    /// Text currently held back (a possible start of a stop string).
    pub fn held_back(&self) -> &str {
        &self.held
    }

    /// The stop string that ended the sequence, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Whether the sequence has ended (stop matched or `finish` called).
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn process(&mut self, stable: &str) -> StopEvent {
        self.held.push_str(stable);
        if let Some((start, stop)) = first_stop(&self.held, &self.stop_strings) {
            let mut new_text = self.held[..start].to_string();
            let matched = self.stop_strings[stop].clone();
            if self.include_stop_str {
                new_text.push_str(&matched);
            }
            self.held.clear();
            self.matched = Some(matched.clone());
            self.done = true;
            return StopEvent::Stop { new_text, matched };
        }
        let hold = longest_stop_prefix_suffix(&self.held, &self.stop_strings);
        let emit_to = self.held.len() - hold;
        let new_text = self.held[..emit_to].to_string();
        self.held.drain(..emit_to);
        StopEvent::Continue { new_text }
    }
}

/// The stop occurrence in `text` that ends first (ties: starts first): `(start, stop index)`.
fn first_stop(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            text.find(s.as_str())
                .map(|start| (start + s.len(), start, i))
        })
        .min()
        .map(|(_, start, i)| (start, i))
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of some stop string.
fn longest_stop_prefix_suffix(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}
