//! Datasets: JSONL formats, chat templates, tokenization with label masks.

pub mod batch;
pub mod format;
pub mod jinja;
pub mod prepare;
pub mod template;
pub mod tokenize;

use std::path::{Path, PathBuf};
use template::Specials;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    #[error("{}:{line}: {msg}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// A special token as tokenizer_config.json writes it: a string or
/// `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of named
/// templates (transformers' newer layout), of which the `default` one.
fn chat_template(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(l) => l
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))?
            .get("template")?
            .as_str()
            .map(str::to_string),
        _ => None,
    }
}

/// The model directory's tokenizer.json and its BOS/EOS and chat template
/// (from tokenizer_config.json).
pub fn load_tokenizer(dir: &Path) -> Result<(Tokenizer, Specials), DataError> {
    let path = dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&path).map_err(|e| DataError::Io {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| DataError::Io {
            path: cfg_path.clone(),
            msg: e.to_string(),
        })?,
        Err(e) => {
            return Err(DataError::Io {
                path: cfg_path,
                msg: format!("{e} (the tokenizer's end token is read from it)"),
            })
        }
    };
    let eos = token_string(cfg.get("eos_token")).ok_or_else(|| DataError::Io {
        path: cfg_path.clone(),
        msg: "key `eos_token` is missing: responses need an end token".into(),
    })?;
    if tok.token_to_id(&eos).is_none() {
        return Err(DataError::Io {
            path: cfg_path,
            msg: format!("key `eos_token`: {eos:?} is not in tokenizer.json"),
        });
    }
    let pad = token_string(cfg.get("pad_token")).filter(|p| *p != eos);
    Ok((
        tok,
        Specials {
            bos: token_string(cfg.get("bos_token")),
            eos,
            pad,
            chat_template: chat_template(cfg.get("chat_template")),
        },
    ))
}
