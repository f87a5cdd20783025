//! Causal attention (GQA, packed segments, sliding window) against a naive
//! f64 softmax attention, its log-sum-exp output, and its gradients against
//! central differences.

mod common;

use common::*;
use graft_kernels::attention::{attention, attention_cached, attention_grad, AttnShape};
use graft_kernels::bf16;
use proptest::prelude::*;

/// Query `i` sees key `j` iff same segment, `j <= i` and, with a window, `i - j < w`.
fn visible(seg: &[i32], window: Option<usize>, i: usize, j: usize) -> bool {
    seg[i] == seg[j] && j <= i && window.is_none_or(|w| i - j < w)
}

/// `(out[t, n_heads*d], lse[t, n_heads])` in f64; query head `h` reads kv
/// head `h / (n_heads / n_kv_heads)` (transformers' `repeat_kv`).
fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seg: &[i32],
    s: &AttnShape,
) -> (Vec<f64>, Vec<f64>) {
    let (t, d) = (s.tokens, s.head_dim);
    let (qw, kw) = (s.n_heads * d, s.n_kv_heads * d);
    let group = s.n_heads / s.n_kv_heads;
    let mut out = vec![0.0; t * qw];
    let mut lse = vec![0.0; t * s.n_heads];
    for i in 0..t {
        for h in 0..s.n_heads {
            let kh = h / group;
            let qi = &q[i * qw + h * d..i * qw + (h + 1) * d];
            let keys: Vec<usize> = (0..t).filter(|&j| visible(seg, s.window, i, j)).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| s.scale as f64 * dot(qi, &k[j * kw + kh * d..j * kw + (kh + 1) * d]))
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let l = m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lse[i * s.n_heads + h] = l;
            for (&j, sc) in keys.iter().zip(&scores) {
                let p = (sc - l).exp();
                for c in 0..d {
                    out[i * qw + h * d + c] += p * v[j * kw + kh * d + c];
                }
            }
        }
    }
    (out, lse)
}

/// The gradients `(dq, dk, dv)` of `dout·attention(q, k, v)` in f64, from
/// the formulas (checked against central differences where those are cheap:
/// `grad_matches_finite_differences`).
fn attention_grad_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    seg: &[i32],
    s: &AttnShape,
) -> [Vec<f64>; 3] {
    let (t, d) = (s.tokens, s.head_dim);
    let (qw, kw) = (s.n_heads * d, s.n_kv_heads * d);
    let group = s.n_heads / s.n_kv_heads;
    let (out, lse) = attention_ref(q, k, v, seg, s);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let sc = s.scale as f64;
    for i in 0..t {
        for h in 0..s.n_heads {
            let kh = h / group;
            let (qi, doi) = (i * qw + h * d, i * qw + h * d);
            let delta = dot(&dout[doi..doi + d], &out[doi..doi + d]);
            for j in (0..t).filter(|&j| visible(seg, s.window, i, j)) {
                let kj = j * kw + kh * d;
                let p = (sc * dot(&q[qi..qi + d], &k[kj..kj + d]) - lse[i * s.n_heads + h]).exp();
                let ds = p * (dot(&dout[doi..doi + d], &v[kj..kj + d]) - delta) * sc;
                for c in 0..d {
                    dq[qi + c] += ds * k[kj + c];
                    dk[kj + c] += ds * q[qi + c];
                    dv[kj + c] += p * dout[doi + c];
                }
            }
        }
    }
    [dq, dk, dv]
}

/// Floors for `dq`, `dk`, `dv` (see [`check_floor`]): the root-sum-square of
/// the terms each one sums.
///
/// With `p = softmax` and `Δ = dout·out`, the score gradient is
/// `ds = p·(dout·v_j − Δ)·scale`, a difference that cancels as the softmax
/// nears one-hot (out ≈ v_j) or by chance; rows of ds also sum to 0, so `dk`
/// of a short causal prefix cancels across queries. f32 rounding is relative
/// to the terms, so with `T = p·scale·(|dout·v_j| + |Δ|)` the errors are
/// measured against `√Σ T²·|k_j|²` (dq), `√Σ T²·|q_i|²` (dk) and
/// `√Σ p²·|dout_i|²` (dv) where the gradient itself is smaller.
fn grad_floors(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    seg: &[i32],
    s: &AttnShape,
) -> [f64; 3] {
    let (t, d) = (s.tokens, s.head_dim);
    let (qw, kw) = (s.n_heads * d, s.n_kv_heads * d);
    let group = s.n_heads / s.n_kv_heads;
    let (out, lse) = attention_ref(q, k, v, seg, s);
    let mut sq = [0.0; 3];
    for i in 0..t {
        for h in 0..s.n_heads {
            let kh = h / group;
            let at = |x: &'_ [f64], w: usize, r: usize, hh: usize| {
                x[r * w + hh * d..r * w + (hh + 1) * d].to_vec()
            };
            let (qi, doi, oi) = (at(q, qw, i, h), at(dout, qw, i, h), at(&out, qw, i, h));
            let delta = dot(&doi, &oi);
            for j in (0..t).filter(|&j| visible(seg, s.window, i, j)) {
                let (kj, vj) = (at(k, kw, j, kh), at(v, kw, j, kh));
                let p = (s.scale as f64 * dot(&qi, &kj) - lse[i * s.n_heads + h]).exp();
                let term = p * s.scale as f64 * (dot(&doi, &vj).abs() + delta.abs());
                sq[0] += term * term * dot(&kj, &kj);
                sq[1] += term * term * dot(&qi, &qi);
                sq[2] += p * p * dot(&doi, &doi);
            }
        }
    }
    sq.map(f64::sqrt)
}

/// Segment ids: contiguous runs of random lengths (one run a third of the
/// time), distinct per run and not necessarily from 0.
fn segments(rng: &mut Gen, t: usize) -> Vec<i32> {
    let max_run = if rng.below(3) == 0 {
        t
    } else {
        1 + rng.below(t.min(8))
    };
    let mut id = rng.below(5) as i32 - 2;
    let mut seg = Vec::with_capacity(t);
    while seg.len() < t {
        let run = (1 + rng.below(max_run)).min(t - seg.len());
        seg.extend(std::iter::repeat_n(id, run));
        id += 1 + rng.below(3) as i32;
    }
    seg
}

/// (n_heads, n_kv_heads): MHA, GQA and MQA.
fn heads() -> impl Strategy<Value = (usize, usize)> {
    prop::sample::select(vec![
        (1, 1),
        (2, 2),
        (2, 1),
        (4, 2),
        (4, 1),
        (3, 3),
        (6, 2),
        (6, 3),
    ])
}

fn window() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![Just(None), (1usize..=12).prop_map(Some)]
}

struct Case {
    s: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    seg: Vec<i32>,
}

fn case(
    tokens: usize,
    (n_heads, n_kv_heads): (usize, usize),
    head_dim: usize,
    window: Option<usize>,
    seed: u64,
) -> Case {
    let mut rng = Gen::new(seed);
    // Spread-out scores (up to ~±10 before scaling at d = 16) make softmaxes
    // from near-uniform to near-one-hot.
    let scale = if rng.coin() {
        1.0 / (head_dim as f32).sqrt()
    } else {
        rng.uniform(0.05, 1.0)
    };
    let s = AttnShape {
        tokens,
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
        window,
    };
    let q = rng.vec(tokens * n_heads * head_dim, -1.5, 1.5);
    let k = rng.vec(tokens * n_kv_heads * head_dim, -1.5, 1.5);
    let v = rng.vec(tokens * n_kv_heads * head_dim, -1.0, 1.0);
    let seg = segments(&mut rng, tokens);
    Case { s, q, k, v, seg }
}

fn forward(c: &Case) -> (Vec<f32>, Vec<f32>) {
    let mut out = nan_buf::<f32>(c.q.len());
    let mut lse = vec![f32::NAN; c.s.tokens * c.s.n_heads];
    attention(&c.q, &c.k, &c.v, &c.seg, c.s, &mut out, &mut lse);
    (out, lse)
}

proptest! {
    #![proptest_config(config(64))]

    /// Generation's cached attention: the last `new` tokens of a sequence
    /// against a cache holding the keys and values of the ones before (plus
    /// unused rows), equal to whole-sequence attention on those rows — bit
    /// for bit, as both sum in the same order — and to the f64 reference.
    #[test]
    fn cached_matches_whole_sequence(tokens in dim(48), split in 0.0f64..1.0, spare in 0usize..4, heads in heads(), head_dim in dim(16), window in window(), seed: u64) {
        let mut c = case(tokens, heads, head_dim, window, seed);
        c.seg = vec![0; tokens];
        let start = ((tokens - 1) as f64 * split) as usize;
        let (qw, kw) = (c.s.n_heads * head_dim, c.s.n_kv_heads * head_dim);
        let (whole, _) = forward(&c);
        let mut k_cache = c.k[..start * kw].to_vec();
        let mut v_cache = c.v[..start * kw].to_vec();
        k_cache.extend(vec![f32::NAN; spare * kw]);
        v_cache.extend(vec![f32::NAN; spare * kw]);
        let s = AttnShape { tokens: tokens - start, ..c.s };
        let mut out = nan_buf::<f32>((tokens - start) * qw);
        attention_cached(&c.q[start * qw..], &c.k[start * kw..], &c.v[start * kw..], &k_cache, &v_cache, start, s, &mut out);
        prop_assert_eq!(&out[..], &whole[start * qw..]);
        let (want, _) = attention_ref(&to_f64(&c.q), &to_f64(&c.k), &to_f64(&c.v), &c.seg, &c.s);
        check("out", &out, &want[start * qw..], 1e-6)?;
    }

    #[test]
    fn forward_matches_reference(tokens in dim(64), heads in heads(), head_dim in dim(16), window in window(), seed: u64) {
        let c = case(tokens, heads, head_dim, window, seed);
        let (want_out, want_lse) = attention_ref(&to_f64(&c.q), &to_f64(&c.k), &to_f64(&c.v), &c.seg, &c.s);
        let (out, lse) = forward(&c);
        // The f32 softmax-weighted sum stays within ~2e-7 (relative L2) of the
        // f64 one over thousands of cases, to 64 keys and d = 16: 1e-6 is the
        // tightest round bound with a margin, 10x below the generic FWD_TOL.
        check("out", &out, &want_out, 1e-6)?;
        // lse only enters through exp(score - lse): an absolute error δ is a
        // relative error δ in every probability, so it is bounded absolutely.
        // Scores here stay within about ±20, where f32 spacing is ≤ 2e-6
        // (observed errors ≤ 1.3e-6); 1e-5 is a few units in the last place.
        let lse_err = lse.iter().zip(&want_lse).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        prop_assert!(lse_err <= 1e-5, "lse: max abs error {lse_err:e}");
        prop_assert!(lse.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn grad_matches_finite_differences(tokens in dim(24), heads in heads(), head_dim in dim(12), window in window(), seed: u64) {
        let c = case(tokens, heads, head_dim, window, seed);
        let dout = Gen::new(!seed).vec(c.q.len(), -1.0, 1.0);
        let (q64, k64, v64, dout64) = (to_f64(&c.q), to_f64(&c.k), to_f64(&c.v), to_f64(&dout));
        let objective = |q: &[f64], k: &[f64], v: &[f64]| dot(&dout64, &attention_ref(q, k, v, &c.seg, &c.s).0);
        let want_dq = numeric_grad(&q64, |q| objective(q, &k64, &v64));
        let want_dk = numeric_grad(&k64, |k| objective(&q64, k, &v64));
        let want_dv = numeric_grad(&v64, |v| objective(&q64, &k64, v));

        let (out, lse) = forward(&c);
        let mut dq = nan_buf::<f32>(c.q.len());
        let mut dk = nan_buf::<f32>(c.k.len());
        let mut dv = nan_buf::<f32>(c.v.len());
        attention_grad(&c.q, &c.k, &c.v, &c.seg, &out, &lse, &dout, c.s, &mut dq, &mut dk, &mut dv);
        // Errors measured this way stay below ~3e-7; the floors can exceed
        // the gradient norm several times over, so the bound is 1e-5, not the
        // generic GRAD_TOL, to stay sharp (a 0.1% error in dk fails it).
        let [floor_dq, floor_dk, floor_dv] = grad_floors(&q64, &k64, &v64, &dout64, &c.seg, &c.s);
        check_floor("dq", &dq, &want_dq, floor_dq, 1e-5)?;
        check_floor("dk", &dk, &want_dk, floor_dk, 1e-5)?;
        check_floor("dv", &dv, &want_dv, floor_dv, 1e-5)?;
        // The analytic reference the block tests use agrees with the
        // differences (to their own truncation error).
        let [rq, rk, rv] = attention_grad_ref(&q64, &k64, &v64, &dout64, &c.seg, &c.s);
        for (what, r, want, floor) in [("ref dq", &rq, &want_dq, floor_dq), ("ref dk", &rk, &want_dk, floor_dk), ("ref dv", &rv, &want_dv, floor_dv)] {
            let err = norm(&r.iter().zip(want.iter()).map(|(a, b)| a - b).collect::<Vec<_>>()) / norm(want).max(floor).max(1e-300);
            prop_assert!(err <= 1e-6, "{what}: {err:e}");
        }
    }
}

proptest! {
    #![proptest_config(config(10))]

    /// Past one block of queries (64) and across several, with segments
    /// and windows cutting blocks anywhere: forward, backward (against the
    /// analytic f64 gradients) and cached generation (bit for bit).
    #[test]
    fn blocks(tokens in 65usize..=260, heads in heads(), head_dim in dim(16), window in prop_oneof![Just(None), (1usize..=100).prop_map(Some)], split in 0.0f64..1.0, seed: u64) {
        let c = case(tokens, heads, head_dim, window, seed);
        let (q64, k64, v64) = (to_f64(&c.q), to_f64(&c.k), to_f64(&c.v));
        let (want_out, _) = attention_ref(&q64, &k64, &v64, &c.seg, &c.s);
        let (out, lse) = forward(&c);
        check("out", &out, &want_out, 1e-6)?;

        let dout = Gen::new(!seed).vec(c.q.len(), -1.0, 1.0);
        let dout64 = to_f64(&dout);
        let [want_dq, want_dk, want_dv] = attention_grad_ref(&q64, &k64, &v64, &dout64, &c.seg, &c.s);
        let (mut dq, mut dk, mut dv) = (nan_buf::<f32>(c.q.len()), nan_buf::<f32>(c.k.len()), nan_buf::<f32>(c.v.len()));
        attention_grad(&c.q, &c.k, &c.v, &c.seg, &out, &lse, &dout, c.s, &mut dq, &mut dk, &mut dv);
        let [floor_dq, floor_dk, floor_dv] = grad_floors(&q64, &k64, &v64, &dout64, &c.seg, &c.s);
        check_floor("dq", &dq, &want_dq, floor_dq, 1e-5)?;
        check_floor("dk", &dk, &want_dk, floor_dk, 1e-5)?;
        check_floor("dv", &dv, &want_dv, floor_dv, 1e-5)?;

        // Generation over one sequence: the cached rows equal the whole.
        let mut c = c;
        c.seg = vec![0; tokens];
        let (whole, _) = forward(&c);
        let start = ((tokens - 1) as f64 * split) as usize;
        let (qw, kw) = (c.s.n_heads * head_dim, c.s.n_kv_heads * head_dim);
        let s = AttnShape { tokens: tokens - start, ..c.s };
        let mut cached = nan_buf::<f32>((tokens - start) * qw);
        attention_cached(&c.q[start * qw..], &c.k[start * kw..], &c.v[start * kw..], &c.k[..start * kw], &c.v[..start * kw], start, s, &mut cached);
        prop_assert_eq!(&cached[..], &whole[start * qw..]);
    }
}

proptest! {
    #![proptest_config(config(10))]

    /// bf16 storage: products multiplied in bf16 (AMX where the CPU has
    /// it), the probabilities and score gradients rounded to bf16 for the
    /// products that take them, near the f64 values of the same bf16
    /// inputs: bf16 outputs alone round by ~1e-3 (relative L2), the errors
    /// measured stay under 3e-3, a wrong block or key is off by O(1).
    /// Forward and backward across blocks, head sizes whole tile blocks
    /// and ragged; cached generation bit for bit.
    #[test]
    fn bf16_storage(tokens in 1usize..=200, heads in heads(), head_dim in prop_oneof![Just(64usize), 1usize..=40], window in window(), seed: u64) {
        let c = case(tokens, heads, head_dim, window, seed);
        let (q, k, v): (Vec<bf16>, Vec<bf16>, Vec<bf16>) = (to_elem(&c.q), to_elem(&c.k), to_elem(&c.v));
        let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
        let (want_out, _) = attention_ref(&q64, &k64, &v64, &c.seg, &c.s);
        let mut out = nan_buf::<bf16>(q.len());
        let mut lse = vec![f32::NAN; tokens * c.s.n_heads];
        attention(&q, &k, &v, &c.seg, c.s, &mut out, &mut lse);
        check("out", &out, &want_out, 5e-3)?;

        let dout: Vec<bf16> = to_elem(&Gen::new(!seed).vec(c.q.len(), -1.0, 1.0));
        let dout64 = to_f64(&dout);
        let [want_dq, want_dk, want_dv] = attention_grad_ref(&q64, &k64, &v64, &dout64, &c.seg, &c.s);
        let (mut dq, mut dk, mut dv) = (nan_buf::<bf16>(q.len()), nan_buf::<bf16>(k.len()), nan_buf::<bf16>(v.len()));
        attention_grad(&q, &k, &v, &c.seg, &out, &lse, &dout, c.s, &mut dq, &mut dk, &mut dv);
        let [floor_dq, floor_dk, floor_dv] = grad_floors(&q64, &k64, &v64, &dout64, &c.seg, &c.s);
        check_floor("dq", &dq, &want_dq, floor_dq, 5e-3)?;
        check_floor("dk", &dk, &want_dk, floor_dk, 5e-3)?;
        check_floor("dv", &dv, &want_dv, floor_dv, 5e-3)?;

        let one = vec![0; tokens];
        let mut whole = nan_buf::<bf16>(q.len());
        attention(&q, &k, &v, &one, c.s, &mut whole, &mut lse);
        let start = tokens / 2;
        let (qw, kw) = (c.s.n_heads * head_dim, c.s.n_kv_heads * head_dim);
        let s = AttnShape { tokens: tokens - start, ..c.s };
        let mut cached = nan_buf::<bf16>((tokens - start) * qw);
        attention_cached(&q[start * qw..], &k[start * kw..], &v[start * kw..], &k[..start * kw], &v[..start * kw], start, s, &mut cached);
        prop_assert_eq!(&cached[..], &whole[start * qw..]);
    }
}

/// The mask itself, on a hand-made case: two segments and a window of 2,
/// with values that make every visible key's weight observable.
#[test]
fn mask_follows_segments_and_window() {
    // One head, d = 1, q = 0: uniform weights over the visible keys, so
    // out[i] is the mean of v over them.
    let seg = [7, 7, 7, 9, 9];
    let v = [1.0f32, 10.0, 100.0, 1000.0, 10000.0];
    let s = AttnShape {
        tokens: 5,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 1,
        scale: 1.0,
        window: Some(2),
    };
    let (q, k) = ([0.0f32; 5], [1.0f32; 5]);
    let mut out = [f32::NAN; 5];
    let mut lse = [f32::NAN; 5];
    attention(&q, &k, &v, &seg, s, &mut out, &mut lse);
    assert_eq!(out, [1.0, 5.5, 55.0, 1000.0, 5500.0]);
    let ln2 = 2f32.ln();
    assert_eq!(lse, [0.0, ln2, ln2, 0.0, ln2]);
}
