//! End-to-end gradient checks: every differentiable op, recorded in a small
//! graph whose float inputs are trainable, compiled with `compile_training`
//! and run on the CPU; each parameter gradient is compared with central
//! finite differences of the loss computed by the forward plan.

use graft_engine::ir::{Activation, AttentionSpec, DType, Graph, Op, RopeSpec, ValueId};
use graft_engine::kernels::bf16;
use graft_engine::{
    compile, compile_training, compile_training_with, CompileOptions, CpuExecutor, Feeds, Tensor,
};
use std::sync::Arc;

/// Cases per op, each with its own shapes and values.
const CASES: u64 = 8;
/// Central-difference step (f32 loss: smaller steps drown in rounding).
const STEP: f32 = 1e-2;
/// Relative L2 error allowed between autograd and finite differences (on top
/// of the finite differences' own f32 noise, see `gradcheck`).
const TOL: f32 = 2e-2;

/// splitmix64: small, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A graph under construction together with the values bound to its leaves.
struct Case {
    g: Graph,
    rng: Rng,
    feeds: Vec<(ValueId, Tensor)>,
}

impl Case {
    fn new(seed: u64) -> Self {
        Case {
            g: Graph::new(),
            rng: Rng::new(seed),
            feeds: Vec::new(),
        }
    }

    fn floats(&mut self, shape: &[usize], amplitude: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| amplitude * self.rng.uniform()).collect();
        Tensor::from_f32(shape, &data).unwrap()
    }

    /// A trainable f32 parameter with values in `[-amplitude, amplitude)`.
    fn param(&mut self, name: &str, shape: &[usize], amplitude: f32) -> ValueId {
        let v = self.g.param(name, shape, DType::F32, true);
        let t = self.floats(shape, amplitude);
        self.feeds.push((v, t));
        v
    }

    fn frozen(&mut self, name: &str, shape: &[usize], amplitude: f32) -> ValueId {
        let v = self.g.param(name, shape, DType::F32, false);
        let t = self.floats(shape, amplitude);
        self.feeds.push((v, t));
        v
    }

    fn ids(&mut self, name: &str, data: &[i32]) -> ValueId {
        let v = self.g.input(name, &[data.len()], DType::I32);
        self.feeds
            .push((v, Tensor::from_i32(&[data.len()], data).unwrap()));
        v
    }

    /// Labels in `0..vocab`, with one position (of several) ignored.
    fn labels(&mut self, tokens: usize, vocab: usize) -> ValueId {
        let mut l: Vec<i32> = (0..tokens)
            .map(|_| self.rng.range(0, vocab - 1) as i32)
            .collect();
        if tokens > 1 {
            let i = self.rng.range(0, tokens - 1);
            l[i] = -100;
        }
        self.ids("labels", &l)
    }

    /// `loss = cross_entropy(y·Wᵀ, labels)` with a frozen head `W`.
    fn head(&mut self, y: ValueId) -> ValueId {
        let (t, c) = (self.g.shape(y)[0], self.g.shape(y)[1]);
        let vocab = self.rng.range(3, 6);
        let w = self.frozen("head", &[vocab, c], 2.0);
        let logits = self.g.linear(y, w, None).unwrap();
        let labels = self.labels(t, vocab);
        self.g.cross_entropy(logits, labels).unwrap()
    }
}

fn feeds_of<'a>(list: &'a [(ValueId, Tensor)], over: Option<(ValueId, &'a Tensor)>) -> Feeds<'a> {
    let mut feeds = Feeds::new();
    for (v, t) in list {
        feeds.bind(*v, t);
    }
    if let Some((v, t)) = over {
        feeds.bind(v, t);
    }
    feeds
}

fn rel_l2(got: &[f32], want: &[f32]) -> f32 {
    let diff: f32 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = want.iter().map(|x| x * x).sum::<f32>().sqrt();
    diff / norm.max(1e-12)
}

/// Compiles `case` for training and compares each trainable parameter's
/// gradient with central finite differences of the forward plan's loss.
fn gradcheck(what: &str, case: Case, loss: ValueId) {
    let trainable: Vec<ValueId> = case
        .g
        .params()
        .filter(|&p| case.g.is_trainable(p))
        .collect();
    let forward = compile(case.g.clone(), &[loss]).unwrap();
    let train = compile_training(case.g, loss, &[]).unwrap();
    assert_eq!(
        train.grads().len(),
        trainable.len(),
        "{what}: every trainable param gets a gradient"
    );

    let mut ex = CpuExecutor::new();
    let out = ex.run(&train, &feeds_of(&case.feeds, None)).unwrap();
    let loss0 = out[0].as_f32().unwrap()[0];
    assert!(loss0.is_finite(), "{what}: loss {loss0}");
    let fwd_loss = ex.run(&forward, &feeds_of(&case.feeds, None)).unwrap()[0]
        .as_f32()
        .unwrap()[0];
    assert!(
        (fwd_loss - loss0).abs() <= 1e-6 * loss0.abs().max(1.0),
        "{what}: {fwd_loss} vs {loss0}"
    );

    let mut fwd_ex = CpuExecutor::new();
    let mut loss_at = |p: ValueId, t: &Tensor| -> f32 {
        let feeds = feeds_of(&case.feeds, Some((p, t)));
        fwd_ex.run(&forward, &feeds).unwrap()[0].as_f32().unwrap()[0]
    };
    for p in trainable {
        let name = train.graph().leaf_name(p).unwrap().to_string();
        let gv = train.grad_of(p).unwrap();
        let gi = train.outputs().iter().position(|&o| o == gv).unwrap();
        assert_eq!(
            out[gi].shape(),
            train.graph().shape(p),
            "{what}: gradient shape of {name}"
        );
        let grad = out[gi].as_f32().unwrap().to_vec();
        let base = &case.feeds.iter().find(|(v, _)| *v == p).unwrap().1;
        let mut fd = vec![0f32; base.numel()];
        for (i, d) in fd.iter_mut().enumerate() {
            let mut plus = base.clone();
            plus.as_f32_mut().unwrap()[i] += STEP;
            let mut minus = base.clone();
            minus.as_f32_mut().unwrap()[i] -= STEP;
            *d = (loss_at(p, &plus) - loss_at(p, &minus)) / (2.0 * STEP);
        }
        // Each loss is rounded to f32, so each difference quotient carries
        // noise of a few ulps of the loss over the step: allow for it, and
        // demand a gradient well above it so that the check means something.
        let noise = 2.0 * f32::EPSILON * loss0.abs().max(1.0) / STEP * (fd.len() as f32).sqrt();
        let norm = fd.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            norm > 10.0 * noise,
            "{what}: the loss barely depends on {name} (|fd| = {norm}, noise {noise}); the check would be vacuous"
        );
        let diff = rel_l2(&grad, &fd) * norm; // absolute L2 distance
        assert!(
            diff < TOL * norm + noise,
            "{what}: gradient of {name} is off by {} (rel L2)\n  autograd {grad:?}\n  fin.diff {fd:?}",
            diff / norm
        );
    }
}

/// Runs `build` and the gradient check for `CASES` seeds; the seeds depend on
/// `what` (FNV-1a of the name) so that ops do not all draw the same shapes.
fn each_case(what: &str, build: impl Fn(&mut Case) -> ValueId) {
    let salt = what.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    for seed in 0..CASES {
        let mut case = Case::new(salt.wrapping_add(seed));
        let loss = build(&mut case);
        gradcheck(&format!("{what} (seed {seed})"), case, loss);
    }
}

#[test]
fn matmul_all_transpose_combinations() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        each_case(&format!("matmul ta={ta} tb={tb}"), |c| {
            let (m, k, n) = (c.rng.range(1, 5), c.rng.range(1, 5), c.rng.range(1, 5));
            let a = c.param("a", &if ta { [k, m] } else { [m, k] }, 1.0);
            let b = c.param("b", &if tb { [n, k] } else { [k, n] }, 1.0);
            let y = c.g.matmul(a, b, ta, tb).unwrap();
            c.head(y)
        });
    }
}

#[test]
fn add_bias() {
    each_case("add_bias", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let x = c.param("x", &[m, n], 1.0);
        let b = c.param("b", &[n], 1.0);
        let y = c.g.apply1(Op::AddBias, &[x, b]).unwrap();
        c.head(y)
    });
}

#[test]
fn mul_cols() {
    each_case("mul_cols", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let x = c.param("x", &[m, n], 1.0);
        let v = c.param("v", &[n], 1.0);
        let y = c.g.mul_cols(x, v).unwrap();
        c.head(y)
    });
}

/// DoRA's scale `m ⊙ (1/‖W + s·BA‖)`: gradients reach the magnitude and
/// the input. A and B are frozen here: the norm is a constant to autograd,
/// which finite differences of the loss would not honour.
#[test]
fn dora_scale_gradients_reach_the_magnitude() {
    each_case("dora scale", |c| {
        let (t, k, n, r) = (c.rng.range(1, 4), c.rng.range(1, 5), c.rng.range(1, 5), 2);
        let x = c.param("x", &[t, k], 1.0);
        let w = c.frozen("w", &[n, k], 1.0);
        let a = c.frozen("a", &[r, k], 0.5);
        let b = c.frozen("b", &[n, r], 0.5);
        let m = c.param("m", &[n], 1.0);
        let g = &mut c.g;
        let inv = g.dora_inv_norm(a, b, w, 2.0).unwrap();
        let scale = g.mul(m, inv).unwrap();
        let wx = g.linear(x, w, None).unwrap();
        let y = g.mul_cols(wx, scale).unwrap();
        c.head(y)
    });
}

#[test]
fn dora_combine() {
    each_case("dora_combine", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let base = c.param("base", &[m, n], 1.0);
        let lora = c.param("lora", &[m, n], 1.0);
        let scale = c.param("scale", &[n], 1.0);
        let y = c.g.dora_combine(base, lora, scale).unwrap();
        c.head(y)
    });
}

#[test]
fn add_mul_scale() {
    each_case("add", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let a = c.param("a", &[m, n], 1.0);
        let b = c.param("b", &[m, n], 1.0);
        let y = c.g.add(a, b).unwrap();
        c.head(y)
    });
    each_case("mul", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let a = c.param("a", &[m, n], 1.0);
        let b = c.param("b", &[m, n], 1.0);
        let y = c.g.mul(a, b).unwrap();
        c.head(y)
    });
    each_case("scale", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let s = 2.0 * c.rng.uniform();
        let x = c.param("x", &[m, n], 1.0);
        let y = c.g.scale(x, s).unwrap();
        c.head(y)
    });
}

#[test]
fn a_value_read_several_times_accumulates_its_gradient() {
    each_case("fan-out", |c| {
        let (m, n) = (c.rng.range(1, 5), c.rng.range(1, 5));
        let x = c.param("x", &[m, n], 1.0);
        let sq = c.g.mul(x, x).unwrap();
        let half = c.g.scale(x, 0.5).unwrap();
        let y = c.g.add(sq, half).unwrap();
        c.head(y)
    });
}

/// `loss = head(cast(cast(x, bf16), f32))`, or `head(x)` (through a no-op
/// scale) with `x` already rounded to bf16.
fn cast_case(seed: u64, with_casts: bool) -> (Case, ValueId, ValueId) {
    let mut c = Case::new(seed);
    let (m, n) = (c.rng.range(1, 5), c.rng.range(2, 6));
    let x = c.param("x", &[m, n], 3.0);
    let y = if with_casts {
        let lo = c.g.cast(x, DType::BF16).unwrap();
        c.g.cast(lo, DType::F32).unwrap()
    } else {
        let rounded = c.feeds[0].1.to_dtype(DType::BF16).unwrap();
        c.feeds[0].1 = rounded.to_dtype(DType::F32).unwrap();
        c.g.scale(x, 1.0).unwrap()
    };
    let loss = c.head(y);
    (c, loss, y)
}

fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// Casts are not differentiable precisely, so check values: the round trip
/// rounds to bf16, and the gradient is the cast-free one (same forward
/// values) rounded to bf16 by the VJP of the f32 cast. Unfused: this checks
/// autograd's casts bit for bit, and a fused sum rounds once instead.
#[test]
fn cast_round_trip_values_and_gradient() {
    let unfused = &CompileOptions {
        fuse: false,
        ..Default::default()
    };
    for seed in 0..CASES {
        let (c, loss, y) = cast_case(seed, true);
        let (plain, plain_loss, _) = cast_case(seed, false);
        let plan = compile_training_with(c.g, loss, &[y], unfused).unwrap();
        let plain_plan = compile_training_with(plain.g, plain_loss, &[], unfused).unwrap();
        let casts = plan
            .graph()
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Cast(_)));
        assert_eq!(casts.count(), 4, "two casts forward, two backward");
        let mut ex = CpuExecutor::new();
        let out = ex.run(&plan, &feeds_of(&c.feeds, None)).unwrap();
        let plain_out = ex.run(&plain_plan, &feeds_of(&plain.feeds, None)).unwrap();

        // Values: exactly x rounded to bf16.
        let xs = c.feeds[0].1.as_f32().unwrap();
        let want = round_bf16(xs);
        assert_eq!(out[1].as_f32().unwrap(), want.as_slice());
        assert_eq!(plain.feeds[0].1.as_f32().unwrap(), want.as_slice());
        assert_ne!(
            xs,
            want.as_slice(),
            "rounding must be visible for the check to mean anything"
        );
        assert_eq!(
            out[0].bytes(),
            plain_out[0].bytes(),
            "same forward values, same loss"
        );
        // Gradient: f32, and the cast-free gradient rounded to bf16.
        assert_eq!(out[2].dtype(), DType::F32);
        let g = out[2].as_f32().unwrap();
        let g_plain = plain_out[1].as_f32().unwrap();
        assert_eq!(g, round_bf16(g_plain).as_slice(), "seed {seed}");
        assert!(g.iter().any(|v| *v != 0.0));
    }
}

#[test]
fn embedding() {
    each_case("embedding", |c| {
        let (vocab, h, t) = (c.rng.range(2, 6), c.rng.range(1, 4), c.rng.range(2, 7));
        let table = c.param("table", &[vocab, h], 1.0);
        // Repeated ids: their rows' gradients must add up.
        let data: Vec<i32> = (0..t)
            .map(|i| {
                if i == 1 {
                    0
                } else {
                    c.rng.range(0, vocab - 1) as i32
                }
            })
            .collect();
        let mut data = data;
        data[0] = 0;
        let ids = c.ids("ids", &data);
        let y = c.g.embedding(table, ids).unwrap();
        c.head(y)
    });
}

#[test]
fn rms_norm_with_and_without_unit_offset() {
    for unit_offset in [false, true] {
        each_case(&format!("rms_norm unit_offset={unit_offset}"), |c| {
            let (t, h) = (c.rng.range(1, 4), c.rng.range(2, 6));
            let x = c.param("x", &[t, h], 1.0);
            let w = c.param("w", &[h], 1.0);
            let y = c.g.rms_norm(x, w, 1e-5, unit_offset).unwrap();
            c.head(y)
        });
    }
}

#[test]
fn rope() {
    each_case("rope", |c| {
        let (t, heads, half) = (c.rng.range(1, 5), c.rng.range(1, 3), c.rng.range(1, 3));
        let inv_freq: Vec<f32> = (0..half).map(|i| 10f32.powf(-(i as f32))).collect();
        let spec = RopeSpec {
            n_heads: heads,
            head_dim: 2 * half,
            inv_freq: Arc::from(inv_freq),
        };
        let x = c.param("x", &[t, heads * 2 * half], 1.0);
        let pos: Vec<i32> = (0..t).map(|_| c.rng.range(0, 30) as i32).collect();
        let pos = c.ids("positions", &pos);
        let y = c.g.rope(x, pos, spec).unwrap();
        c.head(y)
    });
}

#[test]
fn attention_with_gqa_segments_and_window() {
    each_case("attention", |c| {
        let t = c.rng.range(4, 8);
        let n_kv = c.rng.range(1, 2);
        let group = c.rng.range(2, 3);
        let d = 2 * c.rng.range(1, 2);
        let window = Some(c.rng.range(2, 4));
        let spec = AttentionSpec {
            n_heads: n_kv * group,
            n_kv_heads: n_kv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            window,
        };
        // Two or three packed documents of at least two tokens (a lone token
        // attends only to itself, so q gets no gradient from it).
        let cut1 = c.rng.range(2, t - 2);
        let cut2 = c.rng.range(cut1 + 2, t);
        let seg: Vec<i32> = (0..t)
            .map(|i| (i >= cut1) as i32 + (i >= cut2) as i32)
            .collect();
        let q = c.param("q", &[t, n_kv * group * d], 1.5);
        let k = c.param("k", &[t, n_kv * d], 1.5);
        let v = c.param("v", &[t, n_kv * d], 1.0);
        let seg = c.ids("segments", &seg);
        let y = c.g.attention(q, k, v, seg, spec).unwrap();
        c.head(y)
    });
}

#[test]
fn gated_activations() {
    for act in [Activation::Silu, Activation::GeluTanh] {
        each_case(&format!("gated_act {act:?}"), |c| {
            let (t, f) = (c.rng.range(2, 4), c.rng.range(2, 6));
            let gate = c.param("gate", &[t, f], 2.5);
            let up = c.param("up", &[t, f], 1.0);
            let y = c.g.gated_act(act, gate, up).unwrap();
            c.head(y)
        });
    }
}

#[test]
fn cross_entropy_with_ignored_labels() {
    each_case("cross_entropy", |c| {
        let (t, v) = (c.rng.range(2, 6), c.rng.range(2, 7));
        let logits = c.param("logits", &[t, v], 2.0);
        let labels = c.labels(t, v);
        c.g.cross_entropy(logits, labels).unwrap()
    });
}

#[test]
fn dropout() {
    each_case("dropout", |c| {
        let (t, n) = (c.rng.range(2, 5), c.rng.range(3, 8));
        let x = c.param("x", &[t, n], 1.0);
        let seed = c.g.input("seed", &[1], DType::U32);
        let s = c.rng.next() as u32;
        c.feeds.push((seed, Tensor::from_u32(&[1], &[s]).unwrap()));
        let y = c.g.dropout(x, seed, 0.3).unwrap();
        c.head(y)
    });
}

#[test]
fn lora_block_end_to_end() {
    each_case("lora block", |c| {
        let t = c.rng.range(3, 6);
        let (k, n, r, d, n_kv, group, f) = (5, 6, 2, 2, 1, 2, 5);
        let heads = n_kv * group;
        let vocab_in = 7;
        let ids: Vec<i32> = (0..t)
            .map(|_| c.rng.range(0, vocab_in - 1) as i32)
            .collect();
        let ids = c.ids("ids", &ids);
        let pos: Vec<i32> = (0..t as i32).collect();
        let pos = c.ids("positions", &pos);
        let seg = c.ids("segments", &vec![0; t]);
        let table = c.frozen("embed", &[vocab_in, k], 1.0);
        let w = c.frozen("w", &[n, k], 0.5);
        let a = c.param("lora_a", &[r, k], 0.5);
        let b = c.param("lora_b", &[n, r], 0.5);
        let norm = c.frozen("norm", &[n], 0.3);
        let wq = c.frozen("wq", &[heads * d, n], 0.5);
        let wk = c.frozen("wk", &[n_kv * d, n], 0.5);
        let wv = c.frozen("wv", &[n_kv * d, n], 0.5);
        let wg = c.frozen("wg", &[f, heads * d], 0.8);
        let wu = c.frozen("wu", &[f, heads * d], 0.8);

        let g = &mut c.g;
        let x = g.embedding(table, ids).unwrap();
        let base = g.linear(x, w, None).unwrap();
        let down = g.linear(x, a, None).unwrap();
        let up = g.linear(down, b, None).unwrap();
        let lora = g.scale(up, 2.0).unwrap();
        let h = g.add(base, lora).unwrap();
        let hn = g.rms_norm(h, norm, 1e-6, true).unwrap();
        let rope = |heads| RopeSpec {
            n_heads: heads,
            head_dim: d,
            inv_freq: Arc::from(vec![0.5f32]),
        };
        let q = g.linear(hn, wq, None).unwrap();
        let q = g.rope(q, pos, rope(heads)).unwrap();
        let kk = g.linear(hn, wk, None).unwrap();
        let kk = g.rope(kk, pos, rope(n_kv)).unwrap();
        let v = g.linear(hn, wv, None).unwrap();
        let spec = AttentionSpec {
            n_heads: heads,
            n_kv_heads: n_kv,
            head_dim: d,
            scale: 0.7,
            window: Some(3),
        };
        let att = g.attention(q, kk, v, seg, spec).unwrap();
        let gate = g.linear(att, wg, None).unwrap();
        let upm = g.linear(att, wu, None).unwrap();
        let y = g.gated_act(Activation::GeluTanh, gate, upm).unwrap();
        c.head(y)
    });
}
