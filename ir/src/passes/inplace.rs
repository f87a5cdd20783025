//! Placement of in-place ops (LOMO's fused update): an op that writes its
//! first input runs right after the last of (a) the producers of its inputs
//! and (b) every other reader of the value it writes. (b) is what makes the
//! write safe; running as early as that allows is what makes LOMO's memory
//! claim true: each gradient is consumed, and its buffer freed, as soon as
//! it is complete, instead of every gradient living to the end.

use crate::graph::{Graph, NodeId};

/// Reorders `schedule` (a topological order) so that every in-place op sits
/// at its earliest safe position; other nodes keep their relative order.
pub fn place_in_place(g: &Graph, schedule: &[NodeId]) -> Vec<NodeId> {
    let (inplace, mut order): (Vec<NodeId>, Vec<NodeId>) = schedule
        .iter()
        .partition(|&&n| g.node(n).op.updates_in_place());
    for u in inplace {
        let node = g.node(u);
        let target = node.inputs[0];
        // After the producers of its inputs and the other readers of its target.
        let after = order
            .iter()
            .rposition(|&n| {
                let other = g.node(n);
                other.inputs.contains(&target)
                    || other.outputs.iter().any(|o| node.inputs.contains(o))
            })
            .map_or(0, |p| p + 1);
        order.insert(after, u);
    }
    order
}
