//! Softmax cross-entropy with an ignore index, mean over counted tokens.

use crate::math::exp;
use crate::simd::vectorized;
use crate::{Elem, IndexError};
use rayon::prelude::*;

/// Checks every label is in `0..vocab` or `ignore`; returns how many are counted.
pub fn check_labels(labels: &[i32], vocab: usize, ignore: i32) -> Result<usize, IndexError> {
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
    // Lane maxima and lane sums, folded in order: both loops vectorize (a
    // single running value keeps a loop scalar; the max is the same in any
    // order).
    const LANES: usize = 16;
    let mut top = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder().iter().map(|v| v.to_f32());
    for c in chunks {
        for (t, v) in top.iter_mut().zip(c) {
            *t = t.max(v.to_f32());
        }
    }
    let m = top
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max);
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
            // The row is in L1/L2 once copied: the pass in place reads it there.
            d_row.copy_from_slice(row);
            loss_and_grad_in_place(d_row, l, ignore, c);
        });
    Ok(())
}

/// Replaces a row of logits by `c·(softmax(row) − onehot(label))` (zeros
/// when `label` is `ignore`) and returns the row's loss `lse − row[label]`
/// (0 when ignored): [`cross_entropy`]'s arithmetic for the loss, and that
/// of [`cross_entropy_grad`] (which goes through it) for the gradient.
#[inline(always)]
fn loss_and_grad_in_place<T: Elem>(row: &mut [T], label: i32, ignore: i32, c: f32) -> f64 {
    if label == ignore {
        row.fill(T::from_f32(0.0));
        return 0.0;
    }
    let l = label as usize;
    let x_l = row[l].to_f32();
    let lse = vectorized(
        #[inline(always)]
        || {
            let lse = log_sum_exp(row);
            for d in row.iter_mut() {
                *d = T::from_f32(c * exp(d.to_f32() - lse));
            }
            lse
        },
    );
    row[l] = T::from_f32(c * (exp(x_l - lse) - 1.0));
    (lse - x_l) as f64
}

/// The cross-entropy of `h[t, hd]·wᵀ` (`w[v, hd]`) and its input gradient
/// `dh = dlogits·w` for a loss gradient of 1, `chunk` counted tokens at a
/// time: the loss and `dh` bit for bit as [`crate::gemm::gemm`],
/// [`cross_entropy`], [`cross_entropy_grad`] (dloss 1) and `gemm` again
/// give them, without the `[t, v]` logits. Tokens whose label is `ignore`
/// (an instruction's prompt) contribute nothing and get a zero gradient:
/// their logits are never computed. `ws` is the workspace, at least
/// [`linear_cross_entropy_workspace`] elements.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy<T: Elem>(
    h: &[T],
    w: &[T],
    labels: &[i32],
    ignore: i32,
    chunk: usize,
    dh: &mut [T],
    ws: &mut [T],
) -> Result<f32, IndexError> {
    let t = labels.len().max(1);
    let hd = h.len() / t;
    let v = w.len() / hd.max(1);
    let counted = check_labels(labels, v, ignore)?;
    let c = 1.0 / counted as f32;
    let chunk = chunk.clamp(1, t);
    let (logits, rest) = ws.split_at_mut(chunk * v);
    let (hc, dhc) = rest.split_at_mut(chunk * hd);
    dh.fill(T::from_f32(0.0));
    let rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != ignore).collect();
    let mut losses = vec![0f64; rows.len()];
    for (ids, loss) in rows.chunks(chunk).zip(losses.chunks_mut(chunk)) {
        let n = ids.len();
        let (lg, hc, dhc) = (&mut logits[..n * v], &mut hc[..n * hd], &mut dhc[..n * hd]);
        for (dst, &i) in hc.chunks_exact_mut(hd).zip(ids) {
            dst.copy_from_slice(&h[i * hd..][..hd]);
        }
        crate::gemm::gemm(hc, w, lg, n, hd, v, false, true);
        lg.par_chunks_mut(v.max(1))
            .zip(ids)
            .zip(loss)
            .for_each(|((row, &i), loss)| {
                *loss = loss_and_grad_in_place(row, labels[i], ignore, c)
            });
        crate::gemm::gemm(lg, w, dhc, n, v, hd, false, false);
        for (src, &i) in dhc.chunks_exact(hd).zip(ids) {
            dh[i * hd..][..hd].copy_from_slice(src);
        }
    }
    Ok((losses.iter().sum::<f64>() / counted as f64) as f32)
}

/// Elements of [`linear_cross_entropy`]'s workspace: a chunk of logits, and
/// of `h` and `dh` rows gathered.
pub fn linear_cross_entropy_workspace(chunk: usize, hd: usize, v: usize) -> usize {
    chunk * (v + 2 * hd)
}
