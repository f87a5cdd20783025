//! The Llama family as a graph recorder: one decoder for Llama, Mistral,
//! Qwen2 and Gemma, their differences being config flags.

use crate::checkpoint::Checkpoint;
use crate::config::{Arch, ModelConfig};
use crate::lora::Lora;
use crate::ModelError;
use graft_engine::ir::{AttentionSpec, DType, Graph, RopeSpec, ValueId};
use graft_engine::{Feeds, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A causal LM: its config and its base weights in the compute dtype.
pub struct CausalLm {
    pub config: ModelConfig,
    pub dir: PathBuf,
    /// Storage (and compute) dtype of the base weights and activations.
    pub dtype: DType,
    weights: HashMap<String, Tensor>,
    /// The checkpoint's tensors this model does not read
    /// ([`ModelConfig::unexpected`]); commands say so in a note.
    pub unexpected: Vec<String>,
}

/// How to load a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Storage and compute dtype of activations and unquantized weights.
    pub dtype: DType,
    /// Quantize the decoder's linear weights to NF4 with this block size
    /// while loading (bitsandbytes' default is 64).
    pub quantize: Option<usize>,
}

/// What to record.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordOptions<'a> {
    /// Adapter fragments to attach to the base linears.
    pub lora: Option<&'a Lora>,
    /// Mark the adapter trainable (else it is frozen, for inference).
    pub train_lora: bool,
    /// Record the loss against a `labels` input.
    pub loss: bool,
    /// Apply the adapter's dropout (training only).
    pub dropout: bool,
    /// Mark every unquantized base weight trainable (full fine-tuning).
    pub train_base: bool,
    /// Record for generation with a key/value cache of this many rows per
    /// layer: attention reads the cache for earlier positions (inference only).
    pub kv_cache: Option<usize>,
}

/// The cache handles of a graph recorded with [`RecordOptions::kv_cache`].
#[derive(Clone, Debug)]
pub struct KvCache {
    /// i32 `[1]`: rows already cached (the position of the first new token).
    pub start: ValueId,
    /// Per layer: the cache inputs `(k, v)` and the new rows `(k, v)` the
    /// graph outputs, to append after the run.
    pub layers: Vec<[ValueId; 4]>,
}

/// A recorded graph and the handles of its inputs and outputs.
pub struct Recorded {
    pub graph: Graph,
    pub tokens: usize,
    pub ids: ValueId,
    pub positions: ValueId,
    pub segments: ValueId,
    pub labels: Option<ValueId>,
    pub dropout_seed: Option<ValueId>,
    /// The residual stream entering each layer, then leaving the last one:
    /// the checkpoints of activation recomputation.
    pub layer_inputs: Vec<ValueId>,
    /// f32 `[tokens, vocab]`.
    pub logits: ValueId,
    pub loss: Option<ValueId>,
    pub kv_cache: Option<KvCache>,
}

/// A batch of sequences flattened into one token axis: positions restart and
/// the segment id changes at every sequence, so attention never crosses one.
#[derive(Clone, Debug)]
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub segments: Tensor,
    /// Next-token targets (already shifted), -100 where not counted.
    pub labels: Tensor,
    pub seed: Tensor,
}

impl Batch {
    /// Sequences with HF-style labels (`None`: the ids themselves); like
    /// transformers, the target of token `t` is `labels[t+1]` and the last
    /// token of each sequence has none.
    pub fn new(seqs: &[&[i32]], labels: Option<&[&[i32]]>, seed: u32) -> Result<Self, ModelError> {
        let (mut ids, mut pos, mut seg, mut tgt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, seq) in seqs.iter().enumerate() {
            let lab = labels.map_or(*seq, |l| l[s]);
            if lab.len() != seq.len() {
                return Err(ModelError::Input(format!(
                    "sequence {s} has {} tokens but {} labels",
                    seq.len(),
                    lab.len()
                )));
            }
            for (t, &id) in seq.iter().enumerate() {
                ids.push(id);
                pos.push(t as i32);
                seg.push(s as i32);
                tgt.push(lab.get(t + 1).copied().unwrap_or(-100));
            }
        }
        let n = ids.len();
        Ok(Batch {
            ids: Tensor::from_i32(&[n], &ids)?,
            positions: Tensor::from_i32(&[n], &pos)?,
            segments: Tensor::from_i32(&[n], &seg)?,
            labels: Tensor::from_i32(&[n], &tgt)?,
            seed: Tensor::from_u32(&[1], &[seed])?,
        })
    }

    pub fn tokens(&self) -> usize {
        self.ids.numel()
    }
}

impl CausalLm {
    /// Loads config.json and the checkpoint of `dir`, checking every tensor's
    /// presence and shape against the config, converting to `dtype`.
    pub fn load(dir: &Path, dtype: DType) -> Result<Self, ModelError> {
        Self::load_with(
            dir,
            &LoadOptions {
                dtype,
                quantize: None,
            },
        )
    }

    /// [`CausalLm::load`] with options. Linear weights come out NF4 when the
    /// checkpoint is a bitsandbytes 4-bit one (read as is, never requantized)
    /// or when `quantize` asks for it: then each is quantized as it is read,
    /// one tensor at a time, and its pages are released, so the resident set
    /// stays near the quantized size plus one tensor.
    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self, ModelError> {
        let dtype = opts.dtype;
        if !dtype.is_float() {
            return Err(ModelError::Input(format!(
                "compute dtype must be a float, got {dtype}"
            )));
        }
        let config = ModelConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let mut weights = HashMap::new();
        for (name, shape) in config.expected_tensors() {
            let linear = config.is_linear_weight(&name);
            let t = match (linear, &config.quantization, opts.quantize) {
                (true, Some(_), _) => crate::quantized::load_nf4(&ckpt, &name, &shape)?,
                (true, None, Some(block)) => ckpt.load_quantized(&name, &shape, block)?,
                _ => ckpt.load(&name, &shape, dtype)?,
            };
            weights.insert(name, t);
        }
        Ok(CausalLm {
            unexpected: config.unexpected(ckpt.names()),
            config,
            dir: dir.to_path_buf(),
            dtype,
            weights,
        })
    }

    /// A model of `config` with random weights and no checkpoint (benches
    /// and GPU checks of shapes no test can download): weights uniform with
    /// standard deviation 0.02 in `opts.dtype` (uniform: a third of the time
    /// of normal draws over a 7B model's embeddings), or, for linears with
    /// `opts.quantize`, random NF4 codes with the scales that quantizing
    /// such weights gives (drawn directly: seconds, not the minutes of
    /// quantizing a 7B model); norms 1.
    pub fn random(config: ModelConfig, opts: &LoadOptions, seed: u64) -> Result<Self, ModelError> {
        use graft_engine::rng::Rng;
        let mut rng = Rng::new(seed);
        let mut weights = HashMap::new();
        for (name, shape) in config.expected_tensors() {
            let numel: usize = shape.iter().product();
            let t = if name.ends_with("norm.weight") {
                Tensor::from_f32(&shape, &vec![1.0; numel])?.to_dtype(opts.dtype)?
            } else if let (true, Some(block)) = (config.is_linear_weight(&name), opts.quantize) {
                random_nf4(&shape, block, &mut rng)?
            } else {
                // Uniform on ±a has standard deviation a/√3.
                let a = 0.02 * 3f32.sqrt();
                let w: Vec<f32> = (0..numel).map(|_| rng.uniform(-a, a)).collect();
                Tensor::from_f32(&shape, &w)?.to_dtype(opts.dtype)?
            };
            weights.insert(name, t);
        }
        Ok(CausalLm {
            config,
            dir: PathBuf::from("<random>"),
            dtype: opts.dtype,
            weights,
            unexpected: Vec::new(),
        })
    }

    pub fn weight(&self, name: &str) -> Option<&Tensor> {
        self.weights.get(name)
    }

    /// Every base weight by checkpoint name.
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.weights
    }

    /// Mutable base weights (full fine-tuning, merging adapters).
    pub fn weights_mut(&mut self) -> &mut HashMap<String, Tensor> {
        &mut self.weights
    }

    /// Records the forward pass (and the loss if asked) over `tokens` tokens.
    pub fn record(&self, tokens: usize, opts: RecordOptions) -> Result<Recorded, ModelError> {
        let c = &self.config;
        let dt = self.dtype;
        let mut g = Graph::new();
        let ids = g.input("input_ids", &[tokens], DType::I32);
        let positions = g.input("positions", &[tokens], DType::I32);
        let segments = g.input("segments", &[tokens], DType::I32);
        let dropout_p = opts.lora.map_or(0.0, |l| l.config.dropout);
        let dropout_seed =
            (opts.dropout && dropout_p > 0.0).then(|| g.input("dropout_seed", &[1], DType::U32));
        let mut kv_cache = opts.kv_cache.map(|_| KvCache {
            start: g.input("cache_start", &[1], DType::I32),
            layers: Vec::new(),
        });

        let mut rec = Recorder {
            g,
            model: self,
            lora: opts.lora,
            train: opts.train_lora,
            train_base: opts.train_base,
            seed: dropout_seed,
        };
        let embed = rec.weight("model.embed_tokens.weight")?;
        let mut h = rec.g.embedding(embed, ids)?;
        if c.arch == Arch::Gemma {
            // transformers scales by sqrt(hidden) rounded to the weights' dtype.
            let s = Tensor::from_f32(&[1], &[(c.hidden_size as f32).sqrt()])?
                .to_dtype(dt)?
                .to_f32_vec()?[0];
            h = rec.g.scale(h, s)?;
        }
        let unit = c.arch == Arch::Gemma;
        let rope = RopeSpec {
            n_heads: c.num_heads,
            head_dim: c.head_dim,
            inv_freq: Arc::from(c.inv_freq()),
        };
        let rope_k = RopeSpec {
            n_heads: c.num_kv_heads,
            ..rope.clone()
        };
        let attn = AttentionSpec {
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: c.sliding_window,
        };
        let mut layer_inputs = vec![h];
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let w = rec.weight(&format!("{p}.input_layernorm.weight"))?;
            let x = rec.g.rms_norm(h, w, c.rms_norm_eps, unit)?;
            let q = rec.linear(&format!("{p}.self_attn.q_proj"), x)?;
            let k = rec.linear(&format!("{p}.self_attn.k_proj"), x)?;
            let v = rec.linear(&format!("{p}.self_attn.v_proj"), x)?;
            let q = rec.g.rope(q, positions, rope.clone())?;
            let k = rec.g.rope(k, positions, rope_k.clone())?;
            let a = match (&mut kv_cache, opts.kv_cache) {
                (Some(cache), Some(rows)) => {
                    let kv = c.num_kv_heads * c.head_dim;
                    let kc = rec.g.input(&format!("{p}.k_cache"), &[rows, kv], dt);
                    let vc = rec.g.input(&format!("{p}.v_cache"), &[rows, kv], dt);
                    cache.layers.push([kc, vc, k, v]);
                    rec.g
                        .attention_cached(q, k, v, kc, vc, cache.start, attn.clone())?
                }
                _ => rec.g.attention(q, k, v, segments, attn.clone())?,
            };
            let o = rec.linear(&format!("{p}.self_attn.o_proj"), a)?;
            h = rec.g.add(h, o)?;

            let w = rec.weight(&format!("{p}.post_attention_layernorm.weight"))?;
            let x = rec.g.rms_norm(h, w, c.rms_norm_eps, unit)?;
            let gate = rec.linear(&format!("{p}.mlp.gate_proj"), x)?;
            let up = rec.linear(&format!("{p}.mlp.up_proj"), x)?;
            let m = rec.g.gated_act(c.activation, gate, up)?;
            let d = rec.linear(&format!("{p}.mlp.down_proj"), m)?;
            h = rec.g.add(h, d)?;
            layer_inputs.push(h);
        }
        let w = rec.weight("model.norm.weight")?;
        let h = rec.g.rms_norm(h, w, c.rms_norm_eps, unit)?;
        let head = if c.tie_word_embeddings {
            embed
        } else {
            rec.weight("lm_head.weight")?
        };
        let logits = rec.g.linear(h, head, None)?;
        let logits = rec.g.cast(logits, DType::F32)?;
        let (labels, loss) = if opts.loss {
            let labels = rec.g.input("labels", &[tokens], DType::I32);
            (Some(labels), Some(rec.g.cross_entropy(logits, labels)?))
        } else {
            (None, None)
        };
        Ok(Recorded {
            graph: rec.g,
            tokens,
            ids,
            positions,
            segments,
            labels,
            dropout_seed,
            layer_inputs,
            logits,
            loss,
            kv_cache,
        })
    }
}

/// Recording state: the graph being built and where parameters come from.
struct Recorder<'a> {
    g: Graph,
    model: &'a CausalLm,
    lora: Option<&'a Lora>,
    train: bool,
    train_base: bool,
    seed: Option<ValueId>,
}

impl Recorder<'_> {
    /// A base weight, declared with its checkpoint name; frozen unless
    /// training the base (NF4 weights are always frozen).
    fn weight(&mut self, name: &str) -> Result<ValueId, ModelError> {
        if let Some(v) = self.g.find_leaf(name) {
            return Ok(v);
        }
        let t = self
            .model
            .weights
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self.model.dir.clone(),
            })?;
        let trainable = self.train_base && !matches!(t.dtype(), DType::Nf4 { .. });
        Ok(self.g.param(name, t.shape(), t.dtype(), trainable))
    }

    /// A base linear (with bias when the config has one), plus the LoRA
    /// fragment `s·B(A(dropout x))` when the module is adapted, or DoRA's
    /// `(m/‖W + s·B·A‖) ⊙ (W x + s·B A x)`. The branch runs in the adapter's
    /// f32, as PEFT casts to the adapter's dtype.
    fn linear(&mut self, module: &str, x: ValueId) -> Result<ValueId, ModelError> {
        let c = &self.model.config;
        let w = self.weight(&format!("{module}.weight"))?;
        let b = match c.has_bias(module) {
            true => Some(self.weight(&format!("{module}.bias"))?),
            false => None,
        };
        let Some(m) = self
            .lora
            .and_then(|l| l.modules.iter().find(|m| m.path == module))
        else {
            return Ok(self.g.linear(x, w, b)?);
        };
        let cfg = &self.lora.expect("found a module above").config;
        let dt = self.model.dtype;
        let a = self
            .g
            .param(&m.key_a(), m.a.shape(), m.a.dtype(), self.train);
        let bb = self
            .g
            .param(&m.key_b(), m.b.shape(), m.b.dtype(), self.train);
        let xl = self.g.cast(x, m.a.dtype())?;
        let xd = match self.seed {
            Some(seed) => Some(self.g.dropout(xl, seed, cfg.dropout)?),
            None => None,
        };
        let ax = self.g.linear(xd.unwrap_or(xl), a, None)?;
        let bax = self.g.linear(ax, bb, None)?;
        let lora = self.g.scale(bax, cfg.scaling())?;
        let Some(mag) = &m.magnitude else {
            let y = self.g.linear(x, w, b)?;
            let l = self.g.cast(lora, dt)?;
            return Ok(self.g.add(y, l)?);
        };
        // DoRA. g = m/‖W + s·B·A‖ per output row, the norm a constant to autograd.
        let mv = self
            .g
            .param(&m.key_m(), mag.shape(), mag.dtype(), self.train);
        let inv = self.g.dora_inv_norm(a, bb, w, cfg.scaling())?;
        let scale = self.g.mul(mv, inv)?;
        let wx = self.g.linear(x, w, None)?;
        let out = match xd {
            // Without dropout: g ⊙ (W x + s·B A x), one epilogue op.
            None => self.g.dora_combine(wx, lora, scale)?,
            // PEFT with dropout: W x + (g - 1) ⊙ W x_d + g ⊙ s·B A x_d.
            Some(xd) => {
                let wx = self.g.cast(wx, DType::F32)?;
                let xd = self.g.cast(xd, dt)?;
                let wxd = self.g.linear(xd, w, None)?;
                let wxd = self.g.cast(wxd, DType::F32)?;
                let sum = self.g.add(wxd, lora)?;
                let scaled = self.g.mul_cols(sum, scale)?;
                let minus = self.g.scale(wxd, -1.0)?;
                let delta = self.g.add(scaled, minus)?;
                let out = self.g.add(wx, delta)?;
                self.g.cast(out, dt)?
            }
        };
        Ok(match b {
            Some(b) => self.g.apply1(graft_engine::ir::Op::AddBias, &[out, b])?,
            None => out,
        })
    }
}

impl Recorded {
    /// Binds the batch and the model's weights for a plan that updates the
    /// trainable ones in place (full fine-tuning with fused updates): those
    /// are lent mutably, the rest read only.
    pub fn feeds_mut<'a>(
        &self,
        model: &'a mut CausalLm,
        batch: &'a Batch,
    ) -> Result<Feeds<'a>, ModelError> {
        let mut feeds = self.batch_feeds(batch)?;
        let by_name: HashMap<&str, ValueId> = self
            .graph
            .params()
            .map(|p| (self.graph.leaf_name(p).expect("params are named"), p))
            .collect();
        for (name, t) in model.weights.iter_mut() {
            if let Some(&p) = by_name.get(name.as_str()) {
                if self.graph.is_trainable(p) {
                    feeds.bind_mut(p, t);
                } else {
                    feeds.bind(p, t);
                }
            }
        }
        Ok(feeds)
    }

    /// The batch's inputs (ids, positions, segments, labels, dropout seed).
    fn batch_feeds<'a>(&self, batch: &'a Batch) -> Result<Feeds<'a>, ModelError> {
        if batch.tokens() != self.tokens {
            return Err(ModelError::Input(format!(
                "the batch has {} tokens but the graph was recorded for {}",
                batch.tokens(),
                self.tokens
            )));
        }
        let mut feeds = Feeds::new();
        feeds
            .bind(self.ids, &batch.ids)
            .bind(self.positions, &batch.positions)
            .bind(self.segments, &batch.segments);
        if let Some(l) = self.labels {
            feeds.bind(l, &batch.labels);
        }
        if let Some(s) = self.dropout_seed {
            feeds.bind(s, &batch.seed);
        }
        Ok(feeds)
    }

    /// Binds the model's weights, the adapter and the batch to this graph.
    pub fn feeds<'a>(
        &self,
        model: &'a CausalLm,
        lora: Option<&'a Lora>,
        batch: &'a Batch,
    ) -> Result<Feeds<'a>, ModelError> {
        let mut feeds = self.batch_feeds(batch)?;
        let adapter: HashMap<String, &Tensor> = lora
            .map(|l| l.modules.iter().flat_map(|m| m.tensors()).collect())
            .unwrap_or_default();
        for p in self.graph.params() {
            let name = self.graph.leaf_name(p).expect("params are named");
            let t = model
                .weights
                .get(name)
                .or_else(|| adapter.get(name).copied())
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.to_string(),
                    dir: model.dir.clone(),
                })?;
            feeds.bind(p, t);
        }
        Ok(feeds)
    }
}

/// A random NF4 weight: a sample of N(0, 0.02²) quantized for real gives
/// valid scales and code maps; codes and block scales are then drawn.
fn random_nf4(
    shape: &[usize],
    block: usize,
    rng: &mut graft_engine::rng::Rng,
) -> Result<Tensor, ModelError> {
    use graft_engine::ir::Nf4Layout;
    use graft_engine::kernels::nf4::{quantize, Nf4Parts};
    let sample: Vec<f32> = (0..block * 256).map(|_| 0.02 * rng.normal()).collect();
    let p = quantize(&sample, block).map_err(|e| ModelError::Input(format!("nf4: {e}")))?;
    let l = Nf4Layout::new(shape.iter().product(), block);
    let mut packed = vec![0u8; l.packed.len()];
    for c in packed.chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]);
    }
    let absmax = (0..l.blocks)
        .map(|_| p.absmax[(rng.next_u64() % p.absmax.len() as u64) as usize])
        .collect();
    let parts = Nf4Parts {
        block,
        packed,
        absmax,
        nested_scales: vec![p.nested_scales[0]; l.nested_blocks],
        offset: p.offset,
        nested_map: p.nested_map,
    };
    Ok(Tensor::from_nf4(shape, &parts)?)
}
