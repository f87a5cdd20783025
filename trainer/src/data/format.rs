//! Dataset files: JSONL in the alpaca, messages or plain-text format, read
//! into conversations. A malformed line is an error naming `file:line`.

use super::DataError;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One training example.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Turns of a conversation; loss on every assistant turn.
    Chat(Vec<(Role, String)>),
    /// An alpaca record; loss on the output.
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    /// Plain text; loss on all of it.
    Text(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Alpaca,
    Messages,
    Text,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "alpaca" => Format::Alpaca,
            "messages" => Format::Messages,
            "text" => Format::Text,
            _ => return None,
        })
    }
}

/// Reads every non-blank line of a JSONL file as an example.
pub fn read_jsonl(path: &Path, format: Format) -> Result<Vec<Example>, DataError> {
    Ok(read_records(path, format)?
        .into_iter()
        .map(|(_, ex)| ex)
        .collect())
}

/// [`read_jsonl`] with each example's line number (from 1), for errors
/// found later (rendering, tokenizing). A UTF-8 byte-order mark at the
/// start (Windows editors write one) is skipped; bytes that are not UTF-8
/// are an error naming their line.
pub fn read_records(path: &Path, format: Format) -> Result<Vec<(usize, Example)>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Io {
        path: path.into(),
        msg: e.to_string(),
    })?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = |msg: String| DataError::Line {
            path: path.into(),
            line: i + 1,
            msg,
        };
        let line = std::str::from_utf8(line).map_err(|e| at(format!("not UTF-8: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        out.push((i + 1, parse_record(&v, format).map_err(at)?));
    }
    Ok(out)
}

fn string(v: &Value, key: &str, required: bool) -> Result<String, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None => Err(format!("key `{key}` is missing")),
        Some(other) => Err(format!("key `{key}` must be a string, got {other}")),
    }
}

fn parse_record(v: &Value, format: Format) -> Result<Example, String> {
    if !v.is_object() {
        return Err("each line must be a JSON object".into());
    }
    match format {
        Format::Alpaca => Ok(Example::Alpaca {
            instruction: string(v, "instruction", true)?,
            input: string(v, "input", false)?,
            output: string(v, "output", true)?,
        }),
        Format::Text => Ok(Example::Text(string(v, "text", true)?)),
        Format::Messages => {
            let turns = v
                .get("messages")
                .and_then(Value::as_array)
                .ok_or("key `messages` must be a list of {role, content} objects")?;
            let mut out = Vec::new();
            for (j, t) in turns.iter().enumerate() {
                let role = match string(t, "role", true)
                    .map_err(|e| format!("messages[{j}]: {e}"))?
                    .as_str()
                {
                    "system" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(format!(
                            "messages[{j}]: role {other:?} is not system, user or assistant"
                        ))
                    }
                };
                out.push((
                    role,
                    string(t, "content", true).map_err(|e| format!("messages[{j}]: {e}"))?,
                ));
            }
            if !out.iter().any(|(r, _)| *r == Role::Assistant) {
                return Err("key `messages` has no assistant turn to learn from".into());
            }
            Ok(Example::Chat(out))
        }
    }
}
