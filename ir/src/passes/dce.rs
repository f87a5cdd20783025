//! Dead-code elimination: the nodes that contribute to the wanted outputs,
//! in recording (topological) order.

use crate::graph::{Graph, NodeId, ValueId};

pub fn live_schedule(g: &Graph, outputs: &[ValueId]) -> Vec<NodeId> {
    let mut live_value = vec![false; g.values().len()];
    let mut live_node = vec![false; g.nodes().len()];
    for &o in outputs {
        live_value[o.index()] = true;
    }
    for (n, node) in g.nodes().iter().enumerate().rev() {
        if node.outputs.iter().any(|o| live_value[o.index()]) {
            live_node[n] = true;
            for i in &node.inputs {
                live_value[i.index()] = true;
            }
        }
    }
    (0..g.nodes().len())
        .filter(|&n| live_node[n])
        .map(|n| NodeId(n as u32))
        .collect()
}

/// The live schedule and how many times each value is read: by the
/// schedule's nodes, plus once for each of `outputs` (the caller keeps
/// them). A fusion pass absorbs a value only where its one reader is the
/// group.
pub fn live_uses(g: &Graph, outputs: &[ValueId]) -> (Vec<NodeId>, Vec<usize>) {
    let schedule = live_schedule(g, outputs);
    let mut uses = vec![0usize; g.values().len()];
    for &n in &schedule {
        for i in &g.node(n).inputs {
            uses[i.index()] += 1;
        }
    }
    for o in outputs {
        uses[o.index()] += 1;
    }
    (schedule, uses)
}
