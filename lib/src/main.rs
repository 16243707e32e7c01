//! The `tunebook` command line.

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tunebook",
    version,
    about = "Fine-tune LLMs from a notebook, a REPL or this CLI",
    after_help = "Exit status: 0 done; 1 the answer is no (`data validate` found invalid rows, a run failed); \
                  2 error, printed with its causes (also for bad arguments); 3 a run stopped on request."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the version and the compute devices this build can use.
    Info,
    /// Check, measure and prepare training data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate text with a model (a local directory, a .gguf file, or a Hugging Face id in the local cache).
    Generate {
        /// Model directory, .gguf file, or Hugging Face id (org/name) found in the local cache.
        #[arg(long)]
        model: String,
        /// Plain text to continue.
        #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
        prompt: Option<String>,
        /// A user message, sent through the model's chat template.
        #[arg(long)]
        chat: Option<String>,
        /// Most new tokens.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sampler seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Do not stop at end-of-sequence tokens (benchmarks).
        #[arg(long)]
        ignore_eos: bool,
    },
    /// Serve a model (and LoRA adapters) over an OpenAI-compatible HTTP API until SIGINT/SIGTERM.
    Serve(tunebook::serve::ServeArgs),
    /// Fine-tune: `train CONFIG.toml` runs here with a progress bar (`--detach`: in a
    /// background worker); `train --run-dir DIR` runs or resumes the run in DIR.
    Train {
        /// Run configuration (every FineTune option has a key).
        config: Option<std::path::PathBuf>,
        /// Run (or resume) the existing run in this directory.
        #[arg(long, conflicts_with = "config")]
        run_dir: Option<std::path::PathBuf>,
        /// Start a background worker and return.
        #[arg(long)]
        detach: bool,
    },
    /// Write the bundled sample task (dates to rewrite as YYYY-MM-DD) into DIR.
    Sample {
        /// Output directory.
        dir: std::path::PathBuf,
        /// Training examples.
        #[arg(long, default_value_t = 400)]
        train: usize,
        /// Held-out examples.
        #[arg(long, default_value_t = 100)]
        eval: usize,
    },
    /// Evaluate models on held-out data: generate answers (local models through the
    /// serving engine, or any OpenAI-compatible endpoint), score them, compare each model
    /// with the first, and log to MLflow. Exits 1 when a --gate fails.
    Eval {
        /// Evaluation data: chat rows (the last assistant message is the reference) or prompt/response rows.
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        args: tunebook::eval::cli::EvalArgs,
    },
    /// Export a model for llama.cpp / Ollama (GGUF: merged or adapter-only, quantized,
    /// with a Modelfile) or as a merged Hugging Face folder (transformers, vLLM, TGI).
    Export(tunebook::export::ExportArgs),
    /// List, inspect and cancel fine-tuning runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Run a local MLflow tracking server (sqlite and artifacts in a data directory).
    #[command(subcommand)]
    Mlflow(MlflowCommand),
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Every run, newest first.
    List,
    /// Status, progress, checkpoints and recent events of a run.
    Show {
        /// Run name or directory.
        run: String,
    },
    /// Checkpoint and stop a run.
    Cancel {
        /// Run name or directory.
        run: String,
    },
    /// Send a run's metrics, status and model to MLflow (a run trained offline, or
    /// one whose server was away); sends nothing twice.
    Sync {
        /// Run name or directory.
        run: String,
        /// MLflow tracking URI (default: the run's own, then MLFLOW_TRACKING_URI).
        #[arg(long)]
        tracking_uri: Option<String>,
    },
}

#[derive(Subcommand)]
enum MlflowCommand {
    /// Start a local MLflow server (or find the running one) and print its URL.
    Up {
        /// Port on 127.0.0.1 (default: a free one).
        #[arg(long)]
        port: Option<u16>,
        /// Where the database, artifacts and log go (default: $TUNEBOOK_MLFLOW_DIR or ~/.tunebook/mlflow).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Stop the local MLflow server.
    Down {
        /// The data directory given to `up`.
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
}

/// Where the data is and how to read it.
#[derive(Args)]
struct Source {
    /// A Delta table folder (append @vN for a version), a .jsonl/.parquet/.csv file or folder, or a folder of .txt files.
    source: String,
    /// chat, instruction or text (detected from the columns when absent).
    #[arg(long)]
    task: Option<String>,
    /// Column holding chat messages.
    #[arg(long)]
    messages: Option<String>,
    /// Column holding instruction prompts.
    #[arg(long)]
    prompt: Option<String>,
    /// Column holding instruction responses.
    #[arg(long)]
    response: Option<String>,
    /// Column holding raw text.
    #[arg(long)]
    text: Option<String>,
}

impl Source {
    fn args(&self) -> tunebook::data::cli::SourceArgs {
        tunebook::data::cli::SourceArgs {
            task: self.task.clone(),
            messages: self.messages.clone(),
            prompt: self.prompt.clone(),
            response: self.response.clone(),
            text: self.text.clone(),
        }
    }
}

#[derive(Subcommand)]
enum DataCommand {
    /// Validate data against the product's rules; exits non-zero when any row is invalid.
    Validate(Source),
    /// Token statistics for a model: p50/p95/max, totals, over-long examples, warnings.
    Stats {
        #[command(flatten)]
        source: Source,
        /// A model folder, tokenizer.json or .gguf file.
        #[arg(long)]
        model: String,
        /// Context length (default: the model's).
        #[arg(long)]
        context_length: Option<usize>,
    },
    /// Read, validate, template, tokenize and pack; prints timings (used by bench/).
    Prepare {
        #[command(flatten)]
        source: Source,
        /// A model folder, tokenizer.json or .gguf file.
        #[arg(long)]
        model: String,
        /// Tokens per packed window.
        #[arg(long, default_value_t = 2048)]
        context_length: usize,
        /// Shuffle seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Exit status of a command that could not do its job: the error is printed with its
/// whole chain of causes (`error: what failed: why: ...`).
const EXIT_ERROR: u8 = 2;
/// Exit status of a command that worked and whose answer is "no": `data validate`
/// found invalid rows, or a training run failed.
const EXIT_NEGATIVE: u8 = 1;

fn main() -> ExitCode {
    tunebook::model::ops::tune_cpu_runtime();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use tunebook::display::Render;
    match cli.command {
        Command::Info => println!("{}", tunebook::info().text_plain()),
        Command::Data(DataCommand::Validate(src)) => {
            if !tunebook::data::cli::validate(&src.source, &src.args())? {
                return Ok(ExitCode::from(EXIT_NEGATIVE));
            }
        }
        Command::Data(DataCommand::Stats { source, model, context_length }) => {
            tunebook::data::cli::stats(&source.source, &source.args(), &model, context_length)?
        }
        Command::Data(DataCommand::Prepare { source, model, context_length, seed }) => {
            let r = tunebook::data::cli::prepare(&source.source, &source.args(), &model, context_length, seed)?;
            println!(
                "rows={} windows={} tokens={} read_s={:.3} validate_s={:.3} tokenize_s={:.3} pack_s={:.3} total_s={:.3} rows_per_s={:.0}",
                r.rows,
                r.windows,
                r.tokens,
                r.read_s,
                r.validate_s,
                r.tokenize_s,
                r.pack_s,
                r.total_s(),
                r.rows as f64 / r.total_s().max(1e-9)
            );
        }
        Command::Generate { model, prompt, chat, max_tokens, temperature, seed, ignore_eos } => {
            let args = tunebook::model::GenerateArgs { model, prompt, chat, max_tokens, temperature, seed, ignore_eos };
            tunebook::model::run_generate_cli(&args)?;
        }
        Command::Serve(args) => tunebook::serve::run_serve_cli(args)?,
        Command::Train { config, run_dir, detach } => {
            let code = tunebook::train::cli::train(config.as_deref(), run_dir.as_deref(), detach)?;
            return Ok(ExitCode::from(code as u8));
        }
        Command::Sample { dir, train, eval } => {
            tunebook::train::sample::write(&dir, train, eval)?;
            println!("wrote {}/dates-train.jsonl ({train} rows) and dates-eval.jsonl ({eval} rows)", dir.display());
        }
        Command::Eval { source, mut args } => {
            args.data = source.source.clone();
            args.source = source.args();
            if !tunebook::eval::cli::run_eval_cli(&args)? {
                return Ok(ExitCode::from(EXIT_NEGATIVE));
            }
        }
        Command::Export(args) => tunebook::export::run_cli(&args)?,
        Command::Runs(cmd) => match cmd {
            RunsCommand::List => tunebook::train::cli::list()?,
            RunsCommand::Show { run } => tunebook::train::cli::show(&run)?,
            RunsCommand::Cancel { run } => tunebook::train::cli::cancel(&run)?,
            RunsCommand::Sync { run, tracking_uri } => tunebook::train::cli::sync(&run, tracking_uri.as_deref())?,
        },
        Command::Mlflow(cmd) => mlflow(cmd)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn mlflow(cmd: MlflowCommand) -> anyhow::Result<()> {
    use tunebook::mlflow::server;
    match cmd {
        MlflowCommand::Up { port, data_dir } => {
            let (s, already) = server::up(data_dir.as_deref(), port)?;
            println!("{}", server::up_message(&s, already));
        }
        MlflowCommand::Down { data_dir } => match server::down(data_dir.as_deref())? {
            Some(url) => println!("stopped the MLflow server at {url}"),
            None => println!("no local MLflow server was running"),
        },
    }
    Ok(())
}
