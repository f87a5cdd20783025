//! Elementwise kernels and the small reductions that go with them.

use crate::simd::vectorized;
use crate::Elem;
use rayon::prelude::*;

/// Elements per parallel task: each element is independent, so any split
/// gives the same bits; below this, one task (waking the pool costs more).
const CHUNK: usize = 1 << 15;

/// `y[i] = f(a[i], b[i])`, in parallel over chunks of the slices.
fn map2<A: Sync, B: Sync, Y: Send>(a: &[A], b: &[B], y: &mut [Y], f: impl Fn(&A, &B) -> Y + Sync) {
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((y, a), b)| {
            vectorized(
                #[inline(always)]
                || {
                    for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                        *y = f(a, b);
                    }
                },
            )
        });
}

pub fn fill<T: Elem>(y: &mut [T], value: f32) {
    y.fill(T::from_f32(value));
}

pub fn add<T: Elem>(a: &[T], b: &[T], y: &mut [T]) {
    map2(a, b, y, |a, b| T::from_f32(a.to_f32() + b.to_f32()));
}

pub fn mul<T: Elem>(a: &[T], b: &[T], y: &mut [T]) {
    map2(a, b, y, |a, b| T::from_f32(a.to_f32() * b.to_f32()));
}

pub fn scale<T: Elem>(x: &[T], s: f32, y: &mut [T]) {
    map2(x, x, y, |x, _| T::from_f32(x.to_f32() * s));
}

pub fn cast<T: Elem, U: Elem>(x: &[T], y: &mut [U]) {
    map2(x, x, y, |x, _| U::from_f32(x.to_f32()));
}

/// `y[m,n] = x[m,n] + b[n]`.
pub fn add_bias<T: Elem>(x: &[T], b: &[T], y: &mut [T]) {
    let n = b.len();
    for (y_row, x_row) in y.chunks_mut(n).zip(x.chunks(n)) {
        for ((y, x), b) in y_row.iter_mut().zip(x_row).zip(b) {
            *y = T::from_f32(x.to_f32() + b.to_f32());
        }
    }
}

/// `y[m,n] = x[m,n] · v[n]`: a per-column scale (DoRA's magnitude over
/// norm on the base output).
pub fn mul_cols<T: Elem>(x: &[T], v: &[T], y: &mut [T]) {
    let n = v.len();
    for (y_row, x_row) in y.chunks_mut(n).zip(x.chunks(n)) {
        for ((y, x), v) in y_row.iter_mut().zip(x_row).zip(v) {
            *y = T::from_f32(x.to_f32() * v.to_f32());
        }
    }
}

/// `y[n] = sum over rows of x[m,n]`.
pub fn sum_rows<T: Elem>(x: &[T], y: &mut [T]) {
    let n = y.len();
    let mut acc = vec![0f32; n];
    for row in x.chunks(n) {
        for (s, v) in acc.iter_mut().zip(row) {
            *s += v.to_f32();
        }
    }
    for (y, s) in y.iter_mut().zip(acc) {
        *y = T::from_f32(s);
    }
}

/// Whether element `index` survives dropout with probability `p` under `seed`:
/// a counter-based hash, so forward and backward agree without a stored mask.
/// The seed fills the high 32 bits of the hashed word and the index the low
/// ones, so every seed bit counts and (seed, index < 2^32) pairs never collide.
#[inline]
pub fn dropout_keep(seed: u32, index: usize, p: f32) -> bool {
    let mut z = ((seed as u64) << 32) ^ (index as u64) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // z >> 40 < 2^24: exact through u32 (which vectorizes; u64 to f32 does
    // not without AVX-512DQ).
    let u = ((z >> 40) as u32) as f32 / (1u64 << 24) as f32;
    u >= p
}

/// `y = x·mask/(1-p)`; applying it to `dy` with the same seed is the VJP.
/// In parallel over chunks, each element's mask from its own index.
pub fn dropout<T: Elem>(x: &[T], seed: u32, p: f32, y: &mut [T]) {
    let keep_scale = 1.0 / (1.0 - p);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (y, x))| {
            vectorized(
                #[inline(always)]
                || {
                    for (i, (y, x)) in y.iter_mut().zip(x).enumerate() {
                        *y = if dropout_keep(seed, c * CHUNK + i, p) {
                            T::from_f32(x.to_f32() * keep_scale)
                        } else {
                            T::from_f32(0.0)
                        };
                    }
                },
            )
        });
}
