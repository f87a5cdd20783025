//! Shared helpers for the kernel property tests: a seeded data generator,
//! float64 comparison, central finite differences and shape strategies.
//!
//! Each test binary uses a different subset of these.
#![allow(dead_code)]

pub mod nf4;

use graft_kernels::Elem;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Forward kernels (f32 storage and compute) against their f64 reference.
pub const FWD_TOL: f64 = 1e-5;
/// Backward kernels against the f64 central-difference gradient.
pub const GRAD_TOL: f64 = 1e-4;
/// bf16 storage: the output rounding alone is up to 2^-8 ≈ 3.9e-3 relative
/// per element (8 significant bits), hence at most that in relative L2; the
/// f32 compute adds ~1e-6. 5e-3 leaves margin for that and nothing more.
pub const BF16_TOL: f64 = 5e-3;
/// Finite-difference step, in f64.
pub const STEP: f64 = 1e-6;

/// The case count, unless `PROPTEST_CASES` asks for another (stress runs).
pub fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// A dimension: often 1 or tiny, otherwise anything up to `max` (odd sizes included).
pub fn dim(max: usize) -> BoxedStrategy<usize> {
    assert!(max >= 6);
    prop_oneof![Just(1usize), 2..=5usize, 1..=max].boxed()
}

/// SplitMix64: test data comes from a proptest-chosen seed, so a failing case
/// is reproducible from the (shrunk) shape and the seed alone.
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi), as f32.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        (lo as f64 + (hi as f64 - lo as f64) * self.unit()) as f32
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

pub fn to_f64<T: Elem>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

pub fn to_elem<T: Elem>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// An output buffer the kernel must overwrite entirely: NaN until written.
pub fn nan_buf<T: Elem>(n: usize) -> Vec<T> {
    vec![T::from_f32(f32::NAN); n]
}

pub fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `||a-b||₂ / max(||b||₂, floor, tiny)`; infinite on any NaN or infinity on
/// either side, or on a length mismatch, so such a result can never pass.
pub fn rel_l2_floor<T: Elem>(a: &[T], b: &[f64], floor: f64) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let a = to_f64(a);
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b).max(floor).max(f64::MIN_POSITIVE)
}

/// `||a-b||₂ / max(||b||₂, tiny)`; see [`rel_l2_floor`].
pub fn rel_l2<T: Elem>(a: &[T], b: &[f64]) -> f64 {
    rel_l2_floor(a, b, 0.0)
}

/// Fails the case unless `rel_l2(got, want) <= tol`.
pub fn check<T: Elem>(what: &str, got: &[T], want: &[f64], tol: f64) -> Result<(), TestCaseError> {
    check_floor(what, got, want, 0.0, tol)
}

/// Fails the case unless `rel_l2_floor(got, want, floor) <= tol`.
pub fn check_floor<T: Elem>(
    what: &str,
    got: &[T],
    want: &[f64],
    floor: f64,
    tol: f64,
) -> Result<(), TestCaseError> {
    let err = rel_l2_floor(got, want, floor);
    prop_assert!(
        err <= tol,
        "{what}: relative L2 error {err:e} > {tol:e} (len {}, |want| {:e})",
        want.len(),
        norm(want)
    );
    Ok(())
}

/// Central finite differences of `f` at `x`, step [`STEP`].
pub fn numeric_grad(x: &[f64], mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + STEP;
            let up = f(&x);
            x[i] = x0 - STEP;
            let down = f(&x);
            x[i] = x0;
            (up - down) / (2.0 * STEP)
        })
        .collect()
}

/// `op(a)·op(b)` in f64: `op(a)` is `a[m,k]` or the transpose of `a[k,m]`,
/// `op(b)` is `b[k,n]` or the transpose of `b[n,k]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ref(
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = s;
        }
    }
    c
}

pub fn squares(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v * v).collect()
}

/// The root-sum-square of every product `op(a)[i,p]·op(b)[p,j]` the result
/// sums. f32 accumulation error is relative to the terms, not to their sum:
/// where random signs cancel (a 1×1 output, say) the error is measured
/// against this, the typical size of such a sum, instead of the sum itself.
#[allow(clippy::too_many_arguments)]
pub fn terms_rss(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> f64 {
    matmul_ref(&squares(a), &squares(b), m, k, n, ta, tb)
        .iter()
        .sum::<f64>()
        .sqrt()
}
