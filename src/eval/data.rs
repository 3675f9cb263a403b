//! Benchmark files, prediction files and evaluation prompts.
//!
//! Question files have one JSON object per line (blank lines skipped):
//! - GSM8K: `{"question", "answer": "... #### N"}`; the gold is the text after the last `####`
//!   (commas removed). An `answer` without `####` is taken whole (plain `{question, answer}`).
//! - MATH: `{"problem", "solution"}` with an optional `"answer"`; the gold is `answer` when
//!   present, else the last `\boxed{}` of `solution`. `question` may stand for `problem`, and
//!   a plain `{question, answer}` line works too.
//! - Choice: `{"question", "options": [..] | "choices": [..] | "answers": [..], "answer"}`
//!   (`answerKey` or `label` may stand for `answer`; ARC-style `choices: {"text": [..],
//!   "label": [..]}` also read). The answer is an option letter, a 0-based index (a JSON
//!   integer or a string of digits), an ARC label, or the text of an option; it must name one
//!   of the options. An optional `context` (ReClor, LogiQA) is put before the question.
//! - Yes/no: `{"question", "answer"}` with a bool answer or a string `yes`/`no`/`true`/`false`
//!   (any case).
//!
//! Every line may carry a string or number `id`; a line without one gets `line-N`. A malformed
//! line (bad JSON, a missing or ill-typed field, a gold answer that cannot be read) is reported
//! as `(line, message naming the field)` and the other lines still load.
//!
//! Prediction files (for scoring outputs made elsewhere) have `{"output": str, "answer": str |
//! number | bool}` lines.

use super::answer::{AnswerKind, choice_letter, last_boxed, yes_no};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use std::path::Path;

/// An evaluation benchmark format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Benchmark {
    /// GSM8K-style grade-school maths (`#### N` answers).
    Gsm8k,
    /// MATH-style competition maths (`\boxed{}` answers).
    Math,
    /// Multiple choice (ReClor, LogiQA, GPQA, ARC-Challenge, ...).
    Choice,
    /// Yes/no questions (StrategyQA).
    Yesno,
}

impl Benchmark {
    /// How the benchmark's answers are extracted and compared.
    pub fn kind(self) -> AnswerKind {
        match self {
            Benchmark::Gsm8k | Benchmark::Math => AnswerKind::Math,
            Benchmark::Choice => AnswerKind::Choice,
            Benchmark::Yesno => AnswerKind::YesNo,
        }
    }

    /// The benchmark's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::Gsm8k => "gsm8k",
            Benchmark::Math => "math",
            Benchmark::Choice => "choice",
            Benchmark::Yesno => "yesno",
        }
    }
}

/// One benchmark question.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// 1-based line in the file.
    pub line: usize,
    /// The `id` field, or `line-N`.
    pub id: String,
    /// The question text (with the context before it, when the line has one).
    pub question: String,
    /// The options of a multiple-choice question (empty otherwise).
    pub options: Vec<String>,
    /// The gold answer: a math answer, an option letter `A`.., or `yes`/`no`.
    pub gold: String,
    /// A worked solution, where the line has one (GSM8K's text before `####` without its
    /// `<<...>>` calculator notes, MATH's `solution`): few-shot examples show it.
    pub solution: Option<String>,
}

/// The malformed lines of a file: (1-based line, message naming the field).
pub type LineErrors = Vec<(usize, String)>;

/// What a loader returns: the entries read and the malformed lines.
pub type Loaded<T> = (Vec<T>, LineErrors);

/// Reads a JSONL file into (parsed items, malformed lines); blank lines skipped.
fn read_jsonl<T>(
    path: &Path,
    mut parse: impl FnMut(&Map<String, Value>, usize) -> Result<T, String>,
) -> Result<Loaded<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut items = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = match serde_json::from_str::<Value>(line) {
            Err(e) => Err(format!("not valid JSON: {e}")),
            Ok(Value::Object(obj)) => parse(&obj, n),
            Ok(_) => Err("expected a JSON object".to_string()),
        };
        match parsed {
            Ok(item) => items.push(item),
            Err(msg) => errors.push((n, msg)),
        }
    }
    if items.is_empty() {
        match errors.first() {
            None => bail!("{}: no entries (the file is empty)", path.display()),
            Some((n, msg)) => bail!(
                "{}: no valid entry ({} malformed line(s); first: line {n}: {msg})",
                path.display(),
                errors.len()
            ),
        }
    }
    Ok((items, errors))
}

/// Every question of a JSONL file; malformed lines are returned as (line, message) and do not stop the others. Err only when the file cannot be read or holds no question at all (message names the file).
pub fn load_questions(path: &Path, bench: Benchmark) -> Result<Loaded<Question>> {
    read_jsonl(path, |obj, n| parse_question(obj, n, bench))
}

/// The first of `fields` present in `obj`, with its name.
fn field<'a>(
    obj: &'a Map<String, Value>,
    fields: &[&'static str],
) -> Option<(&'static str, &'a Value)> {
    fields.iter().find_map(|&f| obj.get(f).map(|v| (f, v)))
}

/// A non-empty string field.
fn text_field(obj: &Map<String, Value>, fields: &[&'static str]) -> Result<String, String> {
    let Some((name, v)) = field(obj, fields) else {
        return Err(match fields {
            [one] => format!("missing the '{one}' field"),
            [first, rest @ ..] => format!(
                "missing the '{first}' field (or {})",
                rest.iter()
                    .map(|f| format!("'{f}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            [] => unreachable!(),
        });
    };
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        Value::String(_) => Err(format!("'{name}' is empty")),
        _ => Err(format!("'{name}' must be a string")),
    }
}

fn parse_question(
    obj: &Map<String, Value>,
    n: usize,
    bench: Benchmark,
) -> Result<Question, String> {
    let id = match obj.get("id") {
        None | Some(Value::Null) => format!("line-{n}"),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(x)) => x.to_string(),
        Some(_) => return Err("'id' must be a non-empty string or a number".to_string()),
    };
    let mut options = Vec::new();
    let mut solution = None;
    let (question, gold) = match bench {
        Benchmark::Gsm8k | Benchmark::Math => {
            let question = text_field(obj, &["question", "problem"])?;
            solution = math_solution(obj);
            (question, math_gold(obj)?)
        }
        Benchmark::Choice => {
            let mut question = text_field(obj, &["question"])?;
            if let Some(Value::String(c)) = obj.get("context")
                && !c.trim().is_empty()
            {
                question = format!("{}\n{question}", c.trim_end());
            }
            let labels;
            (options, labels) = choice_options(obj)?;
            let gold = choice_gold(obj, &options, &labels)?;
            (question, gold)
        }
        Benchmark::Yesno => {
            let question = text_field(obj, &["question"])?;
            let gold = match obj.get("answer") {
                None => return Err("missing the 'answer' field".to_string()),
                Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_string(),
                Some(Value::String(s)) => yes_no(s)
                    .ok_or_else(|| format!("'answer' must be yes/no or true/false, not {s:?}"))?
                    .to_string(),
                Some(_) => return Err("'answer' must be a bool or a yes/no string".to_string()),
            };
            (question, gold)
        }
    };
    Ok(Question {
        line: n,
        id,
        question,
        options,
        gold,
        solution,
    })
}

/// The worked solution of a maths line: MATH's `solution`, else the part of GSM8K's `answer`
/// before `####` with its `<<...>>` calculator notes removed.
fn math_solution(obj: &Map<String, Value>) -> Option<String> {
    if let Some(Value::String(s)) = obj.get("solution")
        && !s.trim().is_empty()
    {
        return Some(s.trim().to_string());
    }
    let Some(Value::String(a)) = obj.get("answer") else {
        return None;
    };
    let work = &a[..a.rfind("####")?];
    let mut out = String::new();
    let mut rest = work;
    while let Some(start) = rest.find("<<") {
        out.push_str(&rest[..start]);
        match rest[start..].find(">>") {
            Some(end) => rest = &rest[start + end + 2..],
            None => {
                rest = &rest[start..];
                break;
            }
        }
    }
    out.push_str(rest);
    let out = out.trim().to_string();
    (!out.is_empty()).then_some(out)
}

/// The gold of a maths line: `answer` (after `####` when it has one; a number is fine), else
/// the last `\boxed{}` of `solution`.
fn math_gold(obj: &Map<String, Value>) -> Result<String, String> {
    match obj.get("answer") {
        Some(Value::String(s)) => {
            let gold = match s.rfind("####") {
                Some(p) => s[p + 4..].trim().replace(',', ""),
                None => last_boxed(s).unwrap_or_else(|| s.trim().to_string()),
            };
            if gold.is_empty() {
                return Err("'answer' has no final answer (nothing after '####')".to_string());
            }
            Ok(gold)
        }
        Some(Value::Number(x)) => Ok(x.to_string()),
        Some(_) => Err("'answer' must be a string or a number".to_string()),
        None => match obj.get("solution") {
            Some(Value::String(s)) => {
                last_boxed(s).ok_or_else(|| "'solution' has no \\boxed{} answer".to_string())
            }
            Some(_) => Err("'solution' must be a string".to_string()),
            None => Err("missing the 'answer' field (or 'solution')".to_string()),
        },
    }
}

/// The options of a choice line and their labels (ARC-style; empty when absent).
fn choice_options(obj: &Map<String, Value>) -> Result<(Vec<String>, Vec<String>), String> {
    let Some((name, v)) = field(obj, &["options", "choices", "answers"]) else {
        return Err("missing the 'options' field (or 'choices')".to_string());
    };
    let strings = |v: &Value, what: &str| -> Result<Vec<String>, String> {
        let arr = v
            .as_array()
            .ok_or_else(|| format!("'{what}' must be an array of strings"))?;
        arr.iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                Value::Number(x) => Ok(x.to_string()),
                _ => Err(format!("'{what}' must be an array of strings")),
            })
            .collect()
    };
    let (options, labels) = match v {
        Value::Object(o) => {
            let text = o
                .get("text")
                .ok_or_else(|| format!("'{name}' object has no 'text' array"))?;
            let options = strings(text, &format!("{name}.text"))?;
            let labels = match o.get("label") {
                Some(l) => strings(l, &format!("{name}.label"))?,
                None => Vec::new(),
            };
            (options, labels)
        }
        _ => (strings(v, name)?, Vec::new()),
    };
    if options.len() < 2 {
        return Err(format!("'{name}' must hold at least two options"));
    }
    if options.len() > 10 {
        return Err(format!("'{name}' holds more than ten options (A-J)"));
    }
    Ok((options, labels))
}

/// The gold letter of a choice line.
fn choice_gold(
    obj: &Map<String, Value>,
    options: &[String],
    labels: &[String],
) -> Result<String, String> {
    let Some((name, v)) = field(obj, &["answer", "answerKey", "label"]) else {
        return Err("missing the 'answer' field (or 'answerKey', 'label')".to_string());
    };
    let index = match v {
        Value::Number(x) => x
            .as_u64()
            .map(|i| i as usize)
            .ok_or_else(|| format!("'{name}' must be a letter or a 0-based index, not {x}"))?,
        Value::String(s) => {
            let t = s.trim();
            if let Some(i) = labels.iter().position(|l| l.trim() == t) {
                i
            } else if let Some(i) = options.iter().position(|o| o.trim() == t && t.len() > 1) {
                i
            } else if let Some(c) = choice_letter(t) {
                (c as u8 - b'A') as usize
            } else {
                return Err(format!(
                    "'{name}' must be a letter or a 0-based index, not {s:?}"
                ));
            }
        }
        _ => return Err(format!("'{name}' must be a letter or a 0-based index")),
    };
    if index >= options.len() {
        return Err(format!(
            "'{name}' names option {} but there are only {} options",
            index,
            options.len()
        ));
    }
    Ok(char::from(b'A' + index as u8).to_string())
}

/// The system prompt of the maths benchmarks (method.md section 4):
///
/// ```text
/// Please solve the following problem step by step.
/// When you reach the answer, please include the answer in the box format and finish the reasoning with <end_of_reasoning>.
/// I will give you some examples for reference.
/// {shots}
/// ```
///
/// without the last two lines when there are no shots.
pub const MATH_SYSTEM: &str = "Please solve the following problem step by step.\nWhen you reach the answer, please include the answer in the box format and finish the reasoning with <end_of_reasoning>.";

/// The system prompt of multiple-choice benchmarks (followed by the shots sentence and the
/// shots when there are some).
pub const CHOICE_SYSTEM: &str = "Please answer the following multiple-choice question step by step.\nWhen you reach the answer, finish with \"The answer is: X\", where X is the letter of the correct option.";

/// The system prompt of yes/no benchmarks (followed by the shots sentence and the shots when
/// there are some).
pub const YESNO_SYSTEM: &str = "Please answer the following yes/no question step by step.\nWhen you reach the answer, finish with \"The answer is: Yes\" or \"The answer is: No\".";

/// The sentence introducing few-shot examples.
pub const SHOTS_INTRO: &str = "I will give you some examples for reference.";

/// The user-turn instruction after the question.
pub const USER_SUFFIX: &str = "Please directly output the reasoning steps.\n";

/// A question as shown to the model: the question, then for multiple choice the options
/// `A. ...` one a line.
fn question_text(q: &Question) -> String {
    let mut s = q.question.trim_end().to_string();
    for (i, o) in q.options.iter().enumerate() {
        s.push_str(&format!("\n{}. {}", char::from(b'A' + i as u8), o.trim()));
    }
    s
}

/// How a shot's answer is written: `\boxed{gold} <end_of_reasoning>` for maths (the question
/// files carry no worked solutions), `The answer is: X` / `The answer is: Yes` otherwise.
fn shot_answer(bench: Benchmark, shot: &Question) -> String {
    let gold = &shot.gold;
    match bench.kind() {
        AnswerKind::Math => match &shot.solution {
            // A worked solution that boxes its answer already: as it is.
            Some(sol) if sol.contains("\\boxed") => format!("{sol} <end_of_reasoning>"),
            Some(sol) => format!("{sol}\nThe answer is \\boxed{{{gold}}} <end_of_reasoning>"),
            None => format!("\\boxed{{{gold}}} <end_of_reasoning>"),
        },
        AnswerKind::Choice => format!("The answer is: {gold}"),
        AnswerKind::YesNo => {
            let word = if gold == "yes" { "Yes" } else { "No" };
            format!("The answer is: {word}")
        }
    }
}

/// Chat messages (a serde_json array of {"role","content"}) for a question, with optional few-shot examples.
///
/// The system message is the benchmark's instruction ([`MATH_SYSTEM`], [`CHOICE_SYSTEM`],
/// [`YESNO_SYSTEM`]); with shots it continues with `"\n" + SHOTS_INTRO + "\n"` and the shots,
/// each rendered `"The question: {question}\nThe answer: {answer}"` (options included for
/// multiple choice; the answer as in `shot_answer`: for maths the worked solution when the
/// shot has one, then `The answer is \boxed{gold} <end_of_reasoning>` (a solution that boxes
/// its answer itself is shown as it is), or `\boxed{gold} <end_of_reasoning>` alone;
/// `The answer is: X` otherwise) and separated by blank lines. The user message is
/// `"The question: {question}\nPlease directly output the reasoning steps.\n"`, the question
/// followed by its options `A. ...` one a line for multiple choice.
pub fn prompt_messages(bench: Benchmark, q: &Question, shots: &[Question]) -> Value {
    let mut system = match bench.kind() {
        AnswerKind::Math => MATH_SYSTEM,
        AnswerKind::Choice => CHOICE_SYSTEM,
        AnswerKind::YesNo => YESNO_SYSTEM,
    }
    .to_string();
    if !shots.is_empty() {
        let rendered: Vec<String> = shots
            .iter()
            .map(|s| {
                format!(
                    "The question: {}\nThe answer: {}",
                    question_text(s),
                    shot_answer(bench, s)
                )
            })
            .collect();
        system.push('\n');
        system.push_str(SHOTS_INTRO);
        system.push('\n');
        system.push_str(&rendered.join("\n\n"));
    }
    let user = format!("The question: {}\n{USER_SUFFIX}", question_text(q));
    json!([
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ])
}

/// One line of a predictions file.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionLine {
    /// 1-based line in the file.
    pub line: usize,
    /// The model output.
    pub output: String,
    /// The gold answer as written (a number as JSON writes it; a bool as `yes`/`no`).
    pub gold: String,
}

/// `{"output": str, "answer": str|number}` lines of a predictions file (same malformed-line handling).
pub fn load_predictions(path: &Path) -> Result<Loaded<PredictionLine>> {
    read_jsonl(path, |obj, n| {
        let output = match obj.get("output") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("'output' must be a string".to_string()),
            None => return Err("missing the 'output' field".to_string()),
        };
        let gold = match obj.get("answer") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(Value::String(_)) => return Err("'answer' is empty".to_string()),
            Some(Value::Number(x)) => x.to_string(),
            Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_string(),
            Some(_) => return Err("'answer' must be a string or a number".to_string()),
            None => return Err("missing the 'answer' field".to_string()),
        };
        Ok(PredictionLine {
            line: n,
            output,
            gold,
        })
    })
}
