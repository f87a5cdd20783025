//! The fusion pass's rewrites, node by node: what it groups, and that it
//! never absorbs a value something else reads.

use graft_ir::passes::{fuse_products, live_schedule, Fusion};
use graft_ir::{DType, Graph, Op, Product, ValueId};

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
    // The add, the base product, the up-projection, its scale and cast.
    assert_eq!(
        f,
        Fusion {
            groups: 1,
            absorbed: 5
        }
    );
    let Op::MatMulSum {
        terms,
        addend,
        compute,
        out,
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
    // x·Aᵀ is kept (an output here, and B's gradient reads it in training).
    assert!(matches!(op_of(&g, ax), Op::MatMul { .. }));
    assert_eq!(live_schedule(&g, &[y, ax]).len(), 3); // cast, x·Aᵀ, the sum
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
    assert_eq!(f.groups, 1);
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
