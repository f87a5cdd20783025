//! `passes::fuse_linear_loss`: which losses become one
//! `linear_cross_entropy`, what autograd then records, and the memory plan
//! counting the chunk of logits as the node's workspace.

use graft_ir::passes::{fuse_linear_loss, live_schedule, plan_memory, CHUNK_BYTES};
use graft_ir::{backward, DType, Graph, Op, ValueId};

/// `cross_entropy(h·wᵀ)` with `h = x·uᵀ` (`u` trainable unless told) and
/// the head `w` trainable or not; returns the graph, logits and loss.
fn head(
    tokens: usize,
    vocab: usize,
    w_trainable: bool,
    u_trainable: bool,
) -> (Graph, ValueId, ValueId) {
    let mut g = Graph::new();
    let x = g.input("x", &[tokens, 8], DType::BF16);
    let u = g.param("u", &[8, 8], DType::BF16, u_trainable);
    let w = g.param("w", &[vocab, 8], DType::BF16, w_trainable);
    let labels = g.input("labels", &[tokens], DType::I32);
    let h = g.linear(x, u, None).unwrap();
    let logits = g.linear(h, w, None).unwrap();
    let loss = g.cross_entropy(logits, labels).unwrap();
    (g, logits, loss)
}

fn producer_op(g: &Graph, v: ValueId) -> &Op {
    &g.node(g.producer(v).unwrap()).op
}

#[test]
fn a_frozen_head_computes_the_gradient_with_the_loss() {
    let (mut g, logits, loss) = head(300, 11, false, true);
    assert_eq!(fuse_linear_loss(&mut g, &[loss]).unwrap(), 1);
    let node = g.node(g.producer(loss).unwrap()).clone();
    // The chunk: 32 MiB of bf16 logits a chunk, here more than the tokens.
    assert_eq!(
        node.op,
        Op::LinearCrossEntropy {
            ignore_index: -100,
            chunk: 300
        }
    );
    assert_eq!(node.outputs[0], loss);
    let dh = node.outputs[1];
    assert_eq!(
        (g.shape(dh), g.dtype(dh)),
        (&[300usize, 8][..], DType::BF16)
    );
    // The backward scales dh by the loss's gradient and reads no logits.
    let grads = backward(&mut g, loss).unwrap();
    let du = grads.params[0].1;
    let live = live_schedule(&g, &[loss, du]);
    assert!(live
        .iter()
        .any(|&n| g.node(n).op == Op::ScaleBy && g.node(n).inputs[0] == dh));
    for n in live {
        let o = &g.node(n).op;
        assert!(
            !matches!(o, Op::CrossEntropyGrad { .. } | Op::CrossEntropy { .. }),
            "{o:?}"
        );
        assert!(
            g.node(n).outputs.iter().all(|&v| v != logits),
            "the logits are computed"
        );
    }
}

#[test]
fn a_large_batch_is_taken_in_chunks_of_whole_tiles() {
    let vocab = 128_256; // Llama 3
    let (mut g, _, loss) = head(8192, vocab, false, true);
    fuse_linear_loss(&mut g, &[loss]).unwrap();
    let Op::LinearCrossEntropy { chunk, .. } = *producer_op(&g, loss) else {
        panic!("not fused");
    };
    let rows = CHUNK_BYTES / (2 * vocab);
    assert_eq!(chunk, rows / 32 * 32);
    // The workspace is counted in the peak.
    let live = live_schedule(&g, &[loss]);
    let plan = plan_memory(&g, &live, &[loss]);
    let n = g.producer(loss).unwrap();
    // A chunk of logits, and of the rows of h and dh.
    let ws = chunk * (vocab + 2 * 8) * 2;
    assert_eq!(plan.workspace(n).map(|w| w.1), Some(ws));
    assert!(plan.peak_bytes >= ws);
    assert!(
        plan.peak_bytes < 8192 * vocab * 2 / 8,
        "{}",
        plan.peak_bytes
    );
}

#[test]
fn other_losses_are_left_alone() {
    // A trainable head (its gradient needs the logits' gradient), a kept
    // logits output, and an h that needs no gradient.
    let (mut g, _, loss) = head(6, 11, true, true);
    assert_eq!(fuse_linear_loss(&mut g, &[loss]).unwrap(), 0);
    let (mut g, logits, loss) = head(6, 11, false, true);
    assert_eq!(fuse_linear_loss(&mut g, &[loss, logits]).unwrap(), 0);
    let (mut g, _, loss) = head(6, 11, false, false);
    assert_eq!(fuse_linear_loss(&mut g, &[loss]).unwrap(), 0);
    assert!(matches!(producer_op(&g, loss), Op::CrossEntropy { .. }));
}
