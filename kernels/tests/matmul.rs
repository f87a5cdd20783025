//! `matmul` against a naive f64 product, in all four transpose layouts, in
//! f32 and bf16, and its VJP (the four transpose combinations autograd emits)
//! against central differences.

mod common;

use common::*;
use graft_kernels::{bf16, matmul::matmul, Elem};
use proptest::prelude::*;

#[allow(clippy::too_many_arguments)]
fn run<T: Elem>(a: &[T], b: &[T], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<T> {
    let mut c = nan_buf(m * n);
    matmul(a, b, &mut c, m, k, n, ta, tb);
    c
}

/// The gradients of `op(a)·op(b)` in `a`'s and `b`'s own layouts, each one
/// kernel call, as graft-ir's autograd emits them.
#[allow(clippy::too_many_arguments)]
fn matmul_vjp(
    a: &[f32],
    b: &[f32],
    dc: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> (Vec<f32>, Vec<f32>) {
    let da = match (ta, tb) {
        (false, false) => run(dc, b, m, n, k, false, true),
        (false, true) => run(dc, b, m, n, k, false, false),
        (true, false) => run(b, dc, k, n, m, false, true),
        (true, true) => run(b, dc, k, n, m, true, true),
    };
    let db = match (ta, tb) {
        (false, false) => run(a, dc, k, m, n, true, false),
        (false, true) => run(dc, a, n, m, k, true, false),
        (true, false) => run(a, dc, k, m, n, false, false),
        (true, true) => run(dc, a, n, m, k, true, true),
    };
    (da, db)
}

proptest! {
    #![proptest_config(config(64))]

    // Up to 64³: large cases take the rayon path (m·k·n ≥ 2^14), small ones the serial one.
    #[test]
    fn forward_f32(m in dim(64), k in dim(64), n in dim(64), ta: bool, tb: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let want = matmul_ref(&a64, &b64, m, k, n, ta, tb);
        let floor = terms_rss(&a64, &b64, m, k, n, ta, tb);
        check_floor("c", &run(&a, &b, m, k, n, ta, tb), &want, floor, FWD_TOL)?;
    }

    #[test]
    fn forward_bf16(m in dim(48), k in dim(48), n in dim(48), ta: bool, tb: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let a: Vec<bf16> = to_elem(&rng.vec(m * k, -1.0, 1.0));
        let b: Vec<bf16> = to_elem(&rng.vec(k * n, -1.0, 1.0));
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let want = matmul_ref(&a64, &b64, m, k, n, ta, tb);
        let floor = terms_rss(&a64, &b64, m, k, n, ta, tb);
        check_floor("c", &run(&a, &b, m, k, n, ta, tb), &want, floor, BF16_TOL)?;
    }

    // Empty dimensions: no panic, and with k = 0 every output is written as 0.
    #[test]
    fn forward_empty(m in 0usize..=3, k in 0usize..=3, n in 0usize..=3, ta: bool, tb: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let want = matmul_ref(&a64, &b64, m, k, n, ta, tb);
        let floor = terms_rss(&a64, &b64, m, k, n, ta, tb);
        check_floor("c", &run(&a, &b, m, k, n, ta, tb), &want, floor, FWD_TOL)?;
    }

    #[test]
    fn vjp_matches_finite_differences(m in dim(20), k in dim(20), n in dim(20), ta: bool, tb: bool, seed: u64) {
        let mut rng = Gen::new(seed);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        let dc = rng.vec(m * n, -1.0, 1.0);
        let (a64, b64, dc64) = (to_f64(&a), to_f64(&b), to_f64(&dc));
        let want_da = numeric_grad(&a64, |a| dot(&dc64, &matmul_ref(a, &b64, m, k, n, ta, tb)));
        let want_db = numeric_grad(&b64, |b| dot(&dc64, &matmul_ref(&a64, b, m, k, n, ta, tb)));
        let (da, db) = matmul_vjp(&a, &b, &dc, m, k, n, ta, tb);
        // da sums dc[i,j]·op(b)[p,j] over j, db sums op(a)[i,p]·dc[i,j] over
        // i: floors as for the forward, from the same kind of terms.
        let dc2 = squares(&dc64);
        // Σ_p op(b)[p,j]² per column j, Σ_p op(a)[i,p]² per row i.
        let b_cols = matmul_ref(&vec![1.0; k], &squares(&b64), 1, k, n, false, tb);
        let a_rows = matmul_ref(&squares(&a64), &vec![1.0; k], m, k, 1, ta, false);
        let floor_da: f64 = (0..m * n).map(|ij| dc2[ij] * b_cols[ij % n]).sum();
        let floor_db: f64 = (0..m * n).map(|ij| dc2[ij] * a_rows[ij / n]).sum();
        check_floor("da", &da, &want_da, floor_da.sqrt(), GRAD_TOL)?;
        check_floor("db", &db, &want_db, floor_db.sqrt(), GRAD_TOL)?;
    }
}

/// Past the rayon threshold (m·k·n ≥ 2^14) in every layout: the reference
/// agrees, and each output row is bit for bit what a lone serial call on that
/// row gives.
#[test]
fn parallel_path_matches_serial_rows() {
    let (m, k, n) = (67, 33, 45);
    for (case, (ta, tb)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Gen::new(case as u64);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        let (a64, b64) = (to_f64(&a), to_f64(&b));
        let c = run(&a, &b, m, k, n, ta, tb);
        let want = matmul_ref(&a64, &b64, m, k, n, ta, tb);
        check_floor(
            "c",
            &c,
            &want,
            terms_rss(&a64, &b64, m, k, n, ta, tb),
            FWD_TOL,
        )
        .unwrap();
        for i in 0..m {
            // Row i of op(a), as a [1, k] matrix.
            let a_row: Vec<f32> = (0..k)
                .map(|p| if ta { a[p * m + i] } else { a[i * k + p] })
                .collect();
            let row = run(&a_row, &b, 1, k, n, false, tb);
            assert_eq!(row, c[i * n..(i + 1) * n], "ta {ta}, tb {tb}: row {i}");
        }
    }
}
