//! LOMO: full fine-tuning with the SGD update fused into the backward pass.
//! It must equal plain SGD parameter for parameter (bit for bit without
//! clipping; with LOMO's two-pass global-norm clipping, SGD after
//! `clip_grad_norm`), and its plan must hold at most one parameter's
//! gradient beyond what the backward pass itself keeps.

mod common;

use common::{fixture_dir, rel_l2};
use graft::engine::optim::{clip_grad_norm, Sgd};
use graft::engine::{compile_fused, compile_training, CpuExecutor, FusedRule, Tensor};
use graft::ir::DType;
use graft::models::{Batch, CausalLm, RecordOptions};

const LR: f32 = 0.05;
const SGD: FusedRule = FusedRule::Sgd {
    weight_decay: 0.0,
    clip_value: 0.0,
};

fn model() -> CausalLm {
    CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap()
}

fn batches(steps: usize) -> Vec<Batch> {
    (0..steps)
        .map(|s| {
            let seqs: Vec<Vec<i32>> = (0..2)
                .map(|r| {
                    (0..20)
                        .map(|t| ((s * 31 + r * 57 + t * 11) % 256) as i32)
                        .collect()
                })
                .collect();
            let refs: Vec<&[i32]> = seqs.iter().map(Vec::as_slice).collect();
            Batch::new(&refs, None, 0).unwrap()
        })
        .collect()
}

fn opts() -> RecordOptions<'static> {
    RecordOptions {
        train_base: true,
        loss: true,
        ..Default::default()
    }
}

/// Plain SGD after the whole backward pass; `clip`: global-norm clipping.
fn sgd(steps: usize, clip: Option<f64>) -> (CausalLm, Vec<f32>) {
    let mut m = model();
    let data = batches(steps);
    let rec = m.record(data[0].tokens(), opts()).unwrap();
    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
    let names: Vec<String> = plan
        .grads()
        .iter()
        .map(|(p, _)| plan.graph().leaf_name(*p).unwrap().to_string())
        .collect();
    let sizes: Vec<usize> = names.iter().map(|n| m.weight(n).unwrap().numel()).collect();
    let mut opt = Sgd::new(0.0, 0.0, &sizes);
    let mut exec = CpuExecutor::new();
    let mut losses = Vec::new();
    for b in &data {
        let out = exec.run(&plan, &rec.feeds(&m, None, b).unwrap()).unwrap();
        losses.push(out[0].as_f32().unwrap()[0]);
        let mut grads: Vec<Vec<f32>> = out[1..].iter().map(|t| t.to_f32_vec().unwrap()).collect();
        if let Some(max) = clip {
            let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
            clip_grad_norm(&mut refs, max);
        }
        let grads: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let w = m.weights_mut();
        let mut owned: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| (n.clone(), w.remove(n).unwrap()))
            .collect();
        let mut params: Vec<&mut [f32]> = owned
            .iter_mut()
            .map(|(_, t)| t.as_f32_mut().unwrap())
            .collect();
        opt.step(&mut params, &grads, LR as f64).unwrap();
        w.extend(owned);
    }
    (m, losses)
}

/// LOMO; `clip`: its two-pass global-norm clipping (a first run with lr 0
/// measures the norm, the second applies the clipped update).
fn lomo(steps: usize, clip: Option<f64>) -> (CausalLm, Vec<f32>) {
    let mut m = model();
    let data = batches(steps);
    let rec = m.record(data[0].tokens(), opts()).unwrap();
    let (plan, inputs) = compile_fused(rec.graph.clone(), rec.loss.unwrap(), SGD).unwrap();
    let (lr, coef) = (inputs.lr, inputs.coef);
    let mut exec = CpuExecutor::new();
    let mut losses = Vec::new();
    let zero = Tensor::from_f32(&[1], &[0.0]).unwrap();
    let one = Tensor::from_f32(&[1], &[1.0]).unwrap();
    let lr_t = Tensor::from_f32(&[1], &[LR]).unwrap();
    for b in &data {
        let c = match clip {
            None => one.clone(),
            Some(max) => {
                let mut feeds = rec.feeds_mut(&mut m, b).unwrap();
                feeds.bind(lr, &zero).bind(coef, &one);
                let out = exec.run(&plan, &feeds).unwrap();
                let norm = out[1..]
                    .iter()
                    .map(|t| t.as_f32().unwrap()[0] as f64)
                    .sum::<f64>()
                    .sqrt();
                let c = (max / (norm + 1e-6)).min(1.0) as f32;
                Tensor::from_f32(&[1], &[c]).unwrap()
            }
        };
        let mut feeds = rec.feeds_mut(&mut m, b).unwrap();
        feeds.bind(lr, &lr_t).bind(coef, &c);
        let out = exec.run(&plan, &feeds).unwrap();
        losses.push(out[0].as_f32().unwrap()[0]);
    }
    (m, losses)
}

#[test]
fn lomo_equals_sgd_bit_for_bit() {
    let (a, la) = sgd(4, None);
    let (b, lb) = lomo(4, None);
    assert_eq!(la, lb, "losses");
    assert!(la[3] < la[0], "training moves: {la:?}");
    for (name, t) in a.weights() {
        assert_eq!(t.bytes(), b.weight(name).unwrap().bytes(), "{name}");
    }
}

#[test]
fn lomo_two_pass_clipping_equals_sgd_with_global_norm_clipping() {
    // Well below the gradient norms here, so every step clips.
    let (a, la) = sgd(3, Some(0.5));
    let (b, lb) = lomo(3, Some(0.5));
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "losses {la:?} vs {lb:?}");
    }
    let (c, _) = sgd(3, None);
    let mut moved = 0.0f64;
    for (name, t) in a.weights() {
        let (x, y) = (
            t.to_f32_vec().unwrap(),
            b.weight(name).unwrap().to_f32_vec().unwrap(),
        );
        let e = rel_l2(&y, &x);
        assert!(e < 1e-6, "{name}: rel L2 {e:e}");
        moved = moved.max(rel_l2(&x, &c.weight(name).unwrap().to_f32_vec().unwrap()));
    }
    assert!(
        moved > 1e-4,
        "clipping changed nothing: the check would be vacuous"
    );
}

/// The most bytes of complete parameter gradients alive at once in a plan's
/// schedule (a gradient lives from its producer to its last reader, or to
/// the end when it is an output).
fn live_gradient_bytes(plan: &graft::engine::Plan, grads: &[graft::ir::ValueId]) -> usize {
    let g = plan.graph();
    let sched = plan.schedule();
    let pos = |v| {
        sched
            .iter()
            .position(|&n| g.node(n).outputs.contains(&v))
            .unwrap()
    };
    let last = |v| {
        if plan.outputs().contains(&v) {
            return sched.len();
        }
        sched
            .iter()
            .rposition(|&n| g.node(n).inputs.contains(&v))
            .unwrap()
    };
    let spans: Vec<(usize, usize, usize)> = grads
        .iter()
        .map(|&v| (pos(v), last(v), g.ty(v).bytes()))
        .collect();
    (0..sched.len())
        .map(|s| {
            spans
                .iter()
                .filter(|(a, b, _)| *a <= s && s < *b)
                .map(|x| x.2)
                .sum()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn lomo_keeps_at_most_one_gradient_beyond_the_backward_pass() {
    let m = model();
    let b = &batches(1)[0];
    let rec = m.record(b.tokens(), opts()).unwrap();
    let full = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
    let (fused, ..) = compile_fused(rec.graph.clone(), rec.loss.unwrap(), SGD).unwrap();
    let full_grads: Vec<_> = full.grads().iter().map(|(_, g)| *g).collect();
    let fused_grads: Vec<_> = fused
        .schedule()
        .iter()
        .map(|&n| fused.graph().node(n))
        .filter(|n| n.op.updates_in_place())
        .map(|n| n.inputs[1])
        .collect();
    assert_eq!(fused_grads.len(), full_grads.len());
    let sizes: Vec<usize> = full_grads
        .iter()
        .map(|&v| full.graph().ty(v).bytes())
        .collect();
    let (all, largest) = (sizes.iter().sum::<usize>(), *sizes.iter().max().unwrap());
    let (kept, fused_live) = (
        live_gradient_bytes(&full, &full_grads),
        live_gradient_bytes(&fused, &fused_grads),
    );
    eprintln!(
        "gradients: {all} B in all, largest {largest} B; most alive at once: {kept} B kept as outputs, {fused_live} B fused; plan peaks {} B vs {} B",
        full.peak_bytes(),
        fused.peak_bytes()
    );
    assert_eq!(kept, all, "outputs keep every gradient to the end");
    assert!(
        fused_live <= largest,
        "fused: {fused_live} B of gradients alive at once"
    );
    assert!(fused.peak_bytes() < full.peak_bytes());
    // An unshared parameter bound read-only is refused, naming it.
    let mut m2 = model();
    let mut feeds = rec.feeds_mut(&mut m2, b).unwrap();
    let w = m.weight("model.norm.weight").unwrap();
    let p = fused.graph().find_leaf("model.norm.weight").unwrap();
    feeds.bind(p, w);
    let one = Tensor::from_f32(&[1], &[1.0]).unwrap();
    for v in fused.leaves() {
        if fused
            .graph()
            .leaf_name(v)
            .is_some_and(|n| n.starts_with("fused_update."))
        {
            feeds.bind(v, &one);
        }
    }
    let e = CpuExecutor::new()
        .run(&fused, &feeds)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("bind_mut"),
        "{e}"
    );
}

/// AdaLomo as its paper and reference code state it, written plainly in f64
/// over whole tensors after the backward pass: β₂ₜ = 1 − t^−0.8; a matrix
/// keeps row and column means of g² + ε₁ (v ≈ r·cᵀ/mean(r)), a vector the
/// full average; u = g/√v is divided by max(1, RMS(u)/d); the step is
/// lr·max(ε₂, RMS(θ)), after weight decay θ·(1 − lr·max(ε₂, RMS(θ))·λ).
struct AdaLomoRef {
    rows: Vec<Vec<f64>>,
    cols: Vec<Vec<f64>>,
    t: u64,
}

impl AdaLomoRef {
    fn step(
        &mut self,
        params: &mut [(Vec<usize>, Vec<f64>)],
        grads: &[Vec<f64>],
        lr: f64,
        wd: f64,
    ) {
        let (eps1, eps2, d) = (1e-30f64, 1e-3f64, 1.0f64);
        self.t += 1;
        let beta = 1.0 - (self.t as f64).powf(-0.8);
        let rms = |x: &[f64]| (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt();
        for (j, ((shape, p), g)) in params.iter_mut().zip(grads).enumerate() {
            let sq: Vec<f64> = g.iter().map(|x| x * x + eps1).collect();
            let u: Vec<f64> = if shape.len() == 2 {
                let (r, c) = (shape[0], shape[1]);
                for i in 0..r {
                    let m = sq[i * c..(i + 1) * c].iter().sum::<f64>() / c as f64;
                    self.rows[j][i] = beta * self.rows[j][i] + (1.0 - beta) * m;
                }
                for k in 0..c {
                    let m = (0..r).map(|i| sq[i * c + k]).sum::<f64>() / r as f64;
                    self.cols[j][k] = beta * self.cols[j][k] + (1.0 - beta) * m;
                }
                let mean = self.rows[j].iter().sum::<f64>() / r as f64;
                (0..r * c)
                    .map(|x| {
                        let v = self.rows[j][x / c] * self.cols[j][x % c] / mean;
                        g[x] / v.sqrt()
                    })
                    .collect()
            } else {
                for (v, s) in self.rows[j].iter_mut().zip(&sq) {
                    *v = beta * *v + (1.0 - beta) * s;
                }
                g.iter()
                    .zip(&self.rows[j])
                    .map(|(g, v)| g / v.sqrt())
                    .collect()
            };
            let scale = (rms(&u) / d).max(1.0);
            let step = lr * eps2.max(rms(p));
            for (p, u) in p.iter_mut().zip(&u) {
                *p = *p * (1.0 - step * wd) - step * u / scale;
            }
        }
    }
}

#[test]
fn adalomo_matches_an_unfused_reference() {
    let (steps, lr, wd) = (3, 1e-2f32, 0.01f32);
    let data = batches(steps);
    // Reference: gradients out of the plan, the rule in f64.
    let mut m = model();
    let rec = m.record(data[0].tokens(), opts()).unwrap();
    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
    let names: Vec<String> = plan
        .grads()
        .iter()
        .map(|(p, _)| plan.graph().leaf_name(*p).unwrap().to_string())
        .collect();
    let mut params: Vec<(Vec<usize>, Vec<f64>)> = names
        .iter()
        .map(|n| {
            let t = m.weight(n).unwrap();
            (
                t.shape().to_vec(),
                t.to_f32_vec().unwrap().iter().map(|&x| x as f64).collect(),
            )
        })
        .collect();
    let mut reference = AdaLomoRef {
        rows: params
            .iter()
            .map(|(s, _)| vec![0.0; graft::engine::adalomo_state_shapes(s).0[0]])
            .collect(),
        cols: params
            .iter()
            .map(|(s, _)| vec![0.0; graft::engine::adalomo_state_shapes(s).1[0]])
            .collect(),
        t: 0,
    };
    let mut exec = CpuExecutor::new();
    for b in &data {
        let out = exec.run(&plan, &rec.feeds(&m, None, b).unwrap()).unwrap();
        let grads: Vec<Vec<f64>> = out[1..]
            .iter()
            .map(|t| t.as_f32().unwrap().iter().map(|&x| x as f64).collect())
            .collect();
        reference.step(&mut params, &grads, lr as f64, wd as f64);
        for (n, (_, p)) in names.iter().zip(&params) {
            let v: Vec<f32> = p.iter().map(|&x| x as f32).collect();
            let t = m.weights_mut().get_mut(n).unwrap();
            *t = Tensor::from_f32(t.shape(), &v).unwrap();
        }
    }
    // Fused.
    let mut f = model();
    let rule = FusedRule::AdaLomo(graft::ir::AdaLomoSpec {
        weight_decay: wd,
        ..Default::default()
    });
    let (plan, inputs) = compile_fused(rec.graph.clone(), rec.loss.unwrap(), rule).unwrap();
    let mut state = inputs.zero_state(&plan);
    let (lr_t, one) = (
        Tensor::from_f32(&[1], &[lr]).unwrap(),
        Tensor::from_f32(&[1], &[1.0]).unwrap(),
    );
    for (i, b) in data.iter().enumerate() {
        let t = Tensor::from_f32(&[1], &[(i + 1) as f32]).unwrap();
        let mut feeds = rec.feeds_mut(&mut f, b).unwrap();
        feeds
            .bind(inputs.lr, &lr_t)
            .bind(inputs.coef, &one)
            .bind(inputs.step.unwrap(), &t);
        for ((r, c), (rt, ct)) in inputs.state.iter().zip(state.iter_mut()) {
            feeds.bind_mut(*r, rt).bind_mut(*c, ct);
        }
        exec.run(&plan, &feeds).unwrap();
    }
    let mut worst = 0f64;
    let start = model();
    for n in &names {
        let (got, want) = (
            f.weight(n).unwrap().to_f32_vec().unwrap(),
            m.weight(n).unwrap().to_f32_vec().unwrap(),
        );
        let s0 = start.weight(n).unwrap().to_f32_vec().unwrap();
        // Compare the change each made, the part that is AdaLomo's.
        let d_got: Vec<f32> = got.iter().zip(&s0).map(|(a, b)| a - b).collect();
        let d_want: Vec<f32> = want.iter().zip(&s0).map(|(a, b)| a - b).collect();
        let e = rel_l2(&d_got, &d_want);
        assert!(e < 1e-4, "{n}: update rel L2 {e:e}");
        worst = worst.max(e);
    }
    eprintln!("AdaLomo fused vs reference: worst update rel L2 {worst:e}");
}
