//! The run configuration: TOML with fixed section and key names. Every key
//! and its default live in `defaults.toml` (also what `--help` prints); a
//! config file and `--set section.key=value` overrides are merged over it.
//! An unknown key is an error naming it and the nearest valid key; a wrong
//! type names the key and what it should be.

use graft_engine::Device;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Every key with its default and a comment: the reference users read.
pub const DEFAULTS: &str = include_str!("defaults.toml");

#[derive(Debug, thiserror::Error)]
#[error("{origin}: {msg}")]
pub struct ConfigError {
    /// The file, or `--set`.
    pub origin: String,
    pub msg: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub adapter: AdapterSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: PathBuf,
    pub quantize: Quantize,
    pub compute_dtype: ComputeDtype,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    Nf4,
    None,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    Bf16,
    F32,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    pub method: Method,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Lora,
    Dora,
    Full,
}

/// A list of module names, or one string ("all-linear").
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub train: PathBuf,
    pub eval: PathBuf,
    pub format: DataFormat,
    pub template: TemplateName,
    pub max_seq_len: usize,
    pub packing: bool,
    pub train_on_inputs: bool,
    pub overflow: OverflowName,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Alpaca,
    Messages,
    ShareGpt,
    Text,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum TemplateName {
    #[serde(rename = "alpaca")]
    Alpaca,
    #[serde(rename = "llama-2")]
    Llama2,
    #[serde(rename = "llama-3")]
    Llama3,
    #[serde(rename = "chatml")]
    ChatMl,
    #[serde(rename = "qwen2")]
    Qwen2,
    #[serde(rename = "gemma")]
    Gemma,
    #[serde(rename = "mistral")]
    Mistral,
    /// The checkpoint's own, recognised from tokenizer_config.json.
    #[serde(rename = "auto")]
    Auto,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OverflowName {
    Truncate,
    Drop,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub optimizer: OptimizerName,
    pub lr: f64,
    pub scheduler: Scheduler,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub max_grad_value: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub momentum: f64,
    pub epochs: usize,
    pub max_steps: usize,
    pub micro_batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// Recompute each layer's activations in the backward pass instead of
    /// keeping them (`passes::recompute`).
    pub gradient_checkpointing: bool,
    /// Where the training step runs: cpu, gpu, or auto (the GPU when one is
    /// usable and has a kernel for every node of the step).
    #[serde(with = "device_name")]
    pub device: Device,
}

/// `train.device` as the strings cpu, gpu and auto.
mod device_name {
    use graft_engine::Device;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Device, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match d {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
            Device::Auto => "auto",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Device, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Adamw,
    Sgd,
    Lomo,
    Adalomo,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    pub log_steps: usize,
    pub eval_steps: usize,
    pub eval_accuracy: bool,
    pub save_steps: usize,
    pub save_total_limit: usize,
}

fn defaults() -> Table {
    DEFAULTS
        .parse::<Table>()
        .expect("defaults.toml is valid TOML")
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + (ca != cb) as usize)
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a String>) -> String {
    candidates
        .min_by_key(|c| distance(word, c))
        .cloned()
        .unwrap_or_default()
}

/// Keys as transformers, PEFT and TRL name them, and ours: a suggestion by
/// meaning where spelling would suggest something else.
const ALIASES: [(&str, &str); 12] = [
    ("learning_rate", "train.lr"),
    ("num_train_epochs", "train.epochs"),
    ("per_device_train_batch_size", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("lr_scheduler_type", "train.scheduler"),
    ("optim", "train.optimizer"),
    ("lora_alpha", "adapter.alpha"),
    ("lora_dropout", "adapter.dropout"),
    ("use_dora", "adapter.method"),
    ("max_seq_length", "data.max_seq_len"),
    ("output_dir", "output.dir"),
    ("logging_steps", "output.log_steps"),
];

/// The `section.key` to suggest for an unknown `key` of `section` (known:
/// that section's keys).
fn suggest(section: &str, key: &str, known: &Table) -> String {
    match ALIASES.iter().find(|(alias, _)| *alias == key) {
        Some((_, ours)) => ours.to_string(),
        None => format!("{section}.{}", nearest(key, known.keys())),
    }
}

/// Checks that every key of `user` exists in `base`, then sets it there.
fn merge(base: &mut Table, user: Table, origin: &str) -> Result<(), ConfigError> {
    let err = |msg: String| ConfigError {
        origin: origin.to_string(),
        msg,
    };
    for (section, value) in user {
        let Some(Value::Table(known)) = base.get_mut(&section) else {
            // A key outside any section: name the section that has it.
            let home = defaults().into_iter().find_map(|(sec, keys)| match keys {
                Value::Table(t) if t.contains_key(&section) => Some(sec),
                _ => None,
            });
            if let (Some(home), false) = (home, value.is_table()) {
                return Err(err(format!(
                    "`{section}` is outside any section: put it under [{home}] ({home}.{section})"
                )));
            }
            let suggestion = nearest(&section, defaults().keys());
            return Err(err(format!(
                "unknown section [{section}]; did you mean [{suggestion}]?"
            )));
        };
        let Value::Table(keys) = value else {
            return Err(err(format!(
                "`{section}` must be a section ([{section}]), not a value"
            )));
        };
        for (key, v) in keys {
            if !known.contains_key(&key) {
                let suggestion = suggest(&section, &key, known);
                return Err(err(format!(
                    "unknown key `{section}.{key}`; did you mean `{suggestion}`?"
                )));
            }
            known.insert(key, v);
        }
    }
    Ok(())
}

impl Config {
    /// The defaults, then `file` (if any), then each `section.key=value`.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Config, ConfigError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    origin: path.display().to_string(),
                    msg: e.to_string(),
                })?;
                Self::from_texts(&[(&text, &path.display().to_string())], sets)
            }
            None => Self::from_texts(&[], sets),
        }
    }

    /// [`Config::load`] with files' texts (each with its name for errors),
    /// merged over the defaults in order.
    pub fn from_texts(files: &[(&str, &str)], sets: &[String]) -> Result<Config, ConfigError> {
        let mut table = defaults();
        for &(text, origin) in files {
            let user: Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
                origin: origin.to_string(),
                msg: e.to_string(),
            })?;
            merge(&mut table, user, origin)?;
        }
        for s in sets {
            let bad = |msg: String| ConfigError {
                origin: "--set".into(),
                msg,
            };
            let (key, value) = s
                .split_once('=')
                .ok_or_else(|| bad(format!("{s:?} is not section.key=value")))?;
            let (section, name) = key
                .trim()
                .split_once('.')
                .ok_or_else(|| bad(format!("{key:?} is not section.key")))?;
            // A TOML value if it parses as one, else the raw text as a string.
            let value = format!("v = {}", value.trim())
                .parse::<Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| Value::String(value.trim().to_string()));
            let mut user = Table::new();
            user.insert(
                section.to_string(),
                Value::Table([(name.to_string(), value)].into_iter().collect()),
            );
            merge(&mut table, user, "--set")?;
        }
        let config: Config = Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                let msg = e
                    .to_string()
                    .trim()
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
                // The value's origin: the last `--set` of the key the message
                // names, else the file.
                let set = sets.iter().rev().find(|s| {
                    s.split_once('=')
                        .is_some_and(|(k, _)| msg.contains(&format!("`{}`", k.trim())))
                });
                let origin = match (set, files.last()) {
                    (Some(s), _) => format!("--set {s}"),
                    (None, Some((_, o))) => o.to_string(),
                    (None, None) => "configuration".to_string(),
                };
                ConfigError { origin, msg }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: &str| {
            Err(ConfigError {
                origin: "configuration".into(),
                msg: format!("key `{key}` {msg}"),
            })
        };
        if self.output.dir.as_os_str().is_empty() {
            return err("output.dir", "must name a directory");
        }
        if self.adapter.r == 0 {
            return err("adapter.r", "must be positive");
        }
        if !(0.0..1.0).contains(&self.adapter.dropout) {
            return err("adapter.dropout", "must be in [0, 1)");
        }
        if let TargetModules::One(s) = &self.adapter.target_modules {
            if s != "all-linear" {
                return err(
                    "adapter.target_modules",
                    "must be a list of module names or \"all-linear\"",
                );
            }
        }
        for (key, v) in [
            ("data.max_seq_len", self.data.max_seq_len),
            ("train.micro_batch_size", self.train.micro_batch_size),
            ("train.grad_accum", self.train.grad_accum),
        ] {
            if v == 0 {
                return err(key, "must be positive");
            }
        }
        // Token positions and counts are i32 in the kernels.
        if self.data.max_seq_len > 1 << 24
            || self
                .data
                .max_seq_len
                .saturating_mul(self.train.micro_batch_size)
                > i32::MAX as usize
        {
            return err(
                "data.max_seq_len",
                "times train.micro_batch_size must stay below 2^31 tokens (and max_seq_len at most 2^24)",
            );
        }
        if !(self.train.lr > 0.0 && self.train.lr.is_finite()) {
            return err("train.lr", "must be a positive number");
        }
        for (key, b) in [
            ("train.adam_beta1", self.train.adam_beta1),
            ("train.adam_beta2", self.train.adam_beta2),
            ("train.momentum", self.train.momentum),
        ] {
            if !(0.0..1.0).contains(&b) {
                return err(key, "must be in [0, 1)");
            }
        }
        if matches!(
            self.train.optimizer,
            OptimizerName::Lomo | OptimizerName::Adalomo
        ) {
            if self.adapter.method != Method::Full {
                return err(
                    "train.optimizer",
                    "= \"lomo\" / \"adalomo\" updates every weight inside the backward pass: it needs adapter.method = \"full\"",
                );
            }
            if self.train.grad_accum != 1 {
                return err(
                    "train.optimizer",
                    "= \"lomo\" / \"adalomo\" applies each gradient as soon as it is computed: train.grad_accum must be 1",
                );
            }
            if self.train.momentum != 0.0 {
                return err(
                    "train.optimizer",
                    "= \"lomo\" / \"adalomo\" keeps no momentum: train.momentum must be 0",
                );
            }
        }
        // `!(x >= 0)` also refuses NaN, which every comparison lets through.
        for (key, v) in [
            ("train.max_grad_norm", self.train.max_grad_norm),
            ("train.max_grad_value", self.train.max_grad_value),
            ("train.weight_decay", self.train.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return err(key, "must be a finite number, at least 0 (0: off)");
            }
        }
        if !(self.train.adam_epsilon > 0.0 && self.train.adam_epsilon.is_finite()) {
            return err("train.adam_epsilon", "must be a positive number");
        }
        if self.adapter.method != Method::Full
            && !(self.adapter.alpha > 0.0 && self.adapter.alpha.is_finite())
        {
            return err(
                "adapter.alpha",
                "must be a positive number (the adapter's scale is alpha / r; 0 would train nothing)",
            );
        }
        if self.adapter.method == Method::Full {
            if self.model.quantize == Quantize::Nf4 {
                return err(
                    "adapter.method",
                    "= \"full\" trains the base weights, which cannot be 4-bit: set model.quantize = \"none\"",
                );
            }
            if self.model.compute_dtype != ComputeDtype::F32 {
                return err(
                    "adapter.method",
                    "= \"full\" updates the weights in f32: set model.compute_dtype = \"f32\"",
                );
            }
        }
        Ok(())
    }
}
