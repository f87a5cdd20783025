//! Batching: truncation/drop counts, fixed shapes, packing without
//! cross-contamination (each example's logits in a packed row equal its
//! logits alone, on a real model).

mod common;

use common::fixtures;
use graft_engine::ir::DType;
use graft_engine::{compile, CpuExecutor};
use graft_models::{Batch, CausalLm, RecordOptions};
use graft_trainer::data::batch::{batches, fit, Overflow, Packed};
use graft_trainer::data::tokenize::{Tokenized, IGNORE};

/// An example of `n` tokens whose last `answer` tokens carry loss.
fn doc(n: usize, answer: usize, seed: i32) -> Tokenized {
    let ids: Vec<i32> = (0..n as i32).map(|t| (seed * 31 + t * 17) % 256).collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(t, &id)| if t >= n - answer { id } else { IGNORE })
        .collect();
    Tokenized { ids, labels }
}

#[test]
fn overflow_is_truncated_or_dropped_and_counted() {
    let docs = vec![doc(10, 3, 1), doc(30, 5, 2), doc(8, 8, 3), doc(25, 2, 4)];
    let t = fit(docs.clone(), 20, Overflow::Truncate);
    // doc 1 keeps 20 of 30 tokens, but its answer was the last 5: no target left.
    assert_eq!(
        (t.docs.len(), t.truncated, t.no_target, t.dropped),
        (2, 2, 2, 0)
    );
    let d = fit(docs, 20, Overflow::Drop);
    assert_eq!((d.docs.len(), d.dropped, d.no_target), (2, 2, 0));
}

#[test]
fn batches_have_fixed_shapes_restarted_positions_and_shifted_labels() {
    let docs = vec![doc(5, 2, 1), doc(9, 4, 2), doc(7, 7, 3)];
    for packing in [false, true] {
        let out = batches(&docs, 2, 16, packing, 255);
        // Unpacked: three rows -> two batches of 2 rows; packed: 5+9 | 7 -> one batch.
        assert_eq!(out.len(), if packing { 1 } else { 2 });
        for Packed {
            batch: b, counted, ..
        } in &out
        {
            assert_eq!(b.tokens(), 32, "rows x row_len tokens");
            let labels = b.labels.as_i32().unwrap();
            assert_eq!(*counted, labels.iter().filter(|&&l| l != IGNORE).count());
        }
        assert_eq!(out.iter().map(|p| p.tokens).sum::<usize>(), 5 + 9 + 7);
        let b = &out[0].batch;
        let (pos, seg, lab, ids) = (
            b.positions.as_i32().unwrap(),
            b.segments.as_i32().unwrap(),
            b.labels.as_i32().unwrap(),
            b.ids.as_i32().unwrap(),
        );
        // The first example: positions 0..5, one segment, the target of token t is id t+1 where trained.
        assert_eq!(&pos[..5], &[0, 1, 2, 3, 4]);
        assert!(seg[..5].iter().all(|&s| s == seg[0]));
        assert_eq!(&lab[..5], &[IGNORE, IGNORE, ids[3], ids[4], IGNORE]);
        if packing {
            // The second example follows at once, in a new segment, from position 0.
            assert_eq!((pos[5], seg[5] != seg[4]), (0, true));
        } else {
            // Padding follows: its own segment, no loss.
            assert!(seg[5] != seg[4] && ids[5] == 255 && lab[5..16].iter().all(|&l| l == IGNORE));
        }
    }
    let total: usize = [doc(5, 2, 1), doc(9, 4, 2), doc(7, 7, 3)]
        .iter()
        .map(|d| d.labels[1..].iter().filter(|&&l| l != IGNORE).count())
        .sum();
    let packed: usize = batches(&docs, 2, 16, true, 255)
        .iter()
        .map(|p| p.counted)
        .sum();
    assert_eq!(packed, total, "packing loses no target");
}

#[test]
fn packed_examples_do_not_see_each_other() {
    let model = CausalLm::load(&fixtures().join("llama/model"), DType::F32).unwrap();
    let docs = vec![doc(5, 2, 1), doc(9, 4, 2), doc(7, 7, 3)];
    let packed = batches(&docs, 1, 24, true, 0).remove(0).batch;
    let logits = |batch: &Batch| -> Vec<f32> {
        let rec = model
            .record(batch.tokens(), RecordOptions::default())
            .unwrap();
        let plan = compile(rec.graph.clone(), &[rec.logits]).unwrap();
        let out = CpuExecutor::new()
            .run(&plan, &rec.feeds(&model, None, batch).unwrap())
            .unwrap();
        out[0].to_f32_vec().unwrap()
    };
    let all = logits(&packed);
    let vocab = model.config.vocab_size;
    let mut start = 0;
    for d in &docs {
        let alone = logits(&Batch::new(&[&d.ids], None, 0).unwrap());
        let here = &all[start * vocab..(start + d.ids.len()) * vocab];
        let diff = here
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "example at {start}: max diff {diff}");
        start += d.ids.len();
    }
}
