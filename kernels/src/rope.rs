//! Rotary position embedding in the half-split (`rotate_half`) layout.

use crate::Elem;

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
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (t, (y_row, x_row)) in y.chunks_mut(width).zip(x.chunks(width)).enumerate() {
        // As transformers: the angle is the f32 product position·inv_freq.
        let p = positions[t] as f32;
        for i in 0..half {
            let a = p * inv_freq[i];
            cos[i] = a.cos();
            sin[i] = if inverse { -a.sin() } else { a.sin() };
        }
        for (yh, xh) in y_row.chunks_mut(d).zip(x_row.chunks(d)) {
            for i in 0..half {
                let (x1, x2) = (xh[i].to_f32(), xh[i + half].to_f32());
                yh[i] = T::from_f32(x1 * cos[i] - x2 * sin[i]);
                yh[i + half] = T::from_f32(x2 * cos[i] + x1 * sin[i]);
            }
        }
    }
}
