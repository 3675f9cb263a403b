//! Evaluation logic: benchmark and prediction files, evaluation prompts, answer extraction and
//! comparison, and scoring (accuracy with a Wilson interval). No model runs here; the `eval`
//! command drives generation on top of this API.
//!
//! - [`answer`]: extracting the answer a model output states (maths `\boxed{}` / "answer is" /
//!   last number, option letters, yes/no) and comparing it with a gold answer (maths after
//!   LaTeX normalisation, numerically with a tolerance when both are numbers).
//! - [`data`]: the [`data::Benchmark`] formats (GSM8K, MATH, multiple choice, yes/no), question
//!   and prediction JSONL loaders that report malformed lines without stopping, and the chat
//!   prompts (method.md section 4).
//! - [`score`]: scoring one output and the accuracy of many with a 95% Wilson interval.

pub mod answer;
pub mod data;
pub mod score;

pub use answer::{AnswerKind, answers_match, extract_answer};
pub use data::{
    Benchmark, PredictionLine, Question, load_predictions, load_questions, prompt_messages,
};
pub use score::{Accuracy, Scored, accuracy, score_output};
