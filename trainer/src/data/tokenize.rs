//! Tokenization of rendered examples into ids and labels: the whole text is
//! encoded once (so tokens merge across the prompt/response boundary exactly
//! as at inference), and a token is trained on when its bytes overlap a
//! trainable span.
//!
//! A text far longer than the tokens a run can use is encoded only as far
//! as it needs: the tokenizer's working memory is hundreds of bytes per
//! token, so a 25 MB record took 1.9 GB to encode whole, only to be cut to
//! `max_seq_len`.

use super::template::Rendered;
use super::DataError;
use tokenizers::Tokenizer;

/// Label of a token that carries no loss.
pub const IGNORE: i32 = -100;

/// Bytes of text per token needed, below which a text is encoded whole.
const BYTES_PER_TOKEN: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<i32>,
    /// `ids[t]` where the loss counts, else -100 (unshifted, as transformers).
    pub labels: Vec<i32>,
}

/// Token ids and their byte ranges in the text.
type Encoded = (Vec<u32>, Vec<(usize, usize)>);

/// Ids and byte offsets of `text`.
fn encode(tok: &Tokenizer, text: &str) -> Result<Encoded, DataError> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

/// The longest prefix of `text` of at most `n` bytes.
fn prefix(text: &str, n: usize) -> &str {
    let mut n = n.min(text.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    &text[..n]
}

/// The tokens of `text` as encoding it whole gives them: all, or the first
/// `limit` (at least) of a long text. A long text is encoded by prefixes
/// (doubling) until one holds `limit` tokens ending in its first three
/// quarters, which a cut that far on cannot have changed; a second,
/// longer cut must agree on them, else (a tokenizer whose merges reach
/// that far) the text is encoded whole.
fn encode_first(tok: &Tokenizer, text: &str, limit: usize) -> Result<Encoded, DataError> {
    let mut cut = limit.max(1).saturating_mul(BYTES_PER_TOKEN);
    while cut < text.len() {
        let a = prefix(text, cut);
        let (mut ids, mut offsets) = encode(tok, a)?;
        let settled = a.len() - a.len() / 4;
        if offsets.iter().take_while(|o| o.1 <= settled).count() >= limit {
            ids.truncate(limit);
            offsets.truncate(limit);
            let (ids2, offsets2) = encode(tok, prefix(text, cut + cut / 8))?;
            if ids2.get(..limit) == Some(&ids[..]) && offsets2.get(..limit) == Some(&offsets[..]) {
                return Ok((ids, offsets));
            }
            break;
        }
        cut = cut.saturating_mul(2);
    }
    encode(tok, text)
}

/// Tokenizes `r` as far as its first `limit` tokens (`usize::MAX`: whole).
/// A caller that cuts sequences at `max_len` passes `max_len + 1`, so a
/// longer text still shows as longer.
pub fn tokenize(
    tok: &Tokenizer,
    r: &Rendered,
    train_on_inputs: bool,
    limit: usize,
) -> Result<Tokenized, DataError> {
    let (ids, offsets) = encode_first(tok, &r.text, limit)?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(s, e))| {
            let trained = train_on_inputs
                || r.trainable
                    .iter()
                    .any(|span| s < span.end && span.start < e);
            if trained {
                id as i32
            } else {
                IGNORE
            }
        })
        .collect();
    Ok(Tokenized {
        ids: ids.into_iter().map(|i| i as i32).collect(),
        labels,
    })
}
