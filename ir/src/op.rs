//! The operations of the IR and their shape/dtype inference.
//!
//! Activations are 2-D `[tokens, features]`: a batch is flattened into one
//! token axis, and attention separates sequences (and packed documents) by a
//! segment-id input, so one set of ops serves batched, packed and single
//! sequences alike.

use crate::dtype::DType;
use crate::IrError;
use std::sync::Arc;

/// Gated activations: `act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// SiLU (SwiGLU: Llama, Mistral, Qwen2).
    Silu,
    /// GELU with the tanh approximation (GeGLU: Gemma).
    GeluTanh,
}

/// Attention parameters. `q` is `[T, n_heads*head_dim]`, `k`/`v` are
/// `[T, n_kv_heads*head_dim]`; query head `h` reads kv head
/// `h / (n_heads / n_kv_heads)` (GQA).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k before the softmax.
    pub scale: f32,
    /// Sliding window: query `i` sees keys `j` with `i - j < window`.
    pub window: Option<usize>,
}

/// RoPE parameters (half-split `rotate_half` layout, as transformers).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub n_heads: usize,
    pub head_dim: usize,
    /// `head_dim / 2` inverse frequencies, rope scaling already applied.
    pub inv_freq: Arc<[f32]>,
}

/// AdaLomo's hyperparameters (see `Op::AdaLomoUpdate`); the defaults are
/// the AdaLomo paper's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaLomoSpec {
    /// Added to g² before the second moment (1e-30).
    pub eps1: f32,
    /// Floor of the parameter RMS that scales the learning rate (1e-3).
    pub eps2: f32,
    /// The update's RMS is brought down to at most this (1).
    pub clip_threshold: f32,
    /// β₂ₜ = 1 − t^decay_rate (−0.8).
    pub decay_rate: f32,
    pub weight_decay: f32,
    /// Clamp each gradient element to ±this first (0: off).
    pub clip_value: f32,
}

impl Default for AdaLomoSpec {
    fn default() -> Self {
        AdaLomoSpec {
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            weight_decay: 0.0,
            clip_value: 0.0,
        }
    }
}

/// What a fusion group applies to its f32 sum before rounding it, with
/// one more input.
#[derive(Clone, Debug, PartialEq)]
pub enum Epilogue {
    /// Column `j` times `scale[j]` (f32 `[N]`): DoRA's magnitude over the
    /// weight norm, `scale ⊙ (W x + s·B A x)`.
    ScaleCols,
    /// RoPE at each row's position (i32 `[M]`): the q and k projections.
    Rope(RopeSpec),
}

/// One product of [`Op::MatMulSum`]: `scale · op(a)·op(b)` as
/// [`Op::MatMul`] with `ta`/`tb` (its operands of any float dtypes, each
/// widened to f32 as it is read, the scale applied to `a`), or, with
/// `nf4`, as [`Op::Nf4MatMul`] with `tb` (b the NF4 weight, `ta` false).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Product {
    pub ta: bool,
    pub tb: bool,
    pub nf4: bool,
    pub scale: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A constant filled tensor (the seed of the backward pass).
    Fill {
        value: f32,
        shape: Vec<usize>,
        dtype: DType,
    },
    /// `C[M,N] = op(A)·op(B)`, `op` transposing when the flag is set
    /// (`A` is `[M,K]` or `[K,M]`, `B` is `[K,N]` or `[N,K]`).
    MatMul {
        ta: bool,
        tb: bool,
    },
    /// A product with a frozen NF4 weight `w[N,K]`, dequantized tile by tile:
    /// `a[M,K]·wᵀ` when `tb`, else `a[M,N]·w` (the input gradient). Operands
    /// are rounded to `compute` (f32 or bf16), accumulation is f32, and the
    /// output has `a`'s dtype. No gradient ever flows into `w`.
    Nf4MatMul {
        tb: bool,
        compute: DType,
    },
    /// A fusion group (made by `passes::fuse_products`, after autograd):
    /// `[addend +] Σ scale·op(a)·op(b)` over `terms`, inputs `a₀, b₀, a₁,
    /// b₁, …` then the `[M,N]` addend when `addend`. Summed in f32 through
    /// the k of every product in turn and rounded once to `out`; with
    /// `compute` bf16 the products' operands are rounded to bf16 first.
    MatMulSum {
        terms: Vec<Product>,
        addend: bool,
        compute: DType,
        out: DType,
        /// Applied to the f32 sum before it is rounded; its input last.
        epilogue: Option<Epilogue>,
    },
    /// A chain of elementwise ops in one pass over the output (made by
    /// `passes::fuse_elementwise`, after autograd): its inputs are the
    /// program's, in order.
    Elementwise(crate::program::Program),
    /// `x[M,N] + b[N]` broadcast over rows.
    AddBias,
    /// `x[M,N]`, `v[N]` -> `x·v` per column (same dtype).
    MulCols,
    /// DoRA's epilogue in one pass: `base[M,N]` (float), `lora[M,N]` f32,
    /// `scale[N]` f32 -> `scale ⊙ (base + lora)` in base's dtype (the sum
    /// and product in f32).
    DoraCombine,
    /// LOMO's fused SGD step, in place: `param`, `grad`, `lr` (f32 [1]),
    /// `coef` (f32 [1], the gradient's factor: LOMO's clipping) -> f32 [1],
    /// the squared L2 norm of `grad`. Writes `param ← param − lr·(coef·grad
    /// (clamped to ±clip_value when it is positive) + weight_decay·param)`:
    /// its first input is updated in place, so the schedule runs it after
    /// every other reader of that parameter (passes::place_in_place).
    SgdUpdate {
        weight_decay: f32,
        clip_value: f32,
    },
    /// AdaLomo's fused step, in place on `param` and its second-moment state:
    /// `param`, `grad`, `lr`, `coef` (f32 [1] each for the scalars), `step`
    /// (f32 [1], t from 1), `row`, `col` -> f32 [1] = ‖grad‖². A 2-D param
    /// `[R, C]` keeps factored `row [R]`, `col [C]`; a 1-D one `[N]` keeps a
    /// full `row [N]` and a `col [1]` that is unused. With lr = 0 it only
    /// measures the norm (the first pass of two-pass clipping).
    AdaLomoUpdate(AdaLomoSpec),
    /// DoRA's detached weight norm: `a[r,in]` f32, `b[out,r]` f32, `w[out,in]`
    /// (float or NF4) -> f32 `[out]` = `1/‖w_o + scaling·(b·a)_o‖`. No VJP:
    /// the norm is a constant to autograd, as in the DoRA paper (§4.3).
    DoraInvNorm {
        scaling: f32,
    },
    /// `[M,N] -> [N]`: the sum over rows (gradient of a bias).
    SumRows,
    Add,
    Mul,
    Scale(f32),
    Cast(DType),
    /// `table[V,H]`, `ids[T]` -> `[T,H]`.
    Embedding,
    /// `dy[T,H]`, `ids[T]` -> `[vocab,H]`: scatter-add of rows.
    EmbeddingGrad {
        vocab: usize,
    },
    /// `x[T,H]`, `w[H]`: `x·rsqrt(mean(x²)+eps)·w` in f32; Gemma uses `(1+w)`.
    RmsNorm {
        eps: f32,
        unit_offset: bool,
    },
    /// `x`, `w`, `dy` -> `dx`.
    RmsNormGradInput {
        eps: f32,
        unit_offset: bool,
    },
    /// `x`, `dy` -> `dw` (`dw` does not depend on the offset).
    RmsNormGradWeight {
        eps: f32,
    },
    /// `x[T, n_heads*head_dim]`, `positions[T]` -> rotated x. `inverse`
    /// rotates by the negative angle (the VJP).
    Rope {
        spec: RopeSpec,
        inverse: bool,
    },
    /// `q`, `k`, `v`, `segments[T]` -> `out[T, n_heads*head_dim]`,
    /// `lse[T, n_heads]` (f32 log-sum-exp of the scores, kept for backward).
    /// Causal within a segment; never across segments.
    Attention(AttentionSpec),
    /// `q`, `k`, `v`, `segments`, `out`, `lse`, `dout` -> `dq`, `dk`, `dv`.
    AttentionGrad(AttentionSpec),
    /// Generation with a key/value cache: `q`, `k`, `v` of `T` new tokens,
    /// `k_cache`, `v_cache` `[C, n_kv_heads*head_dim]`, `start` (i32 `[1]`,
    /// the cached rows, i.e. the position of the first new token) ->
    /// `out[T, n_heads*head_dim]`. Inference only (no VJP).
    AttentionCached(AttentionSpec),
    /// `gate`, `up` -> `act(gate)*up`.
    GatedAct(Activation),
    /// `gate`, `up`, `dy` -> `dgate`, `dup`.
    GatedActGrad(Activation),
    /// `logits[T,V]`, `labels[T]` (i32) -> f32 `[1]`: mean over labels that
    /// are not `ignore_index`.
    CrossEntropy {
        ignore_index: i32,
    },
    /// `logits`, `labels`, `dloss[1]` -> `dlogits`.
    CrossEntropyGrad {
        ignore_index: i32,
    },
    /// The cross-entropy of `h[T,H]·wᵀ` (`w[V,H]` frozen, h's dtype) with
    /// its input gradient, `chunk` tokens at a time (made by
    /// `passes::fuse_linear_loss`, before autograd): `h`, `w`, `labels` ->
    /// f32 `[1]` the loss (as `CrossEntropy` of the product), and `dh[T,H]`
    /// its gradient for a loss gradient of 1 (its VJP scales it). Only one
    /// chunk of logits `[chunk, V]` ever exists (in the node's workspace,
    /// with the chunk's rows of `h` and `dh`), and only for tokens whose
    /// label is not `ignore_index`.
    LinearCrossEntropy {
        ignore_index: i32,
        chunk: usize,
    },
    /// `x`, `s` (f32 `[1]`) -> `x·s` in x's dtype (a gradient scaled by
    /// the loss's gradient).
    ScaleBy,
    /// `x`, `seed[1]` (u32) -> `x·mask/(1-p)`; the mask is a pure function of
    /// the seed and the element index, so the VJP is the same op on `dy`.
    Dropout {
        p: f32,
    },
}

/// The shape and dtype of one value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TypeInfo {
    pub fn new(shape: Vec<usize>, dtype: DType) -> Self {
        TypeInfo { shape, dtype }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> usize {
        self.dtype.bytes(self.numel())
    }
}

impl Op {
    /// A short name for plan dumps and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Fill { .. } => "fill",
            Op::MatMul { .. } => "matmul",
            Op::Nf4MatMul { .. } => "nf4_matmul",
            Op::MatMulSum { .. } => "matmul_sum",
            Op::Elementwise(_) => "elementwise",
            Op::AddBias => "add_bias",
            Op::MulCols => "mul_cols",
            Op::DoraCombine => "dora_combine",
            Op::SgdUpdate { .. } => "sgd_update",
            Op::AdaLomoUpdate(_) => "adalomo_update",
            Op::DoraInvNorm { .. } => "dora_inv_norm",
            Op::SumRows => "sum_rows",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Scale(_) => "scale",
            Op::Cast(_) => "cast",
            Op::Embedding => "embedding",
            Op::EmbeddingGrad { .. } => "embedding_grad",
            Op::RmsNorm { .. } => "rms_norm",
            Op::RmsNormGradInput { .. } => "rms_norm_grad_input",
            Op::RmsNormGradWeight { .. } => "rms_norm_grad_weight",
            Op::Rope { .. } => "rope",
            Op::Attention(_) => "attention",
            Op::AttentionGrad(_) => "attention_grad",
            Op::AttentionCached(_) => "attention_cached",
            Op::GatedAct(_) => "gated_act",
            Op::GatedActGrad(_) => "gated_act_grad",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::CrossEntropyGrad { .. } => "cross_entropy_grad",
            Op::LinearCrossEntropy { .. } => "linear_cross_entropy",
            Op::ScaleBy => "scale_by",
            Op::Dropout { .. } => "dropout",
        }
    }

    /// The name with what a dump needs to read a fusion group: its terms
    /// (`nf4ᵀ + 2·mmᵀ` …), addend, compute and output types.
    pub fn label(&self) -> String {
        if let Op::LinearCrossEntropy { chunk, .. } = self {
            return format!("linear_cross_entropy[{chunk} tokens a chunk]");
        }
        if let Op::Elementwise(p) = self {
            return format!("elementwise[{}]", p.ops.join("·"));
        }
        let Op::MatMulSum {
            terms,
            addend,
            compute,
            out,
            epilogue,
        } = self
        else {
            return self.name().to_string();
        };
        let t = |flag: bool| if flag { "ᵀ" } else { "" };
        let mut parts: Vec<String> = terms
            .iter()
            .map(|p| {
                let scale = if p.scale == 1.0 {
                    String::new()
                } else {
                    format!("{}·", p.scale)
                };
                let kind = if p.nf4 { "nf4" } else { "mm" };
                format!("{scale}{}{kind}{}", t(p.ta), t(p.tb))
            })
            .collect();
        if *addend {
            parts.push("addend".into());
        }
        let then = match epilogue {
            None => "",
            Some(Epilogue::ScaleCols) => ", ·cols",
            Some(Epilogue::Rope(_)) => ", rope",
        };
        format!("matmul_sum[{} | {compute}→{out}{then}]", parts.join(" + "))
    }

    /// Number of inputs the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Fill { .. } => 0,
            Op::MatMulSum {
                terms,
                addend,
                epilogue,
                ..
            } => 2 * terms.len() + usize::from(*addend) + usize::from(epilogue.is_some()),
            Op::Elementwise(p) => p.inputs.len(),
            Op::SumRows | Op::Scale(_) | Op::Cast(_) => 1,
            Op::MatMul { .. }
            | Op::Nf4MatMul { .. }
            | Op::AddBias
            | Op::MulCols
            | Op::Add
            | Op::Mul
            | Op::Embedding
            | Op::EmbeddingGrad { .. }
            | Op::RmsNorm { .. }
            | Op::RmsNormGradWeight { .. }
            | Op::Rope { .. }
            | Op::GatedAct(_)
            | Op::CrossEntropy { .. }
            | Op::ScaleBy
            | Op::Dropout { .. } => 2,
            Op::RmsNormGradInput { .. }
            | Op::GatedActGrad(_)
            | Op::CrossEntropyGrad { .. }
            | Op::LinearCrossEntropy { .. }
            | Op::DoraInvNorm { .. }
            | Op::DoraCombine => 3,
            Op::Attention(_) | Op::SgdUpdate { .. } => 4,
            Op::AttentionCached(_) => 6,
            Op::AdaLomoUpdate(_) => 7,
            Op::AttentionGrad(_) => 7,
        }
    }

    /// Shape and dtype inference: the types of the outputs given the inputs,
    /// or an error naming what disagrees.
    pub fn infer(&self, ins: &[&TypeInfo]) -> Result<Vec<TypeInfo>, IrError> {
        if ins.len() != self.arity() {
            return Err(self.err(format!("takes {} inputs, got {}", self.arity(), ins.len())));
        }
        let same = |a: &TypeInfo, b: &TypeInfo| -> Result<(), IrError> {
            if a.shape != b.shape || a.dtype != b.dtype {
                return Err(self.err(format!(
                    "operands differ: {:?} {} vs {:?} {}",
                    a.shape, a.dtype, b.shape, b.dtype
                )));
            }
            Ok(())
        };
        let float = |t: &TypeInfo, what: &str| -> Result<(), IrError> {
            if !t.dtype.is_float() {
                return Err(self.err(format!("{what} must be a float, got {}", t.dtype)));
            }
            Ok(())
        };
        let rank = |t: &TypeInfo, r: usize, what: &str| -> Result<(), IrError> {
            if t.shape.len() != r {
                return Err(self.err(format!(
                    "{what} must have rank {r}, got shape {:?}",
                    t.shape
                )));
            }
            Ok(())
        };
        let ids = |t: &TypeInfo, n: usize, what: &str| -> Result<(), IrError> {
            if !matches!(t.dtype, DType::I32 | DType::U32) || t.shape != [n] {
                return Err(self.err(format!(
                    "{what} must be i32/u32 of shape [{n}], got {:?} {}",
                    t.shape, t.dtype
                )));
            }
            Ok(())
        };
        let out = |shape: Vec<usize>, dtype: DType| Ok(vec![TypeInfo::new(shape, dtype)]);
        match self {
            Op::Fill { shape, dtype, .. } => out(shape.clone(), *dtype),
            Op::MatMul { ta, tb } => {
                let (a, b) = (ins[0], ins[1]);
                rank(a, 2, "A")?;
                rank(b, 2, "B")?;
                float(a, "A")?;
                if a.dtype != b.dtype {
                    return Err(self.err(format!("dtypes differ: {} vs {}", a.dtype, b.dtype)));
                }
                let (m, k) = if *ta {
                    (a.shape[1], a.shape[0])
                } else {
                    (a.shape[0], a.shape[1])
                };
                let (k2, n) = if *tb {
                    (b.shape[1], b.shape[0])
                } else {
                    (b.shape[0], b.shape[1])
                };
                if k != k2 {
                    return Err(self.err(format!(
                        "inner dimensions differ: A {:?} (ta={ta}) vs B {:?} (tb={tb})",
                        a.shape, b.shape
                    )));
                }
                out(vec![m, n], a.dtype)
            }
            Op::Nf4MatMul { tb, compute } => {
                let (a, w) = (ins[0], ins[1]);
                rank(a, 2, "a")?;
                float(a, "a")?;
                if !w.dtype.is_nf4() || w.shape.len() != 2 {
                    return Err(self.err(format!(
                        "w must be a 2-D nf4 weight, got {} {:?}",
                        w.dtype, w.shape
                    )));
                }
                if !matches!(compute, DType::F32 | DType::BF16) {
                    return Err(
                        self.err(format!("compute dtype must be f32 or bf16, got {compute}"))
                    );
                }
                let (n, k) = (w.shape[0], w.shape[1]);
                let (inner, outer) = if *tb { (k, n) } else { (n, k) };
                if a.shape[1] != inner {
                    return Err(self.err(format!(
                        "a {:?} does not fit w {:?} (tb={tb})",
                        a.shape, w.shape
                    )));
                }
                out(vec![a.shape[0], outer], a.dtype)
            }
            Op::MatMulSum {
                terms,
                addend,
                compute,
                out: out_dtype,
                epilogue,
            } => {
                if !matches!(compute, DType::F32 | DType::BF16) || !out_dtype.is_float() {
                    return Err(self.err(format!(
                        "compute must be f32 or bf16 and out a float, got {compute}, {out_dtype}"
                    )));
                }
                let mut shape = None;
                for (i, t) in terms.iter().enumerate() {
                    let pair = [ins[2 * i], ins[2 * i + 1]];
                    let ty = match t.nf4 {
                        // Each operand is read as it is stored: float dtypes may differ.
                        false => {
                            float(pair[1], "b")?;
                            let b = TypeInfo::new(pair[1].shape.clone(), pair[0].dtype);
                            Op::MatMul { ta: t.ta, tb: t.tb }.infer(&[pair[0], &b])?
                        }
                        true if !t.ta => Op::Nf4MatMul {
                            tb: t.tb,
                            compute: *compute,
                        }
                        .infer(&pair)?,
                        true => return Err(self.err(format!("term {i}: an NF4 term with ta"))),
                    };
                    let s = &ty[0].shape;
                    if shape.get_or_insert_with(|| s.clone()) != s {
                        return Err(self.err(format!("term {i} is {s:?}, not {shape:?}")));
                    }
                }
                let Some(shape) = shape else {
                    return Err(self.err("no terms".into()));
                };
                if *addend {
                    let c = ins[2 * terms.len()];
                    float(c, "addend")?;
                    if c.shape != shape {
                        return Err(self.err(format!("addend {:?} is not {shape:?}", c.shape)));
                    }
                }
                let e = ins.last().expect("an input per term at least");
                match epilogue {
                    None => {}
                    Some(Epilogue::ScaleCols) if e.dtype != DType::F32 || e.shape != [shape[1]] => {
                        return Err(self.err(format!(
                            "column scales must be f32 [{}], got {} {:?}",
                            shape[1], e.dtype, e.shape
                        )));
                    }
                    Some(Epilogue::ScaleCols) => {}
                    Some(Epilogue::Rope(spec)) => {
                        ids(e, shape[0], "positions")?;
                        if spec.head_dim != 2 * spec.inv_freq.len()
                            || shape[1] != spec.n_heads * spec.head_dim
                        {
                            return Err(self.err(format!(
                                "{:?} is not {} heads of {}",
                                shape, spec.n_heads, spec.head_dim
                            )));
                        }
                    }
                }
                out(shape, *out_dtype)
            }
            Op::AdaLomoUpdate(_) => {
                let (p, g) = (ins[0], ins[1]);
                if p.dtype != DType::F32 || g.dtype != DType::F32 || p.shape != g.shape {
                    return Err(self.err(format!(
                        "param {} {:?} and grad {} {:?} must be f32 of one shape",
                        p.dtype, p.shape, g.dtype, g.shape
                    )));
                }
                for (t, what) in [(ins[2], "lr"), (ins[3], "coef"), (ins[4], "step")] {
                    if t.shape != [1] || t.dtype != DType::F32 {
                        return Err(self.err(format!("{what} must be f32 [1]")));
                    }
                }
                let (rows, cols) = match p.shape.as_slice() {
                    [r, c] => (*r, *c),
                    [n] => (*n, 1),
                    other => {
                        return Err(self.err(format!("param must be 1-D or 2-D, got {other:?}")))
                    }
                };
                if ins[5].shape != [rows] || ins[6].shape != [cols] {
                    return Err(self.err(format!(
                        "state must be row [{rows}] and col [{cols}], got {:?} and {:?}",
                        ins[5].shape, ins[6].shape
                    )));
                }
                out(vec![1], DType::F32)
            }
            Op::SgdUpdate { .. } => {
                let (p, g, lr, coef) = (ins[0], ins[1], ins[2], ins[3]);
                if p.dtype != DType::F32 || g.dtype != DType::F32 || p.shape != g.shape {
                    return Err(self.err(format!(
                        "param {} {:?} and grad {} {:?} must be f32 of one shape",
                        p.dtype, p.shape, g.dtype, g.shape
                    )));
                }
                for (t, what) in [(lr, "lr"), (coef, "coef")] {
                    if t.shape != [1] || t.dtype != DType::F32 {
                        return Err(self.err(format!("{what} must be f32 [1]")));
                    }
                }
                out(vec![1], DType::F32)
            }
            Op::MulCols => {
                let (x, v) = (ins[0], ins[1]);
                rank(x, 2, "x")?;
                float(x, "x")?;
                if v.shape != [x.shape[1]] || v.dtype != x.dtype {
                    return Err(self.err(format!(
                        "v must be {} [{}], got {} {:?}",
                        x.dtype, x.shape[1], v.dtype, v.shape
                    )));
                }
                out(x.shape.clone(), x.dtype)
            }
            Op::DoraCombine => {
                let (base, lora, scale) = (ins[0], ins[1], ins[2]);
                rank(base, 2, "base")?;
                float(base, "base")?;
                if lora.shape != base.shape
                    || lora.dtype != DType::F32
                    || scale.shape != [base.shape[1]]
                    || scale.dtype != DType::F32
                {
                    return Err(self.err(format!(
                        "lora must be f32 {:?} and scale f32 [{}], got {} {:?} and {} {:?}",
                        base.shape, base.shape[1], lora.dtype, lora.shape, scale.dtype, scale.shape
                    )));
                }
                out(base.shape.clone(), base.dtype)
            }
            Op::DoraInvNorm { .. } => {
                let (a, b, w) = (ins[0], ins[1], ins[2]);
                let ok = a.shape.len() == 2
                    && b.shape.len() == 2
                    && w.shape.len() == 2
                    && a.dtype == DType::F32
                    && b.dtype == DType::F32
                    && (w.dtype.is_float() || w.dtype.is_nf4())
                    && b.shape[1] == a.shape[0]
                    && w.shape == [b.shape[0], a.shape[1]];
                if !ok {
                    return Err(self.err(format!(
                        "a {} {:?}, b {} {:?}, w {} {:?} are not f32 [r,in], f32 [out,r], [out,in]",
                        a.dtype, a.shape, b.dtype, b.shape, w.dtype, w.shape
                    )));
                }
                out(vec![w.shape[0]], DType::F32)
            }
            Op::AddBias => {
                let (x, b) = (ins[0], ins[1]);
                rank(x, 2, "x")?;
                float(x, "x")?;
                if b.shape != [x.shape[1]] || b.dtype != x.dtype {
                    return Err(self.err(format!(
                        "bias must be {} [{}], got {} {:?}",
                        x.dtype, x.shape[1], b.dtype, b.shape
                    )));
                }
                out(x.shape.clone(), x.dtype)
            }
            Op::SumRows => {
                rank(ins[0], 2, "x")?;
                float(ins[0], "x")?;
                out(vec![ins[0].shape[1]], ins[0].dtype)
            }
            Op::Add | Op::Mul => {
                same(ins[0], ins[1])?;
                float(ins[0], "operand")?;
                out(ins[0].shape.clone(), ins[0].dtype)
            }
            Op::Scale(_) => {
                float(ins[0], "x")?;
                out(ins[0].shape.clone(), ins[0].dtype)
            }
            Op::Cast(to) => {
                float(ins[0], "x")?;
                if !to.is_float() {
                    return Err(self.err(format!("cannot cast to {to}")));
                }
                out(ins[0].shape.clone(), *to)
            }
            Op::Embedding => {
                let (table, idx) = (ins[0], ins[1]);
                rank(table, 2, "table")?;
                float(table, "table")?;
                rank(idx, 1, "ids")?;
                ids(idx, idx.shape[0], "ids")?;
                out(vec![idx.shape[0], table.shape[1]], table.dtype)
            }
            Op::EmbeddingGrad { vocab } => {
                let (dy, idx) = (ins[0], ins[1]);
                rank(dy, 2, "dy")?;
                float(dy, "dy")?;
                ids(idx, dy.shape[0], "ids")?;
                out(vec![*vocab, dy.shape[1]], dy.dtype)
            }
            // The gradient of x takes dy as a third input of x's type.
            Op::RmsNorm { .. } | Op::RmsNormGradInput { .. } => {
                let (x, w) = (ins[0], ins[1]);
                if let Some(dy) = ins.get(2) {
                    same(x, dy)?;
                }
                rank(x, 2, "x")?;
                float(x, "x")?;
                if w.shape != [x.shape[1]] || w.dtype != x.dtype {
                    return Err(self.err(format!(
                        "weight must be {} [{}], got {} {:?}",
                        x.dtype, x.shape[1], w.dtype, w.shape
                    )));
                }
                out(x.shape.clone(), x.dtype)
            }
            Op::RmsNormGradWeight { .. } => {
                same(ins[0], ins[1])?;
                rank(ins[0], 2, "x")?;
                float(ins[0], "x")?;
                out(vec![ins[0].shape[1]], ins[0].dtype)
            }
            Op::Rope { spec, .. } => {
                let (x, pos) = (ins[0], ins[1]);
                rank(x, 2, "x")?;
                float(x, "x")?;
                if x.shape[1] != spec.n_heads * spec.head_dim
                    || spec.head_dim % 2 != 0
                    || spec.inv_freq.len() != spec.head_dim / 2
                {
                    return Err(self.err(format!(
                        "x {:?} does not fit {} heads of even dim {} with {} frequencies",
                        x.shape,
                        spec.n_heads,
                        spec.head_dim,
                        spec.inv_freq.len()
                    )));
                }
                ids(pos, x.shape[0], "positions")?;
                out(x.shape.clone(), x.dtype)
            }
            Op::Attention(spec) => {
                let (q, k, v, seg) = (ins[0], ins[1], ins[2], ins[3]);
                spec.check(self, q, k, v, Some(seg))?;
                Ok(vec![
                    TypeInfo::new(q.shape.clone(), q.dtype),
                    TypeInfo::new(vec![q.shape[0], spec.n_heads], DType::F32),
                ])
            }
            Op::AttentionCached(spec) => {
                let (q, k, v, kc, vc, start) = (ins[0], ins[1], ins[2], ins[3], ins[4], ins[5]);
                spec.check(self, q, k, v, None)?;
                let rows = kc.shape.first().copied().unwrap_or(0);
                if kc.shape != [rows, k.shape[1]]
                    || vc.shape != kc.shape
                    || kc.dtype != k.dtype
                    || vc.dtype != k.dtype
                {
                    return Err(self.err(format!(
                        "caches k {:?} v {:?} must be {} [C, {}]",
                        kc.shape, vc.shape, k.dtype, k.shape[1]
                    )));
                }
                if start.shape != [1] || start.dtype != DType::I32 {
                    return Err(self.err("start must be i32 [1]".into()));
                }
                out(q.shape.clone(), q.dtype)
            }
            Op::AttentionGrad(spec) => {
                let (q, k, v, seg, o, lse, dout) =
                    (ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6]);
                spec.check(self, q, k, v, Some(seg))?;
                same(q, o)?;
                same(q, dout)?;
                if lse.shape != [q.shape[0], spec.n_heads] || lse.dtype != DType::F32 {
                    return Err(
                        self.err(format!("lse must be f32 [T, n_heads], got {:?}", lse.shape))
                    );
                }
                Ok(vec![
                    TypeInfo::new(q.shape.clone(), q.dtype),
                    TypeInfo::new(k.shape.clone(), k.dtype),
                    TypeInfo::new(v.shape.clone(), v.dtype),
                ])
            }
            Op::GatedAct(_) => {
                same(ins[0], ins[1])?;
                float(ins[0], "gate")?;
                out(ins[0].shape.clone(), ins[0].dtype)
            }
            Op::GatedActGrad(_) => {
                same(ins[0], ins[1])?;
                same(ins[0], ins[2])?;
                float(ins[0], "gate")?;
                Ok(vec![ins[0].clone(), ins[0].clone()])
            }
            Op::CrossEntropy { .. } => {
                let (logits, labels) = (ins[0], ins[1]);
                rank(logits, 2, "logits")?;
                float(logits, "logits")?;
                if labels.dtype != DType::I32 || labels.shape != [logits.shape[0]] {
                    return Err(self.err(format!(
                        "labels must be i32 [{}], got {} {:?}",
                        logits.shape[0], labels.dtype, labels.shape
                    )));
                }
                out(vec![1], DType::F32)
            }
            Op::CrossEntropyGrad { .. } => {
                let (logits, labels, dloss) = (ins[0], ins[1], ins[2]);
                rank(logits, 2, "logits")?;
                float(logits, "logits")?;
                if labels.dtype != DType::I32 || labels.shape != [logits.shape[0]] {
                    return Err(self.err("labels must be i32 [T]".into()));
                }
                if dloss.shape != [1] || dloss.dtype != DType::F32 {
                    return Err(self.err("dloss must be f32 [1]".into()));
                }
                out(logits.shape.clone(), logits.dtype)
            }
            Op::LinearCrossEntropy { chunk, .. } => {
                let (h, w, labels) = (ins[0], ins[1], ins[2]);
                rank(h, 2, "h")?;
                rank(w, 2, "w")?;
                float(h, "h")?;
                if w.dtype != h.dtype || w.shape[1] != h.shape[1] {
                    return Err(self.err(format!(
                        "w must be {} [vocab, {}], got {} {:?}",
                        h.dtype, h.shape[1], w.dtype, w.shape
                    )));
                }
                if labels.dtype != DType::I32 || labels.shape != [h.shape[0]] {
                    return Err(self.err(format!(
                        "labels must be i32 [{}], got {} {:?}",
                        h.shape[0], labels.dtype, labels.shape
                    )));
                }
                if *chunk == 0 {
                    return Err(self.err("chunk must be at least one token".into()));
                }
                Ok(vec![
                    TypeInfo::new(vec![1], DType::F32),
                    TypeInfo::new(h.shape.clone(), h.dtype),
                ])
            }
            Op::Elementwise(p) => {
                use crate::program::Operand;
                p.check().map_err(|m| self.err(m))?;
                let full: Vec<&TypeInfo> = p
                    .inputs
                    .iter()
                    .zip(ins)
                    .filter(|(o, _)| **o == Operand::Full)
                    .map(|(_, t)| *t)
                    .collect();
                let Some(first) = full.first() else {
                    return Err(self.err("no input shaped as the output".into()));
                };
                let cols = first.shape.last().copied().unwrap_or(1);
                for (i, (o, t)) in p.inputs.iter().zip(ins).enumerate() {
                    let ok = match o {
                        Operand::Full => t.shape == first.shape,
                        Operand::Cols => t.shape == [cols],
                        Operand::Scalar => t.shape == [1],
                    };
                    // Loaded inputs are floats; a dropout's seed is a u32
                    // scalar (checked below).
                    let float_or_seed = t.dtype.is_float() || *o == Operand::Scalar;
                    if !ok || !float_or_seed {
                        return Err(self.err(format!(
                            "input {i} ({o:?}) is {} {:?} against the output's {:?}",
                            t.dtype, t.shape, first.shape
                        )));
                    }
                }
                use crate::program::Instr;
                for ins_ in &p.code {
                    let bad = match *ins_ {
                        Instr::Load(i) => (!ins[i].dtype.is_float())
                            .then(|| format!("loads input {i}, a {}", ins[i].dtype)),
                        Instr::Dropout { seed, .. } => (p.inputs[seed] != Operand::Scalar
                            || ins[seed].dtype != DType::U32)
                            .then(|| format!("takes input {seed} as its seed: not a u32 [1]")),
                        _ => None,
                    };
                    if let Some(m) = bad {
                        return Err(self.err(m));
                    }
                }
                if !p.out.is_float() {
                    return Err(self.err(format!("writes {}", p.out)));
                }
                out(first.shape.clone(), p.out)
            }
            Op::ScaleBy => {
                float(ins[0], "x")?;
                if ins[1].shape != [1] || ins[1].dtype != DType::F32 {
                    return Err(self.err("s must be f32 [1]".into()));
                }
                out(ins[0].shape.clone(), ins[0].dtype)
            }
            Op::Dropout { p } => {
                float(ins[0], "x")?;
                if !(0.0..1.0).contains(p) {
                    return Err(self.err(format!("p must be in [0, 1), got {p}")));
                }
                if ins[1].shape != [1] || ins[1].dtype != DType::U32 {
                    return Err(self.err("seed must be u32 [1]".into()));
                }
                out(ins[0].shape.clone(), ins[0].dtype)
            }
        }
    }

    /// Bytes of scratch the op's kernel needs while it runs, beyond its
    /// outputs; the memory plan places it like a value live for that node
    /// alone.
    pub fn workspace_bytes(&self, ins: &[&TypeInfo]) -> usize {
        match self {
            Op::LinearCrossEntropy { chunk, .. } => {
                // A chunk of logits, and of the rows of h and dh gathered.
                let (t, hd, v) = (ins[0].shape[0], ins[0].shape[1], ins[1].shape[0]);
                ins[0].dtype.bytes((*chunk).min(t) * (v + 2 * hd))
            }
            _ => 0,
        }
    }

    /// The inputs the op writes in place (the first is the parameter).
    pub fn in_place_inputs(&self) -> &'static [usize] {
        match self {
            Op::SgdUpdate { .. } => &[0],
            Op::AdaLomoUpdate(_) => &[0, 5, 6],
            _ => &[],
        }
    }
    /// Whether the op writes any input in place.
    pub fn updates_in_place(&self) -> bool {
        !self.in_place_inputs().is_empty()
    }

    fn err(&self, msg: String) -> IrError {
        IrError::Shape {
            op: self.name(),
            msg,
        }
    }
}

impl AttentionSpec {
    fn check(
        &self,
        op: &Op,
        q: &TypeInfo,
        k: &TypeInfo,
        v: &TypeInfo,
        seg: Option<&TypeInfo>,
    ) -> Result<(), IrError> {
        let t = q.shape.first().copied().unwrap_or(0);
        let ok = q.shape == [t, self.n_heads * self.head_dim]
            && k.shape == [t, self.n_kv_heads * self.head_dim]
            && v.shape == k.shape
            && q.dtype.is_float()
            && k.dtype == q.dtype
            && v.dtype == q.dtype
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.window != Some(0);
        if !ok {
            return Err(op.err(format!(
                "q {:?} k {:?} v {:?} do not fit {} heads / {} kv heads of dim {}",
                q.shape, k.shape, v.shape, self.n_heads, self.n_kv_heads, self.head_dim
            )));
        }
        if let Some(seg) =
            seg.filter(|s| !matches!(s.dtype, DType::I32 | DType::U32) || s.shape != [t])
        {
            return Err(op.err(format!("segments must be i32 [{t}], got {:?}", seg.shape)));
        }
        Ok(())
    }
}
