//! Metrics by name, their per-row values, aggregates, standard errors and the paired
//! bootstrap behind the confidence intervals.

use super::metrics::{Bleu, BleuStats, Chrf, ExactMatch, RougeType};
use super::result::Answer;
use anyhow::{Result, bail};

/// A metric of an [`Evaluation`](super::Evaluation). Build one from its name
/// (`"rougeL".into()`) or as a value (`Metric::ExactMatch(ExactMatch::default().ignore_case())`).
#[derive(Clone, Debug)]
pub enum Metric {
    /// Exact match (1/0 per row, mean over rows), with lm-evaluation-harness's options.
    ExactMatch(ExactMatch),
    /// llm-foundry's generation accuracy: the normalised answer starts with a normalised reference.
    PrefixMatch,
    /// SQuAD token F1 (0–1), the best over the references.
    F1,
    /// rouge-score's F-measure (0–1), the best over the references.
    Rouge { kind: RougeType, stem: bool },
    /// sacrebleu's BLEU (0–100): sentence BLEU per row, corpus BLEU as the aggregate.
    Bleu,
    /// MLflow's `bleu` (0–1): Hugging Face `evaluate`'s BLEU per row, mean as the aggregate.
    BleuHf,
    /// sacrebleu's chrF (word order 0) or chrF++ (2), 0–100: sentence per row, corpus aggregate.
    Chrf { word_order: usize },
    /// Tokens in the answer.
    AnswerLength,
    /// Seconds from request to the answer's last token.
    Latency,
    /// lm-evaluation-harness's multiple-choice accuracy: the most likely choice is correct.
    Acc,
    /// The same with log-likelihoods divided by the choices' lengths in characters.
    AccNorm,
    /// Perplexity of the reference answer (and the end-of-turn token after it): per row
    /// `exp(mean NLL)`, aggregated over all tokens (`exp(Σ NLL / Σ tokens)`) as training's
    /// eval perplexity is.
    Perplexity,
    /// Share of the reference's tokens that are the model's most likely next token
    /// (training's `TokenAccuracy`), aggregated over all tokens.
    TokenAccuracy,
    /// An LLM judge's verdict (1 yes, 0 no; rows without a usable verdict are left out of
    /// the mean). `index` is the judge's place in the evaluation.
    Judge { name: String, index: usize },
    /// A name no metric has (an error when the evaluation runs).
    Unknown(String),
}

/// Every metric name [`Metric::parse`] knows.
pub const METRIC_NAMES: &[&str] = &[
    "exact_match",
    "prefix_match",
    "f1",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "rouge1_stem",
    "rouge2_stem",
    "rougeL_stem",
    "rougeLsum_stem",
    "bleu",
    "bleu_hf",
    "chrf",
    "chrf++",
    "answer_length",
    "latency",
    "acc",
    "acc_norm",
    "perplexity",
    "token_accuracy",
];

impl From<&str> for Metric {
    fn from(name: &str) -> Self {
        Metric::parse(name).unwrap_or_else(|_| Metric::Unknown(name.to_string()))
    }
}

impl From<String> for Metric {
    fn from(name: String) -> Self {
        Metric::from(name.as_str())
    }
}

impl Metric {
    /// The metric called `name` (see [`METRIC_NAMES`]; `exact_match` takes the suffixes
    /// `_raw`, `_ignore_case`, `_ignore_punctuation`, `_ignore_numbers`).
    pub fn parse(name: &str) -> Result<Metric> {
        if let Some(mut rest) = name.strip_prefix("exact_match") {
            let mut em = ExactMatch::default();
            while !rest.is_empty() {
                if let Some(r) = rest.strip_prefix("_raw") {
                    em = em.no_trim();
                    rest = r;
                } else if let Some(r) = rest.strip_prefix("_ignore_case") {
                    em = em.ignore_case();
                    rest = r;
                } else if let Some(r) = rest.strip_prefix("_ignore_punctuation") {
                    em = em.ignore_punctuation();
                    rest = r;
                } else if let Some(r) = rest.strip_prefix("_ignore_numbers") {
                    em = em.ignore_numbers();
                    rest = r;
                } else {
                    bail!("unknown exact_match option `{rest}` in `{name}` (options: _raw, _ignore_case, _ignore_punctuation, _ignore_numbers)");
                }
            }
            return Ok(Metric::ExactMatch(em));
        }
        let (base, stem) = match name.strip_suffix("_stem") {
            Some(b) if b.starts_with("rouge") => (b, true),
            _ => (name, false),
        };
        Ok(match base {
            "prefix_match" => Metric::PrefixMatch,
            "f1" => Metric::F1,
            "rougeL" => Metric::Rouge { kind: RougeType::L, stem },
            "rougeLsum" => Metric::Rouge { kind: RougeType::Lsum, stem },
            r if r.starts_with("rouge") && r.len() == 6 && r.as_bytes()[5].is_ascii_digit() && r.as_bytes()[5] != b'0' => {
                Metric::Rouge { kind: RougeType::N((r.as_bytes()[5] - b'0') as usize), stem }
            }
            "bleu" => Metric::Bleu,
            "bleu_hf" => Metric::BleuHf,
            "chrf" => Metric::Chrf { word_order: 0 },
            "chrf++" | "chrf_pp" => Metric::Chrf { word_order: 2 },
            "answer_length" => Metric::AnswerLength,
            "latency" => Metric::Latency,
            "acc" => Metric::Acc,
            "acc_norm" => Metric::AccNorm,
            "perplexity" => Metric::Perplexity,
            "token_accuracy" => Metric::TokenAccuracy,
            _ => bail!("unknown metric `{name}` (known: {})", METRIC_NAMES.join(", ")),
        })
    }

    /// Errors for an unknown metric name.
    pub(crate) fn check(&self) -> Result<()> {
        if let Metric::Unknown(n) = self {
            Metric::parse(n)?;
        }
        Ok(())
    }

    /// The metric's name as logged (MLflow keys allow `[A-Za-z0-9_./ -]`).
    pub fn name(&self) -> String {
        match self {
            Metric::ExactMatch(em) => {
                let mut n = String::from("exact_match");
                if !em.trim {
                    n.push_str("_raw");
                }
                if em.ignore_case {
                    n.push_str("_ignore_case");
                }
                if em.ignore_punctuation {
                    n.push_str("_ignore_punctuation");
                }
                if em.ignore_numbers {
                    n.push_str("_ignore_numbers");
                }
                if !em.regexes_to_ignore.is_empty() {
                    n.push_str("_regex");
                }
                n
            }
            Metric::PrefixMatch => "prefix_match".into(),
            Metric::F1 => "f1".into(),
            Metric::Rouge { kind, stem } => format!("{}{}", kind.name(), if *stem { "_stem" } else { "" }),
            Metric::Bleu => "bleu".into(),
            Metric::BleuHf => "bleu_hf".into(),
            Metric::Chrf { word_order: 0 } => "chrf".into(),
            Metric::Chrf { .. } => "chrf_pp".into(),
            Metric::AnswerLength => "answer_length".into(),
            Metric::Latency => "latency".into(),
            Metric::Acc => "acc".into(),
            Metric::AccNorm => "acc_norm".into(),
            Metric::Perplexity => "perplexity".into(),
            Metric::TokenAccuracy => "token_accuracy".into(),
            Metric::Judge { name, .. } => name.clone(),
            Metric::Unknown(n) => n.clone(),
        }
    }

    /// Whether a larger value is better (false for length and latency, which are reported,
    /// not judged).
    pub fn higher_is_better(&self) -> bool {
        !matches!(self, Metric::AnswerLength | Metric::Latency | Metric::Perplexity)
    }

    /// Whether the metric scores a generated answer (the others score log-likelihoods).
    pub fn needs_generation(&self) -> bool {
        !matches!(self, Metric::Acc | Metric::AccNorm | Metric::Perplexity | Metric::TokenAccuracy)
    }

    /// Whether the aggregate is a corpus score computed from summed statistics rather
    /// than the mean of the rows.
    pub fn is_corpus(&self) -> bool {
        matches!(self, Metric::Bleu | Metric::Chrf { .. } | Metric::Perplexity | Metric::TokenAccuracy)
    }

    /// The row's value.
    pub(crate) fn score(&self, answer: &Answer, row: &super::EvalRow) -> RowValue {
        let references: Vec<&str> = row.references.iter().map(String::as_str).collect();
        let references = references.as_slice();
        let a = answer.text.as_str();
        let b = |x: bool| RowValue::Value(if x { 1.0 } else { 0.0 });
        match self {
            Metric::ExactMatch(em) => b(em.matches(a, references)),
            Metric::PrefixMatch => b(super::metrics::prefix_match(a, references)),
            Metric::F1 => RowValue::Value(super::metrics::squad_f1(a, references)),
            Metric::Rouge { kind, stem } => RowValue::Value(super::metrics::rouge_best(*kind, references, a, *stem).fmeasure),
            Metric::Bleu => {
                let bleu = Bleu::default();
                let stats = bleu.stats(a, references);
                RowValue::Bleu { sentence: Bleu::score_with(stats, true).score, stats }
            }
            Metric::BleuHf => RowValue::Value(super::metrics::hf_bleu(a, references)),
            Metric::Chrf { word_order } => {
                let c = Chrf { word_order: *word_order };
                let stats = c.stats(a, references);
                RowValue::Chrf { sentence: c.f_score(&stats), stats }
            }
            Metric::AnswerLength => RowValue::Value(answer.completion_tokens as f64),
            Metric::Latency => RowValue::Value(answer.latency_s),
            Metric::Acc => RowValue::Value(super::metrics::mc_acc(&answer.choice_logprobs, &row.gold)),
            Metric::AccNorm => {
                let choices: Vec<&str> = row.choices.iter().map(String::as_str).collect();
                RowValue::Value(super::metrics::mc_acc_norm(&answer.choice_logprobs, &choices, &row.gold))
            }
            Metric::Perplexity => match &answer.reference {
                Some(r) if r.tokens > 0 => RowValue::Tokens { value: (-r.logprob / r.tokens as f64).exp(), sum: -r.logprob, tokens: r.tokens },
                _ => RowValue::Tokens { value: f64::NAN, sum: 0.0, tokens: 0 },
            },
            Metric::TokenAccuracy => match &answer.reference {
                Some(r) if r.tokens > 0 => RowValue::Tokens { value: r.greedy_hits as f64 / r.tokens as f64, sum: r.greedy_hits as f64, tokens: r.tokens },
                _ => RowValue::Tokens { value: f64::NAN, sum: 0.0, tokens: 0 },
            },
            Metric::Judge { index, .. } => {
                RowValue::Value(answer.judgments.get(*index).and_then(|j| j.1.value).map_or(f64::NAN, |v| if v { 1.0 } else { 0.0 }))
            }
            Metric::Unknown(_) => RowValue::Value(f64::NAN),
        }
    }

    /// The aggregate of the rows at `idx` (every row appears as often as it is listed).
    pub(crate) fn aggregate(&self, rows: &[RowValue], idx: &mut dyn Iterator<Item = usize>) -> f64 {
        match self {
            Metric::Bleu => {
                let mut total = BleuStats::default();
                for i in idx {
                    if let RowValue::Bleu { stats, .. } = &rows[i] {
                        total += *stats;
                    }
                }
                Bleu::score(total).score
            }
            Metric::Chrf { word_order } => {
                let c = Chrf { word_order: *word_order };
                let mut sum: Vec<usize> = vec![];
                for i in idx {
                    if let RowValue::Chrf { stats, .. } = &rows[i] {
                        if sum.len() < stats.len() {
                            sum.resize(stats.len(), 0);
                        }
                        for (a, b) in sum.iter_mut().zip(stats) {
                            *a += b;
                        }
                    }
                }
                c.f_score(&sum)
            }
            Metric::Perplexity | Metric::TokenAccuracy => {
                let (mut sum, mut n) = (0.0, 0usize);
                for i in idx {
                    if let RowValue::Tokens { sum: s, tokens, .. } = &rows[i] {
                        sum += s;
                        n += tokens;
                    }
                }
                let mean = sum / n as f64;
                if matches!(self, Metric::Perplexity) { mean.exp() } else { mean }
            }
            _ => {
                // Rows without a value (a judge that gave no verdict) are left out.
                let (mut s, mut n) = (0.0, 0usize);
                for i in idx {
                    let v = rows[i].value();
                    if v.is_finite() {
                        s += v;
                        n += 1;
                    }
                }
                if n == 0 { f64::NAN } else { s / n as f64 }
            }
        }
    }
}

/// One row's score, with what a corpus aggregate needs.
#[derive(Clone, Debug)]
pub(crate) enum RowValue {
    Value(f64),
    Bleu { sentence: f64, stats: BleuStats },
    Chrf { sentence: f64, stats: Vec<usize> },
    /// A per-token quantity: the row's own value, and its sum over the row's tokens.
    Tokens { value: f64, sum: f64, tokens: usize },
}

impl RowValue {
    /// The row's own value (sentence BLEU / chrF for the corpus metrics).
    pub fn value(&self) -> f64 {
        match self {
            RowValue::Value(v) => *v,
            RowValue::Bleu { sentence, .. } | RowValue::Chrf { sentence, .. } => *sentence,
            RowValue::Tokens { value, .. } => *value,
        }
    }
}

/// A metric's aggregate over the rows for one model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The mean over rows, or the corpus score for `bleu` / `chrf`.
    pub value: f64,
    /// The standard error: sample standard deviation / √n for means (lm-evaluation-harness's
    /// `mean_stderr`), the bootstrap standard deviation for corpus scores.
    pub stderr: Option<f64>,
}

/// A deterministic stream of row indices drawn with replacement (splitmix64).
pub(crate) struct Resampler {
    state: u64,
}

impl Resampler {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `n` indices in `0..n`, with replacement.
    pub fn sample(&mut self, n: usize) -> Vec<usize> {
        (0..n).map(|_| (self.next() % n as u64) as usize).collect()
    }
}

/// The summary of one model's rows for `metric`.
pub(crate) fn summarize(metric: &Metric, rows: &[RowValue], bootstrap: usize) -> Summary {
    let n = rows.len();
    let value = metric.aggregate(rows, &mut (0..n));
    let stderr = if metric.is_corpus() {
        (bootstrap > 1 && n > 1).then(|| {
            let mut r = Resampler::new(0x5EED);
            let vals: Vec<f64> = (0..bootstrap).map(|_| metric.aggregate(rows, &mut r.sample(n).into_iter())).collect();
            std_dev(&vals)
        })
    } else {
        let vals: Vec<f64> = rows.iter().map(RowValue::value).filter(|v| v.is_finite()).collect();
        (vals.len() > 1).then(|| std_dev(&vals) / (vals.len() as f64).sqrt())
    };
    Summary { value, stderr }
}

/// Sample standard deviation (n − 1).
fn std_dev(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// The 95% paired-bootstrap interval of `metric(candidate) − metric(base)` over the same
/// resampled rows; `None` without resamples.
pub(crate) fn delta_interval(metric: &Metric, base: &[RowValue], candidate: &[RowValue], bootstrap: usize) -> Option<(f64, f64)> {
    let n = base.len();
    if bootstrap < 2 || n < 2 {
        return None;
    }
    let mut r = Resampler::new(0xC1C1);
    let mut deltas: Vec<f64> = (0..bootstrap)
        .map(|_| {
            let idx = r.sample(n);
            metric.aggregate(candidate, &mut idx.iter().copied()) - metric.aggregate(base, &mut idx.iter().copied())
        })
        .collect();
    deltas.sort_by(f64::total_cmp);
    let lo = deltas[((0.025 * bootstrap as f64).floor() as usize).min(bootstrap - 1)];
    let hi = deltas[((0.975 * bootstrap as f64).ceil() as usize).saturating_sub(1).min(bootstrap - 1)];
    Some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(v: &[f64]) -> Vec<RowValue> {
        v.iter().map(|&x| RowValue::Value(x)).collect()
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_errors_listing_the_known_ones() {
        for n in METRIC_NAMES {
            let m = Metric::parse(n).unwrap();
            assert_eq!(Metric::parse(&m.name()).unwrap().name(), m.name(), "{n}");
        }
        assert_eq!(Metric::parse("exact_match_ignore_case_ignore_punctuation").unwrap().name(), "exact_match_ignore_case_ignore_punctuation");
        let e = Metric::parse("rogue").unwrap_err().to_string();
        assert!(e.contains("unknown metric `rogue`") && e.contains("rougeLsum"), "{e}");
        assert!(Metric::from("nope").check().is_err());
    }

    #[test]
    fn mean_stderr_is_the_sample_deviation_over_root_n() {
        let s = summarize(&Metric::F1, &vals(&[1.0, 0.0, 1.0, 0.0]), 0);
        assert_eq!(s.value, 0.5);
        // sample sd of [1,0,1,0] = sqrt(1/3); / 2
        assert!((s.stderr.unwrap() - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-15);
    }

    #[test]
    fn bootstrap_interval_brackets_the_difference_and_is_degenerate_when_models_agree() {
        let base = vals(&[0.0; 50]);
        let cand = vals(&(0..50).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect::<Vec<_>>());
        let (lo, hi) = delta_interval(&Metric::F1, &base, &cand, 1000).unwrap();
        assert!(lo > 0.3 && lo < 0.5 && hi > 0.5 && hi < 0.7, "{lo} {hi}");
        let (lo, hi) = delta_interval(&Metric::F1, &cand, &cand, 1000).unwrap();
        assert_eq!((lo, hi), (0.0, 0.0));
    }
}
