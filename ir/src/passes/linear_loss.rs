//! The loss and its input gradient together, a chunk of tokens at a time.
//!
//! A language model's head ends the step with its largest buffers: the
//! logits `[tokens, vocab]` and, backward, their gradient of the same size
//! (62.5 MiB each in bf16 at 1024 tokens and a 32000 vocabulary; 2 GiB each
//! at 8192 tokens and Llama 3's 128256). When the head's weight is frozen
//! (LoRA, QLoRA), the logits' gradient serves only to make `dh =
//! dlogits·W`, and it depends on the logits alone (the loss's gradient is a
//! scalar factor). So the loss, the logits' gradient and `dh` are computed
//! together in the forward pass, chunk by chunk (`Op::LinearCrossEntropy`),
//! and the backward only scales `dh` by the loss's gradient. The products
//! are the same, each element summed in the same order: loss and gradients
//! are bit-identical, and one chunk of logits is all that is ever stored.
//! Runs before autograd, so the backward is built on the rewritten graph.

use crate::autograd::needs_grad;
use crate::graph::{Graph, NodeId, ValueId};
use crate::passes::live_schedule;
use crate::{IrError, Op};

/// The logits of one chunk are at most this many bytes (or 64 tokens').
pub const CHUNK_BYTES: usize = 32 << 20;

/// Rewrites every `cross_entropy(h·wᵀ)` whose weight `w` needs no gradient,
/// whose `h` does, and whose logits nothing else that `keep` needs reads
/// (nor `keep` holds) into
/// one `linear_cross_entropy`. Returns how many losses it rewrote.
pub fn fuse_linear_loss(g: &mut Graph, keep: &[ValueId]) -> Result<usize, IrError> {
    if let Some(&v) = keep.iter().find(|v| v.index() >= g.values().len()) {
        return Err(IrError::UnknownValue(v));
    }
    let need = needs_grad(g);
    // Readers among the nodes `keep` needs (a cast elided before this
    // pass still reads the logits, dead).
    let mut readers = vec![0usize; g.values().len()];
    let live = live_schedule(g, keep);
    for i in live.iter().flat_map(|&n| &g.node(n).inputs).chain(keep) {
        readers[i.index()] += 1;
    }
    let mut rewritten = 0;
    for n in 0..g.nodes().len() {
        let n = NodeId(n as u32);
        let Op::CrossEntropy { ignore_index } = g.node(n).op else {
            continue;
        };
        let (logits, labels) = (g.node(n).inputs[0], g.node(n).inputs[1]);
        let Some(p) = g.producer(logits) else {
            continue;
        };
        let product = g.node(p);
        if product.op
            != (Op::MatMul {
                ta: false,
                tb: true,
            })
            || readers[logits.index()] != 1
        {
            continue;
        }
        let (h, w) = (product.inputs[0], product.inputs[1]);
        if need[w.index()] || !need[h.index()] {
            continue;
        }
        let (tokens, vocab) = (g.shape(h)[0], g.shape(w)[0]);
        let rows = CHUNK_BYTES / g.dtype(h).bytes(vocab).max(1);
        // Whole tiles of the GEMMs' 32-row blocks.
        let chunk = (rows.max(64) / 32 * 32).min(tokens);
        let op = Op::LinearCrossEntropy {
            ignore_index,
            chunk,
        };
        g.replace_node(n, op, vec![h, w, labels])?;
        rewritten += 1;
    }
    Ok(rewritten)
}
