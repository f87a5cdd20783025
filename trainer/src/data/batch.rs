//! From tokenized examples to fixed-shape batches: over-long examples
//! truncated or dropped (and counted), then laid into `rows` rows of
//! `row_len` tokens, one example per row or packed several to a row. Every
//! example is its own attention segment with positions from 0, so packing
//! never lets one example see another; padding carries no loss.

use super::tokenize::{Tokenized, IGNORE};
use graft_models::Batch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    Truncate,
    Drop,
}

/// The examples that fit, and what happened to the others.
#[derive(Clone, Debug, Default)]
pub struct Fitted {
    pub docs: Vec<Tokenized>,
    pub truncated: usize,
    pub dropped: usize,
    /// Dropped because no token carried loss (e.g. the response was cut off).
    pub no_target: usize,
}

/// Applies `max_len` to every example.
pub fn fit(docs: Vec<Tokenized>, max_len: usize, overflow: Overflow) -> Fitted {
    let mut out = Fitted::default();
    for mut d in docs {
        if d.ids.len() > max_len {
            match overflow {
                Overflow::Drop => {
                    out.dropped += 1;
                    continue;
                }
                Overflow::Truncate => {
                    d.ids.truncate(max_len);
                    d.labels.truncate(max_len);
                    out.truncated += 1;
                }
            }
        }
        // Labels are shifted inside the example: token t predicts t+1, so the
        // first label never counts.
        if !d.labels.iter().skip(1).any(|&l| l != IGNORE) {
            out.no_target += 1;
            continue;
        }
        out.docs.push(d);
    }
    out
}

/// One fixed-shape batch and what it holds.
#[derive(Clone, Debug)]
pub struct Packed {
    pub batch: Batch,
    /// Tokens whose next-token loss counts.
    pub counted: usize,
    /// Tokens of examples (the rest is padding).
    pub tokens: usize,
}

/// Lays `docs` (each at most `row_len` long) into batches of `rows` rows of
/// `row_len` tokens.
pub fn batches(
    docs: &[Tokenized],
    rows: usize,
    row_len: usize,
    packing: bool,
    pad_id: i32,
) -> Vec<Packed> {
    // Rows as lists of example indices.
    let mut layout: Vec<Vec<usize>> = Vec::new();
    let mut fill: Vec<usize> = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let n = d.ids.len().min(row_len);
        let slot = if packing {
            fill.iter().position(|&f| f + n <= row_len)
        } else {
            None
        };
        match slot {
            Some(r) => {
                layout[r].push(i);
                fill[r] += n;
            }
            None => {
                layout.push(vec![i]);
                fill.push(n);
            }
        }
    }
    layout
        .chunks(rows)
        .map(|chunk| {
            let (mut ids, mut pos, mut seg, mut tgt) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut segment = 0;
            let (mut counted, mut tokens) = (0, 0);
            let mut emit_run = |toks: &[i32], labels: Option<&[i32]>| {
                for (t, &id) in toks.iter().enumerate() {
                    ids.push(id);
                    pos.push(t as i32);
                    seg.push(segment);
                    let next = labels.and_then(|l| l.get(t + 1)).copied().unwrap_or(IGNORE);
                    counted += (next != IGNORE) as usize;
                    tgt.push(next);
                }
                segment += 1;
            };
            for r in 0..rows {
                let mut used = 0;
                for &i in chunk.get(r).map(Vec::as_slice).unwrap_or(&[]) {
                    let d = &docs[i];
                    let n = d.ids.len().min(row_len);
                    emit_run(&d.ids[..n], Some(&d.labels[..n]));
                    used += n;
                    tokens += n;
                }
                if used < row_len {
                    emit_run(&vec![pad_id; row_len - used], None);
                }
            }
            let n = ids.len();
            let t = |v: &[i32]| graft_engine::Tensor::from_i32(&[n], v).expect("lengths agree");
            let batch = Batch {
                ids: t(&ids),
                positions: t(&pos),
                segments: t(&seg),
                labels: t(&tgt),
                seed: graft_engine::Tensor::from_u32(&[1], &[0]).expect("one value"),
            };
            Packed {
                batch,
                counted,
                tokens,
            }
        })
        .collect()
}
