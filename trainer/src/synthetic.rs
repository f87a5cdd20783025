//! The synthetic world behind the embedded default: facts of four kinds
//! (made-up capitals, opposites, colours of things, the next number), told
//! as plain text for pretraining, and asked as instructions for tuning.
//! The base model learns the facts from the plain text only; instruction
//! tuning on some of them must teach it to answer questions about all of
//! them, which the held-out split (facts never asked during tuning) measures.

use crate::data::format::{Example, Role};
use graft_engine::rng::Rng;
use serde_json::json;
use std::collections::BTreeSet;

/// One fact: its kind, subject and answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    pub kind: Kind,
    pub subject: String,
    pub answer: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Capital,
    Opposite,
    Color,
    Next,
}

const OPPOSITES: [(&str, &str); 20] = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("near", "far"),
    ("first", "last"),
    ("good", "bad"),
    ("left", "right"),
    ("true", "false"),
    ("day", "night"),
    ("light", "dark"),
];

const COLORS: [(&str, &str); 32] = [
    ("banana", "yellow"),
    ("lemon", "yellow"),
    ("sunflower", "yellow"),
    ("corn", "yellow"),
    ("grass", "green"),
    ("leaf", "green"),
    ("frog", "green"),
    ("lime", "green"),
    ("sky", "blue"),
    ("ocean", "blue"),
    ("sapphire", "blue"),
    ("blueberry", "blue"),
    ("snow", "white"),
    ("milk", "white"),
    ("cloud", "white"),
    ("swan", "white"),
    ("coal", "black"),
    ("crow", "black"),
    ("ink", "black"),
    ("tomato", "red"),
    ("cherry", "red"),
    ("strawberry", "red"),
    ("blood", "red"),
    ("carrot", "orange"),
    ("pumpkin", "orange"),
    ("tangerine", "orange"),
    ("chocolate", "brown"),
    ("coffee", "brown"),
    ("flamingo", "pink"),
    ("elephant", "gray"),
    ("plum", "purple"),
    ("violet", "purple"),
];

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ra", "zu", "ten", "vor", "pel", "dri", "shan", "qua", "bel", "tor", "nim",
    "fa", "gor", "sel", "ush", "yen", "ix", "mar", "do", "wen", "thal",
];

/// A made-up word of two or three syllables.
fn word(rng: &mut Rng, used: &mut BTreeSet<String>) -> String {
    loop {
        let n = 2 + (rng.next_u64() % 2) as usize;
        let w: String = (0..n)
            .map(|_| SYLLABLES[(rng.next_u64() % SYLLABLES.len() as u64) as usize])
            .collect();
        if used.insert(w.clone()) {
            return w;
        }
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

fn pick<'a>(options: &[&'a str], rng: &mut Rng) -> &'a str {
    options[(rng.next_u64() % options.len() as u64) as usize]
}

pub struct World {
    pub facts: Vec<Fact>,
    /// Indices of facts asked during tuning; the rest are held out.
    pub tuned: Vec<usize>,
    pub held_out: Vec<usize>,
}

impl World {
    /// Fraction of each kind's facts asked during tuning.
    const TUNED: f64 = 0.7;

    pub fn new(seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut facts = Vec::new();
        for _ in 0..24 {
            let (country, capital) = (word(&mut rng, &mut used), word(&mut rng, &mut used));
            facts.push(Fact {
                kind: Kind::Capital,
                subject: country,
                answer: capital,
            });
        }
        for (a, b) in OPPOSITES {
            for (x, y) in [(a, b), (b, a)] {
                facts.push(Fact {
                    kind: Kind::Opposite,
                    subject: x.into(),
                    answer: y.into(),
                });
            }
        }
        for (x, c) in COLORS {
            facts.push(Fact {
                kind: Kind::Color,
                subject: x.into(),
                answer: c.into(),
            });
        }
        for n in 0..99 {
            facts.push(Fact {
                kind: Kind::Next,
                subject: n.to_string(),
                answer: (n + 1).to_string(),
            });
        }
        let (mut tuned, mut held_out) = (Vec::new(), Vec::new());
        for kind in [Kind::Capital, Kind::Opposite, Kind::Color, Kind::Next] {
            let mut idx: Vec<usize> = (0..facts.len())
                .filter(|&i| facts[i].kind == kind)
                .collect();
            shuffle(&mut idx, &mut rng);
            let cut = (idx.len() as f64 * Self::TUNED).round() as usize;
            tuned.extend_from_slice(&idx[..cut]);
            held_out.extend_from_slice(&idx[cut..]);
        }
        World {
            facts,
            tuned,
            held_out,
        }
    }

    /// The plain-text phrasings of a kind of fact.
    fn forms(kind: Kind) -> &'static [&'static str] {
        match kind {
            Kind::Capital => &[
                "the capital of {s} is {a} .",
                "{a} is the capital of {s} .",
                "{s} has its capital in {a} .",
                "in {s} , the capital city is {a} .",
            ],
            Kind::Opposite => &[
                "the opposite of {s} is {a} .",
                "{a} is the opposite of {s} .",
                "if it is not {s} , it may be {a} .",
            ],
            Kind::Color => &[
                "the color of the {s} is {a} .",
                "the {s} is {a} .",
                "a {s} has a {a} color .",
            ],
            Kind::Next => &[
                "after {s} comes {a} .",
                "{a} comes right after {s} .",
                "count : {s} {a} .",
            ],
        }
    }

    /// The fact as a plain-text sentence, in a random phrasing.
    pub fn sentence(f: &Fact, rng: &mut Rng) -> String {
        pick(Self::forms(f.kind), rng)
            .replace("{s}", &f.subject)
            .replace("{a}", &f.answer)
    }

    /// A plain-text probe of the fact: the sentence cut before the answer.
    pub fn probe(f: &Fact) -> String {
        let s = &f.subject;
        match f.kind {
            Kind::Capital => format!("the capital of {s} is"),
            Kind::Opposite => format!("the opposite of {s} is"),
            Kind::Color => format!("the color of the {s} is"),
            Kind::Next => format!("after {s} comes"),
        }
    }

    /// The fact asked as an instruction, in one of several phrasings.
    pub fn question(f: &Fact, variant: usize) -> String {
        let s = &f.subject;
        let forms: [String; 3] = match f.kind {
            Kind::Capital => [
                format!("What is the capital of {s} ?"),
                format!("Name the capital city of {s} ."),
                format!("Which city is the capital of {s} ?"),
            ],
            Kind::Opposite => [
                format!("What is the opposite of {s} ?"),
                format!("Give the opposite of the word {s} ."),
                format!("Which word means the opposite of {s} ?"),
            ],
            Kind::Color => [
                format!("What color is the {s} ?"),
                format!("Tell me the color of the {s} ."),
                format!("Which color does the {s} have ?"),
            ],
            Kind::Next => [
                format!("What number comes after {s} ?"),
                format!("Which number follows {s} ?"),
                format!("Name the number right after {s} ."),
            ],
        };
        forms[variant % 3].clone()
    }

    /// Pretraining documents: each tells a few random facts, every kind as
    /// often as the others (so the arbitrary ones, capitals and opposites,
    /// come up often enough to be memorised).
    pub fn corpus(&self, docs: usize, seed: u64) -> Vec<String> {
        let mut rng = Rng::new(seed);
        let kinds = [Kind::Capital, Kind::Opposite, Kind::Color, Kind::Next];
        let by_kind: Vec<Vec<&Fact>> = kinds
            .iter()
            .map(|k| self.facts.iter().filter(|f| f.kind == *k).collect())
            .collect();
        (0..docs)
            .map(|_| {
                let n = 4 + (rng.next_u64() % 5) as usize;
                (0..n)
                    .map(|_| {
                        let facts = &by_kind[(rng.next_u64() % 4) as usize];
                        let f = facts[(rng.next_u64() % facts.len() as u64) as usize];
                        Self::sentence(f, &mut rng)
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    fn instruction(f: &Fact, variant: usize) -> Example {
        Example::Chat(vec![
            (Role::User, Self::question(f, variant)),
            (Role::Assistant, f.answer.clone()),
        ])
    }

    /// Tuning examples: every phrasing of every tuned fact, shuffled.
    pub fn train_set(&self, seed: u64) -> Vec<Example> {
        let mut out: Vec<Example> = self
            .tuned
            .iter()
            .flat_map(|&i| (0..3).map(move |v| (i, v)))
            .map(|(i, v)| Self::instruction(&self.facts[i], v))
            .collect();
        shuffle(&mut out, &mut Rng::new(seed));
        out
    }

    /// Held-out examples: each held-out fact once, in a random phrasing.
    pub fn eval_set(&self, seed: u64) -> Vec<Example> {
        let mut rng = Rng::new(seed);
        self.held_out
            .iter()
            .map(|&i| Self::instruction(&self.facts[i], (rng.next_u64() % 3) as usize))
            .collect()
    }

    /// Every word the corpus, the instructions and the chat template use.
    pub fn vocabulary(&self) -> BTreeSet<String> {
        let mut words: BTreeSet<String> = BTreeSet::new();
        let mut add = |text: &str| {
            for w in text.split_whitespace() {
                words.insert(w.to_string());
            }
        };
        for f in &self.facts {
            for form in Self::forms(f.kind) {
                add(&form.replace("{s}", &f.subject).replace("{a}", &f.answer));
            }
            for v in 0..3 {
                add(&Self::question(f, v));
            }
        }
        for role in ["system", "user", "assistant"] {
            add(role);
        }
        words
    }
}

/// A chat example as a messages JSONL line.
pub fn messages_line(ex: &Example) -> String {
    match ex {
        Example::Chat(turns) => {
            let m: Vec<_> = turns
                .iter()
                .map(|(r, c)| json!({"role": r.name(), "content": c}))
                .collect();
            json!({ "messages": m }).to_string()
        }
        Example::Text(t) => json!({ "text": t }).to_string(),
        Example::Alpaca {
            instruction,
            input,
            output,
        } => json!({"instruction": instruction, "input": input, "output": output}).to_string(),
    }
}

/// Special tokens of the default tokenizer, ids 0.. in this order: padding,
/// unknown, BOS, EOS (also ChatML's end of turn), ChatML's turn start.
pub const SPECIALS: [&str; 5] = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"];

/// A word-level tokenizer.json over `words` (split on whitespace and
/// punctuation, as Hugging Face's `Whitespace` pre-tokenizer), and its
/// tokenizer_config.json.
pub fn tokenizer_files(words: &BTreeSet<String>) -> (String, String) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in SPECIALS
        .iter()
        .copied()
        .chain(words.iter().map(String::as_str))
        .enumerate()
    {
        vocab.insert(t.to_string(), json!(i));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[2], "eos_token": SPECIALS[3],
        "pad_token": SPECIALS[0], "unk_token": SPECIALS[1],
    });
    (
        serde_json::to_string_pretty(&tok).expect("serialises"),
        serde_json::to_string_pretty(&cfg).expect("serialises"),
    )
}

/// config.json of the default model: a small Llama for `vocab` tokens.
pub fn model_config(vocab: usize) -> String {
    let c = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": false,
        "attention_bias": false, "mlp_bias": false, "initializer_range": 0.02,
        "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "torch_dtype": "float32",
    });
    serde_json::to_string_pretty(&c).expect("serialises")
}

/// The embedded default's run configuration (over defaults.toml).
pub const RUN_TOML: &str = r#"# The embedded default run: QLoRA instruction tuning of a tiny Llama that
# Graft pretrained on plain-text facts; held-out exact-match accuracy is
# measured before and after. Any key of `trainer run --help` can be set here.

[model]
# Empty: the embedded model (4-bit on load, bf16 compute).
path = ""
quantize = "nf4"
compute_dtype = "bf16"

[adapter]
method = "lora"
r = 16
alpha = 32.0
dropout = 0.05
target_modules = "all-linear"

[data]
# Empty: the embedded instruction set and its held-out split.
train = ""
eval = ""
format = "messages"
template = "chatml"
max_seq_len = 64
packing = true

[train]
optimizer = "adamw"
lr = 2e-3
scheduler = "linear"
warmup_steps = 20
max_grad_norm = 1.0
epochs = 20
micro_batch_size = 8
seed = 42

[output]
dir = "runs/default"
log_steps = 10
eval_steps = 0
eval_accuracy = true
save_steps = 100
save_total_limit = 2
"#;
