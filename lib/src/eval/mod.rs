//! Evaluation: scores of a model's answers against references.
//!
//! * [`metrics`]: exact match and sacrebleu's BLEU, equal to the reference
//!   implementations' values.

pub mod metrics;

pub use metrics::{Bleu, BleuScore, exact_match, tokenize_13a};
