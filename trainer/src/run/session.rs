//! What a run, an evaluation or a generation works on: the model as the
//! configuration loads it, the adapter, the tokenizer and the datasets.

use super::RunError;
use crate::config::{
    ComputeDtype, Config, DataFormat, Method, OverflowName, Quantize, TargetModules, TemplateName,
};
use crate::data::batch::Overflow;
use crate::data::format::Format;
use crate::data::prepare::{prepare, PrepareOptions, Prepared};
use crate::data::template::{Specials, Template};
use crate::data::tokenize::Tokenized;
use graft_engine::ir::DType;
use graft_models::{CausalLm, LoadOptions, Lora, LoraConfig, Targets};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct Session {
    pub cfg: Config,
    pub model: CausalLm,
    /// The adapter (None for full fine-tuning).
    pub lora: Option<Lora>,
    pub tokenizer: Tokenizer,
    pub specials: Specials,
    pub pad_id: i32,
    /// The base model's directory (the embedded default's extracted copy
    /// when `model.path` is empty).
    pub model_dir: PathBuf,
    /// `data.template`, "auto" resolved.
    pub template: Template,
}

/// The configuration as TOML (what a checkpoint records).
pub fn config_text(cfg: &Config) -> String {
    toml::to_string(cfg).expect("a config always serialises")
}

/// `section.key = value` for every key of a config, in order.
fn flatten(cfg: &Config) -> Vec<(String, String)> {
    let table: toml::Table = toml::from_str(&config_text(cfg)).expect("round-trips");
    let mut out = Vec::new();
    for (section, keys) in table {
        if let toml::Value::Table(keys) = keys {
            for (k, v) in keys {
                out.push((format!("{section}.{k}"), v.to_string()));
            }
        }
    }
    out
}

/// A resumed run must use the configuration its checkpoint was made with,
/// except where the output goes and how long it trains.
pub fn check_same_config(cfg: &Config, saved: &str, dir: &Path) -> Result<(), RunError> {
    let saved: Config = toml::from_str(saved)
        .map_err(|e| RunError::Io(format!("{}: key `config`: {e}", dir.display())))?;
    // Where the step runs changes no result (a run resumes on either
    // device); paths compare as the files they name.
    let free = |k: &str| {
        k.starts_with("output.") || ["train.max_steps", "train.epochs", "train.device"].contains(&k)
    };
    let same_file = |a: &Path, b: &Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    let paths = [
        ("model.path", &cfg.model.path, &saved.model.path),
        ("data.train", &cfg.data.train, &saved.data.train),
        ("data.eval", &cfg.data.eval, &saved.data.eval),
    ];
    for ((k, now), (_, then)) in flatten(cfg).into_iter().zip(flatten(&saved)) {
        let same = match paths.iter().find(|(name, ..)| *name == k) {
            Some((_, a, b)) => same_file(a, b),
            None => now == then,
        };
        if !same && !free(&k) {
            return Err(RunError::Invalid(format!(
                "--resume: {} was made with {k} = {then}, but this run sets {k} = {now}; resume with the same configuration, or set output.dir to start a new run",
                dir.display()
            )));
        }
    }
    Ok(())
}

impl Session {
    /// Loads the model, tokenizer and adapter for `cfg`; `resume` is a
    /// checkpoint whose trained weights replace the fresh ones.
    pub fn open(cfg: &Config, resume: Option<&Path>) -> Result<Session, RunError> {
        let model_dir = if cfg.model.path.as_os_str().is_empty() {
            crate::embedded::model_dir()?
        } else {
            cfg.model.path.clone()
        };
        let dtype = match cfg.model.compute_dtype {
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F32 => DType::F32,
        };
        let quantize = match cfg.model.quantize {
            Quantize::Nf4 => Some(64),
            Quantize::None => None,
        };
        let full = cfg.adapter.method == Method::Full;
        // Full fine-tuning continues from the checkpoint's own weights.
        let load_dir = match (full, resume) {
            (true, Some(dir)) => dir,
            _ => &model_dir,
        };
        let mut model = CausalLm::load_with(load_dir, &LoadOptions { dtype, quantize })?;
        if let Some(note) = graft_models::unexpected_note(load_dir, &model.unexpected) {
            println!("{note}");
        }
        // Its config, tokenizer and other side files are the base model's
        // (a checkpoint may be pruned while the run goes on).
        model.dir = model_dir.clone();
        let lora = match (full, resume) {
            (true, _) => None,
            (false, Some(dir)) => Some(Lora::load(dir, &model.config)?),
            (false, None) => {
                let a = &cfg.adapter;
                let targets = match &a.target_modules {
                    TargetModules::One(_) => Targets::AllLinear,
                    TargetModules::List(l) => Targets::List(l.clone()),
                };
                let lc = LoraConfig {
                    r: a.r,
                    alpha: a.alpha as f32,
                    dropout: a.dropout as f32,
                    targets,
                    use_rslora: a.use_rslora,
                    use_dora: a.method == Method::Dora,
                };
                let mut lora = Lora::init(lc, &model.config, cfg.train.seed)?;
                if lora.config.use_dora {
                    lora.init_magnitudes(&model)?;
                }
                Some(lora)
            }
        };
        let (tokenizer, specials) = crate::data::load_tokenizer(&model_dir)?;
        let named = match cfg.data.template {
            TemplateName::Alpaca => Some(Template::Alpaca),
            TemplateName::Llama2 => Some(Template::Llama2),
            TemplateName::Llama3 => Some(Template::Llama3),
            TemplateName::ChatMl => Some(Template::ChatMl),
            TemplateName::Qwen2 => Some(Template::Qwen2),
            TemplateName::Gemma => Some(Template::Gemma),
            TemplateName::Mistral => Some(Template::Mistral),
            TemplateName::Auto => None,
        };
        // Plain text renders no template.
        let template = match cfg.data.format {
            DataFormat::Text => named.unwrap_or(Template::Alpaca),
            _ => {
                let config = model_dir.join("tokenizer_config.json");
                let chat = specials.chat_template.as_deref();
                let (t, note) = Template::resolve(named, chat, &config)?;
                if let Some(note) = note {
                    println!("{note}");
                }
                t
            }
        };
        let pad_id = specials
            .pad
            .as_deref()
            .and_then(|p| tokenizer.token_to_id(p))
            .unwrap_or(0) as i32;
        Ok(Session {
            cfg: cfg.clone(),
            model,
            lora,
            tokenizer,
            specials,
            pad_id,
            model_dir,
            template,
        })
    }

    pub fn train_path(&self) -> Result<PathBuf, RunError> {
        let p = &self.cfg.data.train;
        if !p.as_os_str().is_empty() {
            return Ok(p.clone());
        }
        if self.cfg.model.path.as_os_str().is_empty() {
            return Ok(crate::embedded::data_dir()?.join("train.jsonl"));
        }
        Err(RunError::Invalid(
            "key `data.train` is empty: give the training JSONL file".into(),
        ))
    }

    pub fn eval_path(&self) -> Option<PathBuf> {
        let p = &self.cfg.data.eval;
        if !p.as_os_str().is_empty() {
            return Some(p.clone());
        }
        if self.cfg.model.path.as_os_str().is_empty() && self.cfg.data.train.as_os_str().is_empty()
        {
            return crate::embedded::data_dir()
                .ok()
                .map(|d| d.join("eval.jsonl"));
        }
        None
    }

    pub fn prepare_options(&self) -> PrepareOptions {
        let d = &self.cfg.data;
        PrepareOptions {
            format: match d.format {
                DataFormat::Alpaca => Format::Alpaca,
                DataFormat::Messages => Format::Messages,
                DataFormat::ShareGpt => Format::ShareGpt,
                DataFormat::Text => Format::Text,
            },
            template: self.template,
            max_len: d.max_seq_len,
            overflow: match d.overflow {
                OverflowName::Truncate => Overflow::Truncate,
                OverflowName::Drop => Overflow::Drop,
            },
            train_on_inputs: d.train_on_inputs,
        }
    }

    pub fn prepare(&self, path: &Path) -> Result<Prepared, RunError> {
        let opts = self.prepare_options();
        if opts.format != Format::Text {
            if let Some(t) = opts
                .template
                .special_tokens()
                .iter()
                .find(|t| self.tokenizer.token_to_id(t).is_none())
            {
                return Err(RunError::Invalid(format!(
                    "data.template = \"{}\" writes the token `{t}`, which {} does not have as one token: use the template the model was trained with",
                    opts.template.name(),
                    self.model_dir.join("tokenizer.json").display()
                )));
            }
        }
        let p = prepare(path, &opts, &self.tokenizer, &self.specials)?;
        let vocab = self.model.config.vocab_size;
        if let Some(id) = p
            .docs
            .iter()
            .flat_map(|d| &d.ids)
            .find(|&&id| id < 0 || id as usize >= vocab)
        {
            return Err(RunError::Invalid(format!(
                "{}: the tokenizer produced id {id}, outside the model's vocab_size {vocab}",
                path.display()
            )));
        }
        Ok(p)
    }

    /// Tokens per batch row: the maximum length when packing, else the
    /// longest example (no row is longer than needed).
    pub fn row_len(&self, docs: &[Tokenized]) -> usize {
        let max = self.cfg.data.max_seq_len;
        if self.cfg.data.packing {
            max
        } else {
            docs.iter().map(|d| d.ids.len()).max().unwrap_or(1).min(max)
        }
    }

    /// A fingerprint of the base model (its weights as stored, and its
    /// config.json): a resumed run must train on the same one.
    pub fn model_digest(&self) -> Result<String, RunError> {
        let config = self.model_dir.join("config.json");
        let config = std::fs::read(&config)
            .map_err(|e| RunError::Io(format!("{}: {e}", config.display())))?;
        let weights = graft_models::checkpoint::Checkpoint::open(&self.model_dir)?.fingerprint();
        let h = graft_engine::kernels::cache::fnv1a(&[&config, weights.as_bytes()]);
        Ok(format!("{h:016x}"))
    }

    /// The name written as the adapter's base model.
    pub fn base_name(&self) -> String {
        if self.cfg.model.path.as_os_str().is_empty() {
            "graft-default".into()
        } else {
            self.cfg.model.path.display().to_string()
        }
    }

    /// Writes what training changed: the adapter in PEFT's format, or the
    /// whole model for full fine-tuning.
    pub fn save_trained(&self, dir: &Path) -> Result<(), RunError> {
        match &self.lora {
            Some(l) => l.save(dir, &self.base_name())?,
            None => self.model.save(dir, DType::F32)?,
        }
        Ok(())
    }

    /// An adapter still all zero after training changed nothing: an error,
    /// not a silent no-op.
    pub fn check_trained(&self) -> Result<(), RunError> {
        let zero = self.lora.as_ref().is_some_and(|l| {
            l.modules
                .iter()
                .all(|m| m.b.as_f32().is_ok_and(|b| b.iter().all(|&x| x == 0.0)))
        });
        if zero {
            return Err(RunError::Invalid(
                "the trained adapter is all zero (every lora_B is 0): training changed nothing; check train.lr, train.warmup_steps against the number of steps, and that the data has trained tokens".into(),
            ));
        }
        Ok(())
    }
}
