//! `trainer merge`: fold a LoRA adapter into its base model and write a
//! plain Hugging Face checkpoint (from an NF4 base: dequantized, merged,
//! written in bf16).

use super::CliError;
use graft_engine::ir::DType;
use graft_models::{CausalLm, LoadOptions, Lora};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (plain or bitsandbytes NF4).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the written weights (default: bf16 for an NF4 base, else
    /// the base's own: config.json's `torch_dtype`, or as stored).
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    dtype: Option<String>,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let mut model = CausalLm::load_with(
        &args.model,
        &LoadOptions {
            dtype: DType::F32,
            quantize: None,
        },
    )?;
    if let Some(note) = graft_models::unexpected_note(&args.model, &model.unexpected) {
        println!("{note}");
    }
    let lora = Lora::load(&args.adapter, &model.config)?;
    let dtype = match args.dtype.as_deref() {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some(_) => DType::BF16,
        None if model.config.quantization.is_some() => DType::BF16,
        None => match model.config.torch_dtype.as_deref() {
            Some("float32") => DType::F32,
            Some("float16") => DType::F16,
            Some(_) => DType::BF16,
            // config.json does not say: the dtype the weights are stored in.
            None => {
                let ckpt = graft_models::checkpoint::Checkpoint::open(&args.model)?;
                let (_, embed) = ckpt.entry("model.embed_tokens.weight")?;
                graft_models::checkpoint::dtype_of(embed.dtype)
                    .filter(|d| d.is_float())
                    .unwrap_or(DType::BF16)
            }
        },
    };
    lora.merge_into(&mut model)?;
    graft_models::write_dir_atomically(&args.out, |tmp| model.save(tmp, dtype))?;
    println!(
        "merged {} adapted modules into {} ({dtype})",
        lora.modules.len(),
        args.out.display()
    );
    Ok(())
}
