//! RMSNorm, forward and backward, in f32 whatever the storage type (as
//! transformers computes it).

use crate::simd::vectorized;
use crate::{Elem, PAR_MIN_WORK};
use rayon::prelude::*;

/// Running sums of a row's reductions: LANES of them, added in order, then
/// the tail (a single running f32 sum cannot be reordered, so its loop
/// stays scalar).
const LANES: usize = 16;

#[inline(always)]
fn inv_rms<T: Elem>(x: &[T], eps: f32) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| v.to_f32() * v.to_f32())
        .sum();
    let mut acc = [0f32; LANES];
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v.to_f32() * v.to_f32();
        }
    }
    let ms = (acc.iter().sum::<f32>() + tail) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

#[inline]
fn gain<T: Elem>(w: T, unit_offset: bool) -> f32 {
    w.to_f32() + if unit_offset { 1.0 } else { 0.0 }
}

fn rows<T: Elem, F>(y: &mut [T], h: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if y.len() >= PAR_MIN_WORK {
        y.par_chunks_mut(h).enumerate().for_each(|(i, r)| {
            vectorized(
                #[inline(always)]
                || f(i, r),
            )
        });
    } else {
        vectorized(
            #[inline(always)]
            || y.chunks_mut(h).enumerate().for_each(|(i, r)| f(i, r)),
        );
    }
}

/// `y = x·rsqrt(mean(x²)+eps)·g` per row of `x[t,h]`, `g = w` or `1+w`.
pub fn rms_norm<T: Elem>(x: &[T], w: &[T], eps: f32, unit_offset: bool, y: &mut [T]) {
    let h = w.len();
    rows(
        y,
        h,
        #[inline(always)]
        |i, y_row| {
            let x_row = &x[i * h..(i + 1) * h];
            let r = inv_rms(x_row, eps);
            for ((y, x), w) in y_row.iter_mut().zip(x_row).zip(w) {
                *y = T::from_f32(x.to_f32() * r * gain(*w, unit_offset));
            }
        },
    );
}

/// `dx = r·(g⊙dy) − x·r³/h·Σ(g⊙dy⊙x)` per row.
pub fn rms_norm_grad_input<T: Elem>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f32,
    unit_offset: bool,
    dx: &mut [T],
) {
    let h = w.len();
    rows(
        dx,
        h,
        #[inline(always)]
        |i, dx_row| {
            let x_row = &x[i * h..(i + 1) * h];
            let dy_row = &dy[i * h..(i + 1) * h];
            let r = inv_rms(x_row, eps);
            let term = |x: &T, dy: &T, w: &T| x.to_f32() * dy.to_f32() * gain(*w, unit_offset);
            let (xc, dc, wc) = (
                x_row.chunks_exact(LANES),
                dy_row.chunks_exact(LANES),
                w.chunks_exact(LANES),
            );
            let tail: f32 = (xc.remainder().iter().zip(dc.remainder()))
                .zip(wc.remainder())
                .map(|((x, dy), w)| term(x, dy, w))
                .sum();
            let mut acc = [0f32; LANES];
            for ((xs, ds), ws) in xc.zip(dc).zip(wc) {
                for (((a, x), dy), w) in acc.iter_mut().zip(xs).zip(ds).zip(ws) {
                    *a += term(x, dy, w);
                }
            }
            let dot = acc.iter().sum::<f32>() + tail;
            let c = r * r * r * dot / h as f32;
            for (((dx, x), dy), w) in dx_row.iter_mut().zip(x_row).zip(dy_row).zip(w) {
                *dx = T::from_f32(r * dy.to_f32() * gain(*w, unit_offset) - x.to_f32() * c);
            }
        },
    );
}

/// `dw[h] = Σ over rows of dy⊙x·r`.
pub fn rms_norm_grad_weight<T: Elem>(x: &[T], dy: &[T], eps: f32, dw: &mut [T]) {
    let h = dw.len();
    let mut acc = vec![0f32; h];
    for (x_row, dy_row) in x.chunks(h).zip(dy.chunks(h)) {
        let r = inv_rms(x_row, eps);
        for ((s, x), dy) in acc.iter_mut().zip(x_row).zip(dy_row) {
            *s += dy.to_f32() * x.to_f32() * r;
        }
    }
    for (d, s) in dw.iter_mut().zip(acc) {
        *d = T::from_f32(s);
    }
}
