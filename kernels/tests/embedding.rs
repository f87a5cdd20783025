//! Embedding lookup (an exact row copy), its gradient against central
//! differences, and token id range errors.

mod common;

use common::*;
use graft_kernels::embedding::{embedding, embedding_grad};
use graft_kernels::{bf16, Elem, IndexError};
use proptest::prelude::*;

fn embedding_ref(table: &[f64], ids: &[i32], h: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| table[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect()
}

/// Ids uniform in `0..vocab`, so small vocabularies repeat ids.
fn ids(rng: &mut Gen, t: usize, vocab: usize) -> Vec<i32> {
    (0..t).map(|_| rng.below(vocab) as i32).collect()
}

fn lookup<T: Elem>(table: &[T], ids: &[i32], h: usize) -> Vec<T> {
    let mut y = nan_buf(ids.len() * h);
    embedding(table, ids, h, &mut y).unwrap();
    y
}

fn bits<T: Elem>(x: &[T]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

proptest! {
    #![proptest_config(config(64))]

    // A lookup copies rows bit for bit, in any storage type.
    #[test]
    fn forward_is_exact(t in dim(64), vocab in dim(200), h in dim(64), seed: u64) {
        let mut rng = Gen::new(seed);
        let table = rng.vec(vocab * h, -3.0, 3.0);
        let ids = ids(&mut rng, t, vocab);
        let want = embedding_ref(&to_f64(&table), &ids, h);
        let y = lookup(&table, &ids, h);
        check("y", &y, &want, 0.0)?;
        let table16: Vec<bf16> = to_elem(&table);
        let y16 = lookup(&table16, &ids, h);
        let want16: Vec<bf16> = ids.iter().flat_map(|&i| table16[i as usize * h..(i as usize + 1) * h].to_vec()).collect();
        prop_assert_eq!(bits(&y16), bits(&want16));
    }

    #[test]
    fn grad(t in dim(48), vocab in dim(24), h in dim(16), seed: u64) {
        let mut rng = Gen::new(seed);
        let table = rng.vec(vocab * h, -3.0, 3.0);
        let ids = ids(&mut rng, t, vocab);
        let dy = rng.vec(t * h, -1.0, 1.0);
        let dy64 = to_f64(&dy);
        let want = numeric_grad(&to_f64(&table), |tb| dot(&dy64, &embedding_ref(tb, &ids, h)));
        let mut dtable = nan_buf::<f32>(vocab * h);
        embedding_grad(&dy, &ids, h, &mut dtable).unwrap();
        // Repeated ids sum their rows in f32: where those cancel, the
        // error is measured against the summed terms, ||dy||.
        check_floor("dtable", &dtable, &want, norm(&dy64), GRAD_TOL)?;
        // Rows of ids that never occur are exactly zero.
        for (v, row) in dtable.chunks(h).enumerate() {
            if !ids.contains(&(v as i32)) {
                prop_assert!(row.iter().all(|&x| x == 0.0), "row {} of an unused id", v);
            }
        }
    }

    // An id outside 0..vocab is an error naming the first bad position, from
    // both kernels; nothing panics.
    #[test]
    fn bad_id_is_an_error(t in dim(16), vocab in dim(50), h in dim(8), seed: u64) {
        let mut rng = Gen::new(seed);
        let table = rng.vec(vocab * h, -1.0, 1.0);
        let mut ids = ids(&mut rng, t, vocab);
        let position = rng.below(t);
        let bad = [-1, -100, vocab as i32, vocab as i32 + 3, i32::MAX, i32::MIN][rng.below(6)];
        ids[position] = bad;
        if position + 1 < t {
            ids[position + 1] = -1;
        }
        let want = IndexError { what: "token id", position, value: bad as i64, limit: vocab };
        let mut y = vec![0f32; t * h];
        prop_assert_eq!(embedding(&table, &ids, h, &mut y), Err(want.clone()));
        let dy = vec![1f32; t * h];
        let mut dtable = vec![0f32; vocab * h];
        prop_assert_eq!(embedding_grad(&dy, &ids, h, &mut dtable), Err(want));
    }
}
