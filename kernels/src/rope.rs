//! Rotary position embedding in the half-split (`rotate_half`) layout.

use crate::simd::vectorized;
use crate::Elem;
use rayon::prelude::*;

/// Rotates each head of `x[t, n_heads*head_dim]` by `positions[t]·inv_freq`:
/// for `i < head_dim/2`, the pair `(x[i], x[i+head_dim/2])` turns by that
/// angle (by its negative when `inverse`, which is the VJP).
pub fn rope<T: Elem>(
    x: &[T],
    positions: &[i32],
    inv_freq: &[f32],
    n_heads: usize,
    inverse: bool,
    y: &mut [T],
) {
    let half = inv_freq.len();
    let d = 2 * half;
    let width = n_heads * d;
    // The cosines and sines of each distinct position, once: a batch holds
    // few (packed sequences restart theirs), and libm's cos and sin per
    // element cost more than the rotation.
    let mut distinct = positions.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let table: Vec<f32> = distinct
        .par_iter()
        .flat_map_iter(|&p| {
            // As transformers: the angle is the f32 product position·inv_freq.
            let angles = inv_freq.iter().map(move |&f| p as f32 * f);
            let sign = if inverse { -1.0 } else { 1.0 };
            angles
                .clone()
                .map(f32::cos)
                .chain(angles.map(move |a| sign * a.sin()))
        })
        .collect();
    y.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .zip(positions)
        .for_each(|((y_row, x_row), p)| {
            let at = distinct.binary_search(p).expect("every position is in the table");
            let (cos, sin) = table[at * d..][..d].split_at(half);
            vectorized(
                #[inline(always)]
                || {
                    for (yh, xh) in y_row.chunks_mut(d).zip(x_row.chunks(d)) {
                        let (y1, y2) = yh.split_at_mut(half);
                        let (x1, x2) = xh.split_at(half);
                        for i in 0..half {
                            let (a, b) = (x1[i].to_f32(), x2[i].to_f32());
                            y1[i] = T::from_f32(a * cos[i] - b * sin[i]);
                            y2[i] = T::from_f32(b * cos[i] + a * sin[i]);
                        }
                    }
                },
            )
        });
}
