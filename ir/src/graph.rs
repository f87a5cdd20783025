//! The graph: values (inputs, parameters, op results) and the nodes that
//! produce them, in recording order (which is a topological order).

use crate::dtype::DType;
use crate::op::{Activation, AttentionSpec, Op, RopeSpec, TypeInfo};
use crate::IrError;
use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}
impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Data fed at every run (token ids, positions, labels, seeds).
    Input { name: String },
    /// A weight bound once; only trainable ones receive gradients.
    Param { name: String, trainable: bool },
    /// Output `index` of a node.
    Node { node: NodeId, index: usize },
}

#[derive(Clone, Debug)]
pub struct Value {
    pub ty: TypeInfo,
    pub source: Source,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

/// Passes that rewrite the node list itself (recomputation) work on the
/// fields directly; everything else goes through the recording methods.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub(crate) values: Vec<Value>,
    pub(crate) nodes: Vec<Node>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn values(&self) -> &[Value] {
        &self.values
    }
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.index()]
    }
    pub fn node(&self, n: NodeId) -> &Node {
        &self.nodes[n.index()]
    }
    pub fn ty(&self, v: ValueId) -> &TypeInfo {
        &self.values[v.index()].ty
    }
    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.values[v.index()].ty.shape
    }
    pub fn dtype(&self, v: ValueId) -> DType {
        self.values[v.index()].ty.dtype
    }

    /// The node producing `v`, if `v` is not a leaf.
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        match self.values[v.index()].source {
            Source::Node { node, .. } => Some(node),
            _ => None,
        }
    }

    pub fn is_trainable(&self, v: ValueId) -> bool {
        matches!(
            self.values[v.index()].source,
            Source::Param {
                trainable: true,
                ..
            }
        )
    }

    /// The name of an input or parameter.
    pub fn leaf_name(&self, v: ValueId) -> Option<&str> {
        match &self.values[v.index()].source {
            Source::Input { name } | Source::Param { name, .. } => Some(name),
            Source::Node { .. } => None,
        }
    }

    /// Finds an input or parameter by name.
    pub fn find_leaf(&self, name: &str) -> Option<ValueId> {
        (0..self.values.len())
            .map(|i| ValueId(i as u32))
            .find(|&v| self.leaf_name(v) == Some(name))
    }

    /// All parameters, in creation order.
    pub fn params(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v.source, Source::Param { .. }))
            .map(|(i, _)| ValueId(i as u32))
    }

    pub(crate) fn push_value(&mut self, ty: TypeInfo, source: Source) -> ValueId {
        self.values.push(Value { ty, source });
        ValueId(self.values.len() as u32 - 1)
    }

    pub fn input(&mut self, name: &str, shape: &[usize], dtype: DType) -> ValueId {
        let source = Source::Input {
            name: name.to_string(),
        };
        self.push_value(TypeInfo::new(shape.to_vec(), dtype), source)
    }

    /// A weight; NF4 weights are always frozen, whatever `trainable` says.
    pub fn param(&mut self, name: &str, shape: &[usize], dtype: DType, trainable: bool) -> ValueId {
        let source = Source::Param {
            name: name.to_string(),
            trainable: trainable && !dtype.is_nf4(),
        };
        self.push_value(TypeInfo::new(shape.to_vec(), dtype), source)
    }

    /// Marks a parameter trainable or frozen.
    pub fn set_trainable(&mut self, v: ValueId, trainable: bool) -> Result<(), IrError> {
        let value = self
            .values
            .get_mut(v.index())
            .ok_or(IrError::UnknownValue(v))?;
        match &mut value.source {
            Source::Param { trainable: t, name } => {
                if trainable && value.ty.dtype.is_nf4() {
                    return Err(IrError::Autograd(format!(
                        "`{name}` is an NF4 weight: quantized weights are frozen"
                    )));
                }
                *t = trainable;
                Ok(())
            }
            _ => Err(IrError::NotAParam(v)),
        }
    }

    /// Records `op` applied to `inputs`, checking shapes; returns its outputs.
    pub fn apply(&mut self, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>, IrError> {
        for &i in inputs {
            if i.index() >= self.values.len() {
                return Err(IrError::UnknownValue(i));
            }
        }
        let tys: Vec<&TypeInfo> = inputs.iter().map(|&i| self.ty(i)).collect();
        let out_tys = op.infer(&tys)?;
        // Kernels walk rows; an empty dimension has no rows to walk and no use.
        if let Some(t) = tys.iter().copied().chain(&out_tys).find(|t| t.numel() == 0) {
            return Err(IrError::Shape {
                op: op.name(),
                msg: format!("empty tensor of shape {:?}", t.shape),
            });
        }
        let node = NodeId(self.nodes.len() as u32);
        let outputs = out_tys
            .into_iter()
            .enumerate()
            .map(|(index, ty)| self.push_value(ty, Source::Node { node, index }))
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs,
        });
        Ok(self.nodes[node.index()].outputs.clone())
    }

    /// A graph rewrite: node `n` computes its outputs with `op` from `inputs`
    /// instead. The outputs keep their ids and must keep their types; `op`
    /// may have more outputs than the node had, which become new values
    /// (returned with the old ones). Every input must be a leaf or come from
    /// an earlier node, so the recording order stays topological. Nodes
    /// only `n` read become dead.
    pub fn replace_node(
        &mut self,
        n: NodeId,
        op: Op,
        inputs: Vec<ValueId>,
    ) -> Result<Vec<ValueId>, IrError> {
        for &i in &inputs {
            if i.index() >= self.values.len() {
                return Err(IrError::UnknownValue(i));
            }
            if self.producer(i).is_some_and(|p| p >= n) {
                return Err(IrError::Shape {
                    op: op.name(),
                    msg: format!("input %{} is not computed before node {}", i.0, n.0),
                });
            }
        }
        let tys: Vec<&TypeInfo> = inputs.iter().map(|&i| self.ty(i)).collect();
        let out_tys = op.infer(&tys)?;
        let node = &self.nodes[n.index()];
        let old: Vec<&TypeInfo> = node.outputs.iter().map(|&o| self.ty(o)).collect();
        if out_tys.len() < old.len() || out_tys.iter().zip(&old).any(|(a, b)| a != *b) {
            return Err(IrError::Shape {
                op: op.name(),
                msg: format!(
                    "would change the outputs of {} from {old:?} to {out_tys:?}",
                    node.op.name()
                ),
            });
        }
        let kept = old.len();
        for (index, ty) in out_tys.into_iter().enumerate().skip(kept) {
            let v = self.push_value(ty, Source::Node { node: n, index });
            self.nodes[n.index()].outputs.push(v);
        }
        let node = &mut self.nodes[n.index()];
        node.op = op;
        node.inputs = inputs;
        Ok(node.outputs.clone())
    }

    /// Records a single-output op.
    pub fn apply1(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, IrError> {
        Ok(self.apply(op, inputs)?[0])
    }

    // Builders for the common ops: one line each, so recorders read like the math.

    pub fn fill(&mut self, value: f32, shape: &[usize], dtype: DType) -> Result<ValueId, IrError> {
        self.apply1(
            Op::Fill {
                value,
                shape: shape.to_vec(),
                dtype,
            },
            &[],
        )
    }
    pub fn matmul(
        &mut self,
        a: ValueId,
        b: ValueId,
        ta: bool,
        tb: bool,
    ) -> Result<ValueId, IrError> {
        self.apply1(Op::MatMul { ta, tb }, &[a, b])
    }
    /// `x·wᵀ (+ b)`: a linear layer with PyTorch's `[out, in]` weight
    /// layout. An NF4 weight is multiplied in `x`'s dtype.
    pub fn linear(
        &mut self,
        x: ValueId,
        w: ValueId,
        b: Option<ValueId>,
    ) -> Result<ValueId, IrError> {
        let y = if self.dtype(w).is_nf4() {
            let compute = self.dtype(x);
            self.apply1(Op::Nf4MatMul { tb: true, compute }, &[x, w])?
        } else {
            self.matmul(x, w, false, true)?
        };
        match b {
            Some(b) => self.apply1(Op::AddBias, &[y, b]),
            None => Ok(y),
        }
    }
    /// `x[M,N]` scaled per column by `v[N]`.
    pub fn mul_cols(&mut self, x: ValueId, v: ValueId) -> Result<ValueId, IrError> {
        self.apply1(Op::MulCols, &[x, v])
    }
    /// DoRA's epilogue: `scale ⊙ (base + lora)` in base's dtype.
    pub fn dora_combine(
        &mut self,
        base: ValueId,
        lora: ValueId,
        scale: ValueId,
    ) -> Result<ValueId, IrError> {
        self.apply1(Op::DoraCombine, &[base, lora, scale])
    }
    /// DoRA's detached `1/‖w + scaling·b·a‖` per output row.
    pub fn dora_inv_norm(
        &mut self,
        a: ValueId,
        b: ValueId,
        w: ValueId,
        scaling: f32,
    ) -> Result<ValueId, IrError> {
        self.apply1(Op::DoraInvNorm { scaling }, &[a, b, w])
    }
    pub fn add(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.apply1(Op::Add, &[a, b])
    }
    pub fn mul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.apply1(Op::Mul, &[a, b])
    }
    pub fn scale(&mut self, x: ValueId, s: f32) -> Result<ValueId, IrError> {
        self.apply1(Op::Scale(s), &[x])
    }
    /// Casts to `to`; a no-op (no node) when `x` already has that dtype.
    pub fn cast(&mut self, x: ValueId, to: DType) -> Result<ValueId, IrError> {
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.apply1(Op::Cast(to), &[x])
    }
    pub fn embedding(&mut self, table: ValueId, ids: ValueId) -> Result<ValueId, IrError> {
        self.apply1(Op::Embedding, &[table, ids])
    }
    pub fn rms_norm(
        &mut self,
        x: ValueId,
        w: ValueId,
        eps: f32,
        unit_offset: bool,
    ) -> Result<ValueId, IrError> {
        self.apply1(Op::RmsNorm { eps, unit_offset }, &[x, w])
    }
    pub fn rope(
        &mut self,
        x: ValueId,
        positions: ValueId,
        spec: RopeSpec,
    ) -> Result<ValueId, IrError> {
        self.apply1(
            Op::Rope {
                spec,
                inverse: false,
            },
            &[x, positions],
        )
    }
    /// Returns the attention output (the log-sum-exp output is kept for backward).
    pub fn attention(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        segments: ValueId,
        spec: AttentionSpec,
    ) -> Result<ValueId, IrError> {
        Ok(self.apply(Op::Attention(spec), &[q, k, v, segments])?[0])
    }
    /// Attention of new tokens against a key/value cache (generation).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_cached(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        k_cache: ValueId,
        v_cache: ValueId,
        start: ValueId,
        spec: AttentionSpec,
    ) -> Result<ValueId, IrError> {
        self.apply1(
            Op::AttentionCached(spec),
            &[q, k, v, k_cache, v_cache, start],
        )
    }
    pub fn gated_act(
        &mut self,
        act: Activation,
        gate: ValueId,
        up: ValueId,
    ) -> Result<ValueId, IrError> {
        self.apply1(Op::GatedAct(act), &[gate, up])
    }
    pub fn cross_entropy(&mut self, logits: ValueId, labels: ValueId) -> Result<ValueId, IrError> {
        self.apply1(Op::CrossEntropy { ignore_index: -100 }, &[logits, labels])
    }
    pub fn dropout(&mut self, x: ValueId, seed: ValueId, p: f32) -> Result<ValueId, IrError> {
        self.apply1(Op::Dropout { p }, &[x, seed])
    }

    /// A readable listing of the nodes in `order` (all nodes when `None`).
    pub fn dump(&self, order: Option<&[NodeId]>) -> String {
        let all: Vec<NodeId> = (0..self.nodes.len()).map(|i| NodeId(i as u32)).collect();
        let mut s = String::new();
        for &n in order.unwrap_or(&all) {
            let node = self.node(n);
            let outs: Vec<String> = node
                .outputs
                .iter()
                .map(|o| format!("%{}:{}{:?}", o.0, self.dtype(*o), self.shape(*o)))
                .collect();
            let ins: Vec<String> = node
                .inputs
                .iter()
                .map(|i| match self.leaf_name(*i) {
                    Some(name) => format!("%{}({name})", i.0),
                    None => format!("%{}", i.0),
                })
                .collect();
            let _ = writeln!(
                s,
                "{} = {}({})",
                outs.join(", "),
                node.op.label(),
                ins.join(", ")
            );
        }
        s
    }
}
