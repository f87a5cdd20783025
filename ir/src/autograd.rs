//! Reverse-mode autograd: appends the backward graph to the forward one.
//!
//! Gradients flow only toward trainable parameters: a value "needs a
//! gradient" when a trainable parameter lies upstream of it, and a VJP is
//! recorded only for the inputs that need one. A frozen weight therefore gets
//! no gradient buffer and no gradient work at all.

use crate::dtype::DType;
use crate::graph::{Graph, NodeId, ValueId};
use crate::op::Op;
use crate::IrError;
use std::collections::HashMap;

/// The result of [`backward`].
#[derive(Clone, Debug, Default)]
pub struct Gradients {
    /// Gradient of the loss for each trainable parameter, in parameter order.
    pub params: Vec<(ValueId, ValueId)>,
    /// Every gradient contribution recorded: `(contribution, value it is the
    /// gradient of)`. Lets tests prove no work is done for frozen values.
    pub contributions: Vec<(ValueId, ValueId)>,
}

impl Gradients {
    pub fn of(&self, param: ValueId) -> Option<ValueId> {
        self.params
            .iter()
            .find(|(p, _)| *p == param)
            .map(|(_, g)| *g)
    }
}

/// For each value, whether a trainable parameter lies upstream of it.
pub fn needs_grad(g: &Graph) -> Vec<bool> {
    let mut need: Vec<bool> = (0..g.values().len())
        .map(|i| g.is_trainable(ValueId(i as u32)))
        .collect();
    for node in g.nodes() {
        let any = node
            .inputs
            .iter()
            .zip(differentiable_inputs(&node.op))
            .any(|(i, d)| d && need[i.index()]);
        for o in &node.outputs {
            need[o.index()] = any;
        }
    }
    need
}

/// Which inputs of an op a gradient can flow into (not ids, labels, seeds,
/// nor the auxiliary inputs of gradient ops, which are never differentiated).
fn differentiable_inputs(op: &Op) -> Vec<bool> {
    match op {
        Op::Embedding | Op::Nf4MatMul { .. } => vec![true, false],
        Op::Rope { .. } | Op::Dropout { .. } | Op::CrossEntropy { .. } => vec![true, false],
        Op::LinearCrossEntropy { .. } => vec![true, false, false],
        Op::Attention(_) => vec![true, true, true, false],
        Op::Fill { .. }
        | Op::DoraInvNorm { .. }
        | Op::SgdUpdate { .. }
        | Op::AdaLomoUpdate(_)
        | Op::SumRows
        | Op::EmbeddingGrad { .. }
        | Op::RmsNormGradInput { .. }
        | Op::RmsNormGradWeight { .. }
        | Op::AttentionGrad(_)
        | Op::GatedActGrad(_)
        | Op::CrossEntropyGrad { .. }
        | Op::ScaleBy => vec![false; op.arity()],
        _ => vec![true; op.arity()],
    }
}

/// Records the gradient of the scalar `loss` (shape `[1]`) with respect to
/// every trainable parameter it depends on.
pub fn backward(g: &mut Graph, loss: ValueId) -> Result<Gradients, IrError> {
    if loss.index() >= g.values().len() {
        return Err(IrError::UnknownValue(loss));
    }
    if g.shape(loss) != [1] || !g.dtype(loss).is_float() {
        return Err(IrError::Autograd(format!(
            "loss must be a float of shape [1], got {:?} {}",
            g.shape(loss),
            g.dtype(loss)
        )));
    }
    let need = needs_grad(g);
    let last = match g.producer(loss) {
        Some(n) => n.index(),
        None => return Ok(Gradients::default()),
    };
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    let mut out = Gradients::default();
    let seed = g.fill(1.0, &[1], g.dtype(loss))?;
    grads.insert(loss, seed);

    for n in (0..=last).rev() {
        let node = g.node(NodeId(n as u32)).clone();
        let douts: Vec<Option<ValueId>> =
            node.outputs.iter().map(|o| grads.get(o).copied()).collect();
        if douts.iter().all(Option::is_none) {
            continue;
        }
        let wanted: Vec<bool> = node
            .inputs
            .iter()
            .zip(differentiable_inputs(&node.op))
            .map(|(i, d)| d && need[i.index()])
            .collect();
        if !wanted.iter().any(|&w| w) {
            continue;
        }
        let dins = vjp(g, &node.op, &node.inputs, &node.outputs, &douts, &wanted)?;
        for ((input, din), w) in node.inputs.iter().zip(dins).zip(wanted) {
            let Some(din) = din.filter(|_| w) else {
                continue;
            };
            out.contributions.push((din, *input));
            let total = match grads.get(input) {
                Some(&prev) => g.add(prev, din)?,
                None => din,
            };
            grads.insert(*input, total);
        }
    }
    out.params = g
        .params()
        .filter(|&p| g.is_trainable(p))
        .filter_map(|p| grads.get(&p).map(|&d| (p, d)))
        .collect();
    Ok(out)
}

/// The vector-Jacobian product of one node: the gradient of each input whose
/// `wanted` flag is set (other entries may be `None`).
fn vjp(
    g: &mut Graph,
    op: &Op,
    ins: &[ValueId],
    outs: &[ValueId],
    douts: &[Option<ValueId>],
    wanted: &[bool],
) -> Result<Vec<Option<ValueId>>, IrError> {
    let mut res = vec![None; ins.len()];
    // Ops whose only differentiable output is the first.
    let Some(dy) = douts[0] else {
        return Ok(res);
    };
    match op {
        Op::MatMulSum { .. } => {
            return Err(IrError::Autograd(
                "matmul_sum is made by the fusion pass, after autograd: differentiate the unfused graph".into(),
            ))
        }
        Op::MatMul { ta, tb } => {
            let (a, b) = (ins[0], ins[1]);
            // C = op(A)·op(B); each case transposes the product back into A's / B's layout.
            if wanted[0] {
                res[0] = Some(match (ta, tb) {
                    (false, false) => g.matmul(dy, b, false, true)?,
                    (false, true) => g.matmul(dy, b, false, false)?,
                    (true, false) => g.matmul(b, dy, false, true)?,
                    (true, true) => g.matmul(b, dy, true, true)?,
                });
            }
            if wanted[1] {
                res[1] = Some(match (ta, tb) {
                    (false, false) => g.matmul(a, dy, true, false)?,
                    (false, true) => g.matmul(dy, a, true, false)?,
                    (true, false) => g.matmul(a, dy, false, false)?,
                    (true, true) => g.matmul(dy, a, true, true)?,
                });
            }
        }
        Op::Nf4MatMul { tb, compute } => {
            // The weight is frozen by construction: only the input gradient.
            let op = Op::Nf4MatMul {
                tb: !tb,
                compute: *compute,
            };
            res[0] = Some(g.apply1(op, &[dy, ins[1]])?);
        }
        Op::AddBias => {
            res[0] = Some(dy);
            if wanted[1] {
                res[1] = Some(g.apply1(Op::SumRows, &[dy])?);
            }
        }
        Op::Add => {
            res[0] = Some(dy);
            res[1] = Some(dy);
        }
        Op::DoraCombine => {
            let (base, lora, scale) = (ins[0], ins[1], ins[2]);
            let dt = g.dtype(base);
            let dy32 = g.cast(dy, DType::F32)?;
            let d_sum = g.mul_cols(dy32, scale)?;
            if wanted[0] {
                res[0] = Some(g.cast(d_sum, dt)?);
            }
            if wanted[1] {
                res[1] = Some(d_sum);
            }
            if wanted[2] {
                let b32 = g.cast(base, DType::F32)?;
                let sum = g.add(b32, lora)?;
                let p = g.mul(dy32, sum)?;
                res[2] = Some(g.apply1(Op::SumRows, &[p])?);
            }
        }
        Op::MulCols => {
            let (x, v) = (ins[0], ins[1]);
            if wanted[0] {
                res[0] = Some(g.apply1(Op::MulCols, &[dy, v])?);
            }
            if wanted[1] {
                let p = g.mul(dy, x)?;
                res[1] = Some(g.apply1(Op::SumRows, &[p])?);
            }
        }
        Op::Mul => {
            if wanted[0] {
                res[0] = Some(g.mul(dy, ins[1])?);
            }
            if wanted[1] {
                res[1] = Some(g.mul(dy, ins[0])?);
            }
        }
        Op::Scale(s) => res[0] = Some(g.scale(dy, *s)?),
        Op::Cast(_) => res[0] = Some(g.cast(dy, g.dtype(ins[0]))?),
        Op::Embedding => {
            let vocab = g.shape(ins[0])[0];
            res[0] = Some(g.apply1(Op::EmbeddingGrad { vocab }, &[dy, ins[1]])?);
        }
        Op::RmsNorm { eps, unit_offset } => {
            if wanted[0] {
                let op = Op::RmsNormGradInput {
                    eps: *eps,
                    unit_offset: *unit_offset,
                };
                res[0] = Some(g.apply1(op, &[ins[0], ins[1], dy])?);
            }
            if wanted[1] {
                res[1] = Some(g.apply1(Op::RmsNormGradWeight { eps: *eps }, &[ins[0], dy])?);
            }
        }
        Op::Rope { spec, inverse } => {
            let op = Op::Rope {
                spec: spec.clone(),
                inverse: !inverse,
            };
            res[0] = Some(g.apply1(op, &[dy, ins[1]])?);
        }
        Op::Attention(spec) => {
            let grads = g.apply(
                Op::AttentionGrad(spec.clone()),
                &[ins[0], ins[1], ins[2], ins[3], outs[0], outs[1], dy],
            )?;
            res[0] = Some(grads[0]);
            res[1] = Some(grads[1]);
            res[2] = Some(grads[2]);
        }
        Op::GatedAct(act) => {
            let grads = g.apply(Op::GatedActGrad(*act), &[ins[0], ins[1], dy])?;
            res[0] = Some(grads[0]);
            res[1] = Some(grads[1]);
        }
        Op::CrossEntropy { ignore_index } => {
            let dy = g.cast(dy, DType::F32)?;
            let op = Op::CrossEntropyGrad {
                ignore_index: *ignore_index,
            };
            res[0] = Some(g.apply1(op, &[ins[0], ins[1], dy])?);
        }
        Op::LinearCrossEntropy { .. } => {
            // dh was computed with the loss, for a loss gradient of 1.
            let dy = g.cast(dy, DType::F32)?;
            res[0] = Some(g.apply1(Op::ScaleBy, &[outs[1], dy])?);
        }
        Op::Dropout { p } => res[0] = Some(g.dropout(dy, ins[1], *p)?),
        other => {
            return Err(IrError::Autograd(format!(
                "op `{}` has no VJP (a gradient op, or inference only)",
                other.name()
            )))
        }
    }
    Ok(res)
}
