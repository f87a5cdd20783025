//! A dataset file end to end: read, render with the template, tokenize with
//! labels, fit to the maximum length. Also keeps, per example, the prompt
//! and the reference answer that evaluation decodes against.

use super::batch::{fit, Overflow};
use super::format::{read_records, Example, Format, Role};
use super::template::{render, Specials, Template};
use super::tokenize::{tokenize, Tokenized};
use super::DataError;
use std::path::Path;
use tokenizers::Tokenizer;

/// How examples become token sequences.
#[derive(Clone, Copy, Debug)]
pub struct PrepareOptions {
    pub format: Format,
    pub template: Template,
    pub max_len: usize,
    pub overflow: Overflow,
    pub train_on_inputs: bool,
}

/// A prompt to complete and the answer expected (alpaca output, last
/// assistant turn).
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub prompt: Vec<i32>,
    pub answer: String,
}

/// A prepared dataset and what fitting did to it.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub docs: Vec<Tokenized>,
    /// Examples read from the file.
    pub read: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub no_target: usize,
    /// One per example with an answer (not plain text) that fits in
    /// `max_len`, in file order.
    pub references: Vec<Reference>,
    /// Examples with an answer left out of `references` as too long.
    pub unreferenced: usize,
}

impl Prepared {
    /// One line for the log: what was read and what fitting did.
    /// A fingerprint of the examples as trained (each one's length, tokens
    /// and labels, in file order): a resumed run's data position means the
    /// same examples only while this is unchanged.
    pub fn digest(&self) -> String {
        let bytes: Vec<u8> = self
            .docs
            .iter()
            .flat_map(|d| {
                std::iter::once(d.ids.len() as i32)
                    .chain(d.ids.iter().copied())
                    .chain(d.labels.iter().copied())
            })
            .flat_map(i32::to_le_bytes)
            .collect();
        format!("{:016x}", graft_engine::kernels::cache::fnv1a(&[&bytes]))
    }

    /// A note for exact-match evaluation when examples were left out of it.
    pub fn exact_match_note(&self) -> Option<String> {
        (self.unreferenced > 0).then(|| {
            format!(
                "note: exact match leaves out {} of {} answered examples, longer than data.max_seq_len",
                self.unreferenced,
                self.unreferenced + self.references.len()
            )
        })
    }

    pub fn summary(&self) -> String {
        format!(
            "{} examples ({} truncated, {} dropped as longer than max_seq_len, {} without a trained token)",
            self.read, self.truncated, self.dropped, self.no_target
        )
    }
}

/// The expected answer of `ex`, if it has one.
fn answer(ex: &Example) -> Option<&str> {
    match ex {
        Example::Alpaca { output, .. } => Some(output),
        Example::Chat(turns) => turns
            .iter()
            .rev()
            .find(|(r, _)| *r == Role::Assistant)
            .map(|(_, c)| c.as_str()),
        Example::Text(_) => None,
    }
}

/// Reads and prepares `path`. An empty result is an error naming the file.
pub fn prepare(
    path: &Path,
    opts: &PrepareOptions,
    tok: &Tokenizer,
    sp: &Specials,
) -> Result<Prepared, DataError> {
    let examples = read_records(path, opts.format)?;
    let mut docs = Vec::with_capacity(examples.len());
    let mut references = Vec::new();
    let mut unreferenced = 0;
    for (line, ex) in &examples {
        // Rendering and tokenizing errors name the record's line.
        let at = |e: DataError| DataError::Line {
            path: path.into(),
            line: *line,
            msg: e.to_string(),
        };
        let r = render(opts.template, ex, sp).map_err(at)?;
        // One token past max_len shows an example is longer.
        let doc = tokenize(
            tok,
            &r,
            opts.train_on_inputs,
            opts.max_len.saturating_add(1),
        )
        .map_err(at)?;
        match (answer(ex), r.trainable.last()) {
            // Generating past the trained length would measure nothing (and
            // hold a cache for the whole prompt).
            (Some(_), Some(_)) if doc.ids.len() > opts.max_len => unreferenced += 1,
            (Some(ans), Some(_)) => {
                let prompt: Vec<i32> = tok
                    .encode(r.prompt(), false)
                    .map_err(|e| at(DataError::Tokenizer(e.to_string())))?
                    .get_ids()
                    .iter()
                    .map(|&i| i as i32)
                    .collect();
                if prompt.is_empty() {
                    return Err(at(DataError::Template(
                        "nothing comes before the answer, so there is no prompt to answer".into(),
                    )));
                }
                references.push(Reference {
                    prompt,
                    answer: ans.to_string(),
                });
            }
            _ => {}
        }
        docs.push(doc);
    }
    let fitted = fit(docs, opts.max_len, opts.overflow);
    let out = Prepared {
        docs: fitted.docs,
        read: examples.len(),
        truncated: fitted.truncated,
        dropped: fitted.dropped,
        no_target: fitted.no_target,
        references,
        unreferenced,
    };
    if out.docs.is_empty() {
        return Err(DataError::Io {
            path: path.into(),
            msg: format!("no example left: {}", out.summary()),
        });
    }
    Ok(out)
}
