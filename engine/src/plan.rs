//! The compile pipeline: record -> autograd -> passes -> an executable plan.

use crate::EngineError;
use graft_ir::passes::{live_schedule, plan_memory, MemoryPlan};
use graft_ir::{backward, Graph, NodeId, Source, ValueId};

/// A compiled graph: the live nodes in execution order and the memory plan
/// that places every intermediate value in one arena.
#[derive(Clone, Debug)]
pub struct Plan {
    graph: Graph,
    schedule: Vec<NodeId>,
    memory: MemoryPlan,
    outputs: Vec<ValueId>,
    /// Gradient of each trainable parameter: `(param, gradient output)`.
    grads: Vec<(ValueId, ValueId)>,
}

impl Plan {
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    pub fn schedule(&self) -> &[NodeId] {
        &self.schedule
    }
    pub fn memory(&self) -> &MemoryPlan {
        &self.memory
    }
    pub fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }
    /// The plan's peak arena bytes (intermediates; weights and inputs excluded).
    pub fn peak_bytes(&self) -> usize {
        self.memory.peak_bytes
    }
    pub fn grads(&self) -> &[(ValueId, ValueId)] {
        &self.grads
    }
    /// The gradient output of a trainable parameter.
    pub fn grad_of(&self, param: ValueId) -> Option<ValueId> {
        self.grads
            .iter()
            .find(|(p, _)| *p == param)
            .map(|(_, g)| *g)
    }
    /// The inputs and parameters the plan reads: each must be bound to run it.
    pub fn leaves(&self) -> Vec<ValueId> {
        let mut seen = vec![false; self.graph.values().len()];
        let mut leaves = Vec::new();
        let mut visit = |v: ValueId| {
            if !seen[v.index()] && !matches!(self.graph.value(v).source, Source::Node { .. }) {
                seen[v.index()] = true;
                leaves.push(v);
            }
        };
        for &n in &self.schedule {
            self.graph.node(n).inputs.iter().for_each(|&i| visit(i));
        }
        self.outputs.iter().for_each(|&o| visit(o));
        leaves
    }
    /// A readable listing of the schedule with the memory plan's peak.
    pub fn dump(&self) -> String {
        format!(
            "{}peak arena: {} bytes (without reuse: {})\n",
            self.graph.dump(Some(&self.schedule)),
            self.memory.peak_bytes,
            self.memory.total_bytes
        )
    }
}

/// Compiles `graph` to compute `outputs` (forward only, or whatever gradient
/// nodes the graph already holds).
pub fn compile(graph: Graph, outputs: &[ValueId]) -> Result<Plan, EngineError> {
    for &o in outputs {
        if o.index() >= graph.values().len() {
            return Err(EngineError::Compile(format!(
                "output %{} is not in the graph",
                o.0
            )));
        }
    }
    let schedule = live_schedule(&graph, outputs);
    let memory = plan_memory(&graph, &schedule, outputs);
    Ok(Plan {
        graph,
        schedule,
        memory,
        outputs: outputs.to_vec(),
        grads: Vec::new(),
    })
}

/// Compiles a training step: records the backward pass of `loss` toward the
/// trainable parameters, then plans `loss`, the gradients and `extra` outputs.
/// The plan's outputs are `[loss, extra.., gradients..]`.
pub fn compile_training(
    mut graph: Graph,
    loss: ValueId,
    extra: &[ValueId],
) -> Result<Plan, EngineError> {
    let grads = backward(&mut graph, loss)?;
    if grads.params.is_empty() {
        return Err(EngineError::Compile(
            "nothing to train: no trainable parameter reaches the loss".into(),
        ));
    }
    let mut outputs = vec![loss];
    outputs.extend_from_slice(extra);
    outputs.extend(grads.params.iter().map(|(_, g)| *g));
    let mut plan = compile(graph, &outputs)?;
    plan.grads = grads.params;
    Ok(plan)
}
