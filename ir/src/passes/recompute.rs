//! Activation recomputation (gradient checkpointing) as a graph rewrite.
//!
//! The forward pass is cut into blocks at checkpoint values (a model's
//! residual stream between transformer layers). Without the rewrite every
//! value a block computes that the backward pass reads stays alive from the
//! forward pass to its use in the backward: all layers' activations at
//! once. With it, the backward reads copies of those values recomputed from
//! the block's checkpoint just before the block's backward starts, so the
//! originals die within the forward pass and at most one block's
//! activations (plus the checkpoints) are alive at a time, for about one
//! more forward pass of compute. The copies are the same ops on the same
//! inputs (dropout masks come from the seed and the element index), so the
//! values and gradients are bit for bit those of the plain graph.

use crate::graph::{Graph, Node, NodeId, Source, ValueId};
use crate::IrError;
use std::collections::HashMap;

/// What the rewrite did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompute {
    /// Blocks whose activations are recomputed.
    pub blocks: usize,
    /// Forward nodes copied into the backward pass.
    pub cloned: usize,
}

/// One block's copies: the node they go before, the nodes to copy (in
/// order) and the values the backward reads from them.
struct Plan {
    before: usize,
    nodes: Vec<usize>,
    saved: Vec<ValueId>,
}

/// Recomputes the activations of each block between consecutive
/// `checkpoints` (values of the forward pass, in order) for the backward
/// pass, which starts at node `backward_from` (every node before it is the
/// forward pass).
pub fn recompute(
    g: &mut Graph,
    checkpoints: &[ValueId],
    backward_from: NodeId,
) -> Result<Recompute, IrError> {
    let bstart = backward_from.index();
    let err = |msg: String| IrError::Autograd(format!("recompute: {msg}"));
    // Block b is the forward nodes after checkpoint b's producer, up to and
    // including checkpoint b+1's.
    let bound = |v: ValueId| -> Result<Option<usize>, IrError> {
        if v.index() >= g.values.len() {
            return Err(IrError::UnknownValue(v));
        }
        Ok(g.producer(v).map(NodeId::index))
    };
    let mut plans = Vec::new();
    for pair in checkpoints.windows(2) {
        let lo = bound(pair[0])?.map_or(0, |n| n + 1);
        let hi = bound(pair[1])?
            .ok_or_else(|| err(format!("checkpoint %{} is not computed", pair[1].0)))?;
        if hi < lo || hi >= bstart {
            return Err(err(format!(
                "checkpoints %{} and %{} do not bound a block of the forward pass",
                pair[0].0, pair[1].0
            )));
        }
        let in_block = |v: ValueId| {
            g.producer(v)
                .is_some_and(|n| (lo..=hi).contains(&n.index()))
        };
        // What the backward reads of this block (not its output: the next
        // checkpoint), and where it first does.
        let mut saved = Vec::new();
        let mut before = usize::MAX;
        for (i, node) in g.nodes.iter().enumerate().skip(bstart) {
            for &v in &node.inputs {
                if v != pair[1] && in_block(v) {
                    before = before.min(i);
                    if !saved.contains(&v) {
                        saved.push(v);
                    }
                }
            }
        }
        if saved.is_empty() {
            continue;
        }
        // The block's nodes those values depend on.
        let mut need = vec![false; hi + 1 - lo];
        let mut stack: Vec<ValueId> = saved.clone();
        while let Some(v) = stack.pop() {
            let n = g.producer(v).expect("in the block").index();
            if !std::mem::replace(&mut need[n - lo], true) {
                stack.extend(g.nodes[n].inputs.iter().copied().filter(|&i| in_block(i)));
            }
        }
        let nodes = (lo..=hi).filter(|&n| need[n - lo]).collect();
        plans.push(Plan {
            before,
            nodes,
            saved,
        });
    }

    // Rebuild the node list with each block's copies before its first
    // backward reader, and point the backward's reads at the copies.
    let old = std::mem::take(&mut g.nodes);
    let mut new_index = vec![0u32; old.len()];
    let mut report = Recompute::default();
    let mut redirect: HashMap<ValueId, ValueId> = HashMap::new();
    for (i, node) in old.iter().enumerate() {
        for p in plans.iter().filter(|p| p.before == i) {
            let mut copy: HashMap<ValueId, ValueId> = HashMap::new();
            for &n in &p.nodes {
                let src = &old[n];
                let at = NodeId(g.nodes.len() as u32);
                let inputs = src
                    .inputs
                    .iter()
                    .map(|v| *copy.get(v).unwrap_or(v))
                    .collect();
                let outputs = src
                    .outputs
                    .iter()
                    .enumerate()
                    .map(|(index, &o)| {
                        let ty = g.values[o.index()].ty.clone();
                        let c = g.push_value(ty, Source::Node { node: at, index });
                        copy.insert(o, c);
                        c
                    })
                    .collect();
                g.nodes.push(Node {
                    op: src.op.clone(),
                    inputs,
                    outputs,
                });
            }
            for v in &p.saved {
                redirect.insert(*v, copy[v]);
            }
            report.blocks += 1;
            report.cloned += p.nodes.len();
        }
        new_index[i] = g.nodes.len() as u32;
        let mut node = node.clone();
        if i >= bstart {
            for v in node.inputs.iter_mut() {
                if let Some(c) = redirect.get(v) {
                    *v = *c;
                }
            }
        }
        g.nodes.push(node);
    }
    // The original nodes moved: their outputs' sources follow. (Copies'
    // outputs were created with their final positions.)
    for (i, node) in old.iter().enumerate() {
        for (index, o) in node.outputs.iter().enumerate() {
            g.values[o.index()].source = Source::Node {
                node: NodeId(new_index[i]),
                index,
            };
        }
    }
    Ok(report)
}
