//! Evaluation: does the fine-tuned model beat its base, by how much, and on which rows?
//!
//! * [`Evaluation`]: the builder (`Evaluation::new(data).model("base", ..).model("tuned", ..)
//!   .metrics([..]).experiment(..).run()`), the library side of `tunebook eval`.
//! * Generation: local models (a folder, `.gguf`, run, PEFT adapter, registered model) go
//!   through the serving engine ([`crate::serve::generate_batch`]): the model's own chat
//!   template and end-of-turn ids, continuous batching, answers that do not depend on the
//!   batch. Any OpenAI-compatible URL (a `tunebook serve` endpoint included) is asked
//!   through `/v1/chat/completions` at temperature 0, a few requests at a time.
//! * [`metrics`]: exact match (trimmed, lm-evaluation-harness's options, llm-foundry's
//!   normalised prefix), SQuAD F1, rouge-score's ROUGE-1/2/L/Lsum with or without the
//!   Porter stemmer, sacrebleu's BLEU and chrF/chrF++, MLflow's per-row BLEU; each equal
//!   to its reference implementation.
//! * [`EvalResult`]: per-row answers and scores, per-model summaries, the difference of
//!   each candidate against the first model with a paired-bootstrap 95% interval; polars
//!   frames ([`EvalResult::rows`], [`EvalResult::summary`]) and a notebook display.
//! * MLflow (`tracking`): one run per model (`mlflow.runType = genai_evaluate`) with
//!   `<metric>/mean` and `/stderr`, the per-row `eval_results_table.json` the experiment's
//!   Evaluation view compares side by side, one trace per row with its assessments, the
//!   data as the run's input; a parent run holding `delta/<metric>`.

pub mod cli;
mod generate;
mod judge;
pub mod metrics;
#[cfg(test)]
mod parity_tests;
mod porter;
mod result;
mod score;
mod tracking;

pub use metrics::{Bleu, BleuScore, Chrf, ExactMatch, Rouge, RougeType, exact_match, rouge, rouge_best, rouge_l, rouge_n, tokenize_13a};
pub use judge::{Judge, JudgeKind, Judgment, parse_verdict};
pub use porter::stem as porter_stem;
pub use result::{Answer, EvalResult, GateOutcome, ModelOutcome};
pub use score::{Metric, Summary};

use crate::data::Dataset;
use crate::tokenize::Message;
use anyhow::{Context, Result, bail};

/// One row to evaluate: the conversation the model answers and the accepted answers.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalRow {
    /// The conversation up to (not including) the answer.
    pub prompt: Vec<Message>,
    /// Accepted answers (at least one; for multiple choice, the gold choices' texts).
    pub references: Vec<String>,
    /// Multiple choice: the choices, scored by log-likelihood (empty otherwise).
    pub choices: Vec<String>,
    /// Multiple choice: the indices of the correct choices.
    pub gold: Vec<usize>,
}

impl EvalRow {
    /// The last user message: what a reader of the table wants to see as the input.
    pub fn question(&self) -> &str {
        self.prompt.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str()).unwrap_or("")
    }
}

/// A model to evaluate, by name.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// The name shown in tables and used as the MLflow run name.
    pub name: String,
    /// A model folder, `.gguf`, run name or folder, PEFT adapter folder, registered model
    /// (`models:/name/3`, `name@alias`), or the URL of an OpenAI-compatible endpoint.
    pub source: String,
}

/// "Promote the candidate only when it beats the base": see [`Evaluation::gate`].
#[derive(Clone, Debug)]
pub struct Gate {
    pub metric: String,
    pub min_delta: f64,
    /// When it passes: the registered-model version to promote (`None`: the candidate's
    /// own source) and the alias to set on it.
    pub promote: Option<(Option<String>, String)>,
}

/// An evaluation of one or more models on the same rows. The first model is the base the
/// others are compared with.
#[derive(Clone, Debug)]
pub struct Evaluation {
    data: Dataset,
    references_column: Option<String>,
    models: Vec<ModelSpec>,
    metrics: Vec<Metric>,
    max_new_tokens: usize,
    stop: Vec<String>,
    seed: u64,
    temperature: f64,
    batch_size: usize,
    limit: Option<usize>,
    experiment: Option<String>,
    tracking_uri: Option<String>,
    api_key: Option<String>,
    concurrency: usize,
    gate: Option<Gate>,
    bootstrap: usize,
    traces: bool,
    multiple_choice: Option<(String, String)>,
    judges: Vec<Judge>,
    chat_template: bool,
    target_delimiter: Option<String>,
}

impl Evaluation {
    /// Evaluates on `data`: chat rows (the last assistant message is the reference) or
    /// instruction rows (`prompt` → `response`); map other column names with
    /// [`Dataset::columns`].
    pub fn new(data: Dataset) -> Self {
        Self {
            data,
            references_column: None,
            models: vec![],
            metrics: vec![],
            max_new_tokens: 256,
            stop: vec![],
            seed: 0,
            temperature: 0.0,
            batch_size: 16,
            limit: None,
            experiment: None,
            tracking_uri: None,
            api_key: None,
            concurrency: 8,
            gate: None,
            bootstrap: 1000,
            traces: true,
            multiple_choice: None,
            judges: vec![],
            chat_template: true,
            target_delimiter: None,
        }
    }

    /// Adds a model under `name` (the first one added is the base the others are compared
    /// with). `source`: a model folder, `.gguf`, a run (name or folder), a PEFT adapter
    /// folder (merged into its base), a registered model (`models:/name/3`, `name@alias`),
    /// or the base URL of an OpenAI-compatible endpoint (`http://host:port/v1`; the served
    /// model is `name` if the endpoint lists it, else its only model).
    pub fn model(mut self, name: impl Into<String>, source: impl Into<String>) -> Self {
        self.models.push(ModelSpec { name: name.into(), source: source.into() });
        self
    }

    /// The metrics, by name or value: `exact_match`, `prefix_match`, `f1`, `rouge1`,
    /// `rouge2`, `rougeL`, `rougeLsum` (a `_stem` suffix uses the Porter stemmer), `bleu`
    /// (sacrebleu), `bleu_hf` (MLflow's per-row BLEU), `chrf`, `chrf++`, `answer_length`,
    /// `latency`. Default: `exact_match`.
    pub fn metrics<M: Into<Metric>>(mut self, metrics: impl IntoIterator<Item = M>) -> Self {
        self.metrics = metrics.into_iter().map(Into::into).collect();
        self
    }

    /// A column holding the accepted answers (a string or a list of strings) instead of
    /// the data's own response.
    pub fn references(mut self, column: impl Into<String>) -> Self {
        self.references_column = Some(column.into());
        self
    }

    /// Most tokens per answer (default 256); answers cut here are counted in the result.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// Stop strings, in addition to the model's end-of-turn tokens.
    pub fn stop<S: Into<String>>(mut self, stop: impl IntoIterator<Item = S>) -> Self {
        self.stop = stop.into_iter().map(Into::into).collect();
        self
    }

    /// Samples at `temperature` with `seed` instead of greedy decoding (the default).
    pub fn sampling(mut self, temperature: f64, seed: u64) -> Self {
        self.temperature = temperature;
        self.seed = seed;
        self
    }

    /// Sequences decoded together by a local model (default 16); answers do not depend on it.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Evaluates only the first `n` rows.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Logs the evaluation to this MLflow experiment (created if needed): one run per
    /// model and a parent run with the differences.
    pub fn experiment(mut self, name: impl Into<String>) -> Self {
        self.experiment = Some(name.into());
        self
    }

    /// The MLflow tracking server (default: `MLFLOW_TRACKING_URI`).
    pub fn tracking_uri(mut self, uri: impl Into<String>) -> Self {
        self.tracking_uri = Some(uri.into());
        self
    }

    /// The API key sent to endpoint models (default: `OPENAI_API_KEY` when set).
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Requests in flight at once per endpoint model (default 8).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Bootstrap resamples for the confidence intervals (default 1000; 0 leaves them out).
    pub fn bootstrap(mut self, n: usize) -> Self {
        self.bootstrap = n;
        self
    }

    /// Whether to log one MLflow trace per row and model (default on).
    pub fn traces(mut self, on: bool) -> Self {
        self.traces = on;
        self
    }

    /// Passes when the last model beats the first on `metric` by at least `min_delta`
    /// (e.g. `0.05` for five points of exact match); `tunebook eval` exits with status 1
    /// when it fails.
    pub fn gate(mut self, metric: impl Into<String>, min_delta: f64) -> Self {
        self.gate = Some(Gate { metric: metric.into(), min_delta, promote: None });
        self
    }

    /// With [`gate`](Self::gate): when it passes, sets `alias` (e.g. `champion`) on the
    /// candidate's version of the registered model (the candidate's source must be
    /// `models:/name/N`, `name/N` or `name@alias`; else use [`promote`](Self::promote)).
    pub fn promote_to(mut self, alias: impl Into<String>) -> Self {
        if let Some(g) = &mut self.gate {
            g.promote = Some((None, alias.into()));
        }
        self
    }

    /// With [`gate`](Self::gate): when it passes, sets `alias` on the registered-model
    /// version `model` (`name/N`, `name@alias`), e.g. the adapter an endpoint serves.
    pub fn promote(mut self, model: impl Into<String>, alias: impl Into<String>) -> Self {
        if let Some(g) = &mut self.gate {
            g.promote = Some((Some(model.into()), alias.into()));
        }
        self
    }

    /// Adds an LLM judge (e.g. `Judge::correctness("http://127.0.0.1:8000/v1")`): its
    /// yes/no verdict on every answer becomes a metric named after it, its rationale is kept
    /// per row (in the table and the traces).
    pub fn judge(mut self, judge: Judge) -> Self {
        self.judges.push(judge);
        self
    }

    /// Multiple choice: `choices` names a column holding each row's choices (a list of
    /// strings), `answer` the correct one (its index, a list of indices, or its text). The
    /// metrics `acc` and `acc_norm` (lm-evaluation-harness's) score every choice by its
    /// log-likelihood after the prompt; the prompt runs once and the choices as one batch.
    pub fn multiple_choice(mut self, choices: impl Into<String>, answer: impl Into<String>) -> Self {
        self.multiple_choice = Some((choices.into(), answer.into()));
        self
    }

    /// Whether prompts go through the model's chat template (default: yes, as serving
    /// does). Without it the user messages are joined as plain text, the way
    /// lm-evaluation-harness prompts a base model.
    pub fn chat_template(mut self, on: bool) -> Self {
        self.chat_template = on;
        self
    }

    /// What goes between the prompt and a choice or reference when they are scored by
    /// log-likelihood (default: nothing with the chat template, a space without it, as
    /// lm-evaluation-harness's `target_delimiter`).
    pub fn target_delimiter(mut self, d: impl Into<String>) -> Self {
        self.target_delimiter = Some(d.into());
        self
    }

    /// The rows as they will be evaluated.
    pub fn rows(&self) -> Result<Vec<EvalRow>> {
        let mut rows = match &self.multiple_choice {
            Some((choices, answer)) => {
                let mut rows = read_prompts(&self.data)?;
                read_choices(&self.data, choices, answer, &mut rows)?;
                rows
            }
            None => read_rows(&self.data, self.references_column.as_deref())?,
        };
        if let Some(n) = self.limit {
            rows.truncate(n);
        }
        Ok(rows)
    }

    /// Generates every model's answers, scores them, and logs to MLflow when an experiment is set.
    pub fn run(&self) -> Result<EvalResult> {
        if self.models.is_empty() {
            bail!("no model to evaluate: add one with .model(\"name\", \"path, run, registered model or endpoint URL\")");
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if !names.insert(m.name.as_str()) {
                bail!("two models are named `{}`: give each .model(..) its own name", m.name);
            }
        }
        let mut metrics = if self.metrics.is_empty() && self.judges.is_empty() { vec![Metric::parse("exact_match")?] } else { self.metrics.clone() };
        for (index, j) in self.judges.iter().enumerate() {
            if metrics.iter().any(|m| m.name() == j.name) {
                bail!("two metrics or judges are named `{}`: rename the judge with .name(..)", j.name);
            }
            metrics.push(Metric::Judge { name: j.name.clone(), index });
        }
        for m in &metrics {
            m.check()?;
        }
        if let Some(g) = &self.gate {
            if !metrics.iter().any(|m| m.name() == g.metric) {
                bail!(
                    "the gate's metric `{}` is not among the metrics ({}): add it to .metrics(..)",
                    g.metric,
                    metrics.iter().map(Metric::name).collect::<Vec<_>>().join(", ")
                );
            }
            if self.models.len() < 2 {
                bail!("a gate compares a candidate with a base: add two models");
            }
        }
        let rows = self.rows()?;
        if rows.is_empty() {
            bail!("{}: no rows to evaluate", self.data.source());
        }
        let settings = generate::Settings {
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            seed: self.seed,
            temperature: self.temperature,
            batch_size: self.batch_size,
            concurrency: self.concurrency,
            api_key: self.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty())),
            chat_template: self.chat_template,
            target_delimiter: self.target_delimiter.clone().unwrap_or_else(|| if self.chat_template { String::new() } else { " ".into() }),
            generate: metrics.iter().any(Metric::needs_generation),
            choices: metrics.iter().any(|m| matches!(m, Metric::Acc | Metric::AccNorm)),
            references: metrics.iter().any(|m| matches!(m, Metric::Perplexity | Metric::TokenAccuracy)),
        };
        if settings.choices && self.multiple_choice.is_none() {
            bail!("acc and acc_norm score choices: say where they are with .multiple_choice(\"choices column\", \"answer column\")");
        }
        let mut outcomes = Vec::with_capacity(self.models.len());
        let all = generate::answers_all(&self.models, &rows, &settings)?;
        for (spec, mut answers) in self.models.iter().zip(all) {
            for j in &self.judges {
                let (judge_model, verdicts) = judge::judge_all(j, &rows, &answers, settings.api_key.as_deref())
                    .with_context(|| format!("judging model `{}`'s answers", spec.name))?;
                for (a, v) in answers.iter_mut().zip(verdicts) {
                    a.judgments.push((judge_model.clone(), v));
                }
            }
            outcomes.push(ModelOutcome::score(spec.clone(), answers, &rows, &metrics));
        }
        let mut result = EvalResult::new(self.data.source().to_string(), rows, metrics, outcomes, self.bootstrap);
        if let Some(g) = &self.gate {
            result.apply_gate(g, &self.models[self.models.len() - 1])?;
        }
        if let Some(exp) = &self.experiment {
            tracking::log(&mut result, &self.data, exp, self.tracking_uri.as_deref(), self.traces, &settings)?;
        }
        Ok(result)
    }
}

/// The prompts of multiple-choice rows, which have no reference answer of their own: the
/// chat column's messages (all of them), else the prompt column as a user message.
fn read_prompts(data: &Dataset) -> Result<Vec<EvalRow>> {
    let cols = data.column_mapping();
    let (name, chat) = if data.df().column(&cols.messages).is_ok() { (cols.messages.as_str(), true) } else { (cols.prompt.as_str(), false) };
    let c = data.df().column(name).map_err(|_| {
        anyhow::anyhow!(
            "{}: no `{}` or `{}` column for the questions (columns: {:?}); map yours with .columns(..)",
            data.source(),
            cols.messages,
            cols.prompt,
            data.df().get_column_names()
        )
    })?;
    let mut rows = Vec::with_capacity(c.len());
    for i in 0..c.len() {
        let v = crate::data::any_to_json(c.get(i)?);
        let prompt = if chat {
            let v = match v {
                serde_json::Value::String(s) => serde_json::from_str(&s).unwrap_or(serde_json::Value::Null),
                v => v,
            };
            serde_json::from_value::<Vec<Message>>(v)
                .ok()
                .filter(|m| !m.is_empty())
                .with_context(|| format!("{} row {i}: `{name}` is not a list of {{role, content}} messages", data.source()))?
        } else {
            match v {
                serde_json::Value::String(s) if !s.trim().is_empty() => vec![Message::user(s)],
                _ => bail!("{} row {i}: `{name}` must be a non-empty string", data.source()),
            }
        };
        rows.push(EvalRow { prompt, references: vec![], choices: vec![], gold: vec![] });
    }
    Ok(rows)
}

/// Adds each row's choices and gold indices from the columns `choices` (a list of strings)
/// and `answer` (an index, a list of indices, or the correct choice's text).
fn read_choices(data: &Dataset, choices: &str, answer: &str, rows: &mut [EvalRow]) -> Result<()> {
    let col = |name: &str| {
        data.df().column(name).map_err(|_| {
            anyhow::anyhow!("{}: no column `{name}` for multiple choice (columns: {:?})", data.source(), data.df().get_column_names())
        })
    };
    let (cc, ac) = (col(choices)?, col(answer)?);
    for (i, row) in rows.iter_mut().enumerate() {
        let where_ = |what: &str| format!("{} row {i}: `{what}`", data.source());
        let ch: Vec<String> = match crate::data::any_to_json(cc.get(i)?) {
            serde_json::Value::Array(a) => a.into_iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<_>>().unwrap_or_default(),
            serde_json::Value::String(s) => serde_json::from_str(&s).unwrap_or_default(),
            _ => vec![],
        };
        if ch.len() < 2 {
            bail!("{} holds {} choice(s): expected a list of at least two strings", where_(choices), ch.len());
        }
        if ch.iter().any(String::is_empty) {
            bail!("{} has an empty choice (acc_norm divides by its length)", where_(choices));
        }
        let gold: Vec<usize> = match crate::data::any_to_json(ac.get(i)?) {
            serde_json::Value::Number(n) => n.as_u64().map(|g| vec![g as usize]).unwrap_or_default(),
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|g| g as usize)).collect(),
            serde_json::Value::String(s) => match (s.parse::<usize>(), serde_json::from_str::<Vec<usize>>(&s)) {
                (Ok(g), _) => vec![g],
                (_, Ok(gs)) => gs,
                _ => ch.iter().position(|c| *c == s).into_iter().collect(),
            },
            _ => vec![],
        };
        if gold.is_empty() || gold.iter().any(|&g| g >= ch.len()) {
            bail!("{} must name a choice: an index below {}, a list of them, or one of the choices' texts", where_(answer), ch.len());
        }
        row.references = gold.iter().map(|&g| ch[g].clone()).collect();
        row.choices = ch;
        row.gold = gold;
    }
    Ok(())
}

/// Reads the rows of `data`: chat conversations whose last message is the assistant's
/// reference, or instruction prompt/response pairs; `references` names a column of
/// accepted answers (string or list of strings) that replaces the data's own.
pub fn read_rows(data: &Dataset, references: Option<&str>) -> Result<Vec<EvalRow>> {
    use crate::data::Example;
    let (examples, report) = data.examples()?;
    if !report.is_valid() {
        return Err(crate::data::DataError::Invalid(Box::new(report)).into());
    }
    let extra: Option<Vec<Vec<String>>> = match references {
        None => None,
        Some(col) => {
            let c = data.df().column(col).map_err(|_| {
                anyhow::anyhow!("{}: no column `{col}` for the references (columns: {:?})", data.source(), data.df().get_column_names())
            })?;
            let mut out = Vec::with_capacity(c.len());
            for i in 0..c.len() {
                let v = crate::data::any_to_json(c.get(i)?);
                let refs: Vec<String> = match v {
                    serde_json::Value::String(s) => vec![s],
                    serde_json::Value::Array(a) => a.into_iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                    _ => vec![],
                };
                if refs.is_empty() {
                    bail!("{} row {i}: `{col}` holds no reference (expected a string or a list of strings)", data.source());
                }
                out.push(refs);
            }
            Some(out)
        }
    };
    let mut rows = Vec::with_capacity(examples.len());
    for (i, ex) in examples.into_iter().enumerate() {
        let Some(ex) = ex else { continue };
        let (prompt, reference) = match ex {
            Example::Chat(mut msgs) => {
                let last = msgs.pop().expect("validated chat rows end with the assistant");
                (msgs, last.content)
            }
            Example::Instruction { prompt, response } => (vec![Message::user(prompt)], response),
            Example::Text(_) => bail!("{}: text rows have no reference answer; evaluate chat or instruction rows", data.source()),
        };
        let references = match &extra {
            Some(e) => e[i].clone(),
            None => vec![reference],
        };
        rows.push(EvalRow { prompt, references, choices: vec![], gold: vec![] });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn chat_rows_answer_the_conversation_before_the_last_assistant_turn() {
        let msgs = r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"2+2?"},{"role":"assistant","content":"4"}]"#;
        let ds = Dataset::from_polars(df!("messages" => [msgs]).unwrap());
        let rows = read_rows(&ds, None).unwrap();
        assert_eq!(rows[0].prompt.len(), 2);
        assert_eq!(rows[0].question(), "2+2?");
        assert_eq!(rows[0].references, vec!["4".to_string()]);
    }

    #[test]
    fn instruction_rows_with_mapped_columns_and_a_list_of_accepted_answers() {
        let refs = Series::new("answers".into(), [Series::new("".into(), ["Paris", "paris, France"]), Series::new("".into(), ["4"])]);
        let df = DataFrame::new(2, vec![
            Column::new("q".into(), ["Capital of France?", "2+2?"]),
            Column::new("a".into(), ["Paris", "four"]),
            refs.into(),
        ])
        .unwrap();
        let ds = Dataset::from_polars(df).columns(crate::data::Columns::default().prompt("q").response("a"));
        let rows = read_rows(&ds, None).unwrap();
        assert_eq!(rows[1].references, vec!["four".to_string()]);
        let rows = read_rows(&ds, Some("answers")).unwrap();
        assert_eq!(rows[0].references, vec!["Paris".to_string(), "paris, France".to_string()]);
        assert_eq!(rows[0].prompt, vec![Message::user("Capital of France?")]);
        let e = read_rows(&ds, Some("gold")).unwrap_err().to_string();
        assert!(e.contains("no column `gold`") && e.contains("answers"), "{e}");
    }

    #[test]
    fn a_run_without_models_or_with_a_gate_on_a_missing_metric_says_what_to_add() {
        let ds = Dataset::from_polars(df!("prompt" => ["a"], "response" => ["b"]).unwrap());
        let e = Evaluation::new(ds.clone()).run().unwrap_err().to_string();
        assert!(e.contains("no model to evaluate"), "{e}");
        let e = Evaluation::new(ds.clone()).model("a", "x").model("a", "y").run().unwrap_err().to_string();
        assert!(e.contains("two models are named `a`"), "{e}");
        let e = Evaluation::new(ds.clone()).model("a", "x").model("b", "y").gate("bleu", 1.0).run().unwrap_err().to_string();
        assert!(e.contains("the gate's metric `bleu` is not among the metrics (exact_match)"), "{e}");
        let e = Evaluation::new(ds).model("a", "x").metrics(["rogue"]).run().unwrap_err().to_string();
        assert!(e.contains("unknown metric `rogue`"), "{e}");
    }
}
