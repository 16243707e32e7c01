//! The logic behind `tunebook data ...` (the CLI only parses arguments and
//! calls these; a notebook can call them too).

use super::{Columns, DataError, Dataset, PackOptions, PrepareOptions, Task};
use crate::display::Render;
use crate::tokenize::Tokenizer;
use std::time::Instant;

/// Column mapping and task given on the command line.
#[derive(Debug, Clone, Default)]
pub struct SourceArgs {
    /// `chat`, `instruction` or `text`; detected when `None`.
    pub task: Option<String>,
    /// Chat messages column.
    pub messages: Option<String>,
    /// Instruction prompt column.
    pub prompt: Option<String>,
    /// Instruction response column.
    pub response: Option<String>,
    /// Text column.
    pub text: Option<String>,
}

/// Opens `source` with the task and column mapping of `args`.
pub fn open(source: &str, args: &SourceArgs) -> Result<Dataset, DataError> {
    let mut ds = Dataset::open(source)?;
    let mut cols = Columns::default();
    if let Some(c) = &args.messages {
        cols = cols.messages(c);
    }
    if let Some(c) = &args.prompt {
        cols = cols.prompt(c);
    }
    if let Some(c) = &args.response {
        cols = cols.response(c);
    }
    if let Some(c) = &args.text {
        cols = cols.text(c);
    }
    ds = ds.columns(cols);
    if let Some(t) = &args.task {
        ds = ds.task(t.parse::<Task>()?);
    }
    Ok(ds)
}

/// `tunebook data validate`: prints the report; returns whether the data is valid.
pub fn validate(source: &str, args: &SourceArgs) -> Result<bool, DataError> {
    let ds = open(source, args)?;
    let report = ds.validate()?;
    println!("{}", report.text_plain());
    Ok(report.is_valid())
}

/// `tunebook data stats`: prints token statistics and warnings for `model`
/// (a model folder, tokenizer.json or GGUF file).
pub fn stats(source: &str, args: &SourceArgs, model: &str, context_length: Option<usize>) -> Result<(), DataError> {
    let ds = open(source, args)?;
    let tok = Tokenizer::load(model)?;
    let stats = ds.stats(&tok, context_length)?;
    println!("{}", stats.text_plain());
    println!("{}", stats.histogram().text_plain());
    Ok(())
}

/// Timings of one `prepare` run.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareReport {
    /// Rows read.
    pub rows: usize,
    /// Packed windows.
    pub windows: usize,
    /// Tokens in examples.
    pub tokens: usize,
    /// Seconds reading.
    pub read_s: f64,
    /// Seconds validating.
    pub validate_s: f64,
    /// Seconds templating, tokenizing and masking.
    pub tokenize_s: f64,
    /// Seconds packing.
    pub pack_s: f64,
}

impl PrepareReport {
    /// Total seconds.
    pub fn total_s(&self) -> f64 {
        self.read_s + self.validate_s + self.tokenize_s + self.pack_s
    }
}

/// `tunebook data prepare`: read → validate → template → tokenize → pack, timed.
pub fn prepare(source: &str, args: &SourceArgs, model: &str, context_length: usize, seed: u64) -> Result<PrepareReport, DataError> {
    let tok = Tokenizer::load(model)?;
    let t0 = Instant::now();
    let ds = open(source, args)?;
    let read_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (examples, report) = ds.examples()?;
    let validate_s = t1.elapsed().as_secs_f64();
    if !report.is_valid() {
        eprintln!("{}", report.summary());
    }
    let t2 = Instant::now();
    let tokenized = ds.tokenize_examples(&examples, &report, &tok, &PrepareOptions::default())?;
    let tokenize_s = t2.elapsed().as_secs_f64();
    let t3 = Instant::now();
    let packed = tokenized.pack(&PackOptions::new(context_length).shuffle(seed));
    let pack_s = t3.elapsed().as_secs_f64();
    Ok(PrepareReport {
        rows: ds.len(),
        windows: packed.windows.len(),
        tokens: packed.real_tokens,
        read_s,
        validate_s,
        tokenize_s,
        pack_s,
    })
}
