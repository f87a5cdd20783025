//! Autograd structure: gradients flow only toward trainable parameters, and a
//! frozen weight costs no gradient work (LoRA's whole point).

use graft_ir::autograd::needs_grad;
use graft_ir::{backward, Activation, AttentionSpec, DType, Graph, IrError, Op, RopeSpec, ValueId};
use std::sync::Arc;

use DType::{BF16, F32, I32, U32};

const T: usize = 5; // tokens
const VOCAB_IN: usize = 17;
const K: usize = 7; // model width
const N: usize = 9; // base projection width
const R: usize = 3; // LoRA rank
const H: usize = 4; // query heads
const KVH: usize = 2; // kv heads
const D: usize = 2; // head dim
const F: usize = 11; // MLP width
const V: usize = 13; // output vocab

struct Lora {
    g: Graph,
    loss: ValueId,
    w: ValueId,
    a: ValueId,
    b: ValueId,
    /// Every frozen parameter.
    frozen: Vec<ValueId>,
    /// Every input (ids, positions, segments, labels, the dropout seed).
    inputs: Vec<ValueId>,
}

fn rope_spec(heads: usize) -> RopeSpec {
    RopeSpec {
        n_heads: heads,
        head_dim: D,
        inv_freq: Arc::from(vec![1.0f32]),
    }
}

/// embedding (frozen) -> x·Wᵀ (W frozen unless `w_trainable`) + 2·(x·Aᵀ)·Bᵀ
/// -> rms_norm (frozen weight) -> rope'd GQA attention over frozen projections
/// -> SwiGLU over frozen projections -> dropout -> frozen LM head -> CE.
fn lora_graph(w_trainable: bool) -> Lora {
    let mut g = Graph::new();
    let ids = g.input("ids", &[T], I32);
    let pos = g.input("positions", &[T], I32);
    let seg = g.input("segments", &[T], I32);
    let labels = g.input("labels", &[T], I32);
    let seed = g.input("seed", &[1], U32);
    let table = g.param("embed", &[VOCAB_IN, K], F32, false);
    let w = g.param("w", &[N, K], F32, w_trainable);
    let a = g.param("lora_a", &[R, K], F32, true);
    let b = g.param("lora_b", &[N, R], F32, true);
    let norm_w = g.param("norm", &[N], F32, false);
    let wq = g.param("wq", &[H * D, N], F32, false);
    let wk = g.param("wk", &[KVH * D, N], F32, false);
    let wv = g.param("wv", &[KVH * D, N], F32, false);
    let wg = g.param("wg", &[F, H * D], F32, false);
    let wu = g.param("wu", &[F, H * D], F32, false);
    let wo = g.param("wo", &[V, F], F32, false);

    let x = g.embedding(table, ids).unwrap();
    let base = g.linear(x, w, None).unwrap();
    let down = g.linear(x, a, None).unwrap();
    let up = g.linear(down, b, None).unwrap();
    let lora = g.scale(up, 2.0).unwrap();
    let h = g.add(base, lora).unwrap();
    let n = g.rms_norm(h, norm_w, 1e-6, false).unwrap();
    let q = g.linear(n, wq, None).unwrap();
    let q = g.rope(q, pos, rope_spec(H)).unwrap();
    let k = g.linear(n, wk, None).unwrap();
    let k = g.rope(k, pos, rope_spec(KVH)).unwrap();
    let v = g.linear(n, wv, None).unwrap();
    let spec = AttentionSpec {
        n_heads: H,
        n_kv_heads: KVH,
        head_dim: D,
        scale: 0.7,
        window: Some(3),
    };
    let att = g.attention(q, k, v, seg, spec).unwrap();
    let gate = g.linear(att, wg, None).unwrap();
    let upm = g.linear(att, wu, None).unwrap();
    let act = g.gated_act(Activation::Silu, gate, upm).unwrap();
    let act = g.dropout(act, seed, 0.1).unwrap();
    let logits = g.linear(act, wo, None).unwrap();
    let loss = g.cross_entropy(logits, labels).unwrap();

    let mut frozen = vec![table, norm_w, wq, wk, wv, wg, wu, wo];
    if !w_trainable {
        frozen.push(w);
    }
    Lora {
        g,
        loss,
        w,
        a,
        b,
        frozen,
        inputs: vec![ids, pos, seg, labels, seed],
    }
}

/// Runs backward; returns the gradients and the index of the first backward node.
fn run_backward(l: &mut Lora) -> (graft_ir::Gradients, usize) {
    let first = l.g.nodes().len();
    let grads = backward(&mut l.g, l.loss).unwrap();
    (grads, first)
}

fn backward_ops(g: &Graph, first: usize) -> Vec<&Op> {
    g.nodes()[first..].iter().map(|n| &n.op).collect()
}

fn backward_matmul_shapes(g: &Graph, first: usize) -> Vec<Vec<usize>> {
    g.nodes()[first..]
        .iter()
        .filter(|n| matches!(n.op, Op::MatMul { .. }))
        .map(|n| g.shape(n.outputs[0]).to_vec())
        .collect()
}

#[test]
fn frozen_base_weight_gets_no_gradient_work() {
    let mut l = lora_graph(false);
    let (grads, first) = run_backward(&mut l);
    let g = &l.g;

    // Gradients exist for A and B only, in parameter order, shaped like them.
    let got: Vec<ValueId> = grads.params.iter().map(|(p, _)| *p).collect();
    assert_eq!(got, vec![l.a, l.b]);
    for &(p, d) in &grads.params {
        assert_eq!(
            g.ty(d),
            g.ty(p),
            "gradient of {:?} has the wrong type",
            g.leaf_name(p)
        );
        assert!(
            g.producer(d).unwrap().index() >= first,
            "gradient is not a backward value"
        );
    }
    assert_eq!(grads.of(l.w), None);

    // No contribution targets a frozen parameter or an input.
    assert!(!grads.contributions.is_empty());
    for &(c, target) in &grads.contributions {
        assert!(
            !l.frozen.contains(&target),
            "contribution %{} to frozen {:?}",
            c.0,
            g.leaf_name(target)
        );
        assert!(
            !l.inputs.contains(&target),
            "contribution %{} to input {:?}",
            c.0,
            g.leaf_name(target)
        );
        assert_eq!(
            g.ty(c),
            g.ty(target),
            "a contribution must have its target's type"
        );
    }

    // No dW matmul: no backward matmul produces the shape of any frozen weight.
    let shapes = backward_matmul_shapes(g, first);
    assert!(!shapes.is_empty());
    for &f in &l.frozen {
        let fs = g.shape(f).to_vec();
        assert!(
            !shapes.contains(&fs),
            "a backward matmul produces {fs:?}, the shape of frozen {:?}",
            g.leaf_name(f)
        );
    }
    assert!(!shapes.contains(&vec![N, K]));
    // ...but dA and dB are there.
    assert!(
        shapes.contains(&vec![R, K]) && shapes.contains(&vec![N, R]),
        "{shapes:?}"
    );

    // Frozen embedding and norm weights: no weight-gradient ops at all.
    let ops = backward_ops(g, first);
    for op in &ops {
        assert!(
            !matches!(
                op,
                Op::EmbeddingGrad { .. } | Op::RmsNormGradWeight { .. } | Op::SumRows
            ),
            "unexpected weight-gradient op {op:?}"
        );
    }
    // The gradient does flow back through every frozen layer on the way to A and B.
    let has = |f: fn(&Op) -> bool| ops.iter().any(|op| f(op));
    assert!(has(|op| matches!(op, Op::CrossEntropyGrad { .. })));
    assert!(has(|op| matches!(op, Op::Dropout { .. })));
    assert!(has(|op| matches!(op, Op::GatedActGrad(Activation::Silu))));
    assert!(has(|op| matches!(op, Op::AttentionGrad(_))));
    assert!(has(|op| matches!(op, Op::Rope { inverse: true, .. })));
    assert!(has(|op| matches!(op, Op::RmsNormGradInput { .. })));
    assert!(has(|op| matches!(op, Op::Scale(s) if *s == 2.0)));
}

#[test]
fn trainable_base_weight_gets_its_dw_matmul() {
    let mut l = lora_graph(true);
    let (grads, first) = run_backward(&mut l);
    let g = &l.g;
    let got: Vec<ValueId> = grads.params.iter().map(|(p, _)| *p).collect();
    assert_eq!(got, vec![l.w, l.a, l.b]);
    let dw = grads.of(l.w).unwrap();
    assert_eq!(g.shape(dw), &[N, K]);
    assert!(grads.contributions.iter().any(|&(_, t)| t == l.w));
    // The check above that fails for a frozen W does find the dW matmul here.
    let shapes = backward_matmul_shapes(g, first);
    assert!(shapes.contains(&vec![N, K]), "{shapes:?}");
    assert!(matches!(
        g.node(g.producer(dw).unwrap()).op,
        Op::MatMul { .. }
    ));
    // Still nothing for the weights that stay frozen.
    for &(_, target) in &grads.contributions {
        assert!(!l.frozen.contains(&target));
    }
}

#[test]
fn needs_grad_marks_exactly_what_depends_on_a_trainable_param() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3], F32);
    let frozen = g.param("frozen", &[4, 3], F32, false);
    let lora = g.param("lora", &[4, 3], F32, true);
    let frozen_only = g.linear(x, frozen, None).unwrap();
    let trained = g.linear(x, lora, None).unwrap();
    let mixed = g.add(frozen_only, trained).unwrap();
    let need = needs_grad(&g);
    assert!(!need[x.index()] && !need[frozen.index()] && !need[frozen_only.index()]);
    assert!(need[lora.index()] && need[trained.index()] && need[mixed.index()]);
}

#[test]
fn a_parameter_used_twice_accumulates_both_contributions() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3], F32);
    let labels = g.input("labels", &[2], I32);
    let w = g.param("w", &[3, 3], F32, true);
    let y = g.matmul(x, w, false, false).unwrap();
    let y = g.matmul(y, w, false, false).unwrap();
    let loss = g.cross_entropy(y, labels).unwrap();
    let grads = backward(&mut g, loss).unwrap();
    let parts: Vec<ValueId> = grads
        .contributions
        .iter()
        .filter(|(_, t)| *t == w)
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(parts.len(), 2);
    let dw = grads.of(w).unwrap();
    let node = g.node(g.producer(dw).unwrap());
    assert_eq!(node.op, Op::Add);
    let mut ins = node.inputs.clone();
    ins.sort();
    let mut want = parts.clone();
    want.sort();
    assert_eq!(
        ins, want,
        "the gradient must be the sum of both contributions"
    );
}

#[test]
fn gradient_of_a_bf16_weight_is_cast_back_to_bf16() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3], F32);
    let labels = g.input("labels", &[2], I32);
    let w = g.param("w", &[4, 3], BF16, true);
    let wf = g.cast(w, F32).unwrap();
    let logits = g.linear(x, wf, None).unwrap();
    let loss = g.cross_entropy(logits, labels).unwrap();
    let grads = backward(&mut g, loss).unwrap();
    let dw = grads.of(w).unwrap();
    assert_eq!(g.ty(dw), g.ty(w));
    assert_eq!(g.node(g.producer(dw).unwrap()).op, Op::Cast(BF16));
}

#[test]
fn every_matmul_transpose_combination_gets_gradients_of_the_right_shape() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (m, k, n) = (2, 3, 4);
        let mut g = Graph::new();
        let a_shape = if ta { [k, m] } else { [m, k] };
        let b_shape = if tb { [n, k] } else { [k, n] };
        let a = g.param("a", &a_shape, F32, true);
        let b = g.param("b", &b_shape, F32, true);
        let labels = g.input("labels", &[m], I32);
        let c = g.matmul(a, b, ta, tb).unwrap();
        let loss = g.cross_entropy(c, labels).unwrap();
        let grads = backward(&mut g, loss).unwrap();
        assert_eq!(
            g.shape(grads.of(a).unwrap()),
            &a_shape,
            "dA for ta={ta} tb={tb}"
        );
        assert_eq!(
            g.shape(grads.of(b).unwrap()),
            &b_shape,
            "dB for ta={ta} tb={tb}"
        );
    }
}

#[test]
fn dropout_backward_reuses_the_forward_seed_and_rate() {
    let mut g = Graph::new();
    let x = g.param("x", &[2, 5], F32, true);
    let seed = g.input("seed", &[1], U32);
    let labels = g.input("labels", &[2], I32);
    let y = g.dropout(x, seed, 0.25).unwrap();
    let loss = g.cross_entropy(y, labels).unwrap();
    let grads = backward(&mut g, loss).unwrap();
    let node = g.node(g.producer(grads.of(x).unwrap()).unwrap());
    assert_eq!(node.op, Op::Dropout { p: 0.25 });
    assert_eq!(node.inputs[1], seed);
}

#[test]
fn backward_rejects_a_non_scalar_loss_and_handles_nothing_to_train() {
    let mut g = Graph::new();
    let x = g.param("x", &[2, 3], F32, true);
    let y = g.scale(x, 2.0).unwrap();
    assert!(matches!(backward(&mut g, y), Err(IrError::Autograd(_))));
    let ids = g.input("ids", &[1], I32);
    assert!(matches!(backward(&mut g, ids), Err(IrError::Autograd(_))));
    assert!(matches!(
        backward(&mut g, ValueId(1000)),
        Err(IrError::UnknownValue(_))
    ));

    // A loss with no trainable parameter upstream: no gradients, no contributions.
    let mut g = Graph::new();
    let logits = g.param("logits", &[2, 3], F32, false);
    let labels = g.input("labels", &[2], I32);
    let loss = g.cross_entropy(logits, labels).unwrap();
    let grads = backward(&mut g, loss).unwrap();
    assert!(grads.params.is_empty() && grads.contributions.is_empty());
}
