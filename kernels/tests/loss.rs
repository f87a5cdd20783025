//! Softmax cross-entropy with an ignore index against an f64 reference, its
//! gradient against central differences, and label range errors; the
//! chunked linear cross-entropy against the unfused kernels, bit for bit.

mod common;

use common::*;
use graft_kernels::gemm::gemm;
use graft_kernels::loss::{
    cross_entropy, cross_entropy_grad, linear_cross_entropy, linear_cross_entropy_workspace,
};
use graft_kernels::{bf16, Elem, IndexError};
use proptest::prelude::*;

const IGNORE: i32 = -100;

/// Mean over counted rows of `logsumexp(logits[t]) − logits[t, label]`.
fn ce_ref(logits: &[f64], labels: &[i32], ignore: i32) -> f64 {
    let v = logits.len() / labels.len();
    let (mut total, mut count) = (0.0, 0);
    for (row, &l) in logits.chunks(v).zip(labels) {
        if l == ignore {
            continue;
        }
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        total += lse - row[l as usize];
        count += 1;
    }
    total / count as f64
}

/// Logits in [-8, 8]; labels uniform in the vocabulary, about a quarter of
/// them ignored, at least one counted.
fn case(t: usize, v: usize, seed: u64) -> (Vec<f32>, Vec<i32>) {
    let mut rng = Gen::new(seed);
    let logits = rng.vec(t * v, -8.0, 8.0);
    let mut labels: Vec<i32> = (0..t)
        .map(|_| {
            if rng.below(4) == 0 {
                IGNORE
            } else {
                rng.below(v) as i32
            }
        })
        .collect();
    let keep = rng.below(t);
    if labels[keep] == IGNORE {
        labels[keep] = rng.below(v) as i32;
    }
    (logits, labels)
}

/// The loss is a difference `lse − logit` of values of the logits' size
/// (here up to 8), so its f32 rounding is absolute at that scale: relative
/// error 1e-5 for losses of 1 and above, absolute 1e-5 below.
fn check_loss(got: f32, want: f64) -> Result<(), TestCaseError> {
    let err = (got as f64 - want).abs();
    prop_assert!(
        err <= 1e-5 * want.abs().max(1.0),
        "loss {got} vs {want}: error {err:e}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn forward_f32(t in dim(64), v in dim(1000), seed: u64) {
        let (logits, labels) = case(t, v, seed);
        let want = ce_ref(&to_f64(&logits), &labels, IGNORE);
        check_loss(cross_entropy(&logits, &labels, IGNORE).unwrap(), want)?;
    }

    #[test]
    fn forward_bf16(t in dim(32), v in dim(500), seed: u64) {
        let (logits, labels) = case(t, v, seed);
        let logits: Vec<bf16> = to_elem(&logits);
        let want = ce_ref(&to_f64(&logits), &labels, IGNORE);
        // The loss itself is f32: only the inputs are bf16, exactly the
        // values the reference sees.
        check_loss(cross_entropy(&logits, &labels, IGNORE).unwrap(), want)?;
    }

    #[test]
    fn grad(t in dim(12), v in dim(40), dloss in -2.0f32..2.0, seed: u64) {
        let (logits, labels) = case(t, v, seed);
        let want = numeric_grad(&to_f64(&logits), |x| dloss as f64 * ce_ref(x, &labels, IGNORE));
        let mut dlogits = nan_buf::<f32>(logits.len());
        cross_entropy_grad(&logits, &labels, IGNORE, dloss, &mut dlogits).unwrap();
        // softmax − onehot cancels on confident rows (p ≈ 1 at the label);
        // the f32 softmax is accurate relative to p, so the error is measured
        // against ||dloss·softmax/count|| where the gradient is smaller.
        let x64 = to_f64(&logits);
        let count = labels.iter().filter(|&&l| l != IGNORE).count() as f64;
        let mut soft = vec![0.0; t * v];
        for ((s_row, x_row), &l) in soft.chunks_mut(v).zip(x64.chunks(v)).zip(&labels) {
            if l != IGNORE {
                let m = x_row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = x_row.iter().map(|x| (x - m).exp()).sum();
                for (s, x) in s_row.iter_mut().zip(x_row) {
                    *s = dloss as f64 * (x - m).exp() / z / count;
                }
            }
        }
        check_floor("dlogits", &dlogits, &want, norm(&soft), GRAD_TOL)?;
        for (row, &l) in dlogits.chunks(v).zip(&labels) {
            if l == IGNORE {
                prop_assert!(row.iter().all(|&d| d == 0.0), "ignored row has a gradient");
            }
        }
    }

    #[test]
    fn linear_f32(t in dim(70), hd in dim(40), v in dim(300), chunk in dim(80), seed: u64) {
        check_linear::<f32>(t, hd, v, chunk, seed)?;
    }

    #[test]
    fn linear_bf16(t in dim(70), hd in dim(40), v in dim(300), chunk in dim(80), seed: u64) {
        check_linear::<bf16>(t, hd, v, chunk, seed)?;
    }

    // A label outside 0..vocab other than the ignore index is an error, from
    // both kernels, naming the first bad position; nothing panics.
    #[test]
    fn bad_label_is_an_error(t in dim(16), v in dim(50), ignore in prop_oneof![Just(-100), Just(-1), Just(0)], seed: u64) {
        let mut rng = Gen::new(seed);
        let logits = rng.vec(t * v, -4.0, 4.0);
        let mut labels: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
        let position = rng.below(t);
        let bad = loop {
            let bad = [-1, -2, -100, v as i32, v as i32 + 7, i32::MAX, i32::MIN][rng.below(7)];
            if bad != ignore {
                break bad;
            }
        };
        labels[position] = bad;
        // A later bad label must not be the one reported.
        if position + 1 < t && v as i32 != ignore {
            labels[position + 1] = v as i32;
        }
        let want = IndexError { what: "label", position, value: bad as i64, limit: v };
        prop_assert_eq!(cross_entropy(&logits, &labels, ignore), Err(want.clone()));
        let mut dlogits = vec![0f32; t * v];
        prop_assert_eq!(cross_entropy_grad(&logits, &labels, ignore, 1.0, &mut dlogits), Err(want));
    }
}

/// `linear_cross_entropy` with `chunk` tokens a chunk (ragged last chunks,
/// chunks past the batch, ignored tokens skipped) gives the loss and `dh`
/// of the unfused kernels
/// bit for bit: `gemm` for the logits, `cross_entropy`,
/// `cross_entropy_grad` with a loss gradient of 1, `gemm` for `dh`.
fn check_linear<T: Elem>(
    t: usize,
    hd: usize,
    v: usize,
    chunk: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Gen::new(seed);
    let h: Vec<T> = to_elem(&rng.vec(t * hd, -2.0, 2.0));
    let w: Vec<T> = to_elem(&rng.vec(v * hd, -2.0, 2.0));
    let (_, labels) = case(t, v, seed);
    let mut logits = vec![T::from_f32(0.0); t * v];
    gemm(&h, &w, &mut logits, t, hd, v, false, true);
    let want_loss = cross_entropy(&logits, &labels, IGNORE).unwrap();
    let mut dlogits = logits.clone();
    cross_entropy_grad(&logits, &labels, IGNORE, 1.0, &mut dlogits).unwrap();
    let mut want_dh = vec![T::from_f32(0.0); t * hd];
    gemm(&dlogits, &w, &mut want_dh, t, v, hd, false, false);

    let mut dh = nan_buf::<T>(t * hd);
    let mut ws = nan_buf::<T>(linear_cross_entropy_workspace(chunk.min(t), hd, v));
    let loss = linear_cross_entropy(&h, &w, &labels, IGNORE, chunk, &mut dh, &mut ws).unwrap();
    prop_assert_eq!(
        loss.to_bits(),
        want_loss.to_bits(),
        "loss {} vs {}",
        loss,
        want_loss
    );
    let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
    prop_assert!(bits(&dh) == bits(&want_dh), "dh differs");
    // A bad label is the same error, before any work.
    let mut bad = labels.clone();
    bad[t - 1] = v as i32;
    let want = IndexError {
        what: "label",
        position: t - 1,
        value: v as i64,
        limit: v,
    };
    let got = linear_cross_entropy(&h, &w, &bad, IGNORE, chunk, &mut dh, &mut ws);
    prop_assert_eq!(got, Err(want));
    Ok(())
}

/// With every row ignored the mean is 0/0 = NaN (as PyTorch) and the gradient zero.
#[test]
fn all_ignored() {
    let logits = [0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0];
    let labels = [IGNORE, IGNORE];
    assert!(cross_entropy(&logits, &labels, IGNORE).unwrap().is_nan());
    let mut d = [f32::NAN; 6];
    cross_entropy_grad(&logits, &labels, IGNORE, 1.0, &mut d).unwrap();
    assert_eq!(d, [0.0; 6]);
}

/// A hand-checked value: uniform logits give log(vocab), a confident right
/// answer nearly 0; the gradient is (softmax − onehot)/count.
#[test]
fn known_values() {
    let logits = [0.0f32, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0];
    let labels = [2, 0];
    let loss = cross_entropy(&logits, &labels, IGNORE).unwrap();
    let want = (4f64.ln() + (3.0 * (-20f64).exp()).ln_1p()) / 2.0;
    assert!((loss as f64 - want).abs() < 1e-6, "{loss} vs {want}");
    let mut d = [f32::NAN; 8];
    cross_entropy_grad(&logits, &labels, IGNORE, 1.0, &mut d).unwrap();
    assert_eq!(&d[..4], &[0.125, 0.125, -0.375, 0.125]);
    // −3e^-20/2 in exact arithmetic, below f32 resolution next to 1.
    assert!(d[4] <= 0.0 && d[4] > -1e-8, "{}", d[4]);
    let tail = (-20f64).exp() / 2.0;
    assert!(
        d[5..]
            .iter()
            .all(|&x| (x as f64 - tail).abs() < 1e-6 * tail),
        "{d:?}"
    );
}
