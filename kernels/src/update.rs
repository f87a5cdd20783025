//! Fused parameter updates that run inside a plan (LOMO): the gradient is
//! consumed where it is produced, and the parameter is written in place.
//! Also AdamW's per-element step, which the engine's optimizer
//! (engine/src/optim.rs) runs after a plan, and the GPU runs too.

/// The f32 scalars of one AdamW step, derived from the f64 hyperparameters
/// as PyTorch's single-tensor AdamW derives them (tests/optim_torch.rs
/// checks the result against torch.optim bit for bit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// `1 − lr·weight_decay` (decoupled weight decay).
    pub decay: f32,
    /// `1 − beta1`, the weight of the first moment's lerp.
    pub w1: f32,
    pub b2: f32,
    /// `1 − beta2`.
    pub w2: f32,
    /// `√(1 − beta2^t)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `−lr / (1 − beta1^t)`.
    pub neg_step: f32,
}

impl AdamWStep {
    /// The scalars of step `t` (from 1) at learning rate `lr`.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: i32) -> AdamWStep {
        let step_size = lr / (1.0 - beta1.powi(t));
        AdamWStep {
            decay: (1.0 - lr * weight_decay) as f32,
            w1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: eps as f32,
            neg_step: (-step_size) as f32,
        }
    }
}

/// `a + w·(b − a)` as ATen's vectorised CPU `lerp` computes it in f32 (one
/// fused multiply-add, anchored at the nearer end).
#[inline]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        (b - a).mul_add(w, a)
    } else {
        (b - a).mul_add(w - 1.0, b)
    }
}

/// One AdamW step on `p` with gradient `g` and moments `m`, `v` (all of one
/// length), operation by operation as PyTorch's single-tensor CPU AdamW.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p *= s.decay;
        *m = lerp(*m, g, s.w1);
        // addcmul: `value·t1` rounded, then fused with `t2` and the sum.
        *v = (s.w2 * g).mul_add(g, *v * s.b2);
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        // addcdiv: `(value·t1)/t2`, then the sum, each rounded.
        *p += (s.neg_step * *m) / denom;
    }
}

/// One SGD step, as `torch.optim.SGD` (no momentum) computes it after
/// `grad *= coef` (LOMO's clipping coefficient; 1 without clipping) and, if
/// `clip_value > 0`, `grad.clamp_(-clip_value, clip_value)` first. Returns
/// the squared L2 norm of the raw gradient (f64 sum), for LOMO's first pass,
/// which runs with `lr = 0` and writes nothing (not even a NaN gradient's
/// NaN, which `p − 0·d` would be).
pub fn sgd_update(p: &mut [f32], g: &[f32], lr: f32, coef: f32, wd: f32, clip_value: f32) -> f64 {
    if lr == 0.0 {
        return g.iter().map(|&x| (x as f64) * (x as f64)).sum();
    }
    let neg_lr = -lr;
    let mut sq = 0f64;
    for (p, &g) in p.iter_mut().zip(g) {
        sq += (g as f64) * (g as f64);
        let g = if clip_value > 0.0 {
            g.clamp(-clip_value, clip_value)
        } else {
            g
        };
        // `grad *= coef` (exact for coef 1) then ATen's fused `add(.., alpha)` steps.
        let mut d = g * coef;
        if wd != 0.0 {
            d = p.mul_add(wd, d);
        }
        *p = d.mul_add(neg_lr, *p);
    }
    sq
}

/// AdaLomo's hyperparameters (the IR's `AdaLomoSpec`, whose defaults are
/// the paper's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaLomo {
    pub eps1: f32,
    pub eps2: f32,
    pub clip_threshold: f32,
    pub decay_rate: f32,
    pub weight_decay: f32,
    pub clip_value: f32,
}

fn rms(x: &[f32]) -> f32 {
    ((x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64).sqrt())
        as f32
}

/// One AdaLomo step of step number `t` (from 1) on `p`: a matrix
/// (`factored`, `row.len() × cols`) keeps a factored second moment, any
/// other parameter a full one in `row` (`col` unused):
/// the gradient (clamped, times `coef`) updates the factored second moment
/// `row[rows]`, `col[cols]` (non-negative factorisation: `v ≈ row·colᵀ /
/// mean(row)`), the update `g/√v` is normalised by its RMS (grouped update
/// normalisation, at most `clip_threshold`), and applied with the learning
/// rate scaled by `max(eps2, RMS(p))`. Returns ‖raw grad‖² (f64 sum).
/// With `lr = 0` it only measures (LOMO's first pass): nothing is written.
#[allow(clippy::too_many_arguments)]
pub fn adalomo_update(
    p: &mut [f32],
    g: &[f32],
    row: &mut [f32],
    col: &mut [f32],
    factored: bool,
    t: u64,
    lr: f32,
    coef: f32,
    h: &AdaLomo,
) -> f64 {
    let sq: f64 = g.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if lr == 0.0 {
        return sq;
    }
    let g: Vec<f32> = g
        .iter()
        .map(|&x| {
            let x = if h.clip_value > 0.0 {
                x.clamp(-h.clip_value, h.clip_value)
            } else {
                x
            };
            x * coef
        })
        .collect();
    let beta = 1.0 - (t as f32).powf(h.decay_rate);
    let mut u = vec![0f32; p.len()];
    if factored {
        let (rows, cols) = (row.len(), col.len());
        // Means summed in f64, as the GPU's do: an f32 sum over a 4096-wide
        // row drifts ~1e-5 with the order of the additions.
        let mut col_sum = vec![0f64; cols];
        for (r, gr) in g.chunks(cols).enumerate() {
            let mut s = 0f64;
            for (c, &x) in gr.iter().enumerate() {
                let v = (x * x + h.eps1) as f64;
                s += v;
                col_sum[c] += v;
            }
            row[r] = row[r] * beta + ((s / cols as f64) as f32) * (1.0 - beta);
        }
        for (c, s) in col.iter_mut().zip(&col_sum) {
            *c = *c * beta + ((s / rows as f64) as f32) * (1.0 - beta);
        }
        let row_mean = (row.iter().map(|&v| v as f64).sum::<f64>() / rows as f64) as f32;
        for (r, (ur, gr)) in u.chunks_mut(cols).zip(g.chunks(cols)).enumerate() {
            let rf = 1.0 / (row[r] / row_mean).sqrt();
            for ((u, &x), &c) in ur.iter_mut().zip(gr).zip(col.iter()) {
                *u = rf * (1.0 / c.sqrt()) * x;
            }
        }
    } else {
        for ((u, &x), v) in u.iter_mut().zip(&g).zip(row.iter_mut()) {
            *v = *v * beta + (x * x + h.eps1) * (1.0 - beta);
            *u = x / v.sqrt();
        }
    }
    let scale = (rms(&u) / h.clip_threshold).max(1.0);
    let lr = lr * h.eps2.max(rms(p));
    let decay = 1.0 - lr * h.weight_decay;
    for (p, u) in p.iter_mut().zip(&u) {
        if h.weight_decay != 0.0 {
            *p *= decay;
        }
        *p -= lr * (u / scale);
    }
    sq
}
