//! The fusion pass for elementwise chains: a node of the elementwise glue
//! (casts between floats, add, mul, scale, scale by a scalar, dropout, the
//! per-column multiply, DoRA's combine) together with the producers of its
//! full-shaped inputs that it alone reads becomes one `Op::Elementwise`
//! node, whose program computes the chain element by element: one pass
//! over memory instead of one per op, and no intermediate stored. In a
//! training step these are LoRA's dropout and casts, the residual adds
//! after them, and DoRA's backward (cast, scale, column multiply, add, cast).
//!
//! The program rounds each value to the dtype its op stored, so the fused
//! chain computes the same bits as the ops one by one. Runs after autograd
//! and after `fuse_products` (which takes the elementwise work it can fold
//! into a product's epilogue first); a value is absorbed only when its one
//! reader is in the chain and it is not an output the caller keeps.

use super::dce::live_uses;
use crate::dtype::DType;
use crate::graph::{Graph, NodeId, ValueId};
use crate::op::Op;
use crate::program::{Instr, Operand, Program};
use crate::IrError;
use std::collections::HashMap;

/// How each input of a fusable node is read: the node's chain absorbs
/// producers through its `Full` inputs only.
fn operands(g: &Graph, n: NodeId) -> Option<Vec<Operand>> {
    let node = g.node(n);
    let float = |v: ValueId| g.dtype(v).is_float();
    if node.outputs.len() != 1 || !float(node.outputs[0]) {
        return None;
    }
    use Operand::*;
    let ops = match node.op {
        Op::Cast(_) | Op::Scale(_) => vec![Full],
        Op::Add | Op::Mul => vec![Full, Full],
        Op::ScaleBy | Op::Dropout { .. } => vec![Full, Scalar],
        Op::MulCols => vec![Full, Cols],
        Op::DoraCombine => vec![Full, Full, Cols],
        _ => return None,
    };
    let full_ok = node
        .inputs
        .iter()
        .zip(&ops)
        .all(|(&i, o)| *o != Full || (float(i) && g.shape(i) == g.shape(node.outputs[0])));
    full_ok.then_some(ops)
}

/// Fuses every elementwise chain of two or more nodes; returns how many
/// chains it made and how many nodes they replaced.
pub fn fuse_elementwise(g: &mut Graph, outputs: &[ValueId]) -> Result<(usize, usize), IrError> {
    let (schedule, uses) = live_uses(g, outputs);
    let mut absorbed = vec![false; g.nodes().len()];
    let (mut chains, mut replaced) = (0, 0);
    // Last to first: a chain's root is met before the nodes it absorbs.
    for &root in schedule.iter().rev() {
        if absorbed[root.index()] || operands(g, root).is_none() {
            continue;
        }
        let mut members = vec![root];
        let mut i = 0;
        while i < members.len() {
            let n = members[i];
            let ops = operands(g, n).expect("members are fusable");
            for (&v, o) in g.node(n).inputs.iter().zip(&ops) {
                let Some(p) = g.producer(v) else { continue };
                let take = *o == Operand::Full
                    && uses[v.index()] == 1
                    && !absorbed[p.index()]
                    && !members.contains(&p)
                    && operands(g, p).is_some();
                if take {
                    members.push(p);
                }
            }
            i += 1;
        }
        if members.len() < 2 {
            continue;
        }
        // Recording order is topological.
        members.sort();
        let (program, inputs) = program_of(g, &members);
        g.replace_node(root, Op::Elementwise(program), inputs)?;
        for &m in &members {
            absorbed[m.index()] = true;
        }
        chains += 1;
        replaced += members.len();
    }
    Ok((chains, replaced))
}

/// The program of `members` (in topological order, the root last) and its
/// inputs: the values they read from outside the chain.
fn program_of(g: &Graph, members: &[NodeId]) -> (Program, Vec<ValueId>) {
    let mut p = Program {
        inputs: Vec::new(),
        code: Vec::new(),
        out: g.dtype(g.node(*members.last().expect("a chain")).outputs[0]),
        ops: Vec::new(),
    };
    let mut inputs: Vec<ValueId> = Vec::new();
    // Where each value is: a register, once loaded or computed.
    let mut reg: HashMap<ValueId, usize> = HashMap::new();
    let mut input = |p: &mut Program, v: ValueId, o: Operand| -> usize {
        match inputs.iter().position(|&x| x == v) {
            Some(i) => i,
            None => {
                inputs.push(v);
                p.inputs.push(o);
                inputs.len() - 1
            }
        }
    };
    let emit = |p: &mut Program, i: Instr| {
        p.code.push(i);
        p.code.len() - 1
    };
    for &n in members {
        let node = g.node(n);
        let ops = operands(g, n).expect("members are fusable");
        let mut r = Vec::new();
        for (&v, &o) in node.inputs.iter().zip(&ops) {
            r.push(match reg.get(&v) {
                Some(&x) => x,
                None if g.dtype(v) == DType::U32 => input(&mut p, v, o),
                None => {
                    let i = input(&mut p, v, o);
                    let x = emit(&mut p, Instr::Load(i));
                    reg.insert(v, x);
                    x
                }
            });
        }
        let y = match node.op {
            Op::Cast(_) => r[0],
            Op::Scale(s) => emit(&mut p, Instr::Scale(r[0], s)),
            Op::Add => emit(&mut p, Instr::Add(r[0], r[1])),
            Op::Mul | Op::ScaleBy | Op::MulCols => emit(&mut p, Instr::Mul(r[0], r[1])),
            Op::Dropout { p: prob } => emit(
                &mut p,
                Instr::Dropout {
                    x: r[0],
                    seed: r[1],
                    p: prob,
                },
            ),
            Op::DoraCombine => {
                let sum = emit(&mut p, Instr::Add(r[0], r[1]));
                emit(&mut p, Instr::Mul(sum, r[2]))
            }
            _ => unreachable!("operands() admits only the ops above"),
        };
        let out = node.outputs[0];
        // The value as its op stored it (the root's store rounds it).
        let y = match g.dtype(out) {
            DType::F32 => y,
            _ if n == *members.last().expect("a chain") => y,
            d => emit(&mut p, Instr::Round(y, d)),
        };
        reg.insert(out, y);
        p.ops.push(node.op.name());
    }
    // The root's value must be the last register: where it is an earlier
    // one (a cast's input), an exact copy (x·1) puts it there.
    let last = reg[&g.node(*members.last().expect("a chain")).outputs[0]];
    if last != p.code.len() - 1 {
        p.code.push(Instr::Scale(last, 1.0));
    }
    (p, inputs)
}
