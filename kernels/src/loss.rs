//! Softmax cross-entropy with an ignore index, mean over counted tokens.

use crate::{Elem, IndexError};

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

fn log_sum_exp<T: Elem>(row: &[T]) -> f32 {
    let m = row
        .iter()
        .map(|v| v.to_f32())
        .fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|v| (v.to_f32() - m).exp()).sum::<f32>().ln()
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
    let mut total = 0f64;
    for (row, &l) in logits.chunks(v).zip(labels) {
        if l != ignore {
            total += (log_sum_exp(row) - row[l as usize].to_f32()) as f64;
        }
    }
    Ok((total / counted as f64) as f32)
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
    for ((d_row, row), &l) in dlogits.chunks_mut(v).zip(logits.chunks(v)).zip(labels) {
        if l == ignore {
            d_row.fill(T::from_f32(0.0));
            continue;
        }
        let lse = log_sum_exp(row);
        for (j, (d, x)) in d_row.iter_mut().zip(row).enumerate() {
            let p = (x.to_f32() - lse).exp();
            let onehot = if j == l as usize { 1.0 } else { 0.0 };
            *d = T::from_f32(c * (p - onehot));
        }
    }
    Ok(())
}
