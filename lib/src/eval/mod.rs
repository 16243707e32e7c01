//! Evaluation: scores of a model's answers against references.
//!
//! * [`metrics`]: exact match, sacrebleu's BLEU and chrF/chrF++, rouge-score's ROUGE-1/2/L, equal to
//!   the reference implementations' values.

pub mod metrics;

pub use metrics::{Bleu, BleuScore, Chrf, Rouge, exact_match, rouge_l, rouge_n, tokenize_13a};
