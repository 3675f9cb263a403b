//! Incremental detokenisation and stop strings with the default model's byte-level BPE
//! tokenizer (SmolLM2, from the local cache): multi-byte characters split across tokens, stop
//! strings across token boundaries and inside one token, include/exclude, held-back prefixes,
//! and the invariant that the emitted text is the full decode truncated at the stop.

use genius_engine::engine::stops::{IncrementalDetokenizer, StopChecker, StopEvent};
use genius_engine::model::{TextTokenizer, load_model};
use std::sync::OnceLock;

fn tok() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| load_model(None).expect("default model").tokenizer)
}

fn enc(text: &str) -> Vec<u32> {
    tok().encode(text, false).unwrap()
}

fn dec(ids: &[u32]) -> String {
    tok().decode(ids).unwrap()
}

/// What the checker must produce: the full decode cut at the stop that ends first (ties: starts
/// first), with or without the stop string.
fn expected(ids: &[u32], stops: &[&str], include: bool) -> (String, Option<String>) {
    let full = dec(ids);
    let hit = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| full.find(s).map(|i| (i + s.len(), i, s.to_string())))
        .min();
    match hit {
        Some((_, start, s)) => {
            let mut out = full[..start].to_string();
            if include {
                out.push_str(&s);
            }
            (out, Some(s))
        }
        None => (full, None),
    }
}

struct Run {
    text: String,
    matched: Option<String>,
    /// Newly emitted text per pushed token.
    pieces: Vec<String>,
    /// Tokens pushed before the sequence ended.
    pushed: usize,
}

/// Pushes the tokens one at a time, as the engine does, checking the invariants on the way.
fn run(ids: &[u32], stops: &[&str], include: bool) -> Run {
    let (want, want_match) = expected(ids, stops, include);
    let mut c = StopChecker::new(stops.iter().map(|s| s.to_string()).collect(), include);
    let mut r = Run {
        text: String::new(),
        matched: None,
        pieces: vec![],
        pushed: 0,
    };
    for n in 1..=ids.len() {
        let ev = c.push(&ids[..n], tok()).unwrap();
        r.pushed = n;
        r.text.push_str(ev.new_text());
        r.pieces.push(ev.new_text().to_string());
        assert!(
            !ev.new_text().ends_with('\u{FFFD}'),
            "partial char emitted: {ev:?}"
        );
        assert!(
            want.starts_with(&r.text),
            "{:?} is not a prefix of {want:?}",
            r.text
        );
        if let StopEvent::Stop { matched, .. } = ev {
            r.matched = Some(matched);
            assert!(c.is_done());
            assert!(c.push(&ids[..n], tok()).is_err(), "push after stop");
            assert_eq!(c.finish(), "");
            break;
        }
    }
    if r.matched.is_none() {
        r.text.push_str(&c.finish());
        r.matched = c.matched().map(str::to_string);
    }
    assert_eq!(
        r.text, want,
        "ids {ids:?} stops {stops:?} include {include}"
    );
    assert_eq!(r.matched, want_match);
    r
}

/// Token indices whose prefix decode ends inside a multi-byte character.
fn split_points(ids: &[u32]) -> Vec<usize> {
    (1..ids.len())
        .filter(|&n| dec(&ids[..n]).ends_with('\u{FFFD}'))
        .collect()
}

#[test]
fn multibyte_characters_split_across_tokens_are_held_until_complete() {
    for text in [
        "Café crème, naïve résumé",
        "Party 🎉🎉 time 👩‍👩‍👧 ok",
        "日本語のテキストと中文文本",
        "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ] {
        let ids = enc(text);
        assert_eq!(dec(&ids), text);
        if !text.starts_with("Café") {
            assert!(
                !split_points(&ids).is_empty(),
                "no token splits a char in {text:?}"
            );
        }
        let r = run(&ids, &[], false);
        assert_eq!(r.text, text);
        // At a split point nothing partial was emitted; the char appears with a later token.
        for n in split_points(&ids) {
            let so_far: String = r.pieces[..n].concat();
            assert!(dec(&ids[..n]).starts_with(&so_far));
            assert!(so_far.len() < dec(&ids[..n]).len());
        }
    }
    // The emoji as raw byte tokens: one token per UTF-8 byte.
    let bytes: Vec<u32> = "🎉"
        .bytes()
        .map(|b| {
            let ch = byte_level_char(b);
            tok().token_to_id(&ch.to_string()).expect("byte token")
        })
        .collect();
    assert_eq!(bytes.len(), 4);
    let mut d = IncrementalDetokenizer::new();
    for n in 1..4 {
        assert_eq!(d.push(&bytes[..n], tok()).unwrap(), "");
        assert_eq!(d.unstable_tail(), "\u{FFFD}");
    }
    assert_eq!(d.push(&bytes, tok()).unwrap(), "🎉");
    assert_eq!(d.finish(), "");
}

/// GPT-2 byte-level BPE: the printable stand-in character for a byte.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from_u32(b as u32).unwrap();
    }
    let mut n = 0;
    for x in 0..=255u8 {
        if !printable(x) {
            if x == b {
                return char::from_u32(256 + n).unwrap();
            }
            n += 1;
        }
    }
    unreachable!()
}

#[test]
fn truncated_mid_character_finish_flushes_the_replacement_char() {
    let ids = enc("ok 🎉");
    let cut = *split_points(&ids)
        .last()
        .expect("emoji split across tokens");
    let r = run(&ids[..cut], &["zz"], false);
    assert!(r.text.ends_with('\u{FFFD}'), "{:?}", r.text);
    assert_eq!(r.text, dec(&ids[..cut]));
}

/// Byte offsets in the full text where each token's text ends.
fn token_ends(ids: &[u32]) -> Vec<usize> {
    (1..=ids.len()).map(|n| dec(&ids[..n]).len()).collect()
}

#[test]
fn stop_string_split_across_two_and_three_tokens() {
    let text = "The quick brown fox jumps over the lazy dog and keeps running";
    let ids = enc(text);
    let ends = token_ends(&ids);
    assert_eq!(dec(&ids), text);
    // Two tokens: the last 2 chars of token 3 and the first 2 of token 4.
    // Three tokens: the last char of token 3, all of token 4, the first char of token 5.
    let two = &text[ends[3] - 2..ends[3] + 2];
    let three = &text[ends[3] - 1..ends[4] + 1];
    for (stop, spans) in [(two, 2), (three, 3)] {
        for include in [false, true] {
            let r = run(&ids, &[stop], include);
            assert_eq!(r.matched.as_deref(), Some(stop));
            assert_eq!(
                r.pushed,
                3 + spans,
                "{stop:?} ends in token {}",
                3 + spans - 1
            );
            let cut = text.find(stop).unwrap();
            let want = if include {
                &text[..cut + stop.len()]
            } else {
                &text[..cut]
            };
            assert_eq!(r.text, want);
            // The stop's first part was held back, not emitted, before the match.
            let before: String = r.pieces[..r.pushed - 1].concat();
            assert!(before.len() <= cut);
        }
    }
}

#[test]
fn stop_inside_one_token_discards_the_rest_of_the_token() {
    let text = "Answer: extraordinary results follow";
    let ids = enc(text);
    let ends = token_ends(&ids);
    // A token with at least 5 characters; stop on its middle 2 characters.
    let i = (0..ids.len())
        .find(|&i| ends[i] - if i == 0 { 0 } else { ends[i - 1] } >= 5)
        .unwrap();
    let start = if i == 0 { 0 } else { ends[i - 1] };
    let stop = &text[start + 2..start + 4];
    assert!(!text[..start + 2].contains(stop));
    for include in [false, true] {
        let r = run(&ids, &[stop], include);
        assert_eq!(r.pushed, i + 1, "stops on the token containing it");
        let want = if include {
            &text[..start + 4]
        } else {
            &text[..start + 2]
        };
        assert_eq!(r.text, want);
    }
}

#[test]
fn overlapping_candidate_prefixes() {
    // Tokens "a", "a", "b": after the first "a" it is held (could start "ab"), after the second
    // the first "a" is released and the second held, then "ab" completes.
    let ids: Vec<u32> = ["a", "a", "b"].iter().flat_map(|s| enc(s)).collect();
    assert_eq!(ids.len(), 3);
    let mut c = StopChecker::new(vec!["ab".into()], false);
    assert_eq!(
        c.push(&ids[..1], tok()).unwrap(),
        StopEvent::Continue {
            new_text: "".into()
        }
    );
    assert_eq!(c.held_back(), "a");
    assert_eq!(
        c.push(&ids[..2], tok()).unwrap(),
        StopEvent::Continue {
            new_text: "a".into()
        }
    );
    assert_eq!(
        c.push(&ids, tok()).unwrap(),
        StopEvent::Stop {
            new_text: "".into(),
            matched: "ab".into()
        }
    );
    run(&ids, &["ab"], true);

    // Longer self-overlap: stop "abab" in "abababx" (tokens one char each where possible).
    let ids: Vec<u32> = "aabababx"
        .chars()
        .flat_map(|ch| enc(&ch.to_string()))
        .collect();
    let r = run(&ids, &["abab"], false);
    assert_eq!(r.text, "a");
    // Several stops: the one that ends first wins, whatever the token split.
    let ids = enc("xx abcd yy");
    assert_eq!(run(&ids, &["abcd", "bc"], false).text, "xx a");
    assert_eq!(run(&ids, &["bcd", "abcd"], true).text, "xx abcd");
}

#[test]
fn stop_at_the_very_beginning() {
    let ids = enc("STOP and then more text");
    let r = run(&ids, &["STOP"], false);
    assert_eq!(r.text, "");
    assert_eq!(r.pieces.concat(), "");
    assert_eq!(run(&ids, &["STOP"], true).text, "STOP");
}

#[test]
fn no_stop_finish_flushes_everything() {
    let text = "The result is </ans";
    let ids = enc(text);
    let mut c = StopChecker::new(vec!["</answer>".into(), "".into()], false);
    assert_eq!(c.stop_strings(), ["</answer>"]);
    let mut out = String::new();
    for n in 1..=ids.len() {
        let ev = c.push(&ids[..n], tok()).unwrap();
        assert!(!ev.is_stop());
        out.push_str(ev.new_text());
    }
    assert_eq!(c.held_back(), "</ans");
    assert_eq!(out, "The result is ");
    out.push_str(&c.finish());
    assert_eq!(out, text);
    assert_eq!(c.matched(), None);
    assert!(c.push(&ids, tok()).is_err(), "push after finish");
    assert_eq!(c.finish(), "");
    // No stop strings at all: everything is emitted as soon as it is stable.
    let r = run(&enc("plain text, no stops at all"), &[], false);
    assert_eq!(r.pieces.concat(), "plain text, no stops at all");
}

#[test]
fn multibyte_stop_strings() {
    for (text, stop) in [
        ("party 🎉 time", "🎉"),
        ("日本語のテキスト", "のテ"),
        ("café olé", "é o"),
    ] {
        for include in [false, true] {
            run(&enc(text), &[stop, "zzz"], include);
        }
    }
}

#[test]
fn concatenated_output_equals_truncated_decode_on_many_cases() {
    let texts = [
        "Let me think step by step.\n\nThe answer is 42.</answer> trailing",
        "1 + 1 = 2, so the final answer is \\boxed{2}. Done!",
        "Émile said «bonjour» — 你好 🌍🌍 then left. ### End",
        "<|im_end|> special token text and more",
        "aaaaabababababcabc",
    ];
    let stops: [&[&str]; 7] = [
        &[],
        &["</answer>"],
        &["\n\n"],
        &["###", "Done"],
        &["🌍", "你"],
        &["abc", "bab", "aaa"],
        &["<|im_end|>"],
    ];
    for text in texts {
        let ids = enc(text);
        for s in stops {
            for include in [false, true] {
                run(&ids, s, include);
            }
        }
        // Every stop string made of a substring of the text, at many offsets.
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        for a in (0..chars.len()).step_by(3) {
            for len in [1, 2, 4, 7] {
                let b = (a + len).min(chars.len());
                let end = chars.get(b).map_or(text.len(), |c| c.0);
                let stop = &text[chars[a].0..end];
                run(&ids, &[stop], a % 2 == 0);
            }
        }
    }
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let ids = enc("hello world");
    let mut c = StopChecker::new(vec!["zz".into()], false);
    c.push(&ids, tok()).unwrap();
    let e = c.push(&ids[..1], tok()).unwrap_err().to_string();
    assert!(e.contains("shrank"), "{e}");
    // A failing decoder's error is passed on.
    let mut c = StopChecker::new(vec![], false);
    let bad = |_: &[u32]| -> anyhow::Result<String> { anyhow::bail!("decoder broke") };
    assert!(
        c.push(&[1], &bad)
            .unwrap_err()
            .to_string()
            .contains("decoder broke")
    );
    // An empty push and a closure decoder work.
    let mut c = StopChecker::new(vec!["b".into()], false);
    let chars = |ids: &[u32]| -> anyhow::Result<String> {
        Ok(ids
            .iter()
            .map(|&i| char::from(b'a' + (i % 26) as u8))
            .collect())
    };
    assert_eq!(
        c.push(&[], &chars).unwrap(),
        StopEvent::Continue {
            new_text: "".into()
        }
    );
    assert_eq!(
        c.push(&[0], &chars).unwrap(),
        StopEvent::Continue {
            new_text: "a".into()
        }
    );
    assert_eq!(
        c.push(&[0, 1], &chars).unwrap(),
        StopEvent::Stop {
            new_text: "".into(),
            matched: "b".into()
        }
    );
}
