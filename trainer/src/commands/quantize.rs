//! `trainer quantize`: a Hugging Face checkpoint to a bitsandbytes NF4 one.

use super::CliError;
use graft_models::quantized::quantize_checkpoint;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (f32, bf16 or f16 safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Output directory for the 4-bit checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Values per absmax block (bitsandbytes' default: 64).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let r = graft_models::write_dir_atomically(&args.out, |tmp| {
        quantize_checkpoint(&args.model, tmp, args.block_size)
    })?;
    if let Some(note) = graft_models::unexpected_note(&args.model, &r.unexpected) {
        println!("{note}");
    }
    println!(
        "quantized {} linear weights ({} parameters) to NF4 at {:.3} bits per parameter; kept {} tensors; wrote {} ({:.1} MB)",
        r.quantized_tensors,
        r.quantized_params,
        r.bits_per_param(),
        r.kept_tensors,
        args.out.join("model.safetensors").display(),
        r.output_bytes as f64 / 1e6
    );
    Ok(())
}
