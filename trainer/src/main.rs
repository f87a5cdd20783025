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
    /// Train: QLoRA / LoRA / full fine-tuning from a TOML configuration.
    /// Without --config it runs the embedded default (a tiny Llama
    /// instruction-tuned in minutes, with held-out accuracy before and after).
    /// `trainer run --help` lists every configuration key with its default.
    Run(commands::run::Args),
    /// Generate text from a prompt (greedy or sampled) with a key/value cache.
    Generate(commands::generate::Args),
    /// Eval loss, and exact-match accuracy of greedy answers, on a
    /// configuration's eval set.
    Eval(commands::eval::Args),
    /// Show the training step `run` would compile: nodes, fusion groups and
    /// the memory plan's peak, unfused and fused (`--dump`: every node).
    Plan(commands::plan::Args),
    /// Merge a LoRA adapter into its base and write a plain HF checkpoint.
    Merge(commands::merge::Args),
    /// Compute the logits of a token sequence and write them to a safetensors
    /// file (tensor `logits`, f32 [tokens, vocab]), for parity checks against
    /// other frameworks.
    Logits(commands::logits::Args),
    /// Quantize a Hugging Face checkpoint to bitsandbytes NF4 (double
    /// quantization), streaming one tensor at a time; transformers loads the
    /// result with its bitsandbytes integration.
    Quantize(commands::quantize::Args),
    /// Regenerate the embedded default (world, tokenizer, pretrained tiny
    /// Llama, instruction data) from nothing.
    MakeDefault(commands::make_default::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    graft_engine::alloc::retain_freed_memory();
    // A GRAFT_CPU this CPU cannot honour is an error before any work.
    if let Err(e) = graft_engine::kernels::gemm::Path::requested() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Logits(args) => commands::logits::run(args),
        Command::Quantize(args) => commands::quantize::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::MakeDefault(args) => commands::make_default::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
