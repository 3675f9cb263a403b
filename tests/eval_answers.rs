//! The evaluation logic: answer extraction and comparison, input formats, prompts, accuracy.
//! Fast; no model.

use genius_engine::eval::answer::{AnswerKind, answers_match, extract_answer};
use genius_engine::eval::data::{
    Benchmark, Question, load_predictions, load_questions, prompt_messages,
};
use genius_engine::eval::score::{accuracy, score_output};
use std::io::Write;
use std::path::PathBuf;

use AnswerKind::{Choice, Math, YesNo};

/// (output, gold, kind, expected extracted, expected correct).
const CASES: &[(&str, &str, AnswerKind, Option<&str>, bool)] = &[
    // --- Math: boxes
    ("So the total is \\boxed{42}.", "42", Math, Some("42"), true),
    (
        "\\boxed{\\frac{1}{2}}",
        "0.5",
        Math,
        Some("\\frac{1}{2}"),
        true,
    ),
    (
        "The value is $\\boxed{\\frac{\\sqrt{3}}{2}}$",
        "\\frac{\\sqrt3}{2}",
        Math,
        Some("\\frac{\\sqrt{3}}{2}"),
        true,
    ),
    (
        "first \\boxed{3} then \\boxed{5}",
        "5",
        Math,
        Some("5"),
        true,
    ),
    (
        "first \\boxed{3} then \\boxed{5}",
        "3",
        Math,
        Some("5"),
        false,
    ),
    ("\\boxed{7}. The answer is 8.", "7", Math, Some("7"), true),
    ("\\boxed {12}", "12", Math, Some("12"), true),
    ("\\fbox{9}", "9", Math, Some("9"), true),
    ("\\boxed{x^{2}+1}", "x^2+1", Math, Some("x^{2}+1"), true),
    (
        "\\boxed{\\dfrac{3}{4}}",
        "\\frac{3}{4}",
        Math,
        Some("\\dfrac{3}{4}"),
        true,
    ),
    ("\\boxed{\\tfrac34}", "0.75", Math, Some("\\tfrac34"), true),
    (
        "\\boxed{\\frac12}",
        "\\frac{1}{2}",
        Math,
        Some("\\frac12"),
        true,
    ),
    (
        "\\boxed{\\left( 1, 2 \\right)}",
        "(1,2)",
        Math,
        Some("\\left( 1, 2 \\right)"),
        true,
    ),
    (
        "\\boxed{ 2 \\, 000 }",
        "2000",
        Math,
        Some("2 \\, 000"),
        true,
    ),
    (
        "\\boxed{10\\text{ cm}}",
        "10",
        Math,
        Some("10\\text{ cm}"),
        true,
    ),
    (
        "\\boxed{\\text{Monday}}",
        "monday",
        Math,
        Some("\\text{Monday}"),
        true,
    ),
    ("\\boxed{30^\\circ}", "30", Math, Some("30^\\circ"), true),
    ("\\boxed{50\\%}", "50", Math, Some("50\\%"), true),
    ("\\boxed{x = 5}", "5", Math, Some("x = 5"), true),
    (
        "\\boxed{-\\frac{1}{3}}",
        "\\frac{-1}{3}",
        Math,
        Some("-\\frac{1}{3}"),
        true,
    ),
    (
        "\\boxed{2\\sqrt{2}}",
        "2\\sqrt{3}",
        Math,
        Some("2\\sqrt{2}"),
        false,
    ),
    ("\\boxed{}", "1", Math, None, false),
    // --- Math: "answer is"
    (
        "We add them. The answer is 18.",
        "18",
        Math,
        Some("18"),
        true,
    ),
    ("THE ANSWER IS: 7", "7", Math, Some("7"), true),
    (
        "The final answer is $\\frac{2}{3}$. I hope it is correct.",
        "\\frac{2}{3}",
        Math,
        Some("\\frac{2}{3}"),
        true,
    ),
    ("The answer is 5 apples.", "5", Math, Some("5 apples"), true),
    (
        "The answer is $18 dollars",
        "18",
        Math,
        Some("18 dollars"),
        true,
    ),
    ("The answer is \\$1,234.", "1234", Math, Some("1,234"), true),
    (
        "So the answer is 3.5, which is half of 7.",
        "7/2",
        Math,
        Some("3.5"),
        true,
    ),
    ("The answer is **-4**", "-4", Math, Some("-4"), true),
    ("The answer is 2.0", "2", Math, Some("2.0"), true),
    ("The answer is 0.5", "\\frac{1}{2}", Math, Some("0.5"), true),
    ("The answer is 1/3", "0.333", Math, Some("1/3"), false),
    (
        "The answer is \u{2212}3.",
        "-3",
        Math,
        Some("\u{2212}3"),
        true,
    ),
    ("The answer is 10 cm.", "10", Math, Some("10 cm"), true),
    ("The answer is 25%.", "25", Math, Some("25%"), true),
    // --- Math: last number
    (
        "She has 3 apples and buys 4 more, so 7 in total",
        "7",
        Math,
        Some("7"),
        true,
    ),
    ("It costs 1,234 in all", "1234", Math, Some("1234"), true),
    ("The difference is -3", "-3", Math, Some("-3"), true),
    (
        "the temperature drops to \u{2212}12 degrees",
        "-12",
        Math,
        Some("-12"),
        true,
    ),
    ("she ate 3/4 of the pie", "0.75", Math, Some("3/4"), true),
    ("the price is 12.50 now", "12.5", Math, Some("12.50"), true),
    ("5-3 leaves 2", "2", Math, Some("2"), true),
    ("no numbers here at all", "4", Math, None, false),
    ("", "4", Math, None, false),
    // --- Choice
    ("The answer is: (C)", "C", Choice, Some("C"), true),
    ("I think the answer is c.", "C", Choice, Some("C"), true),
    ("So the answer is **B**", "B", Choice, Some("B"), true),
    ("The answer is: Option D", "3", Choice, Some("D"), true),
    (
        "The answer is A. Then again the answer is (B).",
        "B",
        Choice,
        Some("B"),
        true,
    ),
    ("The answer is: (b)", "1", Choice, Some("B"), true),
    ("Reasoning...\n(B)", "B", Choice, Some("B"), true),
    ("Reasoning...\n**E.**", "A", Choice, Some("E"), false),
    ("The answer is:\n(A)", "A", Choice, Some("A"), true),
    ("Answer: D", "D", Choice, Some("D"), true),
    ("I cannot decide between them.", "A", Choice, None, false),
    ("The answer is a bit unclear.", "A", Choice, None, false),
    // --- Yes / no
    ("The answer is: Yes", "yes", YesNo, Some("yes"), true),
    ("So the answer is No.", "No", YesNo, Some("no"), true),
    (
        "The answer is yes, because ...",
        "True",
        YesNo,
        Some("yes"),
        true,
    ),
    ("The answer is: true", "yes", YesNo, Some("yes"), true),
    ("The answer is false", "no", YesNo, Some("no"), true),
    ("The answer is: **No**", "yes", YesNo, Some("no"), false),
    (
        "Yes, it can. Hmm, no, it cannot. No.",
        "false",
        YesNo,
        Some("no"),
        true,
    ),
    ("I am not sure about this one.", "yes", YesNo, None, false),
    (
        "The answer is: Yes.\nWait, no.",
        "Yes",
        YesNo,
        Some("yes"),
        true,
    ),
];

#[test]
fn answer_table() {
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    let mut failures = Vec::new();
    for (i, &(output, gold, kind, want, want_ok)) in CASES.iter().enumerate() {
        let got = extract_answer(kind, output);
        let scored = score_output(kind, output, gold);
        if got.as_deref() != want || scored.correct != want_ok || scored.extracted != got {
            failures.push(format!(
                "case {i}: {output:?} gold {gold:?} {kind:?}: extracted {got:?} (want {want:?}), correct {} (want {want_ok})",
                scored.correct
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn comparisons() {
    let same = [
        ("1,234", "1234"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("2.0", "2"),
        ("x^{2}+1", "x^2+1"),
        ("$5$", "5"),
        ("\\$5.00", "5"),
        ("5 dollars", "5"),
        ("10\\%", "10"),
        ("\\left[1, 2\\right]", "[1,2]"),
        ("-3", "\u{2212}3"),
        ("\\frac{\\pi}{4}", "\\frac\\pi4"),
        ("\\sqrt{2}", "\\sqrt2"),
        ("1000000", "1,000,000"),
        ("\\boxed{6}", "6"),
        ("The answer #### 72", "72"),
    ];
    for (a, b) in same {
        assert!(answers_match(Math, a, b), "{a:?} should equal {b:?}");
        assert!(answers_match(Math, b, a), "{b:?} should equal {a:?}");
    }
    let different = [
        ("1,234", "1.234"),
        ("\\frac{1}{3}", "0.33"),
        ("x^2+1", "x^3+1"),
        ("2", "-2"),
        ("", ""),
        ("\\sqrt{2}", "\\sqrt{3}"),
    ];
    for (a, b) in different {
        assert!(!answers_match(Math, a, b), "{a:?} should differ from {b:?}");
    }
    assert!(answers_match(Choice, "c", "C"));
    assert!(answers_match(Choice, "A", "0"));
    assert!(!answers_match(Choice, "A", "B"));
    assert!(!answers_match(Choice, "Z", "Z"));
    assert!(answers_match(YesNo, "yes", "True"));
    assert!(answers_match(YesNo, "no", "FALSE"));
    assert!(!answers_match(YesNo, "maybe", "yes"));
}

fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

#[test]
fn gsm8k_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        &dir,
        "gsm8k.jsonl",
        concat!(
            r#####"{"question": "How many?", "answer": "2 + 3 = 5\n#### 1,005"}"#####,
            "\n\n",
            r#####"{"question": "Bad", "answer": "no final answer ####  "}"#####,
            "\n",
            "{not json\n",
            r#"{"id": "q4", "question": "Plain?", "answer": 12}"#,
            "\n",
            r#####"{"answer": "#### 3"}"#####,
            "\n",
        ),
    );
    let (qs, errs) = load_questions(&path, Benchmark::Gsm8k).unwrap();
    assert_eq!(qs.len(), 2);
    assert_eq!(qs[0].line, 1);
    assert_eq!(qs[0].id, "line-1");
    assert_eq!(qs[0].question, "How many?");
    assert_eq!(qs[0].gold, "1005");
    assert!(qs[0].options.is_empty());
    assert_eq!(
        (qs[1].line, qs[1].id.as_str(), qs[1].gold.as_str()),
        (5, "q4", "12")
    );
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![3, 4, 6]);
    assert!(errs[0].1.contains("'answer'"), "{}", errs[0].1);
    assert!(errs[1].1.contains("JSON"), "{}", errs[1].1);
    assert!(errs[2].1.contains("'question'"), "{}", errs[2].1);
}

#[test]
fn math_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        &dir,
        "math.jsonl",
        concat!(
            r#"{"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$ and not \\boxed{2}... wait, \\boxed{\\frac{1}{2}}"}"#,
            "\n",
            r#"{"problem": "P", "solution": "no box", "answer": "7"}"#,
            "\n",
            r#"{"problem": "P", "solution": "no box here"}"#,
            "\n",
            r#"{"question": "Plain", "answer": "x^2"}"#,
            "\n",
            r#"{"problem": 3, "solution": "\\boxed{1}"}"#,
            "\n",
        ),
    );
    let (qs, errs) = load_questions(&path, Benchmark::Math).unwrap();
    let golds: Vec<&str> = qs.iter().map(|q| q.gold.as_str()).collect();
    assert_eq!(golds, vec!["\\frac{1}{2}", "7", "x^2"]);
    assert_eq!(qs[2].line, 4);
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0].0, 3);
    assert!(errs[0].1.contains("'solution'"), "{}", errs[0].1);
    assert_eq!(errs[1].0, 5);
    assert!(errs[1].1.contains("'problem'"), "{}", errs[1].1);
}

#[test]
fn choice_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        &dir,
        "choice.jsonl",
        concat!(
            r#"{"id": "a", "question": "Pick", "options": ["x", "y", "z"], "answer": "b"}"#,
            "\n",
            r#"{"question": "Pick", "choices": ["x", "y", "z"], "answer": 2}"#,
            "\n",
            r#"{"question": "Pick", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}"#,
            "\n",
            r#"{"context": "Ctx.", "question": "Q?", "answers": ["p", "q"], "label": 0}"#,
            "\n",
            r#"{"question": "Pick", "options": ["x", "y"], "answer": "D"}"#,
            "\n",
            r#"{"question": "Pick", "answer": "A"}"#,
            "\n",
            r#"{"question": "Pick", "options": ["x", "y"]}"#,
            "\n",
        ),
    );
    let (qs, errs) = load_questions(&path, Benchmark::Choice).unwrap();
    let golds: Vec<&str> = qs.iter().map(|q| q.gold.as_str()).collect();
    assert_eq!(golds, vec!["B", "C", "B", "A"]);
    assert_eq!(qs[0].id, "a");
    assert_eq!(qs[0].options, vec!["x", "y", "z"]);
    assert_eq!(qs[3].question, "Ctx.\nQ?");
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![5, 6, 7]);
    assert!(errs[0].1.contains("'answer'"), "{}", errs[0].1);
    assert!(errs[1].1.contains("'options'"), "{}", errs[1].1);
    assert!(errs[2].1.contains("'answer'"), "{}", errs[2].1);
}

#[test]
fn yesno_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        &dir,
        "yesno.jsonl",
        concat!(
            r#"{"question": "Is it?", "answer": true}"#,
            "\n",
            r#"{"question": "Is it?", "answer": "No"}"#,
            "\n",
            r#"{"question": "Is it?", "answer": "maybe"}"#,
            "\n",
            r#"{"question": "Is it?", "answer": "False"}"#,
            "\n",
        ),
    );
    let (qs, errs) = load_questions(&path, Benchmark::Yesno).unwrap();
    let golds: Vec<&str> = qs.iter().map(|q| q.gold.as_str()).collect();
    assert_eq!(golds, vec!["yes", "no", "no"]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, 3);
    assert!(errs[0].1.contains("'answer'"), "{}", errs[0].1);
}

#[test]
fn no_valid_question_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_file(&dir, "all-bad.jsonl", "{oops\n{\"question\": \"q\"}\n");
    let err = load_questions(&bad, Benchmark::Gsm8k).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("all-bad.jsonl"), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");
    let empty = write_file(&dir, "empty.jsonl", "\n\n");
    let msg = format!(
        "{:#}",
        load_questions(&empty, Benchmark::Yesno).unwrap_err()
    );
    assert!(msg.contains("empty.jsonl"), "{msg}");
    let missing = dir.path().join("missing.jsonl");
    let msg = format!(
        "{:#}",
        load_questions(&missing, Benchmark::Math).unwrap_err()
    );
    assert!(msg.contains("missing.jsonl"), "{msg}");
}

#[test]
fn predictions() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        &dir,
        "preds.jsonl",
        concat!(
            r#"{"output": "so \\boxed{4}", "answer": "4"}"#,
            "\n",
            r#"{"output": "The answer is 3", "answer": 3}"#,
            "\n",
            r#"{"answer": "1"}"#,
            "\n",
            r#"{"output": "x", "answer": [1]}"#,
            "\n",
            "[1, 2]\n",
            "\n",
            r#"{"output": "The answer is: Yes", "answer": true}"#,
            "\n",
        ),
    );
    let (preds, errs) = load_predictions(&path).unwrap();
    assert_eq!(preds.len(), 3);
    assert_eq!(preds[0].line, 1);
    assert_eq!(preds[0].output, "so \\boxed{4}");
    assert_eq!(preds[0].gold, "4");
    assert_eq!(preds[1].gold, "3");
    assert_eq!((preds[2].line, preds[2].gold.as_str()), (7, "yes"));
    assert!(score_output(Math, &preds[0].output, &preds[0].gold).correct);
    assert!(score_output(Math, &preds[1].output, &preds[1].gold).correct);
    assert!(score_output(YesNo, &preds[2].output, &preds[2].gold).correct);
    let lines: Vec<usize> = errs.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![3, 4, 5]);
    assert!(errs[0].1.contains("'output'"), "{}", errs[0].1);
    assert!(errs[1].1.contains("'answer'"), "{}", errs[1].1);

    let bad = write_file(&dir, "bad-preds.jsonl", "{\"output\": \"x\"}\n");
    let msg = format!("{:#}", load_predictions(&bad).unwrap_err());
    assert!(msg.contains("bad-preds.jsonl"), "{msg}");
}

#[test]
fn wilson_intervals() {
    let a = accuracy(8, 10);
    assert_eq!((a.n, a.correct), (10, 8));
    assert!((a.accuracy - 0.8).abs() < 1e-12);
    assert!((a.ci_low - 0.4902).abs() < 1e-3, "{a:?}");
    assert!((a.ci_high - 0.9433).abs() < 1e-3, "{a:?}");
    let z = accuracy(0, 0);
    assert_eq!((z.accuracy, z.ci_low, z.ci_high), (0.0, 0.0, 1.0));
    let all = accuracy(20, 20);
    assert_eq!(all.accuracy, 1.0);
    assert!((all.ci_high - 1.0).abs() < 1e-12);
    assert!((all.ci_low - 0.8389).abs() < 1e-3, "{all:?}");
    let none = accuracy(0, 20);
    assert_eq!(none.ci_low, 0.0);
    assert!((none.ci_high - 0.1611).abs() < 1e-3, "{none:?}");
    let half = accuracy(50, 100);
    assert!((half.ci_low - 0.4038).abs() < 1e-3 && (half.ci_high - 0.5962).abs() < 1e-3);
}

fn question(q: &str, options: &[&str], gold: &str) -> Question {
    Question {
        line: 1,
        id: "x".into(),
        question: q.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
        gold: gold.into(),
        solution: None,
    }
}

#[test]
fn few_shot_maths_examples_show_their_worked_solutions() {
    let dir = tempfile::tempdir().unwrap();
    let shots = dir.path().join("shots.jsonl");
    std::fs::write(
        &shots,
        concat!(
            "{\"question\": \"2 + 3?\", \"answer\": \"2 + 3 = <<2+3=5>>5 apples\\n#### 5\"}\n",
            "{\"problem\": \"Half of 8?\", \"solution\": \"8 / 2 = \\\\boxed{4}.\"}\n",
        ),
    )
    .unwrap();
    let (gsm, bad) = load_questions(&shots, Benchmark::Gsm8k).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(gsm[0].solution.as_deref(), Some("2 + 3 = 5 apples"));
    assert_eq!(gsm[1].solution.as_deref(), Some("8 / 2 = \\boxed{4}."));
    let q = question("1 + 1?", &[], "2");
    let msgs = prompt_messages(Benchmark::Gsm8k, &q, &gsm);
    let system = msgs[0]["content"].as_str().unwrap();
    assert!(
        system.contains("The question: 2 + 3?\nThe answer: 2 + 3 = 5 apples\nThe answer is \\boxed{5} <end_of_reasoning>"),
        "{system}"
    );
    assert!(
        system.contains("The answer: 8 / 2 = \\boxed{4}. <end_of_reasoning>"),
        "{system}"
    );
}

#[test]
fn prompts() {
    let q = question("What is 2+2?", &[], "4");
    let m = prompt_messages(Benchmark::Gsm8k, &q, &[]);
    assert_eq!(m[0]["role"], "system");
    assert_eq!(
        m[0]["content"],
        "Please solve the following problem step by step.\nWhen you reach the answer, please include the answer in the box format and finish the reasoning with <end_of_reasoning>."
    );
    assert_eq!(m[1]["role"], "user");
    assert_eq!(
        m[1]["content"],
        "The question: What is 2+2?\nPlease directly output the reasoning steps.\n"
    );
    assert_eq!(m.as_array().unwrap().len(), 2);

    let shot = question("What is 1+1?", &[], "2");
    let m = prompt_messages(Benchmark::Math, &q, &[shot.clone(), shot]);
    let sys = m[0]["content"].as_str().unwrap();
    assert!(sys.contains(
        "<end_of_reasoning>.\nI will give you some examples for reference.\nThe question: What is 1+1?\nThe answer: \\boxed{2}"
    ), "{sys}");
    assert_eq!(sys.matches("The question: What is 1+1?").count(), 2);

    let c = question("Which?", &["red", "blue"], "B");
    let m = prompt_messages(Benchmark::Choice, &c, std::slice::from_ref(&c));
    let user = m[1]["content"].as_str().unwrap();
    assert!(
        user.starts_with("The question: Which?\nA. red\nB. blue\n"),
        "{user}"
    );
    let sys = m[0]["content"].as_str().unwrap();
    assert!(sys.contains("The answer is: X"), "{sys}");
    assert!(
        sys.contains("A. red\nB. blue\nThe answer: The answer is: B"),
        "{sys}"
    );

    let y = question("Is water wet?", &[], "yes");
    let m = prompt_messages(Benchmark::Yesno, &y, &[]);
    let sys = m[0]["content"].as_str().unwrap();
    assert!(
        sys.contains("\"The answer is: Yes\" or \"The answer is: No\""),
        "{sys}"
    );
    assert!(!sys.contains("examples"), "{sys}");
}

#[test]
fn benchmarks() {
    assert_eq!(Benchmark::Gsm8k.kind(), Math);
    assert_eq!(Benchmark::Math.kind(), Math);
    assert_eq!(Benchmark::Choice.kind(), Choice);
    assert_eq!(Benchmark::Yesno.kind(), YesNo);
    use clap::ValueEnum;
    for b in Benchmark::value_variants() {
        assert_eq!(b.to_possible_value().unwrap().get_name(), b.name());
    }
}

/// Random strings built from LaTeX and answer fragments (and multi-byte characters) never make
/// extraction or comparison panic.
#[test]
fn no_panics_on_random_text() {
    const PIECES: &[&str] = &[
        "\\boxed",
        "\\fbox",
        "{",
        "}",
        "\\frac",
        "\\dfrac",
        "\\sqrt",
        "\\text",
        "\\left",
        "\\right",
        "\\",
        "^",
        "_",
        "$",
        "#",
        "####",
        "answer is",
        "Answer:",
        "The answer is: ",
        " ",
        "\n",
        ".",
        ",",
        "-",
        "\u{2212}",
        "/",
        "(",
        ")",
        "1",
        "23",
        "4,567",
        "0.5",
        "x",
        "B",
        "c",
        "yes",
        "No",
        "true",
        "é",
        "\u{1F600}",
        "%",
        "\\%",
        "dollars",
        " cm",
        "=",
        "**",
        "\\,",
        "\\!",
        "^\\circ",
        "{,}",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let len = (next() % 14) as usize;
        let s: String = (0..len)
            .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
            .collect();
        for kind in [Math, Choice, YesNo] {
            let e = extract_answer(kind, &s);
            let _ = answers_match(kind, &s, "1/2");
            let _ = answers_match(kind, e.as_deref().unwrap_or(""), &s);
            let _ = score_output(kind, &s, &s);
        }
    }
}
