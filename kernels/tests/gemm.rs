//! `gemm::gemm_on` on every path this CPU supports against a naive f64
//! product, in all four transpose layouts, for f32, bf16 and f16 storage,
//! from 1×1×1 through ragged edges to a few hundred per dimension (several
//! k blocks, m blocks and B slabs); and its determinism: the same bits
//! whatever the thread count, and each output row what a lone call on that
//! row gives.

mod common;

use common::*;
use graft_kernels::gemm::{gemm, gemm_on, Path};
use graft_kernels::{bf16, f16, Elem};
use proptest::prelude::*;

fn paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.is_supported()).collect()
}

/// f32 accumulation of k terms in sequence: each partial sum rounds with
/// relative error ≤ u = 2^-24, and for terms of random sign the partial
/// sums grow like √p, so the accumulated error is ~u·k·σ/√3 for terms of
/// size σ, i.e. ~u·√(k/3) relative to the terms' root-sum-square √k·σ:
/// 1e-7 at k = 512. 1e-5 (FWD_TOL) leaves two orders of magnitude for
/// that, while one dropped or doubled term in a 100³ product already
/// costs 1e-3, and a NaN or an unwritten (NaN) output is infinite.
const GEMM_TOL: f64 = FWD_TOL;

/// bf16 and f16 outputs against the f64 product rounded to the same type:
/// the f32 accumulation error (~1e-7 of the terms) flips an element's
/// rounding only when it lands within that of a rounding boundary, so
/// nearly every element matches exactly, while a dropped term in a 100³
/// product moves its element by ~10%, far past this.
const ROUNDED_TOL: f64 = 1e-3;

#[allow(clippy::too_many_arguments)]
fn check_all_paths(
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Gen::new(seed);
    let a = rng.vec(m * k, -1.0, 1.0);
    let b = rng.vec(k * n, -1.0, 1.0);
    let (a64, b64) = (to_f64(&a), to_f64(&b));
    let want = matmul_ref(&a64, &b64, m, k, n, ta, tb);
    let floor = terms_rss(&a64, &b64, m, k, n, ta, tb);
    for path in paths() {
        let mut c = nan_buf(m * n);
        gemm_on(path, &a, &b, &mut c, m, k, n, ta, tb);
        check_floor(path.name(), &c, &want, floor, GEMM_TOL)?;
    }
    check_rounded::<bf16>(&a, &b, (m, k, n, ta, tb))?;
    check_rounded::<f16>(&a, &b, (m, k, n, ta, tb))
}

/// The same product with operands and output stored as `T`.
fn check_rounded<T: Elem>(
    a: &[f32],
    b: &[f32],
    (m, k, n, ta, tb): (usize, usize, usize, bool, bool),
) -> Result<(), TestCaseError> {
    let (a, b): (Vec<T>, Vec<T>) = (to_elem(a), to_elem(b));
    let (a64, b64) = (to_f64(&a), to_f64(&b));
    let want: Vec<f64> = matmul_ref(&a64, &b64, m, k, n, ta, tb)
        .iter()
        .map(|&v| T::from_f32(v as f32).to_f32() as f64)
        .collect();
    let floor = terms_rss(&a64, &b64, m, k, n, ta, tb);
    for path in paths() {
        let mut c = nan_buf::<T>(m * n);
        gemm_on(path, &a, &b, &mut c, m, k, n, ta, tb);
        let what = format!("{} {}", path.name(), std::any::type_name::<T>());
        check_floor(&what, &c, &want, floor, ROUNDED_TOL)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    // Mostly below one register tile (14×32 and 6×16): tiles all ragged.
    #[test]
    fn small(m in dim(40), k in dim(40), n in dim(70), ta: bool, tb: bool, seed: u64) {
        check_all_paths(m, k, n, ta, tb, seed)?;
    }

    #[test]
    fn empty(m in 0usize..=3, k in 0usize..=3, n in 0usize..=3, ta: bool, tb: bool, seed: u64) {
        check_all_paths(m, k, n, ta, tb, seed)?;
    }
}

proptest! {
    #![proptest_config(config(12))]

    // Past one k block (384 / 256), the AVX2 m block (1020 rows is too many
    // for a test; see `blocks_in_every_dimension`) and several B panels,
    // with odd sizes, and past the parallel threshold.
    #[test]
    fn large(m in 1usize..=300, k in 1usize..=450, n in 1usize..=300, ta: bool, tb: bool, seed: u64) {
        check_all_paths(m, k, n, ta, tb, seed)?;
    }
}

proptest! {
    #![proptest_config(config(12))]

    /// AMX reads op(a)'s bf16 rows in place where they lie on cache lines
    /// and k is whole tile blocks (32): the same bits as packing them (the
    /// same values one element off that alignment), for whole row panels
    /// and a ragged last one (packed), across k blocks (1024) and with
    /// either layout of b; and near the f64 product.
    #[test]
    fn rows_read_in_place_match_packed(
        m in 1usize..=100, kb in 1usize..=40, n in 1usize..=80, tb: bool, seed: u64,
    ) {
        let k = 32 * kb;
        let mut rng = Gen::new(seed);
        let a: Vec<bf16> = to_elem(&rng.vec(m * k, -1.0, 1.0));
        let b: Vec<bf16> = to_elem(&rng.vec(k * n, -1.0, 1.0));
        let want: Vec<f64> = matmul_ref(&to_f64(&a), &to_f64(&b), m, k, n, false, tb)
            .iter()
            .map(|&v| bf16::from_f32(v as f32).to_f32() as f64)
            .collect();
        let floor = terms_rss(&to_f64(&a), &to_f64(&b), m, k, n, false, tb);
        let mut store = vec![bf16::from_f32(0.0); m * k + 64];
        let at = store.as_ptr().align_offset(64);
        for path in paths() {
            let mut outs = Vec::new();
            for shift in [0, 1] {
                let a_here = &mut store[at + shift..][..m * k];
                a_here.copy_from_slice(&a);
                let mut c = nan_buf::<bf16>(m * n);
                gemm_on(path, &*a_here, &b, &mut c, m, k, n, false, tb);
                outs.push(c);
            }
            prop_assert!(outs[0] == outs[1], "{}: aligned and shifted a differ", path.name());
            check_floor(path.name(), &outs[0], &want, floor, ROUNDED_TOL)?;
        }
    }
}

/// Every blocking loop taken more than once with a ragged last block: m past
/// every path's m block (up to 1.25·mc: 1260 rows for AVX-512, 1275 for
/// AVX2, 1280 for AMX), k past three k blocks, n past the B slabs (640 and
/// 512 columns).
#[test]
fn blocks_in_every_dimension() {
    let (m, k, n) = (1291, 777, 673);
    for (ta, tb) in [(false, false), (true, true)] {
        check_all_paths(m, k, n, ta, tb, 7).unwrap();
    }
}

/// The same bits on 1, 2 and 3 threads (the work is split differently each
/// time), and each row of the product what a lone call on that row gives.
#[test]
fn deterministic_across_threads_and_splits() {
    let (m, k, n) = (131, 517, 301);
    for (case, (ta, tb)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Gen::new(case as u64);
        let a = rng.vec(m * k, -1.0, 1.0);
        let b = rng.vec(k * n, -1.0, 1.0);
        for path in paths() {
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = nan_buf(m * n);
                pool.install(|| gemm_on(path, &a, &b, &mut c, m, k, n, ta, tb));
                let (a16, b16): (Vec<bf16>, Vec<bf16>) = (to_elem(&a), to_elem(&b));
                let mut c16 = nan_buf::<bf16>(m * n);
                pool.install(|| gemm_on(path, &a16, &b16, &mut c16, m, k, n, ta, tb));
                (c, c16)
            };
            let (c, c16) = on(2);
            for threads in [1, 3] {
                let (other, other16) = on(threads);
                assert!(
                    c.iter()
                        .zip(&other)
                        .all(|(x, y)| x.to_bits() == y.to_bits())
                        && c16 == other16,
                    "{}: ta {ta}, tb {tb}: 2 threads vs {threads}",
                    path.name()
                );
            }
            for i in [0, 1, 13, 14, 15, m - 1] {
                let a_row: Vec<f32> = (0..k)
                    .map(|p| if ta { a[p * m + i] } else { a[i * k + p] })
                    .collect();
                let mut row = nan_buf(n);
                gemm_on(path, &a_row, &b, &mut row, 1, k, n, false, tb);
                assert_eq!(
                    row,
                    c[i * n..(i + 1) * n],
                    "{}: ta {ta}, tb {tb}: row {i}",
                    path.name()
                );
            }
        }
    }
}

/// `gemm` is `gemm_on` on the active path (`GRAFT_CPU`, else the best),
/// which CI runs under more than one setting.
#[test]
fn dispatch_takes_the_active_path() {
    let active = Path::active();
    assert!(active.is_supported());
    if let Some(forced) = std::env::var("GRAFT_CPU")
        .ok()
        .and_then(|s| Path::parse(&s))
    {
        if forced.is_supported() {
            assert_eq!(active, forced);
        }
    } else {
        assert_eq!(active, Path::best());
    }
    let (m, k, n) = (37, 401, 45);
    let mut rng = Gen::new(3);
    let a = rng.vec(m * k, -1.0, 1.0);
    let b = rng.vec(k * n, -1.0, 1.0);
    let (mut c, mut want) = (nan_buf(m * n), nan_buf(m * n));
    gemm(&a, &b, &mut c, m, k, n, false, true);
    gemm_on(active, &a, &b, &mut want, m, k, n, false, true);
    assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn names_round_trip() {
    for p in Path::ALL {
        assert_eq!(Path::parse(p.name()), Some(p));
    }
    assert_eq!(Path::parse("sse"), None);
    assert!(Path::Scalar.is_supported());
}
