//! LOMO: full fine-tuning with the SGD update fused into the backward pass.
//! It must equal plain SGD parameter for parameter (bit for bit without
//! clipping; with LOMO's two-pass global-norm clipping, SGD after
//! `clip_grad_norm`), and its plan must hold at most one parameter's
//! gradient beyond what the backward pass itself keeps.

mod common;

use common::{fixture_dir, rel_l2};
use graft::engine::optim::{clip_grad_norm, Sgd};
use graft::engine::{compile_fused_sgd, compile_training, CpuExecutor, Tensor};
use graft::ir::DType;
use graft::models::{Batch, CausalLm, RecordOptions};

const LR: f32 = 0.05;

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
    let (plan, lr, coef) =
        compile_fused_sgd(rec.graph.clone(), rec.loss.unwrap(), 0.0, 0.0).unwrap();
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
    let (fused, ..) = compile_fused_sgd(rec.graph.clone(), rec.loss.unwrap(), 0.0, 0.0).unwrap();
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
