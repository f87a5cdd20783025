//! RoPE (half-split layout) against an f64 rotation, and the inverse rotation
//! as its VJP against central differences.

mod common;

use common::*;
use graft_kernels::{bf16, rope::rope, Elem};
use proptest::prelude::*;

/// Rotates each pair `(x[i], x[i+d/2])` of every head by `positions[t]·inv_freq[i]`.
/// The angle is the f32 product, as the kernel (and transformers) define it;
/// the rotation itself is exact f64.
fn rope_ref(x: &[f64], positions: &[i32], inv_freq: &[f32], n_heads: usize) -> Vec<f64> {
    let half = inv_freq.len();
    let d = 2 * half;
    let mut y = vec![0.0; x.len()];
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let base = (t * n_heads + h) * d;
            for i in 0..half {
                let (sin, cos) = ((p as f32 * inv_freq[i]) as f64).sin_cos();
                let (x1, x2) = (x[base + i], x[base + i + half]);
                y[base + i] = x1 * cos - x2 * sin;
                y[base + i + half] = x2 * cos + x1 * sin;
            }
        }
    }
    y
}

struct Case {
    x: Vec<f32>,
    positions: Vec<i32>,
    inv_freq: Vec<f32>,
}

/// `t` tokens of `n_heads` heads of `2·half` dims; positions up to 32k (where
/// the f32 angle is far from its f64 value, hence the f32 product above).
fn case(t: usize, n_heads: usize, half: usize, seed: u64) -> Case {
    let mut rng = Gen::new(seed);
    let base = [10_000f32, 500_000.0, 1.0e6][rng.below(3)];
    let inv_freq = (0..half)
        .map(|i| base.powf(-((2 * i) as f32) / (2 * half) as f32))
        .collect();
    let max_pos = [4, 512, 32_768][rng.below(3)];
    let positions = (0..t).map(|_| rng.below(max_pos) as i32).collect();
    let x = rng.vec(t * n_heads * 2 * half, -2.0, 2.0);
    Case {
        x,
        positions,
        inv_freq,
    }
}

fn run<T: Elem>(x: &[T], c: &Case, n_heads: usize, inverse: bool) -> Vec<T> {
    let mut y = nan_buf(x.len());
    rope(x, &c.positions, &c.inv_freq, n_heads, inverse, &mut y);
    y
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn forward_f32(t in dim(64), n_heads in 1usize..=8, half in dim(64), seed: u64) {
        let c = case(t, n_heads, half, seed);
        let want = rope_ref(&to_f64(&c.x), &c.positions, &c.inv_freq, n_heads);
        check("y", &run(&c.x, &c, n_heads, false), &want, FWD_TOL)?;
    }

    #[test]
    fn forward_bf16(t in dim(32), n_heads in 1usize..=4, half in dim(32), seed: u64) {
        let c = case(t, n_heads, half, seed);
        let x: Vec<bf16> = to_elem(&c.x);
        let want = rope_ref(&to_f64(&x), &c.positions, &c.inv_freq, n_heads);
        check("y", &run(&x, &c, n_heads, false), &want, BF16_TOL)?;
    }

    // The inverse rotation applied to a cotangent is the gradient of
    // sum(cotangent·rope(x)).
    #[test]
    fn inverse_is_vjp(t in dim(12), n_heads in 1usize..=4, half in dim(16), seed: u64) {
        let c = case(t, n_heads, half, seed);
        let dy = Gen::new(!seed).vec(c.x.len(), -1.0, 1.0);
        let dy64 = to_f64(&dy);
        let want = numeric_grad(&to_f64(&c.x), |x| dot(&dy64, &rope_ref(x, &c.positions, &c.inv_freq, n_heads)));
        check("dx", &run(&dy, &c, n_heads, true), &want, GRAD_TOL)?;
    }

    // Rotating back undoes the rotation (norm preserved per pair).
    #[test]
    fn inverse_undoes_forward(t in dim(32), n_heads in 1usize..=4, half in dim(32), seed: u64) {
        let c = case(t, n_heads, half, seed);
        let back = run(&run(&c.x, &c, n_heads, false), &c, n_heads, true);
        check("x", &back, &to_f64(&c.x), FWD_TOL)?;
    }
}
