//! What an evaluation found: answers and scores per row and model, summaries, differences.

use super::score::{Metric, RowValue, Summary, delta_interval, summarize};
use super::{EvalRow, Gate, ModelSpec};
use crate::display::{Render, Table, escape_html};
use anyhow::{Result, bail};
use polars::prelude::*;

/// One model's answer to one row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answer {
    pub text: String,
    /// Cut by `max_new_tokens` (`finish_reason: "length"`).
    pub truncated: bool,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds from request to the last token.
    pub latency_s: f64,
    /// Multiple choice: each choice's summed log-likelihood after the prompt.
    pub choice_logprobs: Vec<f64>,
    /// The reference answer's log-likelihood, when perplexity or token accuracy is asked for.
    pub reference: Option<crate::model::ContinuationScore>,
    /// Per judge of the evaluation (in order): the judge's model and its verdict.
    pub judgments: Vec<(String, super::Judgment)>,
}

/// One model's answers, per-row scores and summaries.
#[derive(Clone, Debug)]
pub struct ModelOutcome {
    pub spec: ModelSpec,
    pub answers: Vec<Answer>,
    /// Per metric (in the evaluation's order), per row.
    pub(crate) scores: Vec<Vec<RowValue>>,
    /// Per metric.
    pub summaries: Vec<Summary>,
    /// The model's MLflow run, once logged.
    pub run_id: Option<String>,
    pub run_url: Option<String>,
}

impl ModelOutcome {
    pub(crate) fn score(spec: ModelSpec, answers: Vec<Answer>, rows: &[EvalRow], metrics: &[Metric]) -> Self {
        let scores = metrics
            .iter()
            .map(|m| {
                rows.iter()
                    .zip(&answers)
                    .map(|(r, a)| m.score(a, r))
                    .collect()
            })
            .collect();
        Self { spec, answers, scores, summaries: vec![], run_id: None, run_url: None }
    }

    /// Answers cut by `max_new_tokens`.
    pub fn truncated(&self) -> usize {
        self.answers.iter().filter(|a| a.truncated).count()
    }

    /// The per-row values of metric number `m`.
    pub fn row_values(&self, m: usize) -> Vec<f64> {
        self.scores[m].iter().map(RowValue::value).collect()
    }
}

/// Whether the candidate beat the base by the gate's margin, and what was promoted.
#[derive(Clone, Debug, PartialEq)]
pub struct GateOutcome {
    pub metric: String,
    pub min_delta: f64,
    pub delta: f64,
    pub passed: bool,
    /// `(registered model, version, alias)` set because the gate passed.
    pub promoted: Option<(String, String, String)>,
}

/// A candidate's difference from the base on one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    /// Index of the candidate model.
    pub model: usize,
    /// Index of the metric.
    pub metric: usize,
    pub delta: f64,
    /// The paired-bootstrap 95% interval, when resamples were drawn.
    pub interval: Option<(f64, f64)>,
}

/// The result of [`Evaluation::run`](super::Evaluation::run).
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub data_source: String,
    pub rows: Vec<EvalRow>,
    pub metrics: Vec<Metric>,
    /// In the order the models were added; the first is the base.
    pub models: Vec<ModelOutcome>,
    pub deltas: Vec<Delta>,
    pub gate: Option<GateOutcome>,
    /// The MLflow parent run and experiment, once logged.
    pub parent_run_id: Option<String>,
    pub experiment_url: Option<String>,
    pub(crate) tracking_server: Option<String>,
}

impl EvalResult {
    pub(crate) fn new(data_source: String, rows: Vec<EvalRow>, metrics: Vec<Metric>, mut models: Vec<ModelOutcome>, bootstrap: usize) -> Self {
        for m in &mut models {
            m.summaries = metrics.iter().zip(&m.scores).map(|(metric, s)| summarize(metric, s, bootstrap)).collect();
        }
        let mut deltas = vec![];
        for (mi, cand) in models.iter().enumerate().skip(1) {
            for (k, metric) in metrics.iter().enumerate() {
                deltas.push(Delta {
                    model: mi,
                    metric: k,
                    delta: cand.summaries[k].value - models[0].summaries[k].value,
                    interval: delta_interval(metric, &models[0].scores[k], &cand.scores[k], bootstrap),
                });
            }
        }
        Self { data_source, rows, metrics, models, deltas, gate: None, parent_run_id: None, experiment_url: None, tracking_server: None }
    }

    fn metric_index(&self, metric: &str) -> Option<usize> {
        self.metrics.iter().position(|m| m.name() == metric)
    }

    fn model_index(&self, model: &str) -> Option<usize> {
        self.models.iter().position(|m| m.spec.name == model)
    }

    /// `model`'s aggregate on `metric`.
    pub fn score(&self, model: &str, metric: &str) -> Option<f64> {
        Some(self.models[self.model_index(model)?].summaries[self.metric_index(metric)?].value)
    }

    /// The last model's difference from the first on `metric`, with its 95% interval.
    pub fn delta(&self, metric: &str) -> Option<&Delta> {
        let k = self.metric_index(metric)?;
        self.deltas.iter().rev().find(|d| d.metric == k)
    }

    /// Answers of `model` cut by `max_new_tokens`.
    pub fn truncated(&self, model: &str) -> Option<usize> {
        Some(self.models[self.model_index(model)?].truncated())
    }

    /// `Some(false)` when a gate was set and failed.
    pub fn gate_passed(&self) -> Option<bool> {
        self.gate.as_ref().map(|g| g.passed)
    }

    pub(crate) fn apply_gate(&mut self, gate: &Gate, candidate: &ModelSpec) -> Result<()> {
        let Some(d) = self.delta(&gate.metric) else { bail!("the gate's metric `{}` was not computed", gate.metric) };
        let delta = d.delta;
        let passed = delta >= gate.min_delta;
        let mut promoted = None;
        if let (true, Some((target, alias))) = (passed, &gate.promote) {
            let reg = crate::registry::Registry::new(None)?;
            let target = target.as_deref().unwrap_or(&candidate.source);
            let v = reg.resolve(target).map_err(|e| {
                anyhow::anyhow!(
                    "the gate passed, but `{target}` is not a registered model version to promote ({e:#}): name one with .promote(\"NAME/VERSION\", \"{alias}\")"
                )
            })?;
            reg.set_alias(&v.name, alias, &v.version)?;
            promoted = Some((v.name.clone(), v.version.clone(), alias.clone()));
        }
        self.gate = Some(GateOutcome { metric: gate.metric.clone(), min_delta: gate.min_delta, delta, passed, promoted });
        Ok(())
    }

    /// One row per input: the question, the references (joined by ` | `), then for each
    /// model its answer, whether it was cut, and a column per metric (`<model>/<metric>`).
    pub fn rows(&self) -> Result<DataFrame> {
        let mut cols: Vec<Column> = vec![
            Column::new("row".into(), (0..self.rows.len() as u32).collect::<Vec<_>>()),
            Column::new("input".into(), self.rows.iter().map(|r| r.question().to_string()).collect::<Vec<_>>()),
            Column::new("reference".into(), self.rows.iter().map(|r| r.references.join(" | ")).collect::<Vec<_>>()),
        ];
        for m in &self.models {
            let n = &m.spec.name;
            cols.push(Column::new(format!("{n}").into(), m.answers.iter().map(|a| a.text.clone()).collect::<Vec<_>>()));
            cols.push(Column::new(format!("{n}/truncated").into(), m.answers.iter().map(|a| a.truncated).collect::<Vec<_>>()));
            for (k, metric) in self.metrics.iter().enumerate() {
                cols.push(Column::new(format!("{n}/{}", metric.name()).into(), m.row_values(k)));
                if let Metric::Judge { name, index } = metric {
                    let why: Vec<String> = m.answers.iter().map(|a| a.judgments.get(*index).map(|j| j.1.rationale.clone()).unwrap_or_default()).collect();
                    cols.push(Column::new(format!("{n}/{name}/rationale").into(), why));
                }
            }
        }
        Ok(DataFrame::new(self.rows.len(), cols)?)
    }

    /// One row per metric: each model's aggregate and standard error, then each
    /// candidate's difference from the base with its 95% interval.
    pub fn summary(&self) -> Result<DataFrame> {
        let mut cols: Vec<Column> = vec![Column::new("metric".into(), self.metrics.iter().map(Metric::name).collect::<Vec<_>>())];
        for m in &self.models {
            let n = &m.spec.name;
            cols.push(Column::new(n.as_str().into(), m.summaries.iter().map(|s| s.value).collect::<Vec<_>>()));
            cols.push(Column::new(format!("{n}/stderr").into(), m.summaries.iter().map(|s| s.stderr).collect::<Vec<_>>()));
        }
        for (mi, m) in self.models.iter().enumerate().skip(1) {
            let ds: Vec<&Delta> = self.deltas.iter().filter(|d| d.model == mi).collect();
            let suffix = if self.models.len() > 2 { format!("/{}", m.spec.name) } else { String::new() };
            cols.push(Column::new(format!("delta{suffix}").into(), ds.iter().map(|d| d.delta).collect::<Vec<_>>()));
            cols.push(Column::new(format!("ci_low{suffix}").into(), ds.iter().map(|d| d.interval.map(|i| i.0)).collect::<Vec<_>>()));
            cols.push(Column::new(format!("ci_high{suffix}").into(), ds.iter().map(|d| d.interval.map(|i| i.1)).collect::<Vec<_>>()));
        }
        Ok(DataFrame::new(self.metrics.len(), cols)?)
    }

    /// Rows where the models' answers score differently on the first metric (or, when
    /// they score the same everywhere, differ in text).
    pub fn disagreements(&self) -> Vec<usize> {
        if self.models.len() < 2 {
            return vec![];
        }
        (0..self.rows.len())
            .filter(|&i| {
                let v0 = self.models[0].scores.first().map(|s| s[i].value());
                self.models[1..].iter().any(|m| m.scores.first().map(|s| s[i].value()) != v0)
            })
            .collect()
    }

    fn fmt_value(metric: &Metric, v: f64) -> String {
        if !v.is_finite() {
            return "—".into();
        }
        match metric {
            Metric::Bleu | Metric::Chrf { .. } => format!("{v:.2}"),
            Metric::AnswerLength => format!("{v:.1}"),
            Metric::Latency => format!("{v:.3}s"),
            _ => format!("{v:.4}"),
        }
    }

    fn summary_table(&self) -> Table {
        let mut headers = vec!["metric".to_string()];
        headers.extend(self.models.iter().map(|m| m.spec.name.clone()));
        for m in self.models.iter().skip(1) {
            headers.push(if self.models.len() > 2 { format!("Δ {} (95% CI)", m.spec.name) } else { "Δ (95% CI)".into() });
        }
        let mut t = Table::new(headers).title(format!("evaluation of {} rows from {}", self.rows.len(), self.data_source));
        for (k, metric) in self.metrics.iter().enumerate() {
            let mut row = vec![metric.name()];
            for m in &self.models {
                let s = m.summaries[k];
                let mut cell = match s.stderr {
                    Some(e) => format!("{} ± {}", Self::fmt_value(metric, s.value), Self::fmt_value(metric, e)),
                    None => Self::fmt_value(metric, s.value),
                };
                let missing = m.scores[k].iter().filter(|v| !v.value().is_finite()).count();
                if missing > 0 {
                    cell = format!("{cell} ({missing}/{} without a value)", self.rows.len());
                }
                row.push(cell);
            }
            for d in self.deltas.iter().filter(|d| d.metric == k) {
                row.push(match d.interval {
                    Some((lo, hi)) => format!("{:+.4} [{:+.4}, {:+.4}]", d.delta, lo, hi),
                    None => format!("{:+.4}", d.delta),
                });
            }
            t.push(row);
        }
        if self.metrics.iter().any(Metric::needs_generation) {
            let mut cut = vec!["cut by max_new_tokens".to_string()];
            cut.extend(self.models.iter().map(|m| format!("{}/{}", m.truncated(), self.rows.len())));
            cut.extend(self.models.iter().skip(1).map(|_| String::new()));
            t.push(cut);
        }
        t
    }

    fn disagreement_table(&self, max: usize) -> Option<Table> {
        let rows = self.disagreements();
        if rows.is_empty() {
            return None;
        }
        let metric = self.metrics.first()?;
        let mut headers = vec!["row".to_string(), "input".into(), "reference".into()];
        headers.extend(self.models.iter().map(|m| format!("{} ({})", m.spec.name, metric.name())));
        let mut t = Table::new(headers).title(format!("{} rows where the models disagree (first {})", rows.len(), rows.len().min(max)));
        for &i in rows.iter().take(max) {
            let r = &self.rows[i];
            let mut cells = vec![i.to_string(), clip(r.question(), 160), clip(&r.references.join(" | "), 80)];
            for m in &self.models {
                cells.push(format!("{} [{}]", clip(&m.answers[i].text, 120), Self::fmt_value(metric, m.scores[0][i].value())));
            }
            t.push(cells);
        }
        Some(t)
    }

    fn footer(&self) -> Vec<String> {
        let mut lines = vec![];
        if let Some(g) = &self.gate {
            lines.push(format!(
                "gate: Δ {} = {:+.4} {} {:+.4}: {}{}",
                g.metric,
                g.delta,
                if g.passed { "≥" } else { "<" },
                g.min_delta,
                if g.passed { "passed" } else { "FAILED" },
                g.promoted.as_ref().map(|(n, v, a)| format!("; {n} version {v} is now @{a}")).unwrap_or_default()
            ));
        }
        if let Some(url) = &self.experiment_url {
            lines.push(format!("MLflow: {url} (Evaluation view: select the runs, then \"Evaluation\")"));
            for m in &self.models {
                if let Some(u) = &m.run_url {
                    lines.push(format!("  {}: {u}", m.spec.name));
                }
            }
        }
        lines
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

impl Render for EvalResult {
    fn text_plain(&self) -> String {
        let mut s = self.summary_table().text_plain();
        if let Some(t) = self.disagreement_table(10) {
            s.push('\n');
            s.push_str(&t.text_plain());
        }
        for l in self.footer() {
            s.push('\n');
            s.push_str(&l);
        }
        s
    }

    fn text_html(&self) -> Option<String> {
        let mut h = self.summary_table().text_html()?;
        if let Some(t) = self.disagreement_table(20) {
            h.push_str(&t.text_html()?);
        }
        let footer = self.footer();
        if !footer.is_empty() {
            h.push_str("<div>");
            for l in footer {
                let esc = escape_html(&l);
                // Links stay clickable.
                let linked = esc
                    .split(' ')
                    .map(|w| if w.starts_with("http://") || w.starts_with("https://") { format!("<a href=\"{w}\" target=\"_blank\">{w}</a>") } else { w.to_string() })
                    .collect::<Vec<_>>()
                    .join(" ");
                h.push_str(&format!("<div>{linked}</div>"));
            }
            h.push_str("</div>");
        }
        Some(h)
    }
}
