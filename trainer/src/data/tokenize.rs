//! Tokenization of rendered examples into ids and labels: the whole text is
//! encoded once (so tokens merge across the prompt/response boundary exactly
//! as at inference), and a token is trained on when its bytes overlap a
//! trainable span.

use super::template::Rendered;
use super::DataError;
use tokenizers::Tokenizer;

/// Label of a token that carries no loss.
pub const IGNORE: i32 = -100;

#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<i32>,
    /// `ids[t]` where the loss counts, else -100 (unshifted, as transformers).
    pub labels: Vec<i32>,
}

pub fn tokenize(
    tok: &Tokenizer,
    r: &Rendered,
    train_on_inputs: bool,
) -> Result<Tokenized, DataError> {
    let enc = tok
        .encode(r.text.as_str(), false)
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let ids: Vec<i32> = enc.get_ids().iter().map(|&i| i as i32).collect();
    let labels = ids
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(s, e))| {
            let trained = train_on_inputs
                || r.trainable
                    .iter()
                    .any(|span| s < span.end && span.start < e);
            if trained {
                id
            } else {
                IGNORE
            }
        })
        .collect();
    Ok(Tokenized { ids, labels })
}
