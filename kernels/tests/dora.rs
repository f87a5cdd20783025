//! DoRA's row norms `‖W_o + s·(B·A)_o‖` against an f64 reference, with W
//! read through a row callback (as the executor does for dense and NF4).

mod common;

use common::*;
use graft_kernels::dora::{dora_combine, dora_norms};
use proptest::prelude::*;

fn reference(w: &[f64], a: &[f64], b: &[f64], r: usize, s: f64, out: usize) -> Vec<f64> {
    reference_with(w, a, b, r, s, out, |x| x)
}

/// The same norms over |W|, |A|, |B| and |s|: the size of the terms that
/// f32 rounds, so a row whose W and s·BA cancel is judged against them.
fn magnitude(w: &[f64], a: &[f64], b: &[f64], r: usize, s: f64, out: usize) -> Vec<f64> {
    reference_with(w, a, b, r, s, out, f64::abs)
}

fn reference_with(
    w: &[f64],
    a: &[f64],
    b: &[f64],
    r: usize,
    s: f64,
    out: usize,
    f: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let inp = w.len() / out;
    (0..out)
        .map(|o| {
            (0..inp)
                .map(|i| {
                    let ba: f64 = (0..r).map(|k| f(b[o * r + k]) * f(a[k * inp + i])).sum();
                    let v = f(w[o * inp + i]) + f(s) * ba;
                    v * v
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn row_norms_match_reference(out in dim(40), inp in dim(300), r in 1usize..9, s in -4.0f32..4.0, seed: u64) {
        let mut rng = Gen::new(seed);
        let w = rng.vec(out * inp, -1.0, 1.0);
        let a = rng.vec(r * inp, -0.5, 0.5);
        let b = rng.vec(out * r, -0.5, 0.5);
        let mut y = nan_buf::<f32>(out);
        dora_norms(|o, buf| buf.copy_from_slice(&w[o * inp..(o + 1) * inp]), &a, &b, r, s, &mut y);
        let (w, a, b) = (to_f64(&w), to_f64(&a), to_f64(&b));
        let want = reference(&w, &a, &b, r, s as f64, out);
        // A sum of `inp` squares in f32: relative error within ~inp·2^-24 of
        // the terms' magnitude (W and s·BA may cancel to almost nothing).
        let floor = norm(&magnitude(&w, &a, &b, r, s as f64, out));
        check_floor("norms", &y, &want, floor, 1e-5)?;
        prop_assert!(y.iter().all(|x| x.is_finite()));
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// The epilogue rounds the f32 sum, then the product, then to the
    /// storage type: for f32 storage two roundings of the exact value.
    #[test]
    fn combine_matches_reference(m in dim(40), n in dim(300), seed: u64) {
        let mut rng = Gen::new(seed);
        let (base, lora, scale) = (rng.vec(m * n, -3.0, 3.0), rng.vec(m * n, -1.0, 1.0), rng.vec(n, 0.5, 1.5));
        let mut y = nan_buf::<f32>(m * n);
        dora_combine(&base, &lora, &scale, &mut y);
        let want: Vec<f64> = (0..m * n)
            .map(|i| (base[i] as f64 + lora[i] as f64) * scale[i % n] as f64)
            .collect();
        // Where base and lora cancel the sum's rounding is relative to them.
        let floor = norm(&to_f64(&base)) + norm(&to_f64(&lora));
        check_floor("y", &y, &want, floor, 2e-7)?;
        let mut yb = nan_buf::<graft_kernels::bf16>(m * n);
        let base_b: Vec<graft_kernels::bf16> = to_elem(&base);
        dora_combine(&base_b, &lora, &scale, &mut yb);
        let want_b: Vec<f64> = (0..m * n)
            .map(|i| (base_b[i].to_f32() as f64 + lora[i] as f64) * scale[i % n] as f64)
            .collect();
        check_floor("y bf16", &yb, &want_b, floor, 8e-3)?;
    }
}
