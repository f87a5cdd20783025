//! Elementwise kernels, bias add / row sums, casts and dropout.

mod common;

use common::*;
use graft_kernels::elementwise::{self as ew, dropout, dropout_keep};
use graft_kernels::{bf16, f16, Elem};
use proptest::prelude::*;

/// add, mul, scale and add_bias round the exact result once: at most 2^-24
/// relative per element, so at most that in relative L2.
const ROUNDED_TOL: f64 = 6e-8;

fn binary<T: Elem>(f: fn(&[T], &[T], &mut [T]), a: &[T], b: &[T]) -> Vec<T> {
    let mut y = nan_buf(a.len());
    f(a, b, &mut y);
    y
}

fn add_bias_ref(x: &[f64], b: &[f64]) -> Vec<f64> {
    x.chunks(b.len())
        .flat_map(|row| row.iter().zip(b).map(|(x, b)| x + b).collect::<Vec<_>>())
        .collect()
}

fn sum_rows_ref(x: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0.0; n];
    for row in x.chunks(n) {
        for (s, v) in y.iter_mut().zip(row) {
            *s += v;
        }
    }
    y
}

/// Whether `dropout(x)` dropped element `i`: kept elements are `x/(1-p)`
/// (within two f32 roundings), dropped ones exactly 0; `x` is never 0 here.
fn kept_mask(x: &[f32], y: &[f32], p: f32) -> Result<Vec<bool>, TestCaseError> {
    let mut mask = Vec::with_capacity(x.len());
    for (i, (&x, &y)) in x.iter().zip(y).enumerate() {
        prop_assert!(x != 0.0);
        if y == 0.0 {
            mask.push(false);
        } else {
            let want = x as f64 / (1.0 - p as f64);
            let err = (y as f64 - want).abs() / want.abs();
            prop_assert!(
                err <= 2.5e-7,
                "element {}: {} is neither 0 nor x/(1-p) = {}",
                i,
                y,
                want
            );
            mask.push(true);
        }
    }
    Ok(mask)
}

/// Nonzero inputs, so a dropped element is told from a kept one.
fn nonzero(rng: &mut Gen, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.uniform(0.1, 2.0) * if rng.coin() { 1.0 } else { -1.0 })
        .collect()
}

fn run_dropout(x: &[f32], seed: u32, p: f32) -> Vec<f32> {
    let mut y = nan_buf(x.len());
    dropout(x, seed, p, &mut y);
    y
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn add_mul_scale_f32(n in dim(5000), s in -4.0f32..4.0, seed: u64) {
        let mut rng = Gen::new(seed);
        let (a, b) = (rng.vec(n, -3.0, 3.0), rng.vec(n, -3.0, 3.0));
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let sum: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x + y).collect();
        let prod: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x * y).collect();
        let scaled: Vec<f64> = a64.iter().map(|x| x * s as f64).collect();
        check("add", &binary(ew::add, &a, &b), &sum, ROUNDED_TOL)?;
        check("mul", &binary(ew::mul, &a, &b), &prod, ROUNDED_TOL)?;
        let mut y = nan_buf::<f32>(n);
        ew::scale(&a, s, &mut y);
        check("scale", &y, &scaled, ROUNDED_TOL)?;
    }

    #[test]
    fn add_mul_scale_bf16(n in dim(5000), s in -4.0f32..4.0, seed: u64) {
        let mut rng = Gen::new(seed);
        let a: Vec<bf16> = to_elem(&rng.vec(n, -3.0, 3.0));
        let b: Vec<bf16> = to_elem(&rng.vec(n, -3.0, 3.0));
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let sum: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x + y).collect();
        let prod: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x * y).collect();
        let scaled: Vec<f64> = a64.iter().map(|x| x * s as f64).collect();
        check("add", &binary(ew::add, &a, &b), &sum, BF16_TOL)?;
        check("mul", &binary(ew::mul, &a, &b), &prod, BF16_TOL)?;
        let mut y = nan_buf::<bf16>(n);
        ew::scale(&a, s, &mut y);
        check("scale", &y, &scaled, BF16_TOL)?;
    }

    #[test]
    fn fill_writes_every_element(n in dim(5000), value in -1e6f32..1e6) {
        let mut y = nan_buf::<f32>(n);
        ew::fill(&mut y, value);
        prop_assert!(y.iter().all(|&v| v == value));
        let mut y = nan_buf::<bf16>(n);
        ew::fill(&mut y, value);
        prop_assert!(y.iter().all(|&v| v == bf16::from_f32(value)));
    }

    // f32 → bf16 / f16 round to nearest (relative error ≤ 2^-8 / 2^-11), and
    // widening back to f32 is exact.
    #[test]
    fn cast_round_trips(n in dim(5000), seed: u64) {
        let mut rng = Gen::new(seed);
        let x: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) * 2f32.powi(rng.below(20) as i32 - 10)).collect();
        let mut y16 = nan_buf::<bf16>(n);
        ew::cast(&x, &mut y16);
        for (a, b) in x.iter().zip(&y16) {
            prop_assert!((b.to_f32() - a).abs() <= a.abs() * 2f32.powi(-8), "bf16({a}) = {b}");
        }
        let mut h16 = nan_buf::<f16>(n);
        ew::cast(&x, &mut h16);
        for (a, b) in x.iter().zip(&h16) {
            // f16 normals start at 2^-14; below, the absolute step is 2^-24.
            prop_assert!((b.to_f32() - a).abs() <= (a.abs() * 2f32.powi(-11)).max(2f32.powi(-25)), "f16({a}) = {b}");
        }
        let mut back = nan_buf::<f32>(n);
        ew::cast(&y16, &mut back);
        prop_assert!(back.iter().zip(&y16).all(|(a, b)| *a == b.to_f32()));
        let mut again = nan_buf::<bf16>(n);
        ew::cast(&back, &mut again);
        prop_assert_eq!(&again, &y16);
        let mut same = nan_buf::<f32>(n);
        ew::cast(&x, &mut same);
        prop_assert_eq!(&same, &x);
    }

    #[test]
    fn add_bias(m in dim(64), n in dim(300), seed: u64) {
        let mut rng = Gen::new(seed);
        let (x, b) = (rng.vec(m * n, -3.0, 3.0), rng.vec(n, -3.0, 3.0));
        let mut y = nan_buf::<f32>(m * n);
        ew::add_bias(&x, &b, &mut y);
        check("y", &y, &add_bias_ref(&to_f64(&x), &to_f64(&b)), ROUNDED_TOL)?;
    }

    // Also the bias VJP: the gradient of sum(dy·(x + b)) in b.
    #[test]
    fn sum_rows(m in dim(64), n in dim(300), seed: u64) {
        let mut rng = Gen::new(seed);
        let (x, b, dy) = (rng.vec(m * n, -3.0, 3.0), rng.vec(n, -1.0, 1.0), rng.vec(m * n, -1.0, 1.0));
        let mut y = nan_buf::<f32>(n);
        ew::sum_rows(&dy, &mut y);
        // The f32 sum rounds relative to its terms: where random signs cancel
        // the error is measured against their root-sum-square, ||dy||.
        let dy64 = to_f64(&dy);
        check_floor("sum", &y, &sum_rows_ref(&dy64, n), norm(&dy64), FWD_TOL)?;
        let x64 = to_f64(&x);
        let want_db = numeric_grad(&to_f64(&b), |b| dot(&dy64, &add_bias_ref(&x64, b)));
        check_floor("db", &y, &want_db, norm(&dy64), GRAD_TOL)?;
    }

    // Kept elements are x/(1-p), dropped ones 0, the mask is `dropout_keep`'s,
    // independent of x, and a pure function of (seed, index).
    #[test]
    fn dropout_values_and_mask(n in dim(4096), p in 0.0f32..0.95, seed: u32, data_seed: u64) {
        let mut rng = Gen::new(data_seed);
        let x = nonzero(&mut rng, n);
        let y = run_dropout(&x, seed, p);
        let mask = kept_mask(&x, &y, p)?;
        for (i, &kept) in mask.iter().enumerate() {
            prop_assert_eq!(kept, dropout_keep(seed, i, p), "element {}", i);
        }
        // Deterministic, and the same mask for any input.
        prop_assert_eq!(run_dropout(&x, seed, p), y);
        let x2 = nonzero(&mut rng, n);
        prop_assert_eq!(kept_mask(&x2, &run_dropout(&x2, seed, p), p)?, mask);
    }

    // Every bit of the seed matters: flipping any one changes the mask.
    #[test]
    fn dropout_seed_bits_all_matter(seed: u32, p in 0.2f32..0.8) {
        let n = 1024;
        let mask = |seed| (0..n).map(|i| dropout_keep(seed, i, p)).collect::<Vec<_>>();
        let base = mask(seed);
        for bit in 0..32 {
            prop_assert!(mask(seed ^ (1 << bit)) != base, "seed bit {} ignored", bit);
        }
    }

    // The kept fraction is 1 - p: n = 100000 puts its standard deviation at
    // ≤ 0.0016, so 0.01 is over six of them.
    #[test]
    fn dropout_kept_fraction(p in 0.0f32..0.95, seed: u32) {
        let n = 100_000;
        let kept = (0..n).filter(|&i| dropout_keep(seed, i, p)).count();
        let frac = kept as f64 / n as f64;
        prop_assert!((frac - (1.0 - p as f64)).abs() < 0.01, "p = {p}: kept {frac}");
    }

    // Dropout is linear with a fixed mask: applied to a cotangent with the
    // same seed it is its own VJP.
    #[test]
    fn dropout_is_its_own_vjp(n in dim(600), p in 0.0f32..0.9, seed: u32, data_seed: u64) {
        let mut rng = Gen::new(data_seed);
        let (x, dy) = (rng.vec(n, -2.0, 2.0), rng.vec(n, -1.0, 1.0));
        let dy64 = to_f64(&dy);
        let dropout_ref = |x: &[f64]| -> Vec<f64> {
            x.iter().enumerate().map(|(i, v)| if dropout_keep(seed, i, p) { v / (1.0 - p as f64) } else { 0.0 }).collect()
        };
        let want = numeric_grad(&to_f64(&x), |x| dot(&dy64, &dropout_ref(x)));
        check("dx", &run_dropout(&dy, seed, p), &want, GRAD_TOL)?;
    }
}

#[test]
fn dropout_extremes() {
    let x: Vec<f32> = (0..1000).map(|i| i as f32 - 500.5).collect();
    // p = 0 keeps everything unscaled.
    assert_eq!(run_dropout(&x, 7, 0.0), x);
    // p = 1 drops everything.
    assert!(run_dropout(&x, 7, 1.0).iter().all(|&v| v == 0.0));
}

proptest! {
    #![proptest_config(config(64))]

    /// A per-column scale rounds the exact product once.
    #[test]
    fn mul_cols(m in dim(64), n in dim(300), seed: u64) {
        let mut rng = Gen::new(seed);
        let (x, v) = (rng.vec(m * n, -3.0, 3.0), rng.vec(n, -3.0, 3.0));
        let mut y = nan_buf::<f32>(m * n);
        ew::mul_cols(&x, &v, &mut y);
        let want: Vec<f64> = to_f64(&x)
            .chunks(n)
            .flat_map(|row| row.iter().zip(&v).map(|(x, v)| x * *v as f64).collect::<Vec<_>>())
            .collect();
        check("y", &y, &want, ROUNDED_TOL)?;
    }
}

/// The branch-free bf16 rounding is `half`'s, bit for bit: every exponent
/// (denormals, infinities, NaNs with payloads), the rounding boundaries and
/// random patterns.
#[test]
fn bf16_bits_is_halfs_rounding() {
    let mut rng = Gen::new(9);
    let mut patterns: Vec<u32> = (0..200_000).map(|_| rng.next_u64() as u32).collect();
    for hi in [
        0u32, 1, 0x7F7F, 0x7F80, 0x7FC0, 0x8000, 0xFF80, 0x0080, 0x3F80,
    ] {
        for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
            patterns.push(hi << 16 | lo);
        }
    }
    for b in patterns {
        let x = f32::from_bits(b);
        assert_eq!(
            graft_kernels::bf16_bits(x),
            bf16::from_f32(x).to_bits(),
            "{b:#010x}"
        );
    }
}
