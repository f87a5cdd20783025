//! LOMO's fused SGD update against the f64 formula: clamp, factor, weight
//! decay, step; and its returned squared norm of the raw gradient.

mod common;

use common::*;
use graft_kernels::update::sgd_update;
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
        // A few f32 roundings of terms no larger than |p| + lr·|g|.
        check("p", &p, &want, 1e-6)?;
    }
}
