//! The compile pipeline: record -> autograd -> passes (recomputation,
//! fusion, scheduling, the memory plan) -> an executable plan.

use crate::EngineError;
use graft_ir::passes::{
    elide_loss_casts, fuse_elementwise, fuse_linear_loss, fuse_products, live_schedule,
    place_in_place, plan_memory, recompute, Fusion, MemoryPlan, Recompute,
};
use graft_ir::{backward, AdaLomoSpec, DType, Gradients, Graph, NodeId, Op, Source, ValueId};

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
    /// Parameters the plan updates in place (fused updates), in the order of
    /// their squared-gradient-norm outputs.
    updated: Vec<ValueId>,
    fusion: Fusion,
    recompute: Recompute,
}

/// How to compile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Run the fusion passes (`passes::fuse_products`, and on training
    /// plans `passes::elide_loss_casts` and `passes::fuse_linear_loss`
    /// before autograd). Off only to compare against the unfused plan.
    pub fuse: bool,
    /// Activation recomputation (`passes::recompute`) for a training plan:
    /// the forward values that bound its blocks (a model's residual stream
    /// between layers, `Recorded::layer_inputs`); empty: off.
    pub checkpoints: Vec<ValueId>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            fuse: true,
            checkpoints: Vec::new(),
        }
    }
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
    /// Parameters updated in place by the plan (see [`compile_fused`]).
    pub fn updated(&self) -> &[ValueId] {
        &self.updated
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
    /// What the fusion pass did.
    pub fn fusion(&self) -> Fusion {
        self.fusion
    }
    /// What activation recomputation did.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }
    /// A readable listing of the schedule (fusion groups as `matmul_sum[…]`
    /// nodes) with the memory plan's peak.
    pub fn dump(&self) -> String {
        format!(
            "{}{} nodes; fusion: {} groups replacing {} nodes, {} elementwise chains replacing {}; recomputation: {} blocks, {} nodes copied\npeak arena: {} bytes (without reuse: {})\n",
            self.graph.dump(Some(&self.schedule)),
            self.schedule.len(),
            self.fusion.groups,
            self.fusion.absorbed,
            self.fusion.chains,
            self.fusion.chained,
            self.recompute.blocks,
            self.recompute.cloned,
            self.memory.peak_bytes,
            self.memory.total_bytes
        )
    }
}

/// Compiles `graph` to compute `outputs` (forward only, or whatever gradient
/// nodes the graph already holds).
pub fn compile(graph: Graph, outputs: &[ValueId]) -> Result<Plan, EngineError> {
    compile_with(graph, outputs, &CompileOptions::default())
}

/// [`compile`] with options.
pub fn compile_with(
    mut graph: Graph,
    outputs: &[ValueId],
    opts: &CompileOptions,
) -> Result<Plan, EngineError> {
    for &o in outputs {
        if o.index() >= graph.values().len() {
            return Err(EngineError::Compile(format!(
                "output %{} is not in the graph",
                o.0
            )));
        }
    }
    let fusion = match opts.fuse {
        true => {
            let mut f = fuse_products(&mut graph, outputs)?;
            (f.chains, f.chained) = fuse_elementwise(&mut graph, outputs)?;
            f
        }
        false => Fusion::default(),
    };
    let schedule = place_in_place(&graph, &live_schedule(&graph, outputs));
    for &n in &schedule {
        let node = graph.node(n);
        if node.op.updates_in_place() && !graph.is_trainable(node.inputs[0]) {
            return Err(EngineError::Compile(format!(
                "{} writes %{} in place: only a trainable parameter can be updated",
                node.op.name(),
                node.inputs[0].0
            )));
        }
    }
    let memory = plan_memory(&graph, &schedule, outputs);
    Ok(Plan {
        graph,
        schedule,
        memory,
        outputs: outputs.to_vec(),
        grads: Vec::new(),
        updated: Vec::new(),
        fusion,
        recompute: Recompute::default(),
    })
}

/// Compiles a training step: records the backward pass of `loss` toward the
/// trainable parameters, then plans `loss`, the gradients and `extra` outputs.
/// The plan's outputs are `[loss, extra.., gradients..]`.
pub fn compile_training(
    graph: Graph,
    loss: ValueId,
    extra: &[ValueId],
) -> Result<Plan, EngineError> {
    compile_training_with(graph, loss, extra, &CompileOptions::default())
}

/// [`compile_training`] with options.
pub fn compile_training_with(
    mut graph: Graph,
    loss: ValueId,
    extra: &[ValueId],
    opts: &CompileOptions,
) -> Result<Plan, EngineError> {
    let forward_end = NodeId(graph.nodes().len() as u32);
    let grads = differentiate(&mut graph, loss, extra, opts)?;
    if grads.params.is_empty() {
        return Err(EngineError::Compile(
            "nothing to train: no trainable parameter reaches the loss".into(),
        ));
    }
    let mut outputs = vec![loss];
    outputs.extend_from_slice(extra);
    outputs.extend(grads.params.iter().map(|(_, g)| *g));
    let recomputed = recompute_blocks(&mut graph, opts, forward_end)?;
    let mut plan = compile_with(graph, &outputs, opts)?;
    plan.grads = grads.params;
    plan.recompute = recomputed;
    Ok(plan)
}

/// Autograd, after the rewrites that must precede it (`extra`: forward
/// values the plan must also output, which they keep).
fn differentiate(
    graph: &mut Graph,
    loss: ValueId,
    extra: &[ValueId],
    opts: &CompileOptions,
) -> Result<Gradients, EngineError> {
    if opts.fuse {
        elide_loss_casts(graph)?;
        let mut keep = vec![loss];
        keep.extend_from_slice(extra);
        fuse_linear_loss(graph, &keep)?;
    }
    Ok(backward(graph, loss)?)
}

/// Activation recomputation when `opts` asks for it, on a graph whose
/// backward pass starts at `forward_end`.
fn recompute_blocks(
    graph: &mut Graph,
    opts: &CompileOptions,
    forward_end: NodeId,
) -> Result<Recompute, EngineError> {
    match opts.checkpoints.is_empty() {
        true => Ok(Recompute::default()),
        false => Ok(recompute(graph, &opts.checkpoints, forward_end)?),
    }
}

/// The update rule of a fused step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FusedRule {
    /// LOMO: plain SGD.
    Sgd { weight_decay: f32, clip_value: f32 },
    /// AdaLomo: factored second moment, grouped update normalisation.
    AdaLomo(AdaLomoSpec),
}

/// The extra inputs of a fused plan: scalars f32 [1] and, for AdaLomo, the
/// second-moment state of each updated parameter (`row`, `col`; written in
/// place, so bound with `Feeds::bind_mut`), in [`Plan::updated`] order.
#[derive(Clone, Debug)]
pub struct FusedInputs {
    pub lr: ValueId,
    /// The gradient factor (LOMO's clipping coefficient; 1 without).
    pub coef: ValueId,
    /// AdaLomo's step number t (from 1).
    pub step: Option<ValueId>,
    pub state: Vec<(ValueId, ValueId)>,
}

impl FusedInputs {
    /// AdaLomo's initial (zero) state, one `(row, col)` per updated
    /// parameter, shaped as `plan` declares them; empty for SGD.
    pub fn zero_state(&self, plan: &Plan) -> Vec<(crate::Tensor, crate::Tensor)> {
        let g = plan.graph();
        self.state
            .iter()
            .map(|&(r, c)| {
                (
                    crate::Tensor::zeros(g.shape(r), DType::F32),
                    crate::Tensor::zeros(g.shape(c), DType::F32),
                )
            })
            .collect()
    }
}

/// The shapes of AdaLomo's state for a parameter: factored `[rows]`,
/// `[cols]` for a matrix, a full `[n]` (and an unused `[1]`) otherwise.
pub fn adalomo_state_shapes(shape: &[usize]) -> ([usize; 1], [usize; 1]) {
    match shape {
        [r, c] => ([*r], [*c]),
        _ => ([shape.iter().product()], [1]),
    }
}

/// A training step with the update fused into the backward pass (LOMO,
/// AdaLomo): every trainable parameter gets an in-place update scheduled as
/// soon as its gradient is complete and nothing else reads the parameter,
/// so the gradient's buffer is freed at once and no two gradients need to
/// be alive together beyond what the backward pass itself holds. The plan's
/// outputs are `[loss, ‖grad‖² per updated parameter..]`. Run it with lr = 0
/// for the first pass of two-pass clipping: it only measures the norms (and,
/// for AdaLomo, must then be given its state back: see the trainer).
pub fn compile_fused(
    graph: Graph,
    loss: ValueId,
    rule: FusedRule,
) -> Result<(Plan, FusedInputs), EngineError> {
    compile_fused_with(graph, loss, rule, &CompileOptions::default())
}

/// [`compile_fused`] with options.
pub fn compile_fused_with(
    mut graph: Graph,
    loss: ValueId,
    rule: FusedRule,
    opts: &CompileOptions,
) -> Result<(Plan, FusedInputs), EngineError> {
    let forward_end = NodeId(graph.nodes().len() as u32);
    let grads = differentiate(&mut graph, loss, &[], opts)?;
    if grads.params.is_empty() {
        return Err(EngineError::Compile(
            "nothing to train: no trainable parameter reaches the loss".into(),
        ));
    }
    let lr = graph.input("fused_update.lr", &[1], DType::F32);
    let coef = graph.input("fused_update.coef", &[1], DType::F32);
    let mut inputs = FusedInputs {
        lr,
        coef,
        step: None,
        state: Vec::new(),
    };
    let mut outputs = vec![loss];
    for &(p, g) in &grads.params {
        let out = match rule {
            FusedRule::Sgd {
                weight_decay,
                clip_value,
            } => {
                let op = Op::SgdUpdate {
                    weight_decay,
                    clip_value,
                };
                graph.apply1(op, &[p, g, lr, coef])?
            }
            FusedRule::AdaLomo(spec) => {
                let step = *inputs
                    .step
                    .get_or_insert_with(|| graph.input("fused_update.step", &[1], DType::F32));
                let name = graph.leaf_name(p).unwrap_or("param").to_string();
                let (rs, cs) = adalomo_state_shapes(graph.shape(p));
                let row = graph.param(&format!("{name}.adalomo_row"), &rs, DType::F32, false);
                let col = graph.param(&format!("{name}.adalomo_col"), &cs, DType::F32, false);
                inputs.state.push((row, col));
                graph.apply1(Op::AdaLomoUpdate(spec), &[p, g, lr, coef, step, row, col])?
            }
        };
        outputs.push(out);
    }
    let recomputed = recompute_blocks(&mut graph, opts, forward_end)?;
    let mut plan = compile_with(graph, &outputs, opts)?;
    plan.updated = grads.params.iter().map(|(p, _)| *p).collect();
    plan.recompute = recomputed;
    Ok((plan, inputs))
}
