//! `trainer generate`: continue a prompt with a key/value cache.

use super::CliError;
use graft_engine::ir::DType;
use graft_engine::{Device, Executor};
use graft_models::{CausalLm, LoadOptions, Lora};
use graft_trainer::data::format::Example;
use graft_trainer::data::load_tokenizer;
use graft_trainer::data::template::{render, Template};
use graft_trainer::generate::{stop_tokens, Generator, Sampling};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (default: the embedded default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long, allow_hyphen_values = true)]
    prompt: String,
    /// Wrap the prompt as a user turn of this chat template (alpaca,
    /// llama-2, llama-3, chatml, qwen2, gemma, mistral, or auto: the model's
    /// own, recognised from tokenizer_config.json) and generate the
    /// assistant's answer; without it the prompt is plain text after BOS.
    #[arg(long)]
    template: Option<String>,
    #[arg(long, default_value_t = 64, allow_hyphen_values = true)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    seed: u64,
    /// Compute dtype.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Quantize the linear weights while loading.
    #[arg(long, default_value = "none", value_parser = ["none", "nf4"])]
    quantize: String,
    /// Where to run: cpu, gpu (an error when the GPU cannot run the model
    /// whole: it takes bf16) or auto.
    #[arg(long, default_value = "auto")]
    device: Device,
}

pub fn run(args: Args) -> Result<(), CliError> {
    // Written so that NaN fails both.
    let sane = args.top_p > 0.0
        && args.top_p <= 1.0
        && args.temperature >= 0.0
        && args.temperature.is_finite();
    if !sane {
        return Err(CliError::Usage(
            "--top-p must be in (0, 1] and --temperature a finite number, at least 0".into(),
        ));
    }
    let dir = match args.model {
        Some(d) => d,
        None => graft_trainer::embedded::model_dir()?,
    };
    let dtype = if args.dtype == "bf16" {
        DType::BF16
    } else {
        DType::F32
    };
    let quantize = (args.quantize == "nf4").then_some(64);
    let model = CausalLm::load_with(&dir, &LoadOptions { dtype, quantize })?;
    if let Some(note) = graft_models::unexpected_note(&dir, &model.unexpected) {
        eprintln!("{note}");
    }
    let lora = args
        .adapter
        .as_deref()
        .map(|a| Lora::load(a, &model.config))
        .transpose()?;
    let (tok, sp) = load_tokenizer(&dir)?;
    let text = match args.template.as_deref() {
        Some(name) => {
            let named = match name {
                "auto" => None,
                _ => Some(Template::parse(name).ok_or_else(|| {
                    CliError::Usage(format!(
                        "--template {name:?}: not one of {}, auto",
                        Template::ALL.map(Template::name).join(", ")
                    ))
                })?),
            };
            let config = dir.join("tokenizer_config.json");
            let (t, note) = Template::resolve(named, sp.chat_template.as_deref(), &config)?;
            if let Some(note) = note {
                eprintln!("{note}");
            }
            let ex = Example::Alpaca {
                instruction: args.prompt.clone(),
                input: String::new(),
                output: String::new(),
            };
            render(t, &ex, &sp)?.prompt().to_string()
        }
        None => format!("{}{}", sp.bos.as_deref().unwrap_or(""), args.prompt),
    };
    let ids: Vec<i32> = tok
        .encode(text.as_str(), false)
        .map_err(|e| CliError::Usage(format!("tokenizer: {e}")))?
        .get_ids()
        .iter()
        .map(|&i| i as i32)
        .collect();
    let mut exec = Executor::new(args.device)?;
    let mut g = Generator::new(&model, lora.as_ref(), &mut exec);
    // On stderr: stdout is the generated text alone.
    eprintln!("device: {}", g.placement()?);
    let what = format!("the prompt ({} tokens) and --max-new-tokens", ids.len());
    if let Some(note) = model
        .config
        .positions_note(&what, ids.len().saturating_add(args.max_new_tokens))
    {
        eprintln!("{note}");
    }
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let out = g.generate(
        &ids,
        args.max_new_tokens,
        &stop_tokens(&tok, &sp.eos),
        &sampling,
    )?;
    let out: Vec<u32> = out.iter().map(|&i| i as u32).collect();
    let text = tok
        .decode(&out, true)
        .map_err(|e| CliError::Usage(format!("tokenizer: {e}")))?;
    println!("{text}");
    Ok(())
}
