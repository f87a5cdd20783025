//! RMSNorm forward (f32 and bf16) against an f64 reference, and both of its
//! gradients against central differences.

mod common;

use common::*;
use graft_kernels::{bf16, norm, Elem};
use proptest::prelude::*;

/// `y = x / sqrt(mean(x²) + eps) · g` per row of `x[t, h]`, `g = w` or `1 + w`.
fn rms_norm_ref(x: &[f64], w: &[f64], eps: f32, unit_offset: bool) -> Vec<f64> {
    let h = w.len();
    let mut y = vec![0.0; x.len()];
    for (y_row, x_row) in y.chunks_mut(h).zip(x.chunks(h)) {
        let ms = x_row.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for c in 0..h {
            let g = w[c] + if unit_offset { 1.0 } else { 0.0 };
            y_row[c] = x_row[c] * r * g;
        }
    }
    y
}

fn eps_choice() -> impl Strategy<Value = f32> {
    prop_oneof![Just(1e-6f32), Just(1e-5f32), Just(1e-2f32)]
}

fn forward<T: Elem>(x: &[T], w: &[T], eps: f32, unit_offset: bool) -> Vec<T> {
    let mut y = nan_buf(x.len());
    norm::rms_norm(x, w, eps, unit_offset, &mut y);
    y
}

proptest! {
    #![proptest_config(config(64))]

    // Up to 96×400 elements: large cases take the rayon path (≥ 2^14 outputs).
    #[test]
    fn forward_f32(t in dim(96), h in dim(400), eps in eps_choice(), unit_offset: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let x = rng.vec(t * h, -2.0, 2.0);
        let w = rng.vec(h, -1.5, 1.5);
        let want = rms_norm_ref(&to_f64(&x), &to_f64(&w), eps, unit_offset);
        check("y", &forward(&x, &w, eps, unit_offset), &want, FWD_TOL)?;
    }

    #[test]
    fn forward_bf16(t in dim(64), h in dim(300), eps in eps_choice(), unit_offset: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let x: Vec<bf16> = to_elem(&rng.vec(t * h, -2.0, 2.0));
        let w: Vec<bf16> = to_elem(&rng.vec(h, -1.5, 1.5));
        let want = rms_norm_ref(&to_f64(&x), &to_f64(&w), eps, unit_offset);
        check("y", &forward(&x, &w, eps, unit_offset), &want, BF16_TOL)?;
    }

    #[test]
    fn grad_input(t in dim(12), h in dim(40), eps in eps_choice(), unit_offset: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let x = rng.vec(t * h, -2.0, 2.0);
        let w = rng.vec(h, -1.5, 1.5);
        let dy = rng.vec(t * h, -1.0, 1.0);
        let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
        let want = numeric_grad(&x64, |x| dot(&dy64, &rms_norm_ref(x, &w64, eps, unit_offset)));
        let mut dx = nan_buf::<f32>(t * h);
        norm::rms_norm_grad_input(&x, &w, &dy, eps, unit_offset, &mut dx);
        // dx = r·g⊙dy − x·(r³/h)·Σ(g⊙dy⊙x) is a difference of two terms; they
        // cancel when dy is (nearly) parallel to x, exactly so for h = 1 where
        // dx is only O(eps). f32 rounding is relative to the terms, so the
        // error is measured against ||r·g⊙dy|| when dx itself is smaller.
        let mut first = vec![0.0; t * h];
        for (i, row) in x64.chunks(h).enumerate() {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps as f64).sqrt();
            for c in 0..h {
                let g = w64[c] + if unit_offset { 1.0 } else { 0.0 };
                first[i * h + c] = r * g * dy64[i * h + c];
            }
        }
        check_floor("dx", &dx, &want, norm(&first), GRAD_TOL)?;
    }

    #[test]
    fn grad_weight(t in dim(12), h in dim(40), eps in eps_choice(), unit_offset: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let x = rng.vec(t * h, -2.0, 2.0);
        let w = rng.vec(h, -1.5, 1.5);
        let dy = rng.vec(t * h, -1.0, 1.0);
        let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
        let want = numeric_grad(&w64, |w| dot(&dy64, &rms_norm_ref(&x64, w, eps, unit_offset)));
        let mut dw = nan_buf::<f32>(h);
        norm::rms_norm_grad_weight(&x, &dy, eps, &mut dw);
        // dw sums dy·x·r over rows in f32, rounding relative to those terms;
        // where their random signs cancel (h = 1, say) the error is measured
        // against their root-sum-square.
        let terms: Vec<f64> = x64
            .chunks(h)
            .zip(dy64.chunks(h))
            .flat_map(|(x_row, dy_row)| {
                let r = 1.0 / (x_row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps as f64).sqrt();
                x_row.iter().zip(dy_row).map(move |(x, dy)| x * dy * r)
            })
            .collect();
        check_floor("dw", &dw, &want, norm(&terms), GRAD_TOL)?;
    }
}

/// Past the rayon threshold (≥ 2^14 elements): every row is bit for bit what
/// a lone serial call on it gives, forward and backward.
#[test]
fn parallel_path_matches_serial_rows() {
    let (t, h, eps) = (50, 333, 1e-6);
    let mut rng = Gen::new(5);
    let x = rng.vec(t * h, -2.0, 2.0);
    let w = rng.vec(h, -1.5, 1.5);
    let dy = rng.vec(t * h, -1.0, 1.0);
    for unit_offset in [false, true] {
        let y = forward(&x, &w, eps, unit_offset);
        let want = rms_norm_ref(&to_f64(&x), &to_f64(&w), eps, unit_offset);
        check("y", &y, &want, FWD_TOL).unwrap();
        let mut dx = nan_buf::<f32>(t * h);
        norm::rms_norm_grad_input(&x, &w, &dy, eps, unit_offset, &mut dx);
        for i in 0..t {
            let rows = i * h..(i + 1) * h;
            assert_eq!(
                forward(&x[rows.clone()], &w, eps, unit_offset),
                y[rows.clone()],
                "y row {i}"
            );
            let mut dx_row = nan_buf::<f32>(h);
            norm::rms_norm_grad_input(
                &x[rows.clone()],
                &w,
                &dy[rows.clone()],
                eps,
                unit_offset,
                &mut dx_row,
            );
            assert_eq!(dx_row, dx[rows], "dx row {i}");
        }
    }
}
