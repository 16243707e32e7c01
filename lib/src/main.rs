//! The `tunebook` command line.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tunebook", version, about = "Fine-tune LLMs from a notebook, a REPL or this CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the version and the compute devices this build can use.
    Info,
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => {
            use tunebook::display::Render;
            println!("{}", tunebook::info().text_plain());
        }
        Command::Generate { model, prompt, chat, max_tokens, temperature, seed, ignore_eos } => {
            let args = tunebook::model::GenerateArgs { model, prompt, chat, max_tokens, temperature, seed, ignore_eos };
            if let Err(e) = tunebook::model::run_generate_cli(&args) {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
