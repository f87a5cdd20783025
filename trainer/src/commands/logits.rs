//! `trainer logits`: the logits of one sequence, for parity checks.

use super::CliError;
use graft_engine::ir::DType;
use graft_engine::{compile, CpuExecutor};
use graft_models::checkpoint::write_safetensors;
use graft_models::{Batch, CausalLm, LoadOptions, Lora, RecordOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, allow_hyphen_values = true)]
    input_ids: String,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Compute dtype.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Quantize the linear weights while loading (as `[model] quantize`).
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    quantize: String,
}

fn parse_ids(text: &str) -> Result<Vec<i32>, CliError> {
    if text.trim().is_empty() {
        return Err(CliError::Usage("--input-ids is empty".into()));
    }
    let ids: Vec<i32> = text
        .split(',')
        .enumerate()
        .map(|(i, s)| {
            s.trim().parse::<i32>().map_err(|_| {
                CliError::Usage(format!(
                    "--input-ids: item {} ({:?}) is not a token id",
                    i + 1,
                    s.trim()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(ids)
}

/// Fails unless `out` can be written without touching what is read: not a
/// file inside the model's or the adapter's directory (the weights are
/// memory-mapped while the output is written), its folder made first.
fn check_out(out: &std::path::Path, reads: &[&std::path::Path]) -> Result<(), CliError> {
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(folder)
        .map_err(|e| CliError::Usage(format!("--out {}: {e}", out.display())))?;
    let folder = folder.canonicalize().ok();
    if let Some(dir) = reads
        .iter()
        .find(|d| d.canonicalize().ok().is_some_and(|d| Some(d) == folder))
    {
        return Err(CliError::Usage(format!(
            "--out {} is inside {}, which is being read: write it elsewhere",
            out.display(),
            dir.display()
        )));
    }
    Ok(())
}

pub fn run(args: Args) -> Result<(), CliError> {
    let ids = parse_ids(&args.input_ids)?;
    let mut reads = vec![args.model.as_path()];
    reads.extend(args.adapter.as_deref());
    check_out(&args.out, &reads)?;
    let dtype = if args.dtype == "bf16" {
        DType::BF16
    } else {
        DType::F32
    };
    let quantize = (args.quantize == "nf4").then_some(64);
    let model = CausalLm::load_with(&args.model, &LoadOptions { dtype, quantize })?;
    if let Some(note) = graft_models::unexpected_note(&args.model, &model.unexpected) {
        eprintln!("{note}");
    }
    let vocab = model.config.vocab_size;
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        return Err(CliError::Usage(format!(
            "--input-ids: item {} ({id}) is outside the vocabulary of {} (vocab_size {vocab})",
            i + 1,
            args.model.join("config.json").display()
        )));
    }
    let what = format!("the {} tokens of --input-ids", ids.len());
    if let Some(note) = model.config.positions_note(&what, ids.len()) {
        eprintln!("{note}");
    }
    let lora = args
        .adapter
        .as_deref()
        .map(|dir| Lora::load(dir, &model.config))
        .transpose()?;
    let rec = model.record(
        ids.len(),
        RecordOptions {
            lora: lora.as_ref(),
            ..Default::default()
        },
    )?;
    let batch = Batch::new(&[&ids], None, 0)?;
    let feeds = rec.feeds(&model, lora.as_ref(), &batch)?;
    let plan = compile(rec.graph.clone(), &[rec.logits])?;
    let out = CpuExecutor::new().run(&plan, &feeds)?;
    write_safetensors(&args.out, &[("logits".to_string(), &out[0])], None)?;
    Ok(())
}
