//! The loss reads half-precision logits as they are.
//!
//! Models compute the loss in f32 (`logits.float()` in transformers), so a
//! recorded graph casts bf16 logits to f32 before the cross-entropy, and
//! its backward casts the f32 logits gradient back: two f32 `[tokens,
//! vocab]` buffers, the largest of a training step (125 MiB each at 1024
//! tokens and a 32000 vocabulary). The cross-entropy computes in f32
//! whatever it reads, and its gradient of bf16 logits is rounded once to
//! bf16, as the cast after it would round it: reading the logits where they
//! are gives the same loss and gradients bit for bit, without either
//! buffer. Runs before autograd, so the backward is built on the rewritten
//! graph.

use crate::graph::{Graph, NodeId};
use crate::{DType, IrError, Op};

/// Rewrites every `cross_entropy(cast_f32(x))` with `x` bf16 or f16 into
/// `cross_entropy(x)`; the cast stays recorded and dies where nothing else
/// reads it. Returns how many losses it rewrote.
pub fn elide_loss_casts(g: &mut Graph) -> Result<usize, IrError> {
    let mut rewritten = 0;
    for n in 0..g.nodes().len() {
        let n = NodeId(n as u32);
        let node = g.node(n);
        let Op::CrossEntropy { ignore_index } = node.op else {
            continue;
        };
        let (logits, labels) = (node.inputs[0], node.inputs[1]);
        let Some(cast) = g.producer(logits) else {
            continue;
        };
        let cast = g.node(cast);
        let x = cast.inputs[0];
        if cast.op == Op::Cast(DType::F32) && matches!(g.dtype(x), DType::BF16 | DType::F16) {
            g.replace_node(n, Op::CrossEntropy { ignore_index }, vec![x, labels])?;
            rewritten += 1;
        }
    }
    Ok(rewritten)
}
