//! Softmax cross-entropy with an ignore index, mean over counted tokens.

use crate::math::exp;
use crate::simd::vectorized;
use crate::{Elem, IndexError};
use rayon::prelude::*;

fn check_labels(labels: &[i32], vocab: usize, ignore: i32) -> Result<usize, IndexError> {
    let mut counted = 0;
    for (position, &l) in labels.iter().enumerate() {
        if l == ignore {
            continue;
        }
        if l < 0 || l as usize >= vocab {
            return Err(IndexError {
                what: "label",
                position,
                value: l as i64,
                limit: vocab,
            });
        }
        counted += 1;
    }
    Ok(counted)
}

#[inline(always)]
fn log_sum_exp<T: Elem>(row: &[T]) -> f32 {
    let m = row
        .iter()
        .map(|v| v.to_f32())
        .fold(f32::NEG_INFINITY, f32::max);
    // Lane sums, added in order: the exps vectorize.
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| exp(v.to_f32() - m)).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += exp(v.to_f32() - m);
        }
    }
    m + (acc.iter().sum::<f32>() + tail).ln()
}

/// Mean of `lse(logits[t]) − logits[t, labels[t]]` over counted rows. With no
/// counted row the mean is 0/0 = NaN, as in PyTorch.
pub fn cross_entropy<T: Elem>(
    logits: &[T],
    labels: &[i32],
    ignore: i32,
) -> Result<f32, IndexError> {
    let v = logits.len() / labels.len().max(1);
    let counted = check_labels(labels, v, ignore)?;
    // Rows in parallel, their losses summed in order: the same bits on
    // any thread count.
    let losses: Vec<f64> = logits
        .par_chunks(v.max(1))
        .zip(labels)
        .map(|(row, &l)| match l == ignore {
            true => 0.0,
            false => {
                (vectorized(
                    #[inline(always)]
                    || log_sum_exp(row),
                ) - row[l as usize].to_f32()) as f64
            }
        })
        .collect();
    Ok((losses.iter().sum::<f64>() / counted as f64) as f32)
}

/// `dlogits[t] = dloss·(softmax(logits[t]) − onehot(labels[t]))/count`,
/// zero on ignored rows.
pub fn cross_entropy_grad<T: Elem>(
    logits: &[T],
    labels: &[i32],
    ignore: i32,
    dloss: f32,
    dlogits: &mut [T],
) -> Result<(), IndexError> {
    let v = logits.len() / labels.len().max(1);
    let counted = check_labels(labels, v, ignore)?;
    let c = dloss / counted as f32;
    let v = v.max(1);
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(labels)
        .for_each(|((d_row, row), &l)| {
            if l == ignore {
                d_row.fill(T::from_f32(0.0));
                return;
            }
            let lse = vectorized(
                #[inline(always)]
                || {
                    let lse = log_sum_exp(row);
                    for (d, x) in d_row.iter_mut().zip(row) {
                        *d = T::from_f32(c * exp(x.to_f32() - lse));
                    }
                    lse
                },
            );
            let t = &mut d_row[l as usize];
            *t = T::from_f32(c * (exp(row[l as usize].to_f32() - lse) - 1.0));
        });
    Ok(())
}
