//! Scoring predictions: one output against its gold, and accuracy with a Wilson interval.

use super::answer::{AnswerKind, answers_match, extract_answer};
use serde::Serialize;

/// The score of one model output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    /// The answer extracted from the output (None when it states none).
    pub extracted: Option<String>,
    /// Whether the extracted answer matches the gold (false when none was extracted).
    pub correct: bool,
}

/// Extracts the answer of `output` and compares it with `gold`.
pub fn score_output(kind: AnswerKind, output: &str, gold: &str) -> Scored {
    let extracted = extract_answer(kind, output);
    let correct = extracted
        .as_deref()
        .is_some_and(|p| answers_match(kind, p, gold));
    Scored { extracted, correct }
}

/// An accuracy with its 95% confidence interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    /// Number of questions scored.
    pub n: usize,
    /// Number answered correctly.
    pub correct: usize,
    /// `correct / n` (0 when `n` is 0).
    pub accuracy: f64,
    /// Lower end of the 95% Wilson score interval.
    pub ci_low: f64,
    /// Upper end of the 95% Wilson score interval.
    pub ci_high: f64,
}

/// The normal quantile of a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Accuracy with a 95% Wilson score interval (n = 0 -> accuracy 0, interval [0, 1]).
///
/// With `p = correct / n` and `z = 1.96`: centre `(p + z²/2n) / (1 + z²/n)`, half-width
/// `z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)`, clamped to [0, 1].
pub fn accuracy(correct: usize, n: usize) -> Accuracy {
    if n == 0 {
        return Accuracy {
            n,
            correct,
            accuracy: 0.0,
            ci_low: 0.0,
            ci_high: 1.0,
        };
    }
    let nf = n as f64;
    let p = correct as f64 / nf;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denom;
    let half = Z95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    Accuracy {
        n,
        correct,
        accuracy: p,
        // Rounding can put a bound a hair past the estimate at 0 / n and n / n.
        ci_low: (centre - half).clamp(0.0, 1.0).min(p),
        ci_high: (centre + half).clamp(0.0, 1.0).max(p),
    }
}
