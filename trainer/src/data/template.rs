//! Chat templates: an example rendered to text, with the byte spans the loss
//! is computed on (each response and the end-of-turn token after it). The
//! renderings follow the official Jinja templates (tests compare them with
//! transformers' `apply_chat_template`).

use super::format::{Example, Role};
use super::DataError;
use std::ops::Range;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    Llama2,
    Llama3,
    ChatMl,
    /// ChatML with Qwen2's default system message.
    Qwen2,
    Gemma,
    Mistral,
    Alpaca,
}

impl Template {
    pub const ALL: [Template; 7] = [
        Template::Llama2,
        Template::Llama3,
        Template::ChatMl,
        Template::Qwen2,
        Template::Gemma,
        Template::Mistral,
        Template::Alpaca,
    ];

    pub fn parse(s: &str) -> Option<Template> {
        Template::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Template::Llama2 => "llama-2",
            Template::Llama3 => "llama-3",
            Template::ChatMl => "chatml",
            Template::Qwen2 => "qwen2",
            Template::Gemma => "gemma",
            Template::Mistral => "mistral",
            Template::Alpaca => "alpaca",
        }
    }

    /// The official Jinja source this template renders as (none for alpaca,
    /// which is a prompt format, not a chat template).
    pub fn jinja(self) -> Option<&'static str> {
        use super::jinja;
        Some(match self {
            Template::Llama2 => jinja::LLAMA2,
            Template::Llama3 => jinja::LLAMA3,
            Template::ChatMl => jinja::CHATML,
            Template::Qwen2 => jinja::QWEN2,
            Template::Gemma => jinja::GEMMA,
            Template::Mistral => jinja::MISTRAL,
            Template::Alpaca => return None,
        })
    }

    /// The template whose official source `src` is, character for character.
    pub fn of_jinja(src: &str) -> Option<Template> {
        Template::ALL.into_iter().find(|t| t.jinja() == Some(src))
    }

    /// The template to render with: `named`, or (None, `data.template =
    /// "auto"`) the one whose official source the checkpoint's
    /// `chat_template` (read from `config`) is, character for character;
    /// with a note for the user: which one "auto" found, or that a chat
    /// template named outright is not the checkpoint's own.
    pub fn resolve(
        named: Option<Template>,
        chat_template: Option<&str>,
        config: &Path,
    ) -> Result<(Template, Option<String>), DataError> {
        let own = chat_template.and_then(Template::of_jinja);
        let path = config.display();
        match (named, chat_template, own) {
            (Some(t), Some(src), _) if t.jinja().is_some_and(|j| j != src) => {
                let theirs = match own {
                    Some(o) => format!(" (it is {0}'s: template \"{0}\" renders it)", o.name()),
                    None => String::new(),
                };
                let note = format!(
                    "note: template \"{0}\": the chat_template in {path} is not {0}'s{theirs}: the model is then tuned on, or prompted in, a format its own template does not write",
                    t.name()
                );
                Ok((t, Some(note)))
            }
            (Some(t), _, _) => Ok((t, None)),
            (None, _, Some(t)) => Ok((
                t,
                Some(format!("template \"auto\": {}, the chat_template in {path}", t.name())),
            )),
            (None, Some(_), None) => Err(DataError::Template(format!(
                "\"auto\": the chat_template in {path} is none of those Graft renders exactly ({}): name the one the model was tuned with",
                Template::ALL
                    .iter()
                    .filter(|t| t.jinja().is_some())
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            (None, None, _) => Err(DataError::Template(format!(
                "\"auto\": {path} has no chat_template: name the template"
            ))),
        }
    }

    /// The tokens the template writes, each of which the tokenizer must
    /// have as one token: without it the template's markers become word
    /// pieces, and generation never sees its end token.
    pub fn special_tokens(self) -> &'static [&'static str] {
        match self {
            Template::Llama2 | Template::Mistral => &["<s>", "</s>"],
            Template::Llama3 => &[
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            Template::ChatMl | Template::Qwen2 => &["<|im_start|>", "<|im_end|>"],
            Template::Gemma => &["<bos>", "<start_of_turn>", "<end_of_turn>"],
            Template::Alpaca => &[],
        }
    }
}

/// The tokenizer's own begin and end tokens (used by the alpaca template and
/// plain text; the chat templates name theirs).
#[derive(Clone, Debug)]
pub struct Specials {
    pub bos: Option<String>,
    pub eos: String,
    /// Filler of unused batch positions (never attended to, never trained
    /// on); tokenizer_config.json's `pad_token` when it is not EOS.
    pub pad: Option<String>,
    /// tokenizer_config.json's `chat_template` (the model's own Jinja).
    pub chat_template: Option<String>,
}

/// Rendered text and the byte ranges that carry loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub trainable: Vec<Range<usize>>,
}

impl Rendered {
    /// The text before the last trained span: for a conversation ending in
    /// an (empty) assistant turn, the prompt that generation continues, as
    /// transformers' `add_generation_prompt` writes it.
    pub fn prompt(&self) -> &str {
        &self.text[..self.trainable.last().map_or(self.text.len(), |s| s.start)]
    }

    fn push(&mut self, s: &str, trainable: bool) {
        let start = self.text.len();
        self.text.push_str(s);
        if trainable && !s.is_empty() {
            match self.trainable.last_mut() {
                Some(r) if r.end == start => r.end = self.text.len(),
                _ => self.trainable.push(start..self.text.len()),
            }
        }
    }
}

const ALPACA_PREAMBLE: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";
const ALPACA_PREAMBLE_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n";

/// What Qwen2's template writes before a conversation that does not start
/// with a system message.
const QWEN2_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";

/// Renders `ex` with `t`. Plain text ignores the template (BOS, the text,
/// EOS; all of it trained).
pub fn render(t: Template, ex: &Example, sp: &Specials) -> Result<Rendered, DataError> {
    let mut r = Rendered {
        text: String::new(),
        trainable: Vec::new(),
    };
    // Plain text and alpaca records under the alpaca template: BOS, an
    // untrained prompt, then the trained text and EOS.
    let single = match ex {
        Example::Text(s) => Some((String::new(), s)),
        Example::Alpaca {
            instruction,
            input,
            output,
        } if t == Template::Alpaca => Some((
            if input.is_empty() {
                format!("{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n### Response:\n")
            } else {
                format!("{ALPACA_PREAMBLE_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
            },
            output,
        )),
        _ => None,
    };
    if let Some((prompt, target)) = single {
        r.push(sp.bos.as_deref().unwrap_or(""), false);
        r.push(&prompt, false);
        r.push(target, true);
        r.push(&sp.eos, true);
        return Ok(r);
    }
    let turns: Vec<(Role, String)> = match ex {
        Example::Text(_) => unreachable!("rendered above"),
        Example::Alpaca {
            instruction,
            input,
            output,
        } => {
            let user = if input.is_empty() {
                instruction.clone()
            } else {
                format!("{instruction}\n\n{input}")
            };
            vec![(Role::User, user), (Role::Assistant, output.clone())]
        }
        Example::Chat(turns) => turns.clone(),
    };
    match t {
        Template::Alpaca => return Err(DataError::Template(
            "the alpaca template takes alpaca records; use llama-2, llama-3, chatml, qwen2, gemma or mistral for messages"
                .into(),
        )),
        Template::Llama3 => {
            r.push("<|begin_of_text|>", false);
            for (role, content) in &turns {
                r.push(
                    &format!("<|start_header_id|>{}<|end_header_id|>\n\n", role.name()),
                    false,
                );
                let train = *role == Role::Assistant;
                r.push(content.trim(), train);
                r.push("<|eot_id|>", train);
            }
        }
        Template::ChatMl | Template::Qwen2 => {
            if t == Template::Qwen2 && turns.first().is_some_and(|(r, _)| *r != Role::System) {
                r.push(QWEN2_DEFAULT_SYSTEM, false);
            }
            for (role, content) in &turns {
                r.push(&format!("<|im_start|>{}\n", role.name()), false);
                let train = *role == Role::Assistant;
                r.push(content, train);
                r.push("<|im_end|>", train);
                r.push("\n", false);
            }
        }
        Template::Llama2 => {
            let (system, rest) = match turns.first() {
                Some((Role::System, s)) => (Some(s.as_str()), &turns[1..]),
                _ => (None, &turns[..]),
            };
            alternating(t, rest, "(after an optional system message)")?;
            for (i, (role, content)) in rest.iter().enumerate() {
                let content = match (i, system) {
                    (0, Some(s)) => format!("<<SYS>>\n{s}\n<</SYS>>\n\n{content}"),
                    _ => content.clone(),
                };
                if *role == Role::User {
                    r.push(&format!("<s>[INST] {} [/INST]", content.trim()), false);
                } else {
                    r.push(" ", false);
                    r.push(content.trim(), true);
                    r.push(" </s>", true);
                }
            }
        }
        Template::Gemma => {
            no_system(t, &turns)?;
            r.push("<bos>", false);
            for (role, content) in &turns {
                let train = *role == Role::Assistant;
                let name = if train { "model" } else { "user" };
                r.push(&format!("<start_of_turn>{name}\n"), false);
                r.push(content.trim(), train);
                r.push("<end_of_turn>", train);
                r.push("\n", false);
            }
        }
        // Mistral-7B-Instruct v0.1/v0.2: contents as given, no separator
        // between a response and EOS.
        Template::Mistral => {
            no_system(t, &turns)?;
            r.push("<s>", false);
            for (role, content) in &turns {
                if *role == Role::User {
                    r.push(&format!("[INST] {content} [/INST]"), false);
                } else {
                    r.push(content, true);
                    r.push("</s>", true);
                }
            }
        }
    }
    Ok(r)
}

/// Templates without a system role (gemma, mistral), whose Jinja source
/// raises on one, and on turns that do not alternate.
fn no_system(t: Template, turns: &[(Role, String)]) -> Result<(), DataError> {
    if turns.iter().any(|(role, _)| *role == Role::System) {
        return Err(DataError::Template(format!(
            "{} has no system role (its template refuses one): fold the system message into the first user turn",
            t.name()
        )));
    }
    alternating(t, turns, "")
}

/// Templates whose Jinja source raises on any other order (llama-2, gemma,
/// mistral):
/// `turns` must alternate user, assistant, user, ... from a user turn.
fn alternating(t: Template, turns: &[(Role, String)], after: &str) -> Result<(), DataError> {
    let ordered = turns.iter().enumerate().all(|(i, (role, _))| {
        *role
            == if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            }
    });
    match ordered {
        true => Ok(()),
        false => Err(DataError::Template(format!(
            "{} needs turns alternating user/assistant, starting with user{}{after}",
            t.name(),
            if after.is_empty() { "" } else { " " }
        ))),
    }
}
