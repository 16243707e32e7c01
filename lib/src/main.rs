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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => {
            use tunebook::display::Render;
            println!("{}", tunebook::info().text_plain());
        }
    }
    std::process::ExitCode::SUCCESS
}
