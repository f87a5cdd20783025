//! Fused parameter updates that run inside a plan (LOMO): the gradient is
//! consumed where it is produced, and the parameter is written in place.

/// One SGD step, as `torch.optim.SGD` (no momentum) computes it after
/// `grad *= coef` (LOMO's clipping coefficient; 1 without clipping) and, if
/// `clip_value > 0`, `grad.clamp_(-clip_value, clip_value)` first. Returns
/// the squared L2 norm of the raw gradient (f64 sum), for LOMO's first pass.
pub fn sgd_update(p: &mut [f32], g: &[f32], lr: f32, coef: f32, wd: f32, clip_value: f32) -> f64 {
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
