//! The fusion pass for products: a sum of matmul products (Adds over
//! `MatMul` / `Nf4MatMul` results, each possibly behind `Scale` and `Cast`),
//! with at most one other operand, becomes one `MatMulSum` node. Its kernel
//! accumulates the products through their k in turn and adds the other
//! operand as it starts, so the sum costs one pass over its output, and
//! neither the products nor the partial sums are ever stored.
//!
//! In a LoRA training step these groups are:
//! - the adapted linear, `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`: the base product (dense or
//!   NF4), the adapter's up-projection, its scale, the cast back to the
//!   activation dtype and the add; with the residual add after `o_proj` and
//!   `down_proj` as the addend;
//! - the input gradient of a value several projections read (the normed
//!   hidden state feeds q, k, v; gate and up): `Σ dyᵢ·Wᵢ + Σ d(axᵢ)·Aᵢ`,
//!   which autograd recorded as a chain of adds;
//! - a product followed by a scale or a cast alone (an epilogue).
//!
//! A product's operands are read through widening casts (bf16/f16 to f32)
//! and, for `a`, f32 scales: the kernel widens and scales as it packs, so
//! neither the f32 copy nor the scaled copy is stored, and a product of
//! LoRA's f32 adapters with bf16 activations (`cast(x)·Aᵀ` forward;
//! `s·cast(dy)` against `B` and `ax` backward) reads the activations where
//! they are. A product with an operand stored in bf16 is taken in bf16
//! compute, as autocast takes it in PyTorch: the adapters' f32 values are
//! rounded to bf16 as they are packed and the products run on the bf16
//! kernels (AMX), accumulating in f32. A lone product whose operands are
//! read through becomes a group of one term.
//!
//! Then the elementwise op after a group (or a lone product) becomes its
//! epilogue, applied to each row's f32 sum before it is rounded: RoPE after
//! the q and k projections, and DoRA's `scale ⊙ (base + lora)` over the
//! base product and the LoRA group (where nothing else reads them: the
//! magnitude's gradient, in training, reads both).
//!
//! The pass runs after autograd, on the whole training graph. A value is
//! absorbed only when the group is its only reader (and it is not an output
//! the caller keeps), so no value anything else reads disappears; a cast or
//! scale read through stays for its other readers and dies without them.

use super::dce::live_uses;
use crate::dtype::DType;
use crate::graph::{Graph, NodeId, ValueId};
use crate::op::{Epilogue, Op, Product};
use crate::IrError;

/// What the pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fusion {
    /// `MatMulSum` nodes made.
    pub groups: usize,
    /// Nodes they replaced (products, scales, casts and adds).
    pub absorbed: usize,
    /// Operands read through a cast or scale instead of its result.
    pub read_through: usize,
    /// Groups that took the elementwise op after them as their epilogue.
    pub epilogues: usize,
    /// Elementwise chains made (`passes::fuse_elementwise`) and the nodes
    /// they replaced.
    pub chains: usize,
    pub chained: usize,
}

/// One operand of a sum.
enum Leaf {
    /// A product node, its scale (from the scales between it and the sum).
    Product(NodeId, f32),
    Other(ValueId),
}

/// Rewrites every sum of products in the part of `g` that computes
/// `outputs` into a `MatMulSum` node (see the module doc).
pub fn fuse_products(g: &mut Graph, outputs: &[ValueId]) -> Result<Fusion, IrError> {
    let (schedule, mut uses) = live_uses(g, outputs);
    let mut absorbed = vec![false; g.nodes().len()];
    let mut report = Fusion::default();
    // Last to first: a sum is met before the sums and products inside it.
    for &root in schedule.iter().rev() {
        if absorbed[root.index()] {
            continue;
        }
        let Some((leaves, inner)) = group(g, root, &uses) else {
            continue;
        };
        let products: Vec<(NodeId, f32)> = leaves
            .iter()
            .filter_map(|l| match *l {
                Leaf::Product(n, s) => Some((n, s)),
                Leaf::Other(_) => None,
            })
            .collect();
        let others: Vec<ValueId> = leaves
            .iter()
            .filter_map(|l| match *l {
                Leaf::Other(v) => Some(v),
                Leaf::Product(..) => None,
            })
            .collect();
        if products.is_empty() || others.len() > 1 {
            continue;
        }
        let mut terms = Vec::new();
        let mut inputs = Vec::new();
        let mut compute = DType::F32;
        let mut read_through = 0;
        for &(n, scale) in &products {
            let node = g.node(n);
            let (ta, tb, nf4) = match node.op {
                Op::MatMul { ta, tb } => (ta, tb, false),
                Op::Nf4MatMul { tb, .. } => (false, tb, true),
                _ => unreachable!("only products are product leaves"),
            };
            let (a, sa) = read_through_operand(g, node.inputs[0], true);
            let b = match nf4 {
                true => node.inputs[1],
                false => read_through_operand(g, node.inputs[1], false).0,
            };
            for (old, new) in [(node.inputs[0], a), (node.inputs[1], b)] {
                if old != new {
                    uses[old.index()] -= 1;
                    uses[new.index()] += 1;
                    read_through += 1;
                }
            }
            let bf16 = match node.op {
                Op::Nf4MatMul { compute, .. } => compute == DType::BF16,
                _ => g.dtype(a) == DType::BF16 || g.dtype(b) == DType::BF16,
            };
            if bf16 {
                compute = DType::BF16;
            }
            let scale = scale * sa;
            terms.push(Product { ta, tb, nf4, scale });
            inputs.extend_from_slice(&[a, b]);
        }
        // A lone product is a group only to read its operands through.
        let lone = matches!(g.node(root).op, Op::MatMul { .. } | Op::Nf4MatMul { .. });
        if lone && read_through == 0 {
            continue;
        }
        inputs.extend_from_slice(&others);
        let out = g.dtype(g.node(root).outputs[0]);
        let op = Op::MatMulSum {
            terms,
            addend: !others.is_empty(),
            compute,
            out,
            epilogue: None,
        };
        g.replace_node(root, op, inputs)?;
        let gone = products.iter().map(|p| p.0).filter(|&p| p != root);
        let gone = gone.chain(inner);
        report.absorbed += gone.map(|n| absorbed[n.index()] = true).count() + 1;
        report.groups += 1;
        report.read_through += read_through;
    }
    // Then the elementwise work after a group, into its epilogue.
    for &root in &schedule {
        if let Some((op, inputs, gone)) = epilogue_group(g, root, &uses) {
            g.replace_node(root, op, inputs)?;
            report.absorbed += gone.len();
            report.epilogues += 1;
        }
    }
    Ok(report)
}

/// A sum an epilogue can be added to.
struct Sum {
    terms: Vec<Product>,
    /// The terms' operands, then the addend's.
    inputs: Vec<ValueId>,
    compute: DType,
    addend: bool,
    node: NodeId,
}

/// The sum behind `v` when only one node reads it: a group without an
/// epilogue, or a lone product as a group of one.
fn sum_of(g: &Graph, v: ValueId, uses: &[usize]) -> Option<Sum> {
    let node = g.producer(v).filter(|_| uses[v.index()] == 1)?;
    let p = g.node(node);
    let inputs = p.inputs.clone();
    let lone = |ta, tb, nf4, compute| Sum {
        terms: vec![Product {
            ta,
            tb,
            nf4,
            scale: 1.0,
        }],
        inputs: inputs.clone(),
        compute,
        addend: false,
        node,
    };
    match &p.op {
        Op::MatMulSum {
            terms,
            addend,
            compute,
            epilogue: None,
            ..
        } => Some(Sum {
            terms: terms.clone(),
            inputs: inputs.clone(),
            compute: *compute,
            addend: *addend,
            node,
        }),
        &Op::MatMul { ta, tb } => {
            let bf16 = inputs.iter().any(|&i| g.dtype(i) == DType::BF16);
            let compute = if bf16 { DType::BF16 } else { DType::F32 };
            Some(lone(ta, tb, false, compute))
        }
        &Op::Nf4MatMul { tb, compute } => Some(lone(false, tb, true, compute)),
        _ => None,
    }
}

/// A group with `root` as its epilogue: RoPE of a group's output (the q
/// and k projections), or DoRA's `scale ⊙ (base + lora)` of a base product
/// or group and a LoRA group (when nothing else reads them: inference, or
/// a frozen magnitude). The op, its inputs and the nodes it absorbs.
fn epilogue_group(
    g: &Graph,
    root: NodeId,
    uses: &[usize],
) -> Option<(Op, Vec<ValueId>, Vec<NodeId>)> {
    let node = g.node(root);
    let out = g.dtype(node.outputs[0]);
    match &node.op {
        Op::Rope {
            spec,
            inverse: false,
        } => {
            let mut s = sum_of(g, node.inputs[0], uses)?;
            s.inputs.push(node.inputs[1]);
            let op = Op::MatMulSum {
                terms: s.terms,
                addend: s.addend,
                compute: s.compute,
                out,
                epilogue: Some(Epilogue::Rope(spec.clone())),
            };
            Some((op, s.inputs, vec![s.node]))
        }
        Op::DoraCombine => {
            let mut base = sum_of(g, node.inputs[0], uses)?;
            let lora = sum_of(g, node.inputs[1], uses)?;
            if base.addend || lora.addend {
                return None;
            }
            base.terms.extend(lora.terms);
            base.inputs.extend(lora.inputs);
            base.inputs.push(node.inputs[2]);
            let compute = match (base.compute, lora.compute) {
                (DType::F32, DType::F32) => DType::F32,
                _ => DType::BF16,
            };
            let op = Op::MatMulSum {
                terms: base.terms,
                addend: false,
                compute,
                out,
                epilogue: Some(Epilogue::ScaleCols),
            };
            Some((op, base.inputs, vec![base.node, lora.node]))
        }
        _ => None,
    }
}

/// The leaves of the sum (or the product chain) `root` computes, and the
/// nodes between them and `root` (scales, casts, inner adds); `None` when
/// `root` is neither an add nor a scale or cast of a product.
fn group(g: &Graph, root: NodeId, uses: &[usize]) -> Option<(Vec<Leaf>, Vec<NodeId>)> {
    let node = g.node(root);
    let out = g.ty(node.outputs[0]);
    if out.shape.len() != 2 || !out.dtype.is_float() {
        return None;
    }
    let mut leaves = Vec::new();
    let mut inner = Vec::new();
    match node.op {
        Op::Add => {
            for &i in &node.inputs {
                sum_leaves(g, i, uses, &mut leaves, &mut inner);
            }
        }
        Op::MatMul { .. } | Op::Nf4MatMul { .. } => leaves.push(Leaf::Product(root, 1.0)),
        Op::Scale(_) | Op::Cast(_) => {
            let (product, scale) = chain(g, node.outputs[0], usize::MAX, uses, &mut inner)?;
            // The root itself is the group's node, not absorbed.
            inner.retain(|&n| n != root);
            leaves.push(Leaf::Product(product, scale));
        }
        _ => return None,
    }
    Some((leaves, inner))
}

/// Adds the leaves of `v` as an operand of a sum: the operands of an add
/// only the sum reads, else a product chain, else `v` itself.
fn sum_leaves(
    g: &Graph,
    v: ValueId,
    uses: &[usize],
    leaves: &mut Vec<Leaf>,
    inner: &mut Vec<NodeId>,
) {
    let Some(n) = g.producer(v).filter(|_| uses[v.index()] == 1) else {
        leaves.push(Leaf::Other(v));
        return;
    };
    if g.node(n).op == Op::Add {
        inner.push(n);
        for &i in &g.node(n).inputs {
            sum_leaves(g, i, uses, leaves, inner);
        }
        return;
    }
    let mark = inner.len();
    match chain(g, v, 1, uses, inner) {
        Some((product, scale)) => leaves.push(Leaf::Product(product, scale)),
        None => {
            inner.truncate(mark);
            leaves.push(Leaf::Other(v));
        }
    }
}

/// Follows `v` down through float scales and casts to the product that
/// feeds them: the product and the scales' product, pushing the scale and
/// cast nodes to `inner`. Every value on the way must have at most
/// `max_uses` readers at `v` (the root's own output may have several) and
/// exactly one below it.
fn chain(
    g: &Graph,
    mut v: ValueId,
    max_uses: usize,
    uses: &[usize],
    inner: &mut Vec<NodeId>,
) -> Option<(NodeId, f32)> {
    let mut scale = 1.0f32;
    let mut limit = max_uses;
    loop {
        if uses[v.index()] > limit {
            return None;
        }
        limit = 1;
        let n = g.producer(v)?;
        let node = g.node(n);
        match node.op {
            Op::MatMul { .. } | Op::Nf4MatMul { .. } => return Some((n, scale)),
            Op::Scale(s) => scale *= s,
            Op::Cast(to) if to.is_float() && g.dtype(node.inputs[0]).is_float() => {}
            _ => return None,
        }
        inner.push(n);
        v = node.inputs[0];
    }
}

/// The value a product can read in place of operand `v`: below widening
/// casts to f32 (from bf16 or f16: exact) and, for operand `a`
/// (`scales`), f32 scales, whose factors it returns to become the term's
/// scale (the kernel multiplies `a` in f32 as it packs, as the scale did).
fn read_through_operand(g: &Graph, mut v: ValueId, scales: bool) -> (ValueId, f32) {
    let mut scale = 1.0f32;
    while let Some(n) = g.producer(v) {
        let node = g.node(n);
        let x = node.inputs.first().copied();
        match (&node.op, x) {
            (Op::Cast(DType::F32), Some(x)) if matches!(g.dtype(x), DType::BF16 | DType::F16) => {}
            (Op::Scale(s), Some(_)) if scales && g.dtype(v) == DType::F32 => scale *= s,
            _ => break,
        }
        v = node.inputs[0];
    }
    (v, scale)
}
