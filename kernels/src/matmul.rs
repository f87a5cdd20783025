//! Dense matrix product.

use crate::{Elem, PAR_MIN_WORK};
use rayon::prelude::*;

/// `c[m,n] = op(a)·op(b)` with f32 accumulation, where `op(a)` is `a[m,k]`
/// or, when `ta`, the transpose of `a[k,m]`; likewise `op(b)` is `b[k,n]` or
/// the transpose of `b[n,k]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Elem>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) {
    assert_eq!(a.len(), m * k, "matmul: a");
    assert_eq!(b.len(), k * n, "matmul: b");
    assert_eq!(c.len(), m * n, "matmul: c");
    if n == 0 {
        return;
    }
    let row = |(i, c_row): (usize, &mut [T])| {
        let a_at = |p: usize| if ta { a[p * m + i] } else { a[i * k + p] }.to_f32();
        if tb {
            // Rows of b are contiguous: a dot product per output.
            let a_row: Vec<f32> = (0..k).map(a_at).collect();
            for (j, out) in c_row.iter_mut().enumerate() {
                let b_row = &b[j * k..(j + 1) * k];
                let dot: f32 = a_row.iter().zip(b_row).map(|(x, y)| x * y.to_f32()).sum();
                *out = T::from_f32(dot);
            }
        } else {
            // Accumulate scaled rows of b.
            let mut acc = vec![0f32; n];
            for p in 0..k {
                let av = a_at(p);
                for (s, bv) in acc.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *s += av * bv.to_f32();
                }
            }
            for (out, s) in c_row.iter_mut().zip(acc) {
                *out = T::from_f32(s);
            }
        }
    };
    if m * k * n >= PAR_MIN_WORK {
        c.par_chunks_mut(n).enumerate().for_each(row);
    } else {
        c.chunks_mut(n).enumerate().for_each(row);
    }
}
