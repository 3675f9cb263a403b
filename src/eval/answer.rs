//! Answer extraction from model outputs and comparison with gold answers.
//!
//! Extraction ([`extract_answer`]):
//! - [`AnswerKind::Math`]: the last `\boxed{...}` (nested braces handled; also `\boxed {..}`,
//!   `\boxed 5` and `\fbox{..}`), else the text after the last "answer is" (case-insensitive;
//!   a following `:` skipped; up to the end of the line or sentence; `$`, `**` and a trailing
//!   period stripped), else the last number (integers, decimals, negatives, thousands
//!   separators such as `1,234` (returned without commas), fractions such as `3/4`).
//! - [`AnswerKind::Choice`]: the first option letter (A-J) after the last "answer is" (then the
//!   last "answer:"), on the same line or the next non-empty one: an upper-case letter standing
//!   alone (`(C)`, `**B**`, `Option D`), or a lower-case one when it is the first thing said and
//!   not followed by a word (`answer is c.`). Else a lone letter on the last non-empty line
//!   (`(B)`, `**B.**`). Returned upper-case.
//! - [`AnswerKind::YesNo`]: "yes"/"no" (also "true"/"false") as the first word after the last
//!   "answer is" (then "answer:"), or the first yes/no word on that line, else the last
//!   "yes"/"no" word of the output. Returned as `yes` or `no`.
//!
//! Comparison ([`answers_match`]):
//! - Math: both sides go through [`normalize_math`]; when both parse as numbers
//!   ([`parse_number`]: integers, decimals, fractions `a/b`) they are compared with a relative
//!   tolerance of 1e-6, else the normalised strings must be equal (purely alphabetic answers
//!   case-insensitively).
//! - Choice: the option letters (a gold index `0..` maps to `A..`) are equal, ignoring case.
//! - YesNo: both map to the same yes/no (`yes`, `true`, `y` / `no`, `false`, `n`).

/// How a benchmark's answers are extracted and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// A mathematical answer (a number or a LaTeX expression).
    Math,
    /// A multiple-choice option letter.
    Choice,
    /// Yes or no.
    YesNo,
}

/// The answer a model output states, or None.
pub fn extract_answer(kind: AnswerKind, output: &str) -> Option<String> {
    match kind {
        AnswerKind::Math => extract_math(output),
        AnswerKind::Choice => extract_choice(output).map(String::from),
        AnswerKind::YesNo => extract_yes_no(output).map(String::from),
    }
}

/// Whether a predicted answer (as extract_answer returns it) equals the gold answer.
pub fn answers_match(kind: AnswerKind, predicted: &str, gold: &str) -> bool {
    match kind {
        AnswerKind::Math => math_equal(predicted, gold),
        AnswerKind::Choice => match (choice_letter(predicted), choice_letter(gold)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
        AnswerKind::YesNo => match (yes_no(predicted), yes_no(gold)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// The content of the brace group `s` starts with (`s` must start with `{`) and the byte index
/// just past its closing brace; `\{` and `\}` do not count. None when it is not closed.
fn brace_group(s: &str) -> Option<(&str, usize)> {
    let b = s.as_bytes();
    if b.first() != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[1..i], i + 1));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The content of the last `\boxed{...}` (or `\fbox{...}`, `\boxed {...}`, `\boxed 5`) in
/// `text`, trimmed; empty or unclosed boxes are skipped.
pub fn last_boxed(text: &str) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for pat in ["\\boxed", "\\fbox"] {
        let mut from = 0;
        while let Some(p) = text[from..].find(pat) {
            let start = from + p;
            from = start + pat.len();
            if let Some(c) = boxed_content(&text[from..])
                && best.as_ref().is_none_or(|(b, _)| start > *b)
            {
                best = Some((start, c));
            }
        }
    }
    best.map(|(_, c)| c)
}

/// What follows `\boxed`: a brace group, or (after a space) one token.
fn boxed_content(rest: &str) -> Option<String> {
    let t = rest.trim_start();
    let content = if t.starts_with('{') {
        brace_group(t)?.0.trim().to_string()
    } else if rest.starts_with(char::is_whitespace) {
        t.chars()
            .take_while(|c| !c.is_whitespace() && *c != '$')
            .collect()
    } else {
        return None;
    };
    (!content.is_empty()).then_some(content)
}

/// The text after the last occurrence of `marker` (ASCII, lower-case) in `text`, matched
/// case-insensitively.
fn after_last<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let lower = text.to_ascii_lowercase();
    lower.rfind(marker).map(|p| &text[p + marker.len()..])
}

/// The line a stated answer is on: leading whitespace (newlines included), `:` and `*` skipped,
/// up to the end of that line.
fn answer_line(rest: &str) -> &str {
    let t = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ':' || c == '*');
    t.split('\n').next().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Math

fn extract_math(output: &str) -> Option<String> {
    if let Some(b) = last_boxed(output) {
        return Some(b);
    }
    if let Some(a) = after_last(output, "answer is").and_then(math_answer_text) {
        return Some(a);
    }
    last_number(output)
}

/// The stated answer in the text after "answer is", or None when it is empty or reads like
/// prose (more than three words with neither a digit nor LaTeX).
fn math_answer_text(rest: &str) -> Option<String> {
    let line = answer_line(rest);
    let s = cut_sentence(line).trim();
    let s = s.replace("\\$", "").replace('$', "");
    let s = s.trim().trim_matches('*').trim();
    let s = s.trim_end_matches('.').trim();
    if s.is_empty() {
        return None;
    }
    let has_math = s.chars().any(|c| c.is_ascii_digit() || c == '\\');
    if !has_math && s.split_whitespace().count() > 3 {
        return None;
    }
    Some(s.to_string())
}

/// `s` up to the end of its first sentence: a `.`, `!`, `?` followed by whitespace or the end
/// (a decimal point is followed by a digit), or a `, ` / `;` outside brackets and `$..$`.
fn cut_sentence(s: &str) -> &str {
    let b = s.as_bytes();
    let mut depth = 0i32;
    let mut in_dollar = false;
    for i in 0..b.len() {
        let next_space = b.get(i + 1).is_none_or(|c| c.is_ascii_whitespace());
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'$' => in_dollar = !in_dollar,
            b'.' | b'!' | b'?' if next_space && depth <= 0 && !in_dollar => return &s[..i],
            b',' | b';' if depth <= 0 && !in_dollar && (b[i] == b';' || next_space) => {
                return &s[..i];
            }
            _ => {}
        }
    }
    s
}

/// The last number in `text` (`-` or `−` sign, thousands separators removed, decimals,
/// fractions `a/b`).
fn last_number(text: &str) -> Option<String> {
    let c: Vec<char> = text.chars().collect();
    let digit = |j: usize| c.get(j).is_some_and(|d| d.is_ascii_digit());
    let mut last = None;
    let mut i = 0;
    while i < c.len() {
        if !digit(i) || (i > 0 && (digit(i - 1) || c[i - 1] == '.')) {
            i += 1;
            continue;
        }
        let mut s = String::new();
        if i > 0
            && (c[i - 1] == '-' || c[i - 1] == '\u{2212}')
            && (i < 2 || !c[i - 2].is_alphanumeric())
        {
            s.push('-');
        }
        let mut j = i;
        while digit(j) {
            s.push(c[j]);
            j += 1;
        }
        // Thousands groups: ",ddd" not followed by another digit.
        if j - i <= 3 {
            while c.get(j) == Some(&',') && (1..=3).all(|k| digit(j + k)) && !digit(j + 4) {
                s.extend(&c[j + 1..j + 4]);
                j += 4;
            }
        }
        if c.get(j) == Some(&'.') && digit(j + 1) {
            s.push('.');
            j += 1;
            while digit(j) {
                s.push(c[j]);
                j += 1;
            }
        }
        if c.get(j) == Some(&'/') && digit(j + 1) {
            s.push('/');
            j += 1;
            while digit(j) {
                s.push(c[j]);
                j += 1;
            }
        }
        last = Some(s);
        i = j;
    }
    last
}

/// Words dropped after a number even without a space (`10cm`); after a space any word is.
const UNIT_WORDS: [&str; 16] = [
    "cm", "mm", "km", "kg", "mg", "ml", "dollars", "dollar", "cents", "degrees", "inches", "feet",
    "ft", "units", "percent", "meters",
];

/// `\text`-like commands whose argument is kept and the command dropped.
const TEXT_COMMANDS: [&str; 9] = [
    "\\text",
    "\\textbf",
    "\\textit",
    "\\textrm",
    "\\mathrm",
    "\\mathbf",
    "\\mbox",
    "\\mathit",
    "\\operatorname",
];

/// A math answer in a canonical form for comparison: `####` and `\boxed{}` unwrapped, `$`,
/// spaces, `\!`, `\,`, `\;`, `\left`/`\right`, `^\circ`, `%`, "dollars", `\text{..}`-like
/// wrappers, a leading `x =`, trailing unit words (`5 apples`, `10 cm`) and a trailing period
/// dropped; thousands commas removed (`1,234` = `1234`); `\dfrac`/`\tfrac` read as `\frac`,
/// `\frac{a}{b}` and `\frac12` written `a/b` (arguments other than a plain number or word
/// parenthesised); `\sqrt2` written `\sqrt{2}`; braces around a single character after `^` or
/// `_` dropped (`x^{2}` = `x^2`); the unicode minus read as `-`.
pub fn normalize_math(s: &str) -> String {
    let mut s = s.trim().replace('\u{2212}', "-");
    if let Some(p) = s.rfind("####") {
        s = s[p + 4..].to_string();
    }
    if let Some(b) = last_boxed(&s) {
        s = b;
    }
    for cmd in TEXT_COMMANDS {
        s = unwrap_command(&s, cmd);
    }
    for (from, to) in [
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", " "),
        ("\\:", " "),
        ("\\ ", " "),
        ("~", " "),
        ("\\displaystyle", ""),
        ("{,}", ","),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cfrac", "\\frac"),
    ] {
        s = s.replace(from, to);
    }
    s = remove_command(&s, "\\left");
    s = remove_command(&s, "\\right");
    let mut s = s.trim().trim_end_matches('.').trim().to_string();
    // A leading "x =" (a short name on the left of the only '=').
    if s.matches('=').count() == 1 {
        let (l, r) = s.split_once('=').unwrap_or_default();
        let l = l.trim();
        if !l.is_empty() && l.len() <= 6 && l.chars().all(|c| c.is_alphabetic() || c == '\\') {
            s = r.trim().to_string();
        }
    }
    s = rewrite_fracs(&s);
    s = strip_units(&s);
    s = rewrite_sqrt(&s);
    let mut s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    s = drop_script_braces(&s);
    if is_grouped_number(&s) {
        s = s.replace(',', "");
    }
    while s.starts_with('{') && brace_group(&s).is_some_and(|(_, end)| end == s.len()) {
        s = s[1..s.len() - 1].to_string();
    }
    s.strip_prefix('+').map(str::to_string).unwrap_or(s)
}

/// Replaces `cmd{X}` by ` X ` (the command must not continue with a letter).
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find(cmd) {
        let after = &rest[p + cmd.len()..];
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(&rest[..p + cmd.len()]);
            rest = after;
            continue;
        }
        let t = after.trim_start();
        match brace_group(t) {
            Some((inner, end)) => {
                out.push_str(&rest[..p]);
                out.push(' ');
                out.push_str(inner);
                out.push(' ');
                rest = &t[end..];
            }
            None => {
                out.push_str(&rest[..p + cmd.len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Removes `cmd` where it is not followed by a letter (`\left` but not `\leftarrow`).
fn remove_command(s: &str, cmd: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find(cmd) {
        let after = &rest[p + cmd.len()..];
        out.push_str(&rest[..p]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(cmd);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The length of a plain number (`-1,234.5`) at the start of `s`.
fn number_prefix_len(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = usize::from(b.first().is_some_and(|c| *c == b'-' || *c == b'+'));
    let start = i;
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b',' || b[i] == b'.' || b[i] == b'/') {
        i += 1;
    }
    // Do not end on a separator.
    while i > start && matches!(b[i - 1], b',' | b'.' | b'/') {
        i -= 1;
    }
    if b[start..i].iter().any(u8::is_ascii_digit) {
        i
    } else {
        0
    }
}

/// A number followed by unit words (`5 apples`, `10 cm`, `10cm`, `18 dollars`) is the number.
fn strip_units(s: &str) -> String {
    let n = number_prefix_len(s);
    if n == 0 || n == s.len() {
        return s.to_string();
    }
    let rest = &s[n..];
    let words = rest.trim();
    let wordy = words.starts_with(|c: char| c.is_alphabetic())
        && words
            .chars()
            .all(|c| c.is_alphabetic() || c.is_whitespace() || c == '^' || c.is_ascii_digit());
    let spaced = rest.starts_with(char::is_whitespace);
    let known = UNIT_WORDS.iter().any(|u| {
        words
            .split(|c: char| c.is_whitespace() || c == '^')
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(u))
    });
    if wordy && (spaced || known) {
        s[..n].to_string()
    } else {
        s.to_string()
    }
}

/// One `\frac` argument at the start of `s` (after optional spaces): a brace group, a command
/// name, or one character; with the byte length consumed.
fn frac_arg(s: &str) -> Option<(String, usize)> {
    let t = s.trim_start();
    let skipped = s.len() - t.len();
    if t.starts_with('{') {
        let (inner, end) = brace_group(t)?;
        return Some((inner.to_string(), skipped + end));
    }
    let mut chars = t.char_indices();
    let (_, c) = chars.next()?;
    if c == '}' {
        return None;
    }
    if c == '\\' {
        // A command name, or a backslash and one (non-letter) character.
        let letters = t[1..].len()
            - t[1..]
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let end = if letters > 0 {
            1 + letters
        } else {
            1 + t[1..].chars().next().map_or(0, char::len_utf8)
        };
        return Some((t[..end].to_string(), skipped + end));
    }
    Some((c.to_string(), skipped + c.len_utf8()))
}

/// A `\frac` argument as written in `a/b`: plain numbers and words bare, others in parentheses.
fn frac_part(arg: &str) -> String {
    let a = rewrite_fracs(arg.trim());
    let plain = a.chars().all(|c| c.is_alphanumeric() || c == '.')
        || (number_prefix_len(&a) == a.len() && !a.contains('/'));
    if plain && !a.is_empty() {
        a
    } else {
        format!("({a})")
    }
}

/// `\frac{a}{b}` (and `\frac12`) written `a/b`, recursively.
fn rewrite_fracs(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find("\\frac") {
        out.push_str(&rest[..p]);
        let after = &rest[p + 5..];
        let parsed = frac_arg(after).and_then(|(a, n1)| {
            let (b, n2) = frac_arg(&after[n1..])?;
            Some((a, b, n1 + n2))
        });
        match parsed {
            Some((a, b, n)) if !after.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                out.push_str(&frac_part(&a));
                out.push('/');
                out.push_str(&frac_part(&b));
                rest = &after[n..];
            }
            _ => {
                out.push_str("\\frac");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `\sqrt2` written `\sqrt{2}`.
fn rewrite_sqrt(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find("\\sqrt") {
        out.push_str(&rest[..p + 5]);
        rest = &rest[p + 5..];
        if let Some(c) = rest.chars().next()
            && c.is_ascii_alphanumeric()
        {
            out.push('{');
            out.push(c);
            out.push('}');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `^{2}` written `^2` (and `_{n}` written `_n`): braces around one character after `^`/`_`.
fn drop_script_braces(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        if (c[i] == '^' || c[i] == '_')
            && c.get(i + 1) == Some(&'{')
            && c.get(i + 3) == Some(&'}')
            && c.get(i + 2).is_some_and(|x| !matches!(x, '{' | '}' | '\\'))
        {
            out.push(c[i]);
            out.push(c[i + 2]);
            i += 4;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// A number written with thousands commas: `1,234`, `-12,345,678.5`.
fn is_grouped_number(s: &str) -> bool {
    let t = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let groups: Vec<&str> = int.split(',').collect();
    groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()))
        && groups[1..].iter().all(|g| g.len() == 3)
        && frac.chars().all(|c| c.is_ascii_digit())
}

/// A plain decimal number (optional sign; parentheses around it allowed).
fn parse_plain(s: &str) -> Option<f64> {
    let mut s = s.trim();
    while s.starts_with('(') && s.ends_with(')') && s.len() >= 2 {
        s = s[1..s.len() - 1].trim();
    }
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let ok = !body.is_empty()
        && body.chars().all(|c| c.is_ascii_digit() || c == '.')
        && body.chars().any(|c| c.is_ascii_digit())
        && body.matches('.').count() <= 1;
    if ok { s.parse().ok() } else { None }
}

/// The value of a normalised answer that is a number: a decimal or a fraction `a/b` (each side a
/// decimal, optionally signed or parenthesised; a leading `-` before the fraction allowed).
pub fn parse_number(s: &str) -> Option<f64> {
    if let Some(v) = parse_plain(s) {
        return Some(v);
    }
    let (neg, t) = match s.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, s),
    };
    let (a, b) = t.split_once('/')?;
    let (a, b) = (parse_plain(a)?, parse_plain(b)?);
    if b == 0.0 {
        return None;
    }
    let v = a / b;
    Some(if neg { -v } else { v })
}

/// Math answers equal after [`normalize_math`]: numerically (relative tolerance 1e-6) when both
/// are numbers, else as strings.
pub fn math_equal(predicted: &str, gold: &str) -> bool {
    let (p, g) = (normalize_math(predicted), normalize_math(gold));
    if p.is_empty() || g.is_empty() {
        return false;
    }
    if let (Some(x), Some(y)) = (parse_number(&p), parse_number(&g)) {
        return x == y || (x - y).abs() <= 1e-6 * x.abs().max(y.abs());
    }
    p == g
        || (p.chars().all(char::is_alphabetic)
            && g.chars().all(char::is_alphabetic)
            && p.to_lowercase() == g.to_lowercase())
}

// ---------------------------------------------------------------------------------------------
// Choice

/// The option letter an answer or gold names: a letter A-J (any case, punctuation around it
/// ignored) or a 0-based index (`2` = C). Upper-case.
pub fn choice_letter(s: &str) -> Option<char> {
    let t = s.trim().trim_matches(|c: char| !c.is_alphanumeric());
    let mut chars = t.chars();
    let c = chars.next()?;
    if chars.next().is_none() && c.is_ascii_alphabetic() {
        let u = c.to_ascii_uppercase();
        return ('A'..='J').contains(&u).then_some(u);
    }
    let i: u32 = t.parse().ok()?;
    (i < 10).then(|| char::from(b'A' + i as u8))
}

fn extract_choice(output: &str) -> Option<&'static str> {
    for marker in ["answer is", "answer:"] {
        if let Some(l) = after_last(output, marker).and_then(|r| letter_in_line(answer_line(r))) {
            return Some(l);
        }
    }
    let last = output.lines().rev().find(|l| !l.trim().is_empty())?;
    let t = last.trim_matches(|c: char| !c.is_alphanumeric());
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => choice_letter(t).map(letter_str),
        _ => None,
    }
}

const LETTERS: [&str; 10] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];

fn letter_str(c: char) -> &'static str {
    LETTERS[(c as u8 - b'A') as usize]
}

/// The first option letter in a line after "answer is" (see the module doc).
fn letter_in_line(line: &str) -> Option<&'static str> {
    let c: Vec<char> = line.chars().collect();
    let first_alnum = c.iter().position(|x| x.is_alphanumeric())?;
    for i in 0..c.len() {
        let alone = (i == 0 || !c[i - 1].is_alphanumeric())
            && c.get(i + 1).is_none_or(|x| !x.is_alphanumeric());
        if !alone {
            continue;
        }
        // "I think ..." is not option I.
        let pronoun = c[i] == 'I'
            && c.get(i + 1) == Some(&' ')
            && c.get(i + 2).is_some_and(|x| x.is_lowercase());
        if ('A'..='J').contains(&c[i]) && !pronoun {
            return Some(letter_str(c[i]));
        }
        if ('a'..='j').contains(&c[i])
            && i == first_alnum
            && c.get(i + 1).is_none_or(|x| !x.is_whitespace())
        {
            return Some(letter_str(c[i].to_ascii_uppercase()));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Yes / no

/// `yes` or `no` for a yes/no word (`yes`, `y`, `true` / `no`, `n`, `false`; any case,
/// punctuation around it ignored).
pub fn yes_no(s: &str) -> Option<&'static str> {
    let t = s.trim().trim_matches(|c: char| !c.is_alphanumeric());
    match t.to_ascii_lowercase().as_str() {
        "yes" | "y" | "true" => Some("yes"),
        "no" | "n" | "false" => Some("no"),
        _ => None,
    }
}

fn extract_yes_no(output: &str) -> Option<&'static str> {
    let is_word = |w: &&str| matches!(w.to_ascii_lowercase().as_str(), "yes" | "no");
    for marker in ["answer is", "answer:"] {
        if let Some(line) = after_last(output, marker).map(answer_line) {
            let mut words = line
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty());
            if let Some(v) = words.next().and_then(yes_no) {
                return Some(v);
            }
            if let Some(w) = words.find(is_word) {
                return yes_no(w);
            }
        }
    }
    output
        .split(|c: char| !c.is_alphanumeric())
        .rfind(is_word)
        .and_then(yes_no)
}
