//! LoRA and DoRA adapters with PEFT's semantics and file format.
//!
//! `y = W x + s · B(A(dropout(x)))`, `A [r, in]` kaiming-uniform(a=√5),
//! `B [out, r]` zero, `s = alpha/r` (rsLoRA: `alpha/√r`). DoRA adds a
//! magnitude `m [out]` (initialised to the row norms of W):
//! `y = bias + (m / ‖W + s·B·A‖_row) ⊙ (W x + s·B A x)`, the norm detached.
//! Saved as `adapter_config.json` + `adapter_model.safetensors` with PEFT's
//! keys.

use crate::checkpoint::{write_safetensors, Checkpoint};
use crate::config::ModelConfig;
use crate::ModelError;
use graft_engine::ir::DType;
use graft_engine::rng::Rng;
use graft_engine::Tensor;
use serde_json::{json, Value};
use std::path::Path;

/// Which linear modules get an adapter.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// PEFT's list semantics: an entry matches a module whose path equals it
    /// or ends with `.entry` (`q_proj`, `self_attn.q_proj`, a full path).
    List(Vec<String>),
    /// Every linear layer of the decoder (not `lm_head`), as PEFT's "all-linear".
    AllLinear,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Targets,
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row on top of LoRA.
    pub use_dora: bool,
}

impl LoraConfig {
    /// The factor on the LoRA branch.
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// One adapted module: its path in the model (e.g.
/// `model.layers.0.self_attn.q_proj`) and its f32 factors.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub path: String,
    pub a: Tensor,
    pub b: Tensor,
    /// DoRA's magnitude, f32 `[out]`.
    pub magnitude: Option<Tensor>,
}

impl LoraModule {
    /// PEFT's key of A (`base_model.model.<path>.lora_A.weight`).
    pub fn key_a(&self) -> String {
        key(&self.path, "lora_A")
    }
    pub fn key_b(&self) -> String {
        key(&self.path, "lora_B")
    }
    /// PEFT's key of the DoRA magnitude.
    pub fn key_m(&self) -> String {
        format!("base_model.model.{}.lora_magnitude_vector", self.path)
    }
    /// Every trained tensor of the module with its PEFT key.
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        let mut t = vec![(self.key_a(), &self.a), (self.key_b(), &self.b)];
        if let Some(m) = &self.magnitude {
            t.push((self.key_m(), m));
        }
        t
    }
    /// [`LoraModule::tensors`], mutable.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let (ka, kb, km) = (self.key_a(), self.key_b(), self.key_m());
        let mut t = vec![(ka, &mut self.a), (kb, &mut self.b)];
        if let Some(m) = &mut self.magnitude {
            t.push((km, m));
        }
        t
    }
}

fn key(path: &str, which: &str) -> String {
    format!("base_model.model.{path}.{which}.weight")
}

#[derive(Clone, Debug)]
pub struct Lora {
    pub config: LoraConfig,
    /// In model order (layer by layer, q k v o gate up down).
    pub modules: Vec<LoraModule>,
}

/// The adapted modules for `targets`: `(path, [out, in])` in model order.
/// Every list entry must match at least one module.
pub fn resolve_targets(
    targets: &Targets,
    model: &ModelConfig,
) -> Result<Vec<(String, [usize; 2])>, String> {
    let mut all = Vec::new();
    for l in 0..model.num_layers {
        for (name, shape) in model.linear_shapes() {
            all.push((format!("model.layers.{l}.{name}"), shape));
        }
    }
    let entries = match targets {
        Targets::AllLinear => return Ok(all),
        Targets::List(e) => e,
    };
    if entries.is_empty() {
        return Err("target_modules is empty".into());
    }
    let matches = |path: &str, entry: &str| path == entry || path.ends_with(&format!(".{entry}"));
    for entry in entries {
        if !all.iter().any(|(p, _)| matches(p, entry)) {
            let hint = if matches("lm_head", entry) || matches("model.embed_tokens", entry) {
                " (adapters on lm_head / embed_tokens are not supported)"
            } else {
                " (valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or \"all-linear\")"
            };
            return Err(format!(
                "target module {entry:?} matches no module of the model{hint}"
            ));
        }
    }
    Ok(all
        .into_iter()
        .filter(|(p, _)| entries.iter().any(|e| matches(p, e)))
        .collect())
}

impl Lora {
    /// A fresh adapter: A kaiming-uniform(a=√5) i.e. U(±1/√in), B zero.
    pub fn init(config: LoraConfig, model: &ModelConfig, seed: u64) -> Result<Lora, ModelError> {
        check_config(&config).map_err(|msg| ModelError::Adapter {
            path: "[adapter]".into(),
            msg,
        })?;
        let targets =
            resolve_targets(&config.targets, model).map_err(|msg| ModelError::Adapter {
                path: "[adapter] target_modules".into(),
                msg,
            })?;
        let mut rng = Rng::new(seed);
        let modules = targets
            .into_iter()
            .map(|(path, [out, inp])| {
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..config.r * inp)
                    .map(|_| rng.uniform(-bound, bound))
                    .collect();
                Ok(LoraModule {
                    path,
                    a: Tensor::from_f32(&[config.r, inp], &a)?,
                    b: Tensor::zeros(&[out, config.r], DType::F32),
                    magnitude: None,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Lora { config, modules })
    }

    /// Loads a PEFT LoRA adapter directory for `model`.
    pub fn load(dir: &Path, model: &ModelConfig) -> Result<Lora, ModelError> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let bad = |msg: String| ModelError::Adapter {
            path: cfg_path.clone(),
            msg,
        };
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let config = parse_config(&json).map_err(bad)?;
        let targets = resolve_targets(&config.targets, model)
            .map_err(|m| bad(format!("key `target_modules`: {m}")))?;

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            return Err(ModelError::Io {
                path: weights_path,
                msg: "not found (only safetensors adapters are supported)".into(),
            });
        }
        let ckpt = Checkpoint::open_files(dir, &["adapter_model.safetensors".to_string()])?;
        // A tensor of another shape, or holding NaN or inf (a diverged run's
        // adapter), is named here rather than spoiling every output later.
        let load = |name: &str, want: &[usize]| -> Result<Tensor, ModelError> {
            let t = ckpt.load(name, want, DType::F32).map_err(|e| match e {
                ModelError::Shape { path, got, .. } => ModelError::Adapter {
                    path,
                    msg: format!(
                        "tensor `{name}` has shape {got:?}, where r = {} (adapter_config.json) and the model's config.json give {want:?}",
                        config.r
                    ),
                },
                e => e,
            })?;
            crate::check_finite(&weights_path, name, t.as_f32()?)?;
            Ok(t)
        };
        let mut used = 0;
        let mut modules = Vec::new();
        for (path, [out, inp]) in targets {
            let a = load(&key(&path, "lora_A"), &[config.r, inp])?;
            let b = load(&key(&path, "lora_B"), &[out, config.r])?;
            used += 2;
            let mut m = LoraModule {
                path,
                a,
                b,
                magnitude: None,
            };
            if config.use_dora {
                m.magnitude = Some(load(&m.key_m(), &[out])?);
                used += 1;
            }
            modules.push(m);
        }
        if used != ckpt.names().count() {
            let mut extra: Vec<&str> = ckpt
                .names()
                .filter(|n| {
                    !modules
                        .iter()
                        .any(|m| m.tensors().iter().any(|(k, _)| k == n))
                })
                .collect();
            extra.sort();
            let layer = extra[0]
                .split(".layers.")
                .nth(1)
                .and_then(|l| l.split('.').next()?.parse::<usize>().ok());
            let why = if extra[0].ends_with(".lora_magnitude_vector") && !config.use_dora {
                "is a DoRA magnitude, but adapter_config.json has `use_dora` false".to_string()
            } else if let Some(l) = layer.filter(|&l| l >= model.num_layers) {
                format!(
                    "is for layer {l}, but the model has {} layers: the adapter was trained for another model",
                    model.num_layers
                )
            } else {
                "belongs to no target module of adapter_config.json".to_string()
            };
            return Err(ModelError::Adapter {
                path: weights_path,
                msg: format!("tensor `{}` {why}", extra[0]),
            });
        }
        Ok(Lora { config, modules })
    }

    /// Writes the adapter in PEFT's format (both files atomically).
    pub fn save(&self, dir: &Path, base_model: &str) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let c = &self.config;
        let targets = match &c.targets {
            Targets::AllLinear => json!("all-linear"),
            Targets::List(l) => json!(l),
        };
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.r,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": targets,
            "use_rslora": c.use_rslora,
            "use_dora": c.use_dora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
        });
        let tensors: Vec<(String, &Tensor)> =
            self.modules.iter().flat_map(|m| m.tensors()).collect();
        let meta = [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, Some(meta))?;
        let text = serde_json::to_string_pretty(&config).expect("a json! value always serialises");
        crate::write_atomically(&dir.join("adapter_config.json"), text.as_bytes())
    }
}

fn check_config(c: &LoraConfig) -> Result<(), String> {
    if c.r == 0 {
        return Err("key `r` must be positive".into());
    }
    if !(0.0..1.0).contains(&c.dropout) {
        return Err(format!(
            "key `lora_dropout` must be in [0, 1), got {}",
            c.dropout
        ));
    }
    if !c.alpha.is_finite() {
        return Err("key `lora_alpha` must be finite".into());
    }
    Ok(())
}

/// Reads PEFT's adapter_config.json, refusing what Graft would silently get wrong.
fn parse_config(j: &Value) -> Result<LoraConfig, String> {
    let get = |k: &str| j.get(k).filter(|v| !v.is_null());
    if let Some(t) = get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(format!(
                "key `peft_type` is {t:?}; only LORA adapters are supported"
            ));
        }
    }
    if get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return Err(
            "key `lora_bias` is true; adapters with a bias on lora_B are not supported".into(),
        );
    }
    if get("exclude_modules").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(
            "key `exclude_modules` is not supported; list the target modules instead".into(),
        );
    }
    if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err("key `fan_in_fan_out` is true; Llama-family linears are not Conv1D".into());
    }
    if let Some(b) = get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(format!("key `bias` is {b:?}; only \"none\" is supported"));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(format!("key `{k}` is not supported (per-module ranks)"));
        }
    }
    for k in ["modules_to_save", "layers_to_transform"] {
        if get(k).is_some() {
            return Err(format!("key `{k}` is not supported"));
        }
    }
    let r = get("r")
        .and_then(Value::as_i64)
        .ok_or("key `r` is missing or not an integer")?;
    let r = usize::try_from(r).map_err(|_| format!("key `r` must be positive, got {r}"))?;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or("key `lora_alpha` is missing or not a number")? as f32;
    let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let use_rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    let use_dora = get("use_dora").and_then(Value::as_bool).unwrap_or(false);
    let targets = match get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => {
            return Err(format!(
                "key `target_modules` is the regex {s:?}; give a list of module names instead"
            ))
        }
        Some(Value::Array(a)) => Targets::List(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or("key `target_modules` must list strings")
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err("key `target_modules` is missing".into()),
    };
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        use_rslora,
        use_dora,
    };
    check_config(&config)?;
    Ok(config)
}
