//! `passes::elide_loss_casts`: the cross-entropy reads bf16/f16 logits
//! directly, and only where its input is a cast to f32 of such logits.

use graft_ir::passes::{elide_loss_casts, live_schedule};
use graft_ir::{backward, DType, Graph, Op, ValueId};

/// `cross_entropy(cast(x·Wᵀ → to))` with activations and weight stored in
/// `dt`; returns the graph, the logits before the cast, and the loss.
fn lm_head(dt: DType, to: DType) -> (Graph, ValueId, ValueId) {
    let mut g = Graph::new();
    let x = g.input("x", &[6, 8], dt);
    let w = g.param("w", &[11, 8], dt, true);
    let labels = g.input("labels", &[6], DType::I32);
    let logits = g.linear(x, w, None).unwrap();
    let cast = g.cast(logits, to).unwrap();
    let loss = g.cross_entropy(cast, labels).unwrap();
    (g, logits, loss)
}

fn loss_input(g: &Graph, loss: ValueId) -> ValueId {
    g.node(g.producer(loss).unwrap()).inputs[0]
}

#[test]
fn half_logits_are_read_without_the_cast() {
    for dt in [DType::BF16, DType::F16] {
        let (mut g, logits, loss) = lm_head(dt, DType::F32);
        assert_eq!(elide_loss_casts(&mut g).unwrap(), 1);
        assert_eq!(loss_input(&g, loss), logits);
        // The cast is dead, and the backward never meets it: no f32
        // [tokens, vocab] value is computed anywhere in the step.
        let grads = backward(&mut g, loss).unwrap();
        let mut outs = vec![loss];
        outs.extend(grads.params.iter().map(|(_, d)| *d));
        for n in live_schedule(&g, &outs) {
            let node = g.node(n);
            assert!(
                !matches!(node.op, Op::Cast(_)),
                "{dt}: a cast is still live: {}",
                node.op.name()
            );
            for &o in &node.outputs {
                assert!(
                    !(g.shape(o) == [6, 11] && g.dtype(o) == DType::F32),
                    "{dt}: {} computes an f32 [6, 11] value",
                    node.op.name()
                );
            }
        }
    }
}

#[test]
fn other_losses_are_left_alone() {
    // f32 logits (the cast is a no-op copy), and a cast to another half
    // type (it rounds: the loss must see the rounded values).
    for (dt, to) in [(DType::F32, DType::F32), (DType::F16, DType::BF16)] {
        let (mut g, _, loss) = lm_head(dt, to);
        let before = loss_input(&g, loss);
        assert_eq!(elide_loss_casts(&mut g).unwrap(), 0, "{dt} -> {to}");
        assert_eq!(loss_input(&g, loss), before);
    }
    // Logits straight from the product: nothing to elide.
    let mut g = Graph::new();
    let x = g.input("x", &[6, 8], DType::BF16);
    let w = g.param("w", &[11, 8], DType::BF16, true);
    let labels = g.input("labels", &[6], DType::I32);
    let logits = g.linear(x, w, None).unwrap();
    g.cross_entropy(logits, labels).unwrap();
    assert_eq!(elide_loss_casts(&mut g).unwrap(), 0);
}
