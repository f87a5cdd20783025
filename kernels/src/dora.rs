//! DoRA's weight norm: per output row `o`, `‖W_o + s·(B·A)_o‖₂`, with
//! `W [out, in]` (dense or NF4, read one row at a time), `A [r, in]`,
//! `B [out, r]`. The sum `B·A` is formed first, then scaled and added to
//! `W`, as PEFT's `get_weight_norm` does; f32 throughout.

use rayon::prelude::*;

/// `row(o, buf)` writes row `o` of W (as f32) into `buf` (`in` values).
pub fn dora_norms(
    row: impl Fn(usize, &mut [f32]) + Sync,
    a: &[f32],
    b: &[f32],
    r: usize,
    s: f32,
    y: &mut [f32],
) {
    let inp = a.len() / r.max(1);
    y.par_iter_mut().enumerate().for_each(|(o, y)| {
        let mut w = vec![0f32; inp];
        row(o, &mut w);
        let b_row = &b[o * r..(o + 1) * r];
        let mut sq = 0f32;
        for (i, w) in w.iter().enumerate() {
            let ba: f32 = b_row
                .iter()
                .enumerate()
                .map(|(k, bk)| bk * a[k * inp + i])
                .sum();
            let v = w + s * ba;
            sq += v * v;
        }
        *y = sq.sqrt();
    });
}
