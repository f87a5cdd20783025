//! Dataset files: JSONL in the alpaca, messages, ShareGPT or plain-text
//! format, read into conversations. A malformed line is an error naming `file:line`.

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
    /// `{"messages": [{"role", "content"}, ...]}` (OpenAI's and
    /// transformers' chat layout).
    Messages,
    /// `{"conversations": [{"from", "value"}, ...]}` with `human`/`gpt`
    /// roles (ShareGPT, as many instruction datasets are published).
    ShareGpt,
    Text,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "alpaca" => Format::Alpaca,
            "messages" => Format::Messages,
            "sharegpt" => Format::ShareGpt,
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
        Format::Messages => chat(v, ("messages", "role", "content"), &MESSAGES_ROLES),
        Format::ShareGpt => chat(v, ("conversations", "from", "value"), &SHAREGPT_ROLES),
    }
}

const MESSAGES_ROLES: [(&str, Role); 3] = [
    ("system", Role::System),
    ("user", Role::User),
    ("assistant", Role::Assistant),
];

/// ShareGPT's names, and the messages format's, which some ShareGPT files use.
const SHAREGPT_ROLES: [(&str, Role); 5] = [
    ("system", Role::System),
    ("human", Role::User),
    ("gpt", Role::Assistant),
    ("user", Role::User),
    ("assistant", Role::Assistant),
];

/// A conversation: the list under `list`, each turn's role under `role`
/// (one of `roles`) and its text under `content`.
fn chat(
    v: &Value,
    (list, role, content): (&str, &str, &str),
    roles: &[(&str, Role)],
) -> Result<Example, String> {
    let turns = v
        .get(list)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("key `{list}` must be a list of {{{role}, {content}}} objects"))?;
    let mut out = Vec::new();
    for (j, t) in turns.iter().enumerate() {
        let at = |e: String| format!("{list}[{j}]: {e}");
        let name = string(t, role, true).map_err(at)?;
        let Some(&(_, r)) = roles.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = roles.iter().map(|(n, _)| *n).collect();
            return Err(at(format!(
                "{role} {name:?} is not one of {}",
                names.join(", ")
            )));
        };
        out.push((r, string(t, content, true).map_err(at)?));
    }
    if !out.iter().any(|(r, _)| *r == Role::Assistant) {
        return Err(format!("key `{list}` has no assistant turn to learn from"));
    }
    Ok(Example::Chat(out))
}
