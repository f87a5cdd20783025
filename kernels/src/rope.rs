//! Rotary position embedding in the half-split (`rotate_half`) layout.

use crate::simd::vectorized;
use crate::Elem;
use rayon::prelude::*;

/// The cosines and sines of a batch's positions, each distinct position
/// once: a batch holds few (packed sequences restart theirs), and libm's cos
/// and sin per element would cost more than the rotation.
pub struct RopeTable {
    distinct: Vec<i32>,
    /// Per distinct position: `half` cosines, then `half` sines (negated
    /// for the inverse rotation).
    table: Vec<f32>,
    half: usize,
}

impl RopeTable {
    pub fn new(positions: &[i32], inv_freq: &[f32], inverse: bool) -> RopeTable {
        let mut distinct = positions.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let sign = if inverse { -1.0 } else { 1.0 };
        let table = distinct
            .par_iter()
            .flat_map_iter(|&p| {
                // As transformers: the angle is the f32 product position·inv_freq.
                let angles = inv_freq.iter().map(move |&f| p as f32 * f);
                angles
                    .clone()
                    .map(f32::cos)
                    .chain(angles.map(move |a| sign * a.sin()))
            })
            .collect();
        RopeTable {
            distinct,
            table,
            half: inv_freq.len(),
        }
    }

    /// Head width: the columns one rotation takes.
    pub fn head_dim(&self) -> usize {
        2 * self.half
    }

    /// Rotates every head of `row` (whole heads) by position `p`, a
    /// position the table was made with, in place.
    #[inline(always)]
    pub fn rotate(&self, p: i32, row: &mut [f32]) {
        let half = self.half;
        let at = self
            .distinct
            .binary_search(&p)
            .expect("a position of the table's");
        let (cos, sin) = self.table[at * 2 * half..][..2 * half].split_at(half);
        for head in row.chunks_exact_mut(2 * half) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

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
    let table = RopeTable::new(positions, inv_freq, inverse);
    let width = n_heads * table.head_dim();
    y.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .zip(positions)
        .for_each_init(
            || vec![0f32; width],
            |buf, ((y_row, x_row), &p)| {
                vectorized(
                    #[inline(always)]
                    || {
                        buf.iter_mut().zip(x_row).for_each(|(o, v)| *o = v.to_f32());
                        table.rotate(p, buf);
                        y_row
                            .iter_mut()
                            .zip(buf.iter())
                            .for_each(|(o, &v)| *o = T::from_f32(v));
                    },
                )
            },
        );
}
