//! DoRA's weight norm: per output row `o`, `‖W_o + s·(B·A)_o‖₂`, with
//! `W [out, in]` (dense or NF4, read one row at a time), `A [r, in]`,
//! `B [out, r]`. The sum `B·A` is formed first, then scaled and added to
//! `W`, as PEFT's `get_weight_norm` does; f32 throughout.

use crate::simd::vectorized;
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
    y.par_iter_mut().enumerate().for_each_init(
        || (vec![0f32; inp], vec![0f32; inp]),
        |(w, ba), (o, y)| {
            row(o, w);
            let b_row = &b[o * r..(o + 1) * r];
            // (B·A)_o as rows of A scaled and added in k order: each
            // element's sum is the same sequence of roundings as a dot
            // product over k, with A read contiguously.
            ba.fill(0.0);
            vectorized(
                #[inline(always)]
                || {
                    for (bk, a_row) in b_row.iter().zip(a.chunks_exact(inp.max(1))) {
                        ba.iter_mut().zip(a_row).for_each(|(x, a)| *x += bk * a);
                    }
                },
            );
            let mut sq = 0f32;
            for (w, ba) in w.iter().zip(ba.iter()) {
                let v = w + s * ba;
                sq += v * v;
            }
            *y = sq.sqrt();
        },
    );
}

/// DoRA's epilogue: `y = scale ⊙ (base + lora)` per column, the sum and the
/// product rounded to f32 (as casting base to f32, adding and scaling as
/// separate ops would), then to `T`.
pub fn dora_combine<T: crate::Elem>(base: &[T], lora: &[f32], scale: &[f32], y: &mut [T]) {
    let n = scale.len();
    for ((y_row, b_row), l_row) in y.chunks_mut(n).zip(base.chunks(n)).zip(lora.chunks(n)) {
        for (((y, b), l), s) in y_row.iter_mut().zip(b_row).zip(l_row).zip(scale) {
            *y = T::from_f32((b.to_f32() + l) * s);
        }
    }
}
