//! The logic behind `tunebook eval` (the CLI parses arguments and calls this).

use super::{Evaluation, Metric};
use crate::data::cli::SourceArgs;
use crate::display::Render;
use anyhow::{Context, Result, bail};

/// `tunebook eval`'s arguments (the data source and its column mapping are set by the caller).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EvalArgs {
    #[arg(skip)]
    pub data: String,
    #[arg(skip)]
    pub source: SourceArgs,
    /// NAME=SOURCE (repeat; the first is the base): a model folder, .gguf, run, PEFT adapter, models:/name/N, name@alias, or http://host:port/v1.
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Metrics (repeat or comma-separate): exact_match, prefix_match, f1, rouge1, rouge2, rougeL, rougeLsum (+_stem), bleu, bleu_hf, chrf, chrf++, answer_length, latency; acc, acc_norm (multiple choice); perplexity, token_accuracy (of the references).
    #[arg(long = "metric")]
    pub metrics: Vec<String>,
    /// A column of accepted answers (string or list of strings) replacing the data's own.
    #[arg(long)]
    pub references: Option<String>,
    /// Multiple choice: the column holding each row's choices (with --answer; metrics acc, acc_norm).
    #[arg(long, requires = "answer")]
    pub choices: Option<String>,
    /// Multiple choice: the column holding the correct choice (index, indices or text).
    #[arg(long, requires = "choices")]
    pub answer: Option<String>,
    /// An OpenAI-compatible endpoint (http://host:port/v1) whose model judges every answer's correctness against the reference (MLflow's `correctness` judge).
    #[arg(long)]
    pub judge: Option<String>,
    /// The judge endpoint's model (default: its only one).
    #[arg(long, requires = "judge")]
    pub judge_model: Option<String>,
    /// Most tokens the judge may write per verdict.
    #[arg(long, requires = "judge", default_value_t = 512)]
    pub judge_max_tokens: usize,
    /// A guideline the judge checks every answer against (repeat; MLflow's `guidelines` judge).
    #[arg(long, requires = "judge")]
    pub guideline: Vec<String>,
    /// Send prompts as plain text instead of through the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// A stop string (repeat).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Only the first N rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sequences decoded together by a local model (answers do not depend on it).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Log to this MLflow experiment (one run per model, a parent run with the differences).
    #[arg(long)]
    pub experiment: Option<String>,
    /// The MLflow server (default: MLFLOW_TRACKING_URI).
    #[arg(long)]
    pub tracking_uri: Option<String>,
    /// A file holding the API key for endpoint models (default: OPENAI_API_KEY).
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// METRIC:MIN_DELTA: pass only when the last model beats the first by at least MIN_DELTA.
    #[arg(long)]
    pub gate: Option<String>,
    /// With --gate: set this alias on the candidate's registered-model version when the gate passes.
    #[arg(long)]
    pub promote_to: Option<String>,
    /// Write the per-row results (.csv, .jsonl or .parquet).
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
}

/// Runs the evaluation, prints the summary; returns whether the gate (if any) passed.
pub fn run_eval_cli(a: &EvalArgs) -> Result<bool> {
    let data = crate::data::cli::open(&a.data, &a.source)?;
    let mut ev = Evaluation::new(data).max_new_tokens(a.max_new_tokens).batch_size(a.batch_size).stop(a.stop.clone());
    for m in &a.models {
        let Some((name, source)) = m.split_once('=') else {
            bail!("--model {m:?}: expected NAME=SOURCE (e.g. --model base=HuggingFaceTB/SmolLM2-135M-Instruct --model tuned=runs/dates-1)");
        };
        ev = ev.model(name, source);
    }
    if !a.metrics.is_empty() {
        let metrics: Vec<Metric> = a.metrics.iter().flat_map(|m| m.split(',')).map(|m| Metric::parse(m.trim())).collect::<Result<_>>()?;
        ev = ev.metrics(metrics);
    }
    if let Some(c) = &a.references {
        ev = ev.references(c);
    }
    if let (Some(c), Some(g)) = (&a.choices, &a.answer) {
        ev = ev.multiple_choice(c, g);
    }
    if let Some(url) = &a.judge {
        let with_model = |mut j: super::Judge| {
            j.max_tokens = a.judge_max_tokens;
            match &a.judge_model {
                Some(m) => j.model(m),
                None => j,
            }
        };
        ev = ev.judge(with_model(super::Judge::correctness(url)));
        if !a.guideline.is_empty() {
            ev = ev.judge(with_model(super::Judge::guidelines(url, a.guideline.clone())));
        }
    }
    if a.no_chat_template {
        ev = ev.chat_template(false);
    }
    if let Some(n) = a.limit {
        ev = ev.limit(n);
    }
    if let Some(e) = &a.experiment {
        ev = ev.experiment(e);
    }
    if let Some(u) = &a.tracking_uri {
        ev = ev.tracking_uri(u);
    }
    if let Some(f) = &a.api_key_file {
        let keys = crate::serve::read_api_keys(f)?;
        ev = ev.api_key(&keys[0]);
    }
    if let Some(g) = &a.gate {
        let Some((metric, delta)) = g.rsplit_once(':') else { bail!("--gate {g:?}: expected METRIC:MIN_DELTA (e.g. exact_match:0.05)") };
        let delta: f64 = delta.parse().with_context(|| format!("--gate {g:?}: {delta:?} is not a number"))?;
        ev = ev.gate(metric, delta);
        if let Some(alias) = &a.promote_to {
            ev = ev.promote_to(alias);
        }
    } else if a.promote_to.is_some() {
        bail!("--promote-to needs --gate METRIC:MIN_DELTA (promotion happens only when the gate passes)");
    }
    let result = ev.run()?;
    println!("{}", result.text_plain());
    if let Some(out) = &a.output {
        write_frame(&mut result.rows()?, out)?;
        println!("wrote the per-row results to {}", out.display());
    }
    Ok(result.gate_passed() != Some(false))
}

fn write_frame(df: &mut polars::prelude::DataFrame, path: &std::path::Path) -> Result<()> {
    use polars::prelude::*;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut buf = Vec::new();
    match ext {
        "csv" => CsvWriter::new(&mut buf).finish(df)?,
        "jsonl" | "json" => JsonWriter::new(&mut buf).with_json_format(JsonFormat::JsonLines).finish(df)?,
        "parquet" => {
            ParquetWriter::new(&mut buf).finish(df)?;
        }
        _ => bail!("--output {}: use a .csv, .jsonl or .parquet file", path.display()),
    }
    crate::files::write_atomic(path, &buf)?;
    Ok(())
}
