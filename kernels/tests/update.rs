//! LOMO's fused SGD update against the f64 formula: clamp, factor, weight
//! decay, step; and its returned squared norm of the raw gradient.

mod common;

use common::*;
use graft_kernels::update::{adalomo_update, sgd_update, AdaLomo};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn sgd_update_matches_the_formula(n in dim(5000), lr in 0.0f32..0.5, coef in 0.1f32..1.0, wd in prop_oneof![Just(0.0f32), 0.0f32..0.1], clip in prop_oneof![Just(0.0f32), 0.1f32..2.0], seed: u64) {
        let mut rng = Gen::new(seed);
        let p0 = rng.vec(n, -2.0, 2.0);
        let g = rng.vec(n, -3.0, 3.0);
        let mut p = p0.clone();
        let sq = sgd_update(&mut p, &g, lr, coef, wd, clip);
        let want_sq: f64 = g.iter().map(|&x| (x as f64).powi(2)).sum();
        prop_assert!((sq - want_sq).abs() <= 1e-12 * want_sq.max(1.0));
        let want: Vec<f64> = p0.iter().zip(&g).map(|(&p, &g)| {
            let (p, mut g) = (p as f64, g as f64);
            if clip > 0.0 {
                g = g.clamp(-(clip as f64), clip as f64);
            }
            p - lr as f64 * (coef as f64 * g + wd as f64 * p)
        }).collect();
        // A few f32 roundings of terms no larger than |p| + lr·|g|: where
        // the step cancels the parameter the error is relative to those.
        let floor = norm(&to_f64(&p0)) + lr as f64 * norm(&to_f64(&g));
        check_floor("p", &p, &want, floor, 1e-6)?;
    }
}

/// LOMO's measuring pass (lr 0) writes nothing, not even where the
/// gradient is NaN or infinite or the parameter is -0, and still returns
/// the raw gradient's squared norm.
#[test]
fn sgd_update_at_lr_zero_writes_nothing() {
    let p0 = vec![1.5f32, -0.0, 2.0, -3.0];
    let g = vec![0.5f32, 1.0, f32::NAN, f32::INFINITY];
    let mut p = p0.clone();
    let sq = sgd_update(&mut p, &g, 0.0, 0.7, 0.1, 0.5);
    assert!(sq.is_nan());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&p), bits(&p0));
    let sq = sgd_update(&mut p, &g[..2], 0.0, 1.0, 0.0, 0.0);
    assert_eq!(sq, 1.25);
}

/// AdaLomo's rule in f64 for one tensor: the reference twin.
#[allow(clippy::too_many_arguments)]
fn adalomo_ref(
    p: &mut [f64],
    g: &[f64],
    row: &mut [f64],
    col: &mut [f64],
    cols: Option<usize>,
    t: u64,
    lr: f64,
    wd: f64,
) {
    let beta = 1.0 - (t as f64).powf(-0.8);
    let sq: Vec<f64> = g.iter().map(|x| x * x + 1e-30).collect();
    let u: Vec<f64> = match cols {
        Some(c) => {
            let r = row.len();
            for i in 0..r {
                row[i] = beta * row[i]
                    + (1.0 - beta) * sq[i * c..(i + 1) * c].iter().sum::<f64>() / c as f64;
            }
            for k in 0..c {
                col[k] = beta * col[k]
                    + (1.0 - beta) * (0..r).map(|i| sq[i * c + k]).sum::<f64>() / r as f64;
            }
            let mean = row.iter().sum::<f64>() / r as f64;
            (0..r * c)
                .map(|x| g[x] / (row[x / c] * col[x % c] / mean).sqrt())
                .collect()
        }
        None => {
            for (v, s) in row.iter_mut().zip(&sq) {
                *v = beta * *v + (1.0 - beta) * s;
            }
            g.iter()
                .zip(row.iter())
                .map(|(g, v)| g / v.sqrt())
                .collect()
        }
    };
    let rms = |x: &[f64]| (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt();
    let scale = rms(&u).max(1.0);
    let step = lr * 1e-3f64.max(rms(p));
    for (p, u) in p.iter_mut().zip(&u) {
        *p = *p * (1.0 - step * wd) - step * u / scale;
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// Three steps on a random matrix (factored state) or vector (full
    /// state); lr 0 only measures and writes nothing.
    #[test]
    fn adalomo_update_matches_the_reference(rows in dim(40), cols in dim(70), matrix: bool, lr in 1e-3f32..0.1, wd in prop_oneof![Just(0.0f32), 0.0f32..0.1], seed: u64) {
        let mut rng = Gen::new(seed);
        let (n, cols_opt) = if matrix { (rows * cols, Some(cols)) } else { (rows, None) };
        let (r_len, c_len) = if matrix { (rows, cols) } else { (rows, 1) };
        let p0 = rng.vec(n, -1.0, 1.0);
        let mut p = p0.clone();
        let mut p64: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut row, mut col) = (vec![0f32; r_len], vec![0f32; c_len]);
        let (mut row64, mut col64) = (vec![0f64; r_len], vec![0f64; c_len]);
        let h = AdaLomo { eps1: 1e-30, eps2: 1e-3, clip_threshold: 1.0, decay_rate: -0.8, weight_decay: wd, clip_value: 0.0 };
        for t in 1..=3u64 {
            let g = rng.vec(n, -2.0, 2.0);
            let before = (p.clone(), row.clone());
            let sq = adalomo_update(&mut p, &g, &mut row, &mut col, matrix, t, 0.0, 1.0, &h);
            prop_assert_eq!((&p, &row), (&before.0, &before.1), "lr 0 writes nothing");
            prop_assert!(sq > 0.0);
            adalomo_update(&mut p, &g, &mut row, &mut col, matrix, t, lr, 1.0, &h);
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            adalomo_ref(&mut p64, &g64, &mut row64, &mut col64, cols_opt, t, lr as f64, wd as f64);
        }
        // The change AdaLomo made, not the parameter it was added to.
        let moved: Vec<f32> = p.iter().zip(&p0).map(|(a, b)| a - b).collect();
        let moved64: Vec<f64> = p64.iter().zip(&p0).map(|(a, &b)| a - b as f64).collect();
        // Each stored f32 parameter carries about an ulp of |p|; a tiny
        // update's relative error is measured against 1% of |p| instead.
        check_floor("update", &moved, &moved64, 1e-2 * norm(&to_f64(&p0)), 1e-4)?;
        check("row", &row, &row64, 1e-5)?;
    }
}
