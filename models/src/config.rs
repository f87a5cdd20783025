//! Hugging Face `config.json` for the Llama family (Llama, Mistral, Qwen2,
//! Gemma): the fields Graft reads, their defaults as transformers sets them,
//! and the derived quantities the recorder needs.

use crate::ModelError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Gemma,
}

impl Arch {
    pub const SUPPORTED: [&'static str; 4] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "GemmaForCausalLM",
    ];

    fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "GemmaForCausalLM" => Arch::Gemma,
            _ => return None,
        })
    }
}

/// llama3-style RoPE rescaling by wavelength band.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// The longest sequence the model was trained for, if stated (RoPE
    /// runs past it, with what quality the model's training decides).
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_llama3: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    /// Bias on q/k/v (Qwen2; Llama's `attention_bias` also on o).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub activation: graft_ir::Activation,
    /// The dtype transformers saved the weights in, if stated.
    pub torch_dtype: Option<String>,
    /// Set when the checkpoint's linear weights are bitsandbytes NF4.
    pub quantization: Option<crate::quantized::Bnb4Bit>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<Value>,
}

impl ModelConfig {
    /// A note when `what` reaches `positions` positions, past the model's
    /// `max_position_embeddings` (allowed: RoPE runs on, untrained).
    pub fn positions_note(&self, what: &str, positions: usize) -> Option<String> {
        let max = self.max_position_embeddings.filter(|&m| positions > m)?;
        Some(format!(
            "note: {what} reach {positions} positions, more than the model's max_position_embeddings ({max}): positions past it were never trained"
        ))
    }

    /// Reads `DIR/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::parse(&text, &path)
    }

    /// Parses config text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let arch_name = raw
            .architectures
            .first()
            .ok_or_else(|| err("key `architectures` is missing or empty".into()))?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| ModelError::UnknownArchitecture {
            path: path.to_path_buf(),
            arch: arch_name.clone(),
        })?;
        for (key, v) in [
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("vocab_size", raw.vocab_size),
        ] {
            if v == 0 {
                return Err(err(format!("key `{key}` must be positive")));
            }
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(err(format!(
                "key `num_key_value_heads` ({num_kv_heads}) must divide `num_attention_heads` ({})",
                raw.num_attention_heads
            )));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "key `head_dim` ({head_dim}) must be even and positive"
            )));
        }

        // transformers v5 keeps rope settings in `rope_parameters`; older
        // configs have top-level `rope_theta` and `rope_scaling`.
        let params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0) as f32;
        let scaling = raw
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(params);
        let rope_llama3 = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            s.get(k).and_then(Value::as_f64).map(|v| v as f32).ok_or_else(|| {
                                err(format!("key `rope_scaling.{k}` is missing (rope_type llama3)"))
                            })
                        };
                        Some(Llama3Scaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?,
                        })
                    }
                    other => {
                        return Err(err(format!(
                            "key `rope_scaling.rope_type` = {other:?} is not supported (supported: default, llama3)"
                        )))
                    }
                }
            }
        };

        let sliding_window = match arch {
            Arch::Mistral => raw.sliding_window,
            Arch::Qwen2 if raw.use_sliding_window == Some(true) => {
                return Err(err(
                    "key `use_sliding_window` = true is not supported for Qwen2 yet".into(),
                ))
            }
            _ => None,
        };
        let activation = match arch {
            // Gemma runs tanh-GELU (`hidden_activation` in older configs, `hidden_act` in v5).
            Arch::Gemma => match raw
                .hidden_activation
                .or(raw.hidden_act)
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh")
            {
                "gelu_pytorch_tanh" | "gelu_tanh" => graft_ir::Activation::GeluTanh,
                other => {
                    return Err(err(format!(
                        "key `hidden_activation` = {other:?} is not supported"
                    )))
                }
            },
            _ => match raw.hidden_act.as_deref().unwrap_or("silu") {
                "silu" | "swish" => graft_ir::Activation::Silu,
                other => {
                    return Err(err(format!(
                        "key `hidden_act` = {other:?} is not supported (silu)"
                    )))
                }
            },
        };
        // Zero or negative, these give NaN everywhere (a 0 base has no
        // frequencies; a negative epsilon can make a norm's root negative).
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        for (key, v) in [
            ("rope_theta", rope_theta as f64),
            ("rms_norm_eps", rms_norm_eps),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(err(format!("key `{key}` must be positive, got {v}")));
            }
        }
        if let Some(s) = &rope_llama3 {
            let factors = [
                ("factor", s.factor),
                ("low_freq_factor", s.low_freq_factor),
                ("high_freq_factor", s.high_freq_factor),
                (
                    "original_max_position_embeddings",
                    s.original_max_position_embeddings,
                ),
            ];
            if let Some((k, v)) = factors.iter().find(|(_, v)| !(*v > 0.0 && v.is_finite())) {
                return Err(err(format!(
                    "key `rope_scaling.{k}` must be positive, got {v}"
                )));
            }
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(err(format!(
                    "key `rope_scaling.high_freq_factor` ({}) must exceed `low_freq_factor` ({})",
                    s.high_freq_factor, s.low_freq_factor
                )));
            }
        }
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(ModelConfig {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_llama3,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(arch == Arch::Gemma),
            sliding_window,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            activation,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            quantization: crate::quantized::parse_quantization_config(
                raw.quantization_config.as_ref(),
                path,
            )?,
        })
    }

    /// RoPE inverse frequencies, computed in f32 in the order transformers
    /// uses, with llama3 band rescaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let Some(s) = &self.rope_llama3 else {
            return base;
        };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }

    /// The tensors of `names` (a checkpoint's) that this model does not
    /// read, sorted: a sign that config.json does not describe the weights
    /// (fewer layers, another architecture). The parts of NF4 weights, the
    /// rotary buffers older checkpoints carry and a tied `lm_head` are read
    /// or redundant, not unexpected.
    pub fn unexpected<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<String> {
        let expected: std::collections::HashSet<String> = self
            .expected_tensors()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let part_of_expected = |n: &str| {
            crate::quantized::PART_SUFFIXES
                .iter()
                .any(|s| n.strip_suffix(s).is_some_and(|w| expected.contains(w)))
        };
        let mut out: Vec<String> = names
            .filter(|n| !expected.contains(*n) && !part_of_expected(n))
            .filter(|n| !n.ends_with(".rotary_emb.inv_freq"))
            .filter(|n| !(self.tie_word_embeddings && *n == "lm_head.weight"))
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    /// Every tensor the checkpoint must hold, with the shape config.json implies.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (name, shape) in self.linear_shapes() {
                let module = format!("{p}.{name}");
                t.push((format!("{module}.weight"), shape.to_vec()));
                if self.has_bias(name) {
                    t.push((format!("{module}.bias"), vec![shape[0]]));
                }
            }
        }
        t.push(("model.norm.weight".into(), vec![h]));
        if !self.tie_word_embeddings {
            t.push(("lm_head.weight".into(), vec![v, h]));
        }
        t
    }

    /// The linear modules of one decoder layer (path inside the layer, `[out, in]`).
    pub fn linear_shapes(&self) -> [(&'static str, [usize; 2]); 7] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ]
    }

    /// Whether `name` is the weight of a decoder linear (what 4-bit
    /// quantization applies to; never embeddings, norms or `lm_head`).
    pub fn is_linear_weight(&self, name: &str) -> bool {
        name.starts_with("model.layers.")
            && name.ends_with(".weight")
            && self
                .linear_shapes()
                .iter()
                .any(|(m, _)| name.ends_with(&format!(".{m}.weight")))
    }

    /// Whether the linear at `module` (a path ending in its name) has a bias.
    pub fn has_bias(&self, module: &str) -> bool {
        if ["q_proj", "k_proj", "v_proj"]
            .iter()
            .any(|m| module.ends_with(m))
        {
            self.qkv_bias
        } else if module.ends_with("o_proj") {
            self.o_bias
        } else {
            self.mlp_bias
        }
    }
}
