//! `trainer`: Graft's command-line tool.

mod commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Graft: train adapters on large language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute the logits of a token sequence and write them to a safetensors
    /// file (tensor `logits`, f32 [tokens, vocab]), for parity checks against
    /// other frameworks.
    Logits(commands::logits::Args),
    /// Quantize a Hugging Face checkpoint to bitsandbytes NF4 (double
    /// quantization), streaming one tensor at a time; transformers loads the
    /// result with its bitsandbytes integration.
    Quantize(commands::quantize::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(args) => commands::logits::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
