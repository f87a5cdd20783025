//! Causal self-attention with GQA, segments (packed documents and batch rows
//! flattened into one token axis) and an optional sliding window.
//!
//! Layout: `q[t, n_heads*d]`, `k`/`v[t, n_kv_heads*d]`. Query `i` attends to
//! keys `j` with `seg[j] = seg[i]`, `j <= i` and, with a window `w`,
//! `i - j < w`; segments must be contiguous runs.
//!
//! The products run in the storage's precision, as autocast does: bf16
//! attention multiplies bf16 (AMX) with f32 sums, its probabilities and
//! score gradients rounded to bf16 for the products that take them; any
//! other storage works in f32. Softmax and its statistics are f32 always.

use crate::gemm::{self, Term};
use crate::math::exp;
use crate::simd::vectorized;
use crate::{bf16, Elem};
use rayon::prelude::*;
use std::cell::Cell;
use std::mem::MaybeUninit;

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

/// `Σ a·b` in f32 in a fixed order: LANES partial sums, added in order,
/// then the tail.
#[inline]
fn dot<C: Elem>(a: &[C], b: &[C]) -> f32 {
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    let mut acc = [0f32; LANES];
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l].to_f32() * y[l].to_f32();
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x.to_f32() * y.to_f32();
    }
    sum
}

/// `x` folded by `f` from `init` in a fixed order: LANES running values,
/// folded in order, then the tail (a single running value would keep the
/// loop scalar).
#[inline(always)]
fn reduce(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut acc = [init; LANES];
    for c in chunks {
        for l in 0..LANES {
            acc[l] = f(acc[l], c[l]);
        }
    }
    acc.iter().chain(tail).fold(init, |a, &v| f(a, v))
}

/// Queries per block: the scores of a block against every key it may see
/// (`BLOCK × keys` floats) stay in L2, and each block's products are GEMMs
/// large enough for the register-tile kernels.
const BLOCK: usize = 64;

/// `[rows, heads·d]` (any storage type) in the compute type `C`,
/// head-major: head `h` is the contiguous `[rows, d]` matrix at `h·rows·d`,
/// which the block GEMMs read as plain matrices.
fn by_head<T: Elem, C: Elem>(x: &[T], rows: usize, heads: usize, d: usize) -> Vec<C> {
    // Each element is written once, so the buffer is not zeroed first (a
    // pass over fresh megabytes that cost as much as the copy), and rows
    // already in `C` (bf16 attention on bf16, f32 on f32) are copied as
    // they are instead of through f32: together 2.3 → 0.6 ms for the issue
    // workload's q, k and v of one layer (Zen 4, 2 threads).
    let same = T::BF16 == C::BF16 && size_of::<T>() == size_of::<C>();
    let mut out: Vec<C> = Vec::with_capacity(rows * heads * d);
    out.spare_capacity_mut()
        .par_chunks_mut(rows * d)
        .enumerate()
        .for_each(|(h, dst)| {
            for (r, o) in dst.chunks_exact_mut(d).enumerate() {
                let src = &x[r * heads * d + h * d..][..d];
                if same {
                    // SAFETY: T and C are then the same type (the compute
                    // types are f32 and bf16, and only bf16 has BF16 set),
                    // and MaybeUninit<C> is laid out as C.
                    let src: &[MaybeUninit<C>] =
                        unsafe { std::slice::from_raw_parts(src.as_ptr().cast(), d) };
                    o.copy_from_slice(src);
                } else {
                    vectorized(
                        #[inline(always)]
                        || {
                            for (o, v) in o.iter_mut().zip(src) {
                                o.write(C::from_f32(v.to_f32()));
                            }
                        },
                    )
                }
            }
        });
    // SAFETY: the chunks cover all `rows·heads·d` elements, each written above.
    unsafe { out.set_len(rows * heads * d) };
    out
}

/// Head-major `[heads][rows][d]` f32 into `[rows, heads·d]` of `T`, rows
/// in parallel.
fn from_head_major<T: Elem>(src: &[f32], dst: &mut [T], rows: usize, heads: usize, d: usize) {
    dst.par_chunks_mut(heads * d)
        .with_min_len(16)
        .enumerate()
        .for_each(|(r, row)| {
            vectorized(
                #[inline(always)]
                || {
                    for (h, o) in row.chunks_exact_mut(d).enumerate() {
                        for (o, x) in o.iter_mut().zip(&src[(h * rows + r) * d..][..d]) {
                            *o = T::from_f32(*x);
                        }
                    }
                },
            )
        });
}

thread_local! {
    /// Score blocks and partial products, kept per thread between calls: a
    /// step runs hundreds of blocks, and fresh zeroed buffers for each were
    /// a pass over them (and page faults) every time.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch of `len` floats, whose contents are
/// left from earlier calls: `f` writes what it reads. Taken out while in
/// use, so a nested call (rayon may run another block while this one
/// waits) gets its own.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = SCRATCH.take();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    SCRATCH.set(v);
    r
}

/// `c[m,n] = op(a)·op(b)` summed in f32 (overwritten), multiplied in `C`
/// (bf16: AMX), single-threaded: the caller runs one task per head (or head
/// and block) already.
fn mm<C: Elem>(
    a: &[C],
    b: &[C],
    c: &mut [f32],
    (m, k, n): (usize, usize, usize),
    ta: bool,
    tb: bool,
) {
    let (a, b) = (C::operand(a), C::operand(b));
    let term = Term {
        a,
        b,
        k,
        ta,
        tb,
        scale: 1.0,
    };
    gemm::serial(|| gemm::gemm_sum(&[term], None, None, c, (m, n), C::BF16))
}

/// `x` in the compute type, for a product that takes it.
fn to_compute<C: Elem>(x: &[f32]) -> Vec<C> {
    vectorized(
        #[inline(always)]
        || x.iter().map(|&v| C::from_f32(v)).collect(),
    )
}

/// The visible keys of a block of queries: query `r` of the block sees keys
/// `first[r]..=last[r]`, indices into the block's key rows `lo..`.
struct Visible {
    lo: usize,
    keys: usize,
    first: Vec<usize>,
    last: Vec<usize>,
}

impl Visible {
    /// Queries `i0..i1` of a sequence whose query `i` sees keys
    /// `starts[i]..=i` (the same positions as the queries).
    fn block(starts: &[usize], i0: usize, i1: usize) -> Visible {
        // From an even key: the bf16 dot-product instructions (AVX512-BF16,
        // AMX) multiply keys two at a time, so a range that started at an
        // odd key in one call and an even one in another would pair, and
        // round, the same keys differently; cached generation (whose first
        // block starts mid-way) must match whole-sequence attention bit for
        // bit. The extra key is masked like any other.
        let lo = starts[i0..i1].iter().copied().min().unwrap_or(i0) & !1;
        Visible {
            lo,
            keys: i1 - lo,
            first: starts[i0..i1].iter().map(|&s| s - lo).collect(),
            last: (i0..i1).map(|i| i - lo).collect(),
        }
    }
}

/// Softmax of the scaled scores `scores[r, ..keys]` over each query's
/// visible keys, in place (zero elsewhere); returns each row's log-sum-exp.
/// The same arithmetic in every entry point, so cached and whole-sequence
/// attention agree bit for bit.
fn softmax_rows(scores: &mut [f32], vis: &Visible, scale: f32, lse: &mut [f32]) {
    vectorized(
        #[inline(always)]
        || {
            for (r, row) in scores.chunks_exact_mut(vis.keys).enumerate() {
                let (a, b) = (vis.first[r], vis.last[r]);
                row[..a].fill(0.0);
                row[b + 1..].fill(0.0);
                let seen = &mut row[a..=b];
                seen.iter_mut().for_each(|x| *x *= scale);
                let m = reduce(seen, f32::NEG_INFINITY, f32::max);
                seen.iter_mut().for_each(|x| *x = exp(*x - m));
                let sum = reduce(seen, 0.0, |s, x| s + x);
                seen.iter_mut().for_each(|x| *x /= sum);
                lse[r] = m + sum.ln();
            }
        },
    )
}

/// One block of queries of one head: `out[nq, d] = softmax(scale·q·kᵀ)·v`
/// over the visible keys, `q` the block's rows, `k`/`v` the head's key rows
/// from `vis.lo`; `lse[r]` for each query.
fn attend<C: Elem>(
    q: &[C],
    k: &[C],
    v: &[C],
    vis: &Visible,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (nq, d) = (vis.first.len(), q.len() / vis.first.len().max(1));
    let nk = vis.keys;
    let (k, v) = (&k[vis.lo * d..][..nk * d], &v[vis.lo * d..][..nk * d]);
    with_scratch(nq * nk, |p| {
        mm(q, k, p, (nq, d, nk), false, true);
        softmax_rows(p, vis, scale, lse);
        mm(&to_compute::<C>(p), v, out, (nq, nk, d), false, false);
    })
}

/// Every head's attention, in blocks of [`BLOCK`] positions: the queries
/// `qh` (head-major, positions `start..` of the sequence) against the keys
/// and values `kh`/`vh` (head-major, positions `0..starts.len()`), position
/// `p` seeing keys `starts[p]..=p`. Returns the head-major output
/// `[heads][rows][d]` and log-sum-exps `[heads][rows]`, one task per head
/// and block. The blocks are those of the whole sequence, the first cut at
/// `start`, so that each query's keys, products and softmax are the same
/// whatever `start` is (cached generation equals whole-sequence attention
/// bit for bit).
fn attend_heads<C: Elem>(
    (qh, kh, vh): (&[C], &[C], &[C]),
    starts: &[usize],
    start: usize,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let (d, total) = (s.head_dim, starts.len());
    let rows = total - start;
    let blocks: Vec<(usize, usize)> = (start / BLOCK..total.div_ceil(BLOCK))
        .map(|b| ((b * BLOCK).max(start), ((b + 1) * BLOCK).min(total)))
        .collect();
    let mut oh = vec![0f32; s.n_heads * rows * d];
    let mut lh = vec![0f32; s.n_heads * rows];
    let mut tasks = Vec::with_capacity(s.n_heads * blocks.len());
    for (h, (mut o, mut l)) in oh.chunks_mut(rows * d).zip(lh.chunks_mut(rows)).enumerate() {
        for &(p0, p1) in &blocks {
            let (ob, orest) = std::mem::take(&mut o).split_at_mut((p1 - p0) * d);
            let (lb, lrest) = std::mem::take(&mut l).split_at_mut(p1 - p0);
            (o, l) = (orest, lrest);
            tasks.push((h, (p0, p1), ob, lb));
        }
    }
    tasks.into_par_iter().for_each(|(h, (p0, p1), o, l)| {
        let vis = Visible::block(starts, p0, p1);
        let kv = (h / s.group()) * total * d;
        let qb = &qh[(h * rows + p0 - start) * d..(h * rows + p1 - start) * d];
        let (kk, vv) = (&kh[kv..kv + total * d], &vh[kv..kv + total * d]);
        attend(qb, kk, vv, &vis, s.scale, o, l);
    });
    (oh, lh)
}

/// Forward: writes `out` and the f32 log-sum-exp of the scaled scores
/// `lse[t, n_heads]`. One task per (head, block of [`BLOCK`] queries): the
/// block's scores against its visible keys by one GEMM, the softmax in
/// place, the output by another; nothing `[t, t]` is ever stored.
pub fn attention<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    s: AttnShape,
    out: &mut [T],
    lse: &mut [f32],
) {
    match T::BF16 {
        true => attention_in::<T, bf16>(q, k, v, seg, s, out, lse),
        false => attention_in::<T, f32>(q, k, v, seg, s, out, lse),
    }
}

/// [`attention`] with products in `C`.
fn attention_in<T: Elem, C: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    s: AttnShape,
    out: &mut [T],
    lse: &mut [f32],
) {
    let (d, t) = (s.head_dim, s.tokens);
    let starts = key_starts(seg, s.window);
    let (qh, kh, vh): (Vec<C>, Vec<C>, Vec<C>) = (
        by_head(q, t, s.n_heads, d),
        by_head(k, t, s.n_kv_heads, d),
        by_head(v, t, s.n_kv_heads, d),
    );
    let (oh, lh) = attend_heads((&qh, &kh, &vh), &starts, 0, s);
    from_head_major(&oh, out, t, s.n_heads, d);
    lse.par_chunks_mut(s.n_heads.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            row.iter_mut()
                .enumerate()
                .for_each(|(h, x)| *x = lh[h * t + i])
        });
}

/// Backward from the saved `out` and `lse`: `dq`, `dk`, `dv`. One task per
/// kv head (it alone accumulates that head's `dk`, `dv`); per query head of
/// its group and block of queries, the probabilities are recomputed from
/// the scores and `lse`, and every product is a GEMM:
/// `dp = dout·vᵀ`, `ds = p⊙(dp − Δ)·scale` with `Δᵢ = doutᵢ·outᵢ`,
/// `dq = ds·k`, `dk += dsᵀ·q`, `dv += pᵀ·dout`.
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
    let grads = (dq, dk, dv);
    match T::BF16 {
        true => attention_grad_in::<T, bf16>(q, k, v, seg, out, lse, dout, s, grads),
        false => attention_grad_in::<T, f32>(q, k, v, seg, out, lse, dout, s, grads),
    }
}

/// [`attention_grad`] with products in `C`.
#[allow(clippy::too_many_arguments)]
fn attention_grad_in<T: Elem, C: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    seg: &[i32],
    out: &[T],
    lse: &[f32],
    dout: &[T],
    s: AttnShape,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) {
    let (d, t, g) = (s.head_dim, s.tokens, s.group());
    let starts = key_starts(seg, s.window);
    let (qh, kh, vh): (Vec<C>, Vec<C>, Vec<C>) = (
        by_head(q, t, s.n_heads, d),
        by_head(k, t, s.n_kv_heads, d),
        by_head(v, t, s.n_kv_heads, d),
    );
    let (oh, doh): (Vec<C>, Vec<C>) = (
        by_head(out, t, s.n_heads, d),
        by_head(dout, t, s.n_heads, d),
    );
    // Head-major gradients: each kv head's task owns its `dk`, `dv` and
    // the `dq` of its group's query heads.
    let mut dqh = vec![0f32; s.n_heads * t * d];
    let mut dkh = vec![0f32; s.n_kv_heads * t * d];
    let mut dvh = vec![0f32; s.n_kv_heads * t * d];
    let per_kv = dqh
        .par_chunks_mut(g * t * d)
        .zip(dkh.par_chunks_mut(t * d))
        .zip(dvh.par_chunks_mut(t * d));
    per_kv.enumerate().for_each(|(kvh, ((dq_l, dk_l), dv_l))| {
        let (kk, vv) = (&kh[kvh * t * d..][..t * d], &vh[kvh * t * d..][..t * d]);
        for hg in 0..g {
            let h = kvh * g + hg;
            // Rows i0..i1 of head h in a head-major buffer.
            let rows = |i0: usize, i1: usize| h * t * d + i0 * d..h * t * d + i1 * d;
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let vis = Visible::block(&starts, i0, i1);
                let (nq, nk) = (i1 - i0, vis.keys);
                let (qb, ob, dob) = (&qh[rows(i0, i1)], &oh[rows(i0, i1)], &doh[rows(i0, i1)]);
                let (kb, vb) = (&kk[vis.lo * d..][..nk * d], &vv[vis.lo * d..][..nk * d]);
                with_scratch(2 * nq * nk + nk * d, |buf| {
                    let (p, rest) = buf.split_at_mut(nq * nk);
                    let (ds, acc) = rest.split_at_mut(nq * nk);
                    // p from the saved log-sum-exp (exactly the forward's
                    // probabilities up to rounding), zero where not visible.
                    mm(qb, kb, p, (nq, d, nk), false, true);
                    mm(dob, vb, ds, (nq, d, nk), false, true);
                    vectorized(
                        #[inline(always)]
                        || {
                            let rows = p.chunks_exact_mut(nk).zip(ds.chunks_exact_mut(nk));
                            for (r, (pr, dsr)) in rows.enumerate() {
                                let l = lse[(i0 + r) * s.n_heads + h];
                                let (a, b) = (vis.first[r], vis.last[r]);
                                pr[..a].fill(0.0);
                                pr[b + 1..].fill(0.0);
                                pr[a..=b]
                                    .iter_mut()
                                    .for_each(|x| *x = exp(s.scale * *x - l));
                                let delta = dot(&dob[r * d..][..d], &ob[r * d..][..d]);
                                for (x, &pv) in dsr.iter_mut().zip(pr.iter()) {
                                    *x = pv * (*x - delta) * s.scale;
                                }
                            }
                        },
                    );
                    let ds = to_compute::<C>(ds);
                    let dq = &mut dq_l[(hg * t + i0) * d..(hg * t + i1) * d];
                    mm(&ds, kb, dq, (nq, nk, d), false, false);
                    let lo = vis.lo * d;
                    mm(&ds, qb, acc, (nk, nq, d), true, false);
                    dk_l[lo..lo + nk * d]
                        .iter_mut()
                        .zip(&*acc)
                        .for_each(|(a, x)| *a += x);
                    mm(&to_compute::<C>(p), dob, acc, (nk, nq, d), true, false);
                    dv_l[lo..lo + nk * d]
                        .iter_mut()
                        .zip(&*acc)
                        .for_each(|(a, x)| *a += x);
                });
            }
        }
    });
    from_head_major(&dqh, dq, t, s.n_heads, d);
    from_head_major(&dkh, dk, t, s.n_kv_heads, d);
    from_head_major(&dvh, dv, t, s.n_kv_heads, d);
}

/// Attention of `t` new tokens against a key/value cache, for generation:
/// new token `i` sits at position `start + i` and sees cache rows
/// `0..start` and new rows `0..=i` (within the window). `k_cache`/`v_cache`
/// hold at least `start` rows laid out like `k`/`v`. The result equals
/// [`attention`] over the whole sequence, restricted to the new rows, bit
/// for bit: the same block products and softmax on the same keys.
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
    let caches = (k_cache, v_cache);
    match T::BF16 {
        true => attention_cached_in::<T, bf16>(q, k, v, caches, start, s, out),
        false => attention_cached_in::<T, f32>(q, k, v, caches, start, s, out),
    }
}

/// [`attention_cached`] with products in `C`.
fn attention_cached_in<T: Elem, C: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    (k_cache, v_cache): (&[T], &[T]),
    start: usize,
    s: AttnShape,
    out: &mut [T],
) {
    let (d, t) = (s.head_dim, s.tokens);
    let kw = s.n_kv_heads * d;
    assert!(
        k_cache.len() >= start * kw && v_cache.len() >= start * kw,
        "attention_cached: cache too short"
    );
    let total = start + t;
    // The whole sequence's keys and values: the cache rows, then the new ones.
    let whole = |cache: &[T], new: &[T]| -> Vec<T> {
        cache[..start * kw]
            .iter()
            .chain(&new[..t * kw])
            .copied()
            .collect()
    };
    let (kh, vh): (Vec<C>, Vec<C>) = (
        by_head(&whole(k_cache, k), total, s.n_kv_heads, d),
        by_head(&whole(v_cache, v), total, s.n_kv_heads, d),
    );
    let qh: Vec<C> = by_head(q, t, s.n_heads, d);
    // Position p sees keys from the window's start (no segments here).
    let starts: Vec<usize> = (0..total)
        .map(|p| s.window.map_or(0, |w| (p + 1).saturating_sub(w)))
        .collect();
    let (oh, _) = attend_heads((&qh, &kh, &vh), &starts, start, s);
    from_head_major(&oh, out, t, s.n_heads, d);
}
