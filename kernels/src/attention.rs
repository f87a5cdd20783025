//! Causal self-attention with GQA, segments (packed documents and batch rows
//! flattened into one token axis) and an optional sliding window.
//!
//! Layout: `q[t, n_heads*d]`, `k`/`v[t, n_kv_heads*d]`. Query `i` attends to
//! keys `j` with `seg[j] = seg[i]`, `j <= i` and, with a window `w`,
//! `i - j < w`; segments must be contiguous runs.

use crate::math::exp;
use crate::Elem;
use rayon::prelude::*;

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub window: Option<usize>,
}

impl AttnShape {
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// The first key each query may see.
fn key_starts(seg: &[i32], window: Option<usize>) -> Vec<usize> {
    let mut starts = Vec::with_capacity(seg.len());
    let mut seg_start = 0;
    for i in 0..seg.len() {
        if i > 0 && seg[i] != seg[i - 1] {
            seg_start = i;
        }
        let win_start = window.map_or(0, |w| (i + 1).saturating_sub(w));
        starts.push(seg_start.max(win_start));
    }
    starts
}

/// Lanes of the dot product: independent partial sums, so that the loop
/// vectorizes (a single running f32 sum cannot be reordered).
const LANES: usize = 16;

/// `Σ a·b` in a fixed order: LANES partial sums, added in order, then the
/// tail. Every attention entry point uses it, so cached and whole-sequence
/// attention agree bit for bit.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    let mut acc = [0f32; LANES];
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

/// The tensor in f32, converted once: the inner loops then read plain f32
/// rows instead of converting every element of every row they revisit.
fn widen<T: Elem>(x: &[T]) -> Vec<f32> {
    x.par_iter().map(|v| v.to_f32()).collect()
}

/// Forward: writes `out` and the f32 log-sum-exp of the scaled scores `lse[t, n_heads]`.
pub fn attention<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    s: AttnShape,
    out: &mut [T],
    lse: &mut [f32],
) {
    let d = s.head_dim;
    let (qw, kw) = (s.n_heads * d, s.n_kv_heads * d);
    let starts = key_starts(seg, s.window);
    let (q, k, v) = (widen(q), widen(k), widen(v));
    out.par_chunks_mut(qw)
        .zip(lse.par_chunks_mut(s.n_heads))
        .enumerate()
        .for_each(|(i, (out_row, lse_row))| {
            let keys = starts[i]..=i;
            let mut scores = vec![0f32; i + 1 - starts[i]];
            let mut acc = vec![0f32; d];
            for h in 0..s.n_heads {
                let kh = h / s.group();
                let qh = &q[i * qw + h * d..i * qw + (h + 1) * d];
                for (sc, j) in scores.iter_mut().zip(keys.clone()) {
                    *sc = s.scale * dot(qh, &k[j * kw + kh * d..j * kw + (kh + 1) * d]);
                }
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = scores.iter().map(|x| exp(x - m)).sum();
                acc.fill(0.0);
                for (sc, j) in scores.iter().zip(keys.clone()) {
                    let p = exp(sc - m) / sum;
                    for (a, vv) in acc
                        .iter_mut()
                        .zip(&v[j * kw + kh * d..j * kw + (kh + 1) * d])
                    {
                        *a += p * vv;
                    }
                }
                for (o, a) in out_row[h * d..(h + 1) * d].iter_mut().zip(&acc) {
                    *o = T::from_f32(*a);
                }
                lse_row[h] = m + sum.ln();
            }
        });
}

/// Backward from the saved `out` and `lse`: `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn attention_grad<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    out: &[T],
    lse: &[f32],
    dout: &[T],
    s: AttnShape,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (d, t, g) = (s.head_dim, s.tokens, s.group());
    let (qw, kw) = (s.n_heads * d, s.n_kv_heads * d);
    let starts = key_starts(seg, s.window);
    let (q, k, v, out, dout) = (widen(q), widen(k), widen(v), widen(out), widen(dout));
    fn row(x: &[f32], width: usize, d: usize, i: usize, h: usize) -> &[f32] {
        &x[i * width + h * d..i * width + (h + 1) * d]
    }
    // One task per kv head: it owns dk/dv of that head and dq of its query
    // heads, so the accumulations never race.
    let per_kv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.n_kv_heads)
        .into_par_iter()
        .map(|kh| {
            let mut dq_l = vec![0f32; t * g * d];
            let mut dk_l = vec![0f32; t * d];
            let mut dv_l = vec![0f32; t * d];
            for hg in 0..g {
                let h = kh * g + hg;
                for i in 0..t {
                    let qi = row(&q, qw, d, i, h);
                    let doi = row(&dout, qw, d, i, h);
                    let oi = row(&out, qw, d, i, h);
                    let delta: f32 = dot(doi, oi);
                    let l = lse[i * s.n_heads + h];
                    for j in starts[i]..=i {
                        let kj = &k[j * kw + kh * d..j * kw + (kh + 1) * d];
                        let vj = &v[j * kw + kh * d..j * kw + (kh + 1) * d];
                        let p = exp(s.scale * dot(qi, kj) - l);
                        let ds = p * (dot(doi, vj) - delta) * s.scale;
                        let dq_i = &mut dq_l[(i * g + hg) * d..(i * g + hg + 1) * d];
                        for (a, kv) in dq_i.iter_mut().zip(kj) {
                            *a += ds * kv;
                        }
                        let dk_j = &mut dk_l[j * d..(j + 1) * d];
                        for (a, qv) in dk_j.iter_mut().zip(qi) {
                            *a += ds * qv;
                        }
                        let dv_j = &mut dv_l[j * d..(j + 1) * d];
                        for (a, dov) in dv_j.iter_mut().zip(doi) {
                            *a += p * dov;
                        }
                    }
                }
            }
            (dq_l, dk_l, dv_l)
        })
        .collect();
    for (kh, (dq_l, dk_l, dv_l)) in per_kv.into_iter().enumerate() {
        for i in 0..t {
            for hg in 0..g {
                let h = kh * g + hg;
                let src = &dq_l[(i * g + hg) * d..(i * g + hg + 1) * d];
                for (o, x) in dq[i * qw + h * d..i * qw + (h + 1) * d].iter_mut().zip(src) {
                    *o = T::from_f32(*x);
                }
            }
            for c in 0..d {
                dk[i * kw + kh * d + c] = T::from_f32(dk_l[i * d + c]);
                dv[i * kw + kh * d + c] = T::from_f32(dv_l[i * d + c]);
            }
        }
    }
}

/// Attention of `t` new tokens against a key/value cache, for generation:
/// new token `i` sits at position `start + i` and sees cache rows
/// `0..start` and new rows `0..=i` (within the window). `k_cache`/`v_cache`
/// hold at least `start` rows laid out like `k`/`v`. The result equals
/// [`attention`] over the whole sequence, restricted to the new rows.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    k_cache: &[T],
    v_cache: &[T],
    start: usize,
    s: AttnShape,
    out: &mut [T],
) {
    let d = s.head_dim;
    let (qw, kw) = (s.n_heads * d, s.n_kv_heads * d);
    assert!(
        k_cache.len() >= start * kw,
        "attention_cached: cache too short"
    );
    // Row `j` of the whole sequence: from the cache, then the new rows.
    let row = |src_cache: &'_ [T], src_new: &'_ [T], j: usize, kh: usize| -> Vec<f32> {
        let (src, r) = if j < start {
            (src_cache, j)
        } else {
            (src_new, j - start)
        };
        src[r * kw + kh * d..r * kw + (kh + 1) * d]
            .iter()
            .map(|x| x.to_f32())
            .collect()
    };
    out.par_chunks_mut(qw).enumerate().for_each(|(i, out_row)| {
        let p = start + i;
        let first = s.window.map_or(0, |w| (p + 1).saturating_sub(w));
        for h in 0..s.n_heads {
            let kh = h / s.group();
            let qh: Vec<f32> = q[i * qw + h * d..i * qw + (h + 1) * d]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let scores: Vec<f32> = (first..=p)
                .map(|j| s.scale * dot(&qh, &row(k_cache, k, j, kh)))
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|x| exp(x - m)).sum();
            let mut acc = vec![0f32; d];
            for (sc, j) in scores.iter().zip(first..=p) {
                let w = exp(sc - m) / sum;
                for (a, vv) in acc.iter_mut().zip(row(v_cache, v, j, kh)) {
                    *a += w * vv;
                }
            }
            for (o, a) in out_row[h * d..(h + 1) * d].iter_mut().zip(&acc) {
                *o = T::from_f32(*a);
            }
        }
    });
}
