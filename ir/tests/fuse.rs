//! The fusion pass's rewrites, node by node: what it groups, and that it
//! never absorbs a value something else reads.

use graft_ir::passes::{fuse_products, live_schedule, Fusion};
use graft_ir::{DType, Epilogue, Graph, Op, Product, RopeSpec, ValueId};
use std::sync::Arc;

fn op_of(g: &Graph, v: ValueId) -> &Op {
    &g.node(g.producer(v).unwrap()).op
}

/// `x·Wᵀ + cast(2·(x·Aᵀ)·Bᵀ)` as a model records an adapted linear.
fn lora(g: &mut Graph, x: ValueId, w: ValueId) -> (ValueId, ValueId) {
    let a = g.param("a", &[2, 8], DType::F32, true);
    let b = g.param("b", &[6, 2], DType::F32, true);
    let xl = g.cast(x, DType::F32).unwrap();
    let ax = g.linear(xl, a, None).unwrap();
    let bax = g.linear(ax, b, None).unwrap();
    let s = g.scale(bax, 2.0).unwrap();
    let base = g.linear(x, w, None).unwrap();
    let l = g.cast(s, DType::BF16).unwrap();
    (g.add(base, l).unwrap(), ax)
}

#[test]
fn an_adapted_linear_becomes_one_sum_of_two_products() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 8], DType::BF16);
    let w = g.param("w", &[6, 8], DType::Nf4 { block: 64 }, false);
    let (y, ax) = lora(&mut g, x, w);
    let f = fuse_products(&mut g, &[y, ax]).unwrap();
    // The add, the base product, the up-projection, its scale and cast; and
    // x·Aᵀ, a group of one that reads x through its cast.
    assert_eq!(
        f,
        Fusion {
            groups: 2,
            absorbed: 6,
            read_through: 1,
            epilogues: 0,
            ..Default::default()
        }
    );
    let Op::MatMulSum {
        terms,
        addend,
        compute,
        out,
        epilogue: None,
    } = op_of(&g, y)
    else {
        panic!("{:?}", op_of(&g, y));
    };
    let t = |nf4, scale| Product {
        ta: false,
        tb: true,
        nf4,
        scale,
    };
    assert_eq!(terms, &[t(true, 1.0), t(false, 2.0)]);
    assert!(!addend);
    assert_eq!((*compute, *out), (DType::BF16, DType::BF16));
    // x·Aᵀ is kept (an output here, and B's gradient reads it in training),
    // taken in bf16 from x as stored: the f32 copy of x is dead.
    let ax_node = g.node(g.producer(ax).unwrap());
    assert!(matches!(
        ax_node.op,
        Op::MatMulSum {
            compute: DType::BF16,
            out: DType::F32,
            ..
        }
    ));
    assert_eq!(ax_node.inputs[0], x);
    assert_eq!(live_schedule(&g, &[y, ax]).len(), 2); // x·Aᵀ, the sum
}

#[test]
fn operands_are_read_through_widening_casts_and_scales() {
    let mut g = Graph::new();
    // LoRA's backward: s·cast(dy) against B and against x·Aᵀ.
    let dy = g.input("dy", &[4, 6], DType::BF16);
    let b = g.param("b", &[6, 2], DType::F32, true);
    let ax = g.input("ax", &[4, 2], DType::F32);
    let d = g.cast(dy, DType::F32).unwrap();
    let d = g.scale(d, 2.0).unwrap();
    let d_ax = g.matmul(d, b, false, false).unwrap();
    let d_b = g.matmul(d, ax, true, false).unwrap();
    // f16 widened exactly: read through, the product stays in f32.
    let x16 = g.input("x16", &[4, 8], DType::F16);
    let w32 = g.param("w32", &[3, 8], DType::F32, false);
    let x32 = g.cast(x16, DType::F32).unwrap();
    let p16 = g.linear(x32, w32, None).unwrap();
    // Not read through: a narrowing cast, and a scale of operand b.
    let xf = g.input("xf", &[4, 8], DType::F32);
    let wb = g.param("wb", &[3, 8], DType::BF16, false);
    let xb = g.cast(xf, DType::BF16).unwrap();
    let narrowed = g.linear(xb, wb, None).unwrap();
    let ws = g.scale(w32, 3.0).unwrap();
    let b_scaled = g.linear(xf, ws, None).unwrap();

    let outs = [d_ax, d_b, p16, narrowed, b_scaled];
    let f = fuse_products(&mut g, &outs).unwrap();
    assert_eq!((f.groups, f.read_through), (3, 3));
    let sum = |v: ValueId| match op_of(&g, v) {
        Op::MatMulSum { terms, compute, .. } => (terms.clone(), *compute),
        other => panic!("{other:?}"),
    };
    let term = |ta, tb, scale| Product {
        ta,
        tb,
        nf4: false,
        scale,
    };
    assert_eq!(sum(d_ax), (vec![term(false, false, 2.0)], DType::BF16));
    assert_eq!(sum(d_b), (vec![term(true, false, 2.0)], DType::BF16));
    assert_eq!(sum(p16), (vec![term(false, true, 1.0)], DType::F32));
    let inputs = |v: ValueId| g.node(g.producer(v).unwrap()).inputs.clone();
    assert_eq!(inputs(d_ax), [dy, b]);
    assert_eq!(inputs(d_b), [dy, ax]);
    assert_eq!(inputs(p16), [x16, w32]);
    assert!(matches!(op_of(&g, narrowed), Op::MatMul { .. }));
    assert!(matches!(op_of(&g, b_scaled), Op::MatMul { .. }));
    // The f32 copies of dy and x16 and the scaled dy are computed no more.
    for n in live_schedule(&g, &outs) {
        for &o in &g.node(n).outputs {
            assert!(![d, x32].contains(&o), "{:?} still computed", g.node(n).op);
        }
    }
}

#[test]
fn a_residual_is_the_addend_and_partial_sums_are_absorbed() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 8], DType::BF16);
    let h = g.input("h", &[4, 6], DType::BF16);
    let w = g.param("w", &[6, 8], DType::BF16, false);
    let (y, _) = lora(&mut g, x, w);
    let out = g.add(h, y).unwrap();
    let f = fuse_products(&mut g, &[out]).unwrap();
    assert_eq!(f.groups, 2); // and x·Aᵀ from x as stored
    let node = g.node(g.producer(out).unwrap());
    assert!(matches!(node.op, Op::MatMulSum { addend: true, .. }));
    assert_eq!(*node.inputs.last().unwrap(), h);
}

#[test]
fn values_read_elsewhere_or_kept_are_never_absorbed() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 8], DType::F32);
    let w1 = g.param("w1", &[6, 8], DType::F32, false);
    let w2 = g.param("w2", &[6, 8], DType::F32, false);
    let p1 = g.linear(x, w1, None).unwrap();
    let p2 = g.linear(x, w2, None).unwrap();
    let sum = g.add(p1, p2).unwrap();
    // p1 has a second reader: it stays, as the sum's addend.
    let other = g.scale(p1, 3.0).unwrap();
    let mut kept = g.clone();
    fuse_products(&mut g, &[sum, other]).unwrap();
    let node = g.node(g.producer(sum).unwrap());
    assert!(matches!(&node.op, Op::MatMulSum { terms, addend: true, .. } if terms.len() == 1));
    assert_eq!(node.inputs[2], p1);
    // The scale of p1 cannot take p1 (read by the sum too): left alone.
    assert_eq!(op_of(&g, other), &Op::Scale(3.0));
    // p2 kept as an output: the sum has no product of its own left to fuse
    // but p1 (read twice), so nothing changes.
    let f = fuse_products(&mut kept, &[sum, other, p2]).unwrap();
    assert_eq!(f.groups, 0);
    assert_eq!(op_of(&kept, sum), &Op::Add);
}

#[test]
fn sums_without_products_are_left_alone() {
    let mut g = Graph::new();
    let a = g.input("a", &[4, 8], DType::F32);
    let b = g.input("b", &[4, 8], DType::F32);
    let s = g.add(a, b).unwrap();
    assert_eq!(fuse_products(&mut g, &[s]).unwrap().groups, 0);
    assert_eq!(op_of(&g, s), &Op::Add);
}

#[test]
fn a_matmul_sum_refuses_autograd() {
    let mut g = Graph::new();
    let x = g.param("x", &[4, 8], DType::F32, true);
    let w = g.param("w", &[1, 8], DType::F32, false);
    let p = g.linear(x, w, None).unwrap();
    let y = g.scale(p, 0.5).unwrap();
    fuse_products(&mut g, &[y]).unwrap();
    let labels = g.input("labels", &[4], DType::I32);
    let loss = g.cross_entropy(y, labels).unwrap();
    let e = graft_ir::backward(&mut g, loss).unwrap_err().to_string();
    assert!(e.contains("fusion pass"), "{e}");
}

/// RoPE over one head of 6.
fn head6() -> RopeSpec {
    RopeSpec {
        n_heads: 1,
        head_dim: 6,
        inv_freq: Arc::from(vec![1.0f32, 0.5, 0.25]),
    }
}

#[test]
fn rope_after_a_projection_is_its_epilogue() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 8], DType::BF16);
    let pos = g.input("positions", &[4], DType::I32);
    let w = g.param("w", &[6, 8], DType::Nf4 { block: 64 }, false);
    let (y, ax) = lora(&mut g, x, w);
    let q = g.rope(y, pos, head6()).unwrap();
    let f = fuse_products(&mut g, &[q, ax]).unwrap();
    assert_eq!((f.groups, f.epilogues), (2, 1));
    let node = g.node(g.producer(q).unwrap());
    let Op::MatMulSum {
        terms, epilogue, ..
    } = &node.op
    else {
        panic!("{:?}", node.op);
    };
    assert_eq!(terms.len(), 2, "the base and the adapter's up-projection");
    assert_eq!(epilogue, &Some(Epilogue::Rope(head6())));
    assert_eq!(*node.inputs.last().unwrap(), pos);
    // y itself is computed no more: the rope's group makes q from x.
    let live = live_schedule(&g, &[q, ax]);
    assert!(live
        .iter()
        .all(|&n| g.node(n).outputs.iter().all(|&o| o != y)));
    // A rope of a value read elsewhere (here kept) stays as it is.
    let mut g2 = Graph::new();
    let x = g2.input("x", &[4, 8], DType::BF16);
    let pos = g2.input("positions", &[4], DType::I32);
    let w = g2.param("w", &[6, 8], DType::BF16, false);
    let p = g2.linear(x, w, None).unwrap();
    let kept = g2.rope(p, pos, head6()).unwrap();
    let f = fuse_products(&mut g2, &[kept, p]).unwrap();
    assert_eq!(f.epilogues, 0);
}

#[test]
fn a_dora_combine_is_the_epilogue_of_its_products_when_nothing_else_reads_them() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 8], DType::BF16);
    let w = g.param("w", &[6, 8], DType::Nf4 { block: 64 }, false);
    let a = g.param("a", &[2, 8], DType::F32, false);
    let b = g.param("b", &[6, 2], DType::F32, false);
    let scale = g.input("scale", &[6], DType::F32);
    let xl = g.cast(x, DType::F32).unwrap();
    let ax = g.linear(xl, a, None).unwrap();
    let bax = g.linear(ax, b, None).unwrap();
    let lora = g.scale(bax, 2.0).unwrap();
    let base = g.linear(x, w, None).unwrap();
    let y = g.dora_combine(base, lora, scale).unwrap();
    let f = fuse_products(&mut g, &[y]).unwrap();
    assert_eq!(f.epilogues, 1);
    let node = g.node(g.producer(y).unwrap());
    let Op::MatMulSum {
        terms,
        epilogue,
        compute,
        out,
        ..
    } = &node.op
    else {
        panic!("{:?}", node.op);
    };
    // The base (NF4) and the adapter's up-projection, scaled per column.
    assert_eq!(terms.len(), 2);
    assert!(terms[0].nf4 && terms[1].scale == 2.0);
    assert_eq!(
        (epilogue, *compute, *out),
        (&Some(Epilogue::ScaleCols), DType::BF16, DType::BF16)
    );
    assert_eq!(*node.inputs.last().unwrap(), scale);
    assert_eq!(live_schedule(&g, &[y]).len(), 2); // x·Aᵀ and the group
}
