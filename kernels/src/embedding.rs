//! Embedding lookup and its gradient.

use crate::{Elem, IndexError};

pub(crate) fn check_ids(ids: &[i32], vocab: usize) -> Result<(), IndexError> {
    match ids.iter().position(|&t| t < 0 || t as usize >= vocab) {
        Some(position) => Err(IndexError {
            what: "token id",
            position,
            value: ids[position] as i64,
            limit: vocab,
        }),
        None => Ok(()),
    }
}

/// `y[t,:] = table[ids[t],:]` for `table[vocab, h]`.
pub fn embedding<T: Elem>(
    table: &[T],
    ids: &[i32],
    h: usize,
    y: &mut [T],
) -> Result<(), IndexError> {
    check_ids(ids, table.len() / h.max(1))?;
    for (row, &id) in y.chunks_mut(h).zip(ids) {
        row.copy_from_slice(&table[id as usize * h..(id as usize + 1) * h]);
    }
    Ok(())
}

/// `dtable[v,:] = sum of dy[t,:] over t with ids[t] = v`.
pub fn embedding_grad<T: Elem>(
    dy: &[T],
    ids: &[i32],
    h: usize,
    dtable: &mut [T],
) -> Result<(), IndexError> {
    let vocab = dtable.len() / h.max(1);
    check_ids(ids, vocab)?;
    let mut acc = vec![0f32; dtable.len()];
    for (row, &id) in dy.chunks(h).zip(ids) {
        for (s, v) in acc[id as usize * h..(id as usize + 1) * h]
            .iter_mut()
            .zip(row)
        {
            *s += v.to_f32();
        }
    }
    for (d, s) in dtable.iter_mut().zip(acc) {
        *d = T::from_f32(s);
    }
    Ok(())
}
