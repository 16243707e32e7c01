//! Training data: load it into polars, check it, format it with the model's
//! chat template, tokenize it with loss masks, and pack it into windows.
//!
//! ```no_run
//! use tunebook::data::{Dataset, PackOptions, PrepareOptions};
//! use tunebook::tokenize::Tokenizer;
//! let ds = Dataset::from_delta("/data/chats")?;           // or from_jsonl, from_parquet, ...
//! let report = ds.validate()?;                            // rows × problems, shown as a table
//! let tok = Tokenizer::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let stats = ds.stats(&tok, Some(2048))?;                // p50/p95/max tokens, warnings
//! let (train, eval) = ds.split(0.1, 42);
//! let packed = train.tokenize(&tok, &PrepareOptions::default())?.pack(&PackOptions::new(2048).shuffle(42));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Owns: sources (Delta with time travel, JSONL, Parquet, CSV, folders of
//! `.txt`, a polars DataFrame) and writing Delta; task formats (chat,
//! instruction, text) with detection and column mapping; validation against the
//! product's data rules; token statistics; loss masks; packing with segment ids
//! and per-example positions; deterministic split and shuffle; previews.
//!
//! Must never: train on prompt tokens by default, let a packed example see
//! another (segment ids and positions are the contract with the model engine),
//! add a second BOS to templated text, or panic on malformed input.

mod arrow_bridge;
pub mod cli;
mod delta;
mod display;
mod pack;
mod prepare;
mod source;
mod validate;

pub use delta::{DeltaVersion, WriteMode};
pub use display::{Preview, TokenHistogram};
pub use pack::{PackOptions, Packed, Window};
pub use prepare::{ChatLoss, OverLength, PrepareOptions, Stats, TokenizedExample, Tokenized};
pub use validate::{Problem, Rule, ValidationReport};
pub(crate) use validate::{Example, any_to_json};

use polars::prelude::*;

/// What went wrong loading, writing or preparing data. Every message names the
/// file (and row or line where there is one) and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file or folder.
        path: String,
        /// What failed.
        message: String,
    },
    /// A file is not in the format its name says.
    #[error("{path}, line {line}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A Delta table could not be read or written.
    #[error("Delta table {path}: {message}")]
    Delta {
        /// The table location.
        path: String,
        /// What failed.
        message: String,
    },
    /// polars failed.
    #[error("polars: {0}")]
    Polars(String),
    /// Arrow conversion failed.
    #[error("arrow: {0}")]
    Arrow(String),
    /// Strict validation found problems (the report lists them all).
    #[error("{}", .0.summary())]
    Invalid(Box<ValidationReport>),
    /// Tokenizer or chat template failure.
    #[error(transparent)]
    Tokenize(#[from] crate::tokenize::TokenizeError),
    /// An option has a value that cannot work.
    #[error("{0}")]
    Option(String),
    /// The user interrupted the work (notebook interrupt or Ctrl-C in the kernel).
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

impl From<PolarsError> for DataError {
    fn from(e: PolarsError) -> Self {
        DataError::Polars(e.to_string())
    }
}

/// The three kinds of training data the product accepts, and what a run learns
/// from them (the product's `task_type`: `CHAT_COMPLETION`, `INSTRUCTION_FINETUNE`,
/// `CONTINUED_PRETRAIN`, written `chat_completion`, `instruction_finetune`, `continued_pretrain` in
/// `CONFIG.toml`; the upper-case names and `chat`, `instruction`, `text` are accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub enum Task {
    /// Conversations: a `messages` list of `{role, content}`; formatted with
    /// the model's chat template; loss on assistant turns.
    #[default]
    #[serde(rename = "chat_completion", alias = "CHAT_COMPLETION", alias = "chat", alias = "ChatCompletion", alias = "Chat")]
    Chat,
    /// `prompt` plus `response` (or `completion`), not templated; loss on the response.
    #[serde(rename = "instruction_finetune", alias = "INSTRUCTION_FINETUNE", alias = "instruction", alias = "InstructionFinetune", alias = "Instruction")]
    Instruction,
    /// Raw text (continued pretraining): a `text` column or `.txt` files; loss on everything.
    #[serde(rename = "continued_pretrain", alias = "CONTINUED_PRETRAIN", alias = "text", alias = "ContinuedPretrain", alias = "Text")]
    Text,
}

impl Task {
    /// `chat`, `instruction` or `text`.
    pub fn name(self) -> &'static str {
        match self {
            Task::Chat => "chat",
            Task::Instruction => "instruction",
            Task::Text => "text",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.to_ascii_lowercase().as_str() {
            "chat" | "chat_completion" => Ok(Task::Chat),
            "instruction" | "instruction_finetune" => Ok(Task::Instruction),
            "text" | "continued_pretrain" | "cpt" => Ok(Task::Text),
            other => Err(DataError::Option(format!("unknown task `{other}`: use chat, instruction or text"))),
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which columns hold the fields of each task. Defaults: `messages`, `prompt`,
/// `response` (or `completion`), `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// Chat conversations (list of `{role, content}`, or a JSON string of one).
    pub messages: String,
    /// Instruction prompt.
    pub prompt: String,
    /// Instruction response; `None` picks `response`, else `completion`.
    pub response: Option<String>,
    /// Raw text.
    pub text: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns { messages: "messages".into(), prompt: "prompt".into(), response: None, text: "text".into() }
    }
}

impl Columns {
    /// Uses `name` as the chat messages column.
    pub fn messages(mut self, name: impl Into<String>) -> Self {
        self.messages = name.into();
        self
    }
    /// Uses `name` as the instruction prompt column.
    pub fn prompt(mut self, name: impl Into<String>) -> Self {
        self.prompt = name.into();
        self
    }
    /// Uses `name` as the instruction response column.
    pub fn response(mut self, name: impl Into<String>) -> Self {
        self.response = Some(name.into());
        self
    }
    /// Uses `name` as the text column.
    pub fn text(mut self, name: impl Into<String>) -> Self {
        self.text = name.into();
        self
    }
}

/// A training data set: a polars DataFrame plus how to read it (task and columns).
#[derive(Debug, Clone)]
pub struct Dataset {
    df: DataFrame,
    source: String,
    task: Option<Task>,
    columns: Columns,
    /// Problems only visible while reading (a number among strings in JSONL,
    /// which polars turns into text), by row of `df`.
    load_problems: Vec<validate::Problem>,
    /// For line-based files (JSONL, CSV): the file and 1-based line of each row.
    lines: Option<std::sync::Arc<RowLines>>,
}

/// Where each row of a line-based file starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowLines {
    /// The files read, in order.
    pub files: Vec<String>,
    /// Per row: index into `files` and 1-based line number.
    pub at: Vec<(u32, u32)>,
}

impl Dataset {
    /// Wraps a DataFrame you built or transformed in polars.
    pub fn from_polars(df: DataFrame) -> Self {
        Dataset { df, source: "DataFrame".into(), task: None, columns: Columns::default(), load_problems: vec![], lines: None }
    }

    pub(crate) fn with_source(df: DataFrame, source: impl Into<String>) -> Self {
        Dataset { df, source: source.into(), task: None, columns: Columns::default(), load_problems: vec![], lines: None }
    }

    /// Records the file and line of each row (line-based sources); ignored unless
    /// there is one entry per row.
    pub(crate) fn with_lines(mut self, lines: RowLines) -> Self {
        if lines.at.len() == self.df.height() {
            self.lines = Some(std::sync::Arc::new(lines));
        }
        self
    }

    /// `data.jsonl line 7`: where an editor shows row `row`, for line-based files.
    pub fn line_of(&self, row: usize) -> Option<String> {
        let l = self.lines.as_ref()?;
        let &(file, line) = l.at.get(row)?;
        Some(format!("{} line {line}", l.files.get(file as usize)?))
    }

    /// Sets the task explicitly instead of detecting it from the columns.
    pub fn task(mut self, task: Task) -> Self {
        self.task = Some(task);
        self
    }

    /// Maps task fields to columns with other names.
    pub fn columns(mut self, columns: Columns) -> Self {
        self.columns = columns;
        self
    }

    /// Where the data came from (a path, or `DataFrame`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The data as a polars DataFrame.
    pub fn df(&self) -> &DataFrame {
        &self.df
    }

    /// The DataFrame, consuming the dataset.
    pub fn into_df(self) -> DataFrame {
        self.df
    }

    /// A lazy polars query over the data, to filter and transform in a cell;
    /// wrap the collected result with [`Dataset::from_polars`].
    pub fn lazy(&self) -> LazyFrame {
        self.df.clone().lazy()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.df.height()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.df.height() == 0
    }

    /// The column mapping in use.
    pub fn column_mapping(&self) -> &Columns {
        &self.columns
    }

    /// The task: the one set with [`Dataset::task`], or detected from the
    /// columns (`messages` → chat; `prompt` with `response`/`completion` →
    /// instruction; `text` → text).
    pub fn detect_task(&self) -> Result<Task, DataError> {
        if let Some(t) = self.task {
            return Ok(t);
        }
        let has = |c: &str| self.df.column(c).is_ok();
        let c = &self.columns;
        if has(&c.messages) {
            return Ok(Task::Chat);
        }
        let response = c.response.as_deref().map(has).unwrap_or_else(|| has("response") || has("completion"));
        if has(&c.prompt) && response {
            return Ok(Task::Instruction);
        }
        if has(&c.text) {
            return Ok(Task::Text);
        }
        Err(DataError::Option(format!(
            "cannot tell the task from the columns [{}]: expected `{}` (chat), `{}` + `response`/`completion` (instruction) or `{}` (text); set .task(..) and map your columns with .columns(Columns::default().messages(\"..\"))",
            self.df.get_column_names().iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "),
            c.messages,
            c.prompt,
            c.text
        )))
    }

    /// Rows in a deterministic random order given by `seed`.
    pub fn shuffle(&self, seed: u64) -> Dataset {
        let idx = permutation(self.len(), seed);
        self.take_rows(&idx)
    }

    /// A deterministic train/eval split: rows are shuffled by `seed`, then
    /// `eval_fraction` of them (rounded, at least one when the fraction is
    /// positive and there are two rows or more) go to the eval set.
    pub fn split(&self, eval_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let n = self.len();
        let frac = if eval_fraction.is_finite() { eval_fraction.clamp(0.0, 1.0) } else { 0.0 };
        let mut n_eval = (n as f64 * frac).round() as usize;
        if frac > 0.0 && n >= 2 {
            n_eval = n_eval.clamp(1, n - 1);
        }
        let idx = permutation(n, seed);
        let (eval_idx, train_idx) = idx.split_at(n_eval.min(n));
        let mut train_idx = train_idx.to_vec();
        let mut eval_idx = eval_idx.to_vec();
        train_idx.sort_unstable();
        eval_idx.sort_unstable();
        (self.take_rows(&train_idx), self.take_rows(&eval_idx))
    }

    fn take_rows(&self, idx: &[u32]) -> Dataset {
        let ca = IdxCa::from_vec("idx".into(), idx.iter().map(|&i| i as IdxSize).collect());
        let df = self.df.take(&ca).unwrap_or_else(|_| self.df.clear());
        let mut load_problems = vec![];
        if !self.load_problems.is_empty() {
            let mut by_row: std::collections::HashMap<usize, Vec<&validate::Problem>> = std::collections::HashMap::new();
            for p in &self.load_problems {
                if let Some(r) = p.row {
                    by_row.entry(r).or_default().push(p);
                }
            }
            for (new_row, &old_row) in idx.iter().enumerate() {
                for p in by_row.get(&(old_row as usize)).into_iter().flatten() {
                    load_problems.push(validate::Problem { row: Some(new_row), ..(*p).clone() });
                }
            }
        }
        let lines = self.lines.as_ref().map(|l| {
            std::sync::Arc::new(RowLines { files: l.files.clone(), at: idx.iter().filter_map(|&i| l.at.get(i as usize).copied()).collect() })
        });
        Dataset { df, source: self.source.clone(), task: self.task, columns: self.columns.clone(), load_problems, lines }
    }
}

/// A deterministic permutation of `0..n` (Fisher-Yates driven by splitmix64,
/// so the order never changes across library versions).
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests;
