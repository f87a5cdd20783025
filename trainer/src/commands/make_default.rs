//! `trainer make-default`: regenerates the embedded default from nothing:
//! the synthetic world, its tokenizer, a randomly initialised tiny Llama
//! pretrained by Graft (full fine-tuning) on plain-text facts, and the
//! instruction dataset with its held-out split.

use super::CliError;
use graft_engine::ir::DType;
use graft_engine::rng::Rng;
use graft_engine::{Device, Executor, Tensor};
use graft_models::checkpoint::write_safetensors;
use graft_models::{CausalLm, LoadOptions, ModelConfig};
use graft_trainer::config::Config;
use graft_trainer::data::format::Example;
use graft_trainer::generate::{Generator, Sampling};
use graft_trainer::run::{train, RunOptions};
use graft_trainer::synthetic::{self, World};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Where the embedded files go.
    #[arg(long, default_value = "trainer/assets/default")]
    out: PathBuf,
    /// Scratch directory (corpus, initial weights, pretraining run).
    #[arg(long, default_value = "target/make-default")]
    work: PathBuf,
    /// Pretraining steps (of 8 x 128 tokens), at least 1.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..))]
    pretrain_steps: u64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn write(path: &Path, text: &str) -> Result<(), CliError> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))?;
    }
    graft_models::write_atomically(path, text.as_bytes())?;
    Ok(())
}

fn jsonl(examples: &[Example]) -> String {
    examples
        .iter()
        .map(|e| synthetic::messages_line(e) + "\n")
        .collect()
}

/// Random initial weights as transformers initialises a Llama: normal with
/// the config's initializer_range, norms at one.
fn init_weights(dir: &Path, seed: u64) -> Result<(), CliError> {
    let config = ModelConfig::load(dir)?;
    let mut rng = Rng::new(seed);
    let tensors: Vec<(String, Tensor)> = config
        .expected_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| 0.02 * rng.normal()).collect()
            };
            Ok((name, Tensor::from_f32(&shape, &v)?))
        })
        .collect::<Result<_, CliError>>()?;
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, None)?;
    Ok(())
}

/// Share of facts whose plain-text probe the model completes correctly,
/// per kind of fact.
fn probe(model: &CausalLm, world: &World, tok: &tokenizers::Tokenizer) -> Result<String, CliError> {
    let mut exec = Executor::new(Device::Cpu)?;
    let mut g = Generator::new(model, None, &mut exec);
    let mut counts: Vec<(synthetic::Kind, usize, usize)> = Vec::new();
    for f in &world.facts {
        let text = format!("{} {}", synthetic::SPECIALS[2], World::probe(f));
        let ids: Vec<i32> = tok
            .encode(text.as_str(), false)
            .map_err(|e| CliError::Usage(e.to_string()))?
            .get_ids()
            .iter()
            .map(|&i| i as i32)
            .collect();
        let out = g.generate(&ids, 1, &[], &Sampling::GREEDY)?;
        let ok = (tok.id_to_token(out[0] as u32).as_deref() == Some(f.answer.as_str())) as usize;
        match counts.iter_mut().find(|c| c.0 == f.kind) {
            Some(c) => (c.1 += ok, c.2 += 1),
            None => (counts.push((f.kind, ok, 1)), ()),
        };
    }
    let (ok, n) = counts.iter().fold((0, 0), |a, c| (a.0 + c.1, a.1 + c.2));
    let kinds: Vec<String> = counts
        .iter()
        .map(|(k, ok, n)| format!("{k:?} {ok}/{n}"))
        .collect();
    Ok(format!("{ok}/{n} ({})", kinds.join(", ")))
}

pub fn run(args: Args) -> Result<(), CliError> {
    // Before the minutes of pretraining.
    if args.out.exists() && !args.out.is_dir() {
        return Err(CliError::Usage(format!(
            "--out {} is a file, not a directory",
            args.out.display()
        )));
    }
    let world = World::new(args.seed);
    let words = world.vocabulary();
    let init = args.work.join("init");
    let (tok_json, tok_cfg) = synthetic::tokenizer_files(&words);
    let vocab = (synthetic::SPECIALS.len() + words.len()).div_ceil(64) * 64;
    write(&init.join("tokenizer.json"), &tok_json)?;
    write(&init.join("tokenizer_config.json"), &tok_cfg)?;
    write(&init.join("config.json"), &synthetic::model_config(vocab))?;
    init_weights(&init, args.seed)?;
    let corpus: String = world
        .corpus(40_000, args.seed + 1)
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    let corpus_path = args.work.join("corpus.jsonl");
    write(&corpus_path, &corpus)?;
    println!(
        "world: {} facts ({} tuned, {} held out), {} words, vocab {vocab}",
        world.facts.len(),
        world.tuned.len(),
        world.held_out.len(),
        words.len()
    );

    let run_dir = args.work.join("pretrain");
    let _ = std::fs::remove_dir_all(&run_dir);
    let pretrain = format!(
        r#"
[model]
path = "{init}"
quantize = "none"
compute_dtype = "f32"
[adapter]
method = "full"
[data]
train = "{corpus}"
format = "text"
max_seq_len = 128
packing = true
[train]
lr = 3e-3
scheduler = "cosine"
warmup_steps = 50
weight_decay = 0.01
max_grad_norm = 1.0
max_steps = {steps}
micro_batch_size = 8
seed = {seed}
[output]
dir = "{run}"
log_steps = 50
save_steps = 0
"#,
        init = init.display(),
        corpus = corpus_path.display(),
        steps = args.pretrain_steps,
        seed = args.seed,
        run = run_dir.display(),
    );
    let cfg = Config::from_texts(&[(&pretrain, "make-default pretraining")], &[])?;
    let report = train(
        &cfg,
        &RunOptions {
            progress: true,
            ..Default::default()
        },
    )?;
    let model = CausalLm::load(&report.output, DType::F32)?;
    let model_out = args.out.join("model");
    let _ = std::fs::remove_dir_all(&model_out);
    model.save(&model_out, DType::BF16)?;

    write(
        &args.out.join("data/train.jsonl"),
        &jsonl(&world.train_set(args.seed + 2)),
    )?;
    write(
        &args.out.join("data/eval.jsonl"),
        &jsonl(&world.eval_set(args.seed + 3)),
    )?;
    write(&args.out.join("run.toml"), synthetic::RUN_TOML)?;

    let (tok, _) = graft_trainer::data::load_tokenizer(&model_out)?;
    let nf4 = CausalLm::load_with(
        &model_out,
        &LoadOptions {
            dtype: DType::BF16,
            quantize: Some(64),
        },
    )?;
    let plain = CausalLm::load(&model_out, DType::F32)?;
    println!(
        "plain-text probe of every fact: f32 {}; NF4 + bf16 {}",
        probe(&plain, &world, &tok)?,
        probe(&nf4, &world, &tok)?
    );
    println!("wrote {}", args.out.display());
    Ok(())
}
