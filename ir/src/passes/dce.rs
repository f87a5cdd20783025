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
