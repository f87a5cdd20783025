//! Datasets against the oracle (tests/oracle/make_data_fixtures.py): the
//! tokenizer gives the HF tokenizers ids, the chat templates render what
//! transformers' apply_chat_template renders with the same loss spans, and
//! tokenization labels exactly the tokens of the responses.

mod common;

use common::{fixtures, tmp};
use graft_trainer::data::format::{read_jsonl, Example, Format, Role};
use graft_trainer::data::load_tokenizer;
use graft_trainer::data::template::{render, Rendered, Specials, Template};
use graft_trainer::data::tokenize::{tokenize, IGNORE};
use serde_json::Value;

fn data_dir() -> std::path::PathBuf {
    fixtures().join("data")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir().join(name)).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect()
}

fn spans(v: &Value) -> Vec<std::ops::Range<usize>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_u64().unwrap() as usize..s[1].as_u64().unwrap() as usize)
        .collect()
}

/// A fixture's messages as turns.
fn turns_of(messages: &Value) -> Vec<(Role, String)> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            (role, m["content"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn tokenizer_matches_hf_tokenizers() {
    let (tok, sp) = load_tokenizer(&data_dir()).unwrap();
    assert_eq!(sp.eos, "<|eot_id|>");
    assert_eq!(sp.bos.as_deref(), Some("<|begin_of_text|>"));
    let enc = json("encodings.json");
    let cases = enc["encodings"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let ids: Vec<i32> = tok
            .encode(text, false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i32)
            .collect();
        assert_eq!(ids, ints(&c["ids"]), "{text:?}");
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn chat_templates_match_transformers_with_their_loss_spans() {
    let (tok, sp) = load_tokenizer(&data_dir()).unwrap();
    let t = json("templates.json");
    let mut checked = 0;
    for (name, template) in [
        ("llama-3", Template::Llama3),
        ("llama-2", Template::Llama2),
        ("chatml", Template::ChatMl),
        ("qwen2", Template::Qwen2),
        ("gemma", Template::Gemma),
        ("mistral", Template::Mistral),
    ] {
        for r in t["templates"][name]["renderings"].as_array().unwrap() {
            if r["add_generation_prompt"].as_bool().unwrap() {
                continue; // generation prompts are for `trainer generate`
            }
            let got = render(template, &Example::Chat(turns_of(&r["messages"])), &sp).unwrap();
            let what = format!("{name} {}", r["name"]);
            assert_eq!(got.text, r["text"].as_str().unwrap(), "{what}");
            assert_eq!(got.trainable, spans(&r["spans_byte"]), "{what}");
            let tk = tokenize(&tok, &got, false, usize::MAX).unwrap();
            assert_eq!(tk.ids, ints(&r["ids"]), "{what}");
            assert_eq!(tk.labels, ints(&r["labels"]), "{what}");
            assert!(
                tk.labels.iter().any(|&l| l != IGNORE) && tk.labels.contains(&IGNORE),
                "{what}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 26, "{checked} renderings checked");
}

/// Graft's copies of the official Jinja sources are the ones transformers
/// rendered for the fixtures, so `auto` recognises exactly the templates
/// whose renderings are checked above; `resolve` picks the checkpoint's own,
/// and notes a chat template named outright that is not it.
#[test]
fn auto_recognises_the_official_templates_and_notes_a_mismatch() {
    let t = json("templates.json");
    let mut known = 0;
    for tpl in Template::ALL {
        let Some(src) = tpl.jinja() else { continue };
        assert_eq!(
            Some(src),
            t["templates"][tpl.name()]["chat_template"].as_str(),
            "{}",
            tpl.name()
        );
        assert_eq!(Template::of_jinja(src), Some(tpl));
        known += 1;
    }
    assert_eq!(known, 6);
    let cfg = std::path::Path::new("m/tokenizer_config.json");
    let qwen2 = Template::Qwen2.jinja();
    let (got, note) = Template::resolve(None, qwen2, cfg).unwrap();
    assert_eq!(got, Template::Qwen2);
    assert!(note
        .unwrap()
        .contains("\"auto\": qwen2, the chat_template in m/"));
    // Plain ChatML named for a Qwen2 checkpoint: rendered, with a note.
    let (got, note) = Template::resolve(Some(Template::ChatMl), qwen2, cfg).unwrap();
    assert_eq!(got, Template::ChatMl);
    let note = note.unwrap();
    assert!(note.contains("is not chatml's (it is qwen2's"), "{note}");
    for (named, src) in [
        (Template::Qwen2, qwen2),
        (Template::ChatMl, None),
        (Template::Alpaca, qwen2),
    ] {
        assert_eq!(
            Template::resolve(Some(named), src, cfg).unwrap(),
            (named, None)
        );
    }
    let other = format!("{} ", qwen2.unwrap());
    let (got, note) = Template::resolve(Some(Template::Llama3), Some(&other), cfg).unwrap();
    assert_eq!(got, Template::Llama3);
    assert!(!note.unwrap().contains("it is"));
    let e = Template::resolve(None, Some(&other), cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "none of those Graft renders exactly (llama-2, llama-3, chatml, qwen2, gemma, mistral)"
        ),
        "{e}"
    );
    let e = Template::resolve(None, None, cfg).unwrap_err().to_string();
    assert!(
        e.contains("m/tokenizer_config.json has no chat_template"),
        "{e}"
    );
}

/// tokenizer_config.json's `chat_template` is read as a string, or from
/// transformers' list of named templates (the `default` one).
#[test]
fn the_checkpoints_chat_template_is_read_in_both_layouts() {
    let dir = tmp("chat-template");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        data_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let qwen2 = Template::Qwen2.jinja().unwrap();
    for (value, want) in [
        (serde_json::json!(qwen2), Some(qwen2)),
        (
            serde_json::json!([{"name": "tool_use", "template": "x"}, {"name": "default", "template": qwen2}]),
            Some(qwen2),
        ),
        (serde_json::json!(null), None),
    ] {
        let cfg = serde_json::json!({"eos_token": "<|im_end|>", "chat_template": value});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let (_, sp) = load_tokenizer(&dir).unwrap();
        assert_eq!(sp.chat_template.as_deref(), want);
    }
}

/// The prompt generation continues (a conversation rendered with an empty
/// last assistant turn, cut before it) is transformers' rendering with
/// `add_generation_prompt` (llama-2's template has none; mistral's has
/// none either, and its prompt is the conversation as rendered).
#[test]
fn generation_prompts_match_transformers() {
    let (_, sp) = load_tokenizer(&data_dir()).unwrap();
    let t = json("templates.json");
    let mut checked = 0;
    for (name, template) in [
        ("llama-3", Template::Llama3),
        ("chatml", Template::ChatMl),
        ("qwen2", Template::Qwen2),
        ("gemma", Template::Gemma),
        ("mistral", Template::Mistral),
    ] {
        for r in t["templates"][name]["renderings"].as_array().unwrap() {
            if !r["add_generation_prompt"].as_bool().unwrap() {
                continue;
            }
            let mut turns = turns_of(&r["messages"]);
            turns.push((Role::Assistant, String::new()));
            let got = render(template, &Example::Chat(turns), &sp).unwrap();
            assert_eq!(got.prompt(), r["text"].as_str().unwrap(), "{name}");
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked} prompts checked");
}

#[test]
fn alpaca_template_matches_with_bos_and_eos() {
    let (tok, sp) = load_tokenizer(&data_dir()).unwrap();
    let t = json("templates.json");
    let renderings = t["templates"]["alpaca"]["renderings"].as_array().unwrap();
    for r in renderings {
        let ex = Example::Alpaca {
            instruction: r["instruction"].as_str().unwrap().into(),
            input: r["input"].as_str().unwrap().into(),
            output: r["output"].as_str().unwrap().into(),
        };
        let want = &r["with_bos_eos"];
        let got = render(Template::Alpaca, &ex, &sp).unwrap();
        assert_eq!(got.text, want["text"].as_str().unwrap());
        assert_eq!(got.trainable, spans(&want["spans_byte"]));
        let tk = tokenize(&tok, &got, false, usize::MAX).unwrap();
        assert_eq!(tk.ids, ints(&want["ids"]));
        assert_eq!(tk.labels, ints(&want["labels"]));
        // train_on_inputs: every token counts.
        assert_eq!(
            tokenize(&tok, &got, true, usize::MAX).unwrap().labels,
            tk.ids
        );
    }
    assert!(renderings.len() >= 3);
}

#[test]
fn jsonl_formats_read_and_bad_lines_name_file_and_line() {
    let d = data_dir();
    let alpaca = read_jsonl(&d.join("alpaca.jsonl"), Format::Alpaca).unwrap();
    assert_eq!(alpaca.len(), 5);
    assert!(matches!(&alpaca[3], Example::Alpaca { input, .. } if input.is_empty()));
    let chats = read_jsonl(&d.join("messages.jsonl"), Format::Messages).unwrap();
    assert_eq!(chats.len(), 5);
    assert_eq!(
        read_jsonl(&d.join("text.jsonl"), Format::Text)
            .unwrap()
            .len(),
        4
    );

    let e = read_jsonl(&d.join("bad.jsonl"), Format::Alpaca)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.jsonl:3: not valid JSON"), "{e}");
    let e = read_jsonl(&d.join("text.jsonl"), Format::Alpaca)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("text.jsonl:1: key `instruction` is missing"),
        "{e}"
    );
    let e = read_jsonl(&d.join("alpaca.jsonl"), Format::Messages)
        .unwrap_err()
        .to_string();
    assert!(e.contains("alpaca.jsonl:1: key `messages`"), "{e}");
}

/// ShareGPT records (`conversations` of `from`/`value`, `human`/`gpt`
/// roles) read as the same conversations as the messages fixture; a role
/// or key it does not have is named with its line and turn.
#[test]
fn sharegpt_records_read_as_the_messages_they_hold() {
    let d = data_dir();
    let text = std::fs::read_to_string(d.join("messages.jsonl")).unwrap();
    let sharegpt: String = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let turns: Vec<Value> = v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let from = match t["role"].as_str().unwrap() {
                        "user" => "human",
                        "assistant" => "gpt",
                        other => other,
                    };
                    serde_json::json!({"from": from, "value": t["content"]})
                })
                .collect();
            format!("{}\n", serde_json::json!({ "conversations": turns }))
        })
        .collect();
    let path = tmp("sharegpt.jsonl");
    std::fs::write(&path, sharegpt).unwrap();
    let got = read_jsonl(&path, Format::ShareGpt).unwrap();
    let want = read_jsonl(&d.join("messages.jsonl"), Format::Messages).unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got, want);
    // The messages format's role names are accepted too.
    let path = tmp("sharegpt-bad.jsonl");
    for (line, want) in [
        (
            r#"{"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}"#,
            "",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]}"#,
            ":1: conversations[1]: from \"tool\" is not one of system, human, gpt, user, assistant",
        ),
        (
            r#"{"conversations": [{"from": "human", "text": "a"}]}"#,
            ":1: conversations[0]: key `value` is missing",
        ),
        (
            r#"{"messages": []}"#,
            ":1: key `conversations` must be a list of {from, value} objects",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "a"}]}"#,
            ":1: key `conversations` has no assistant turn",
        ),
    ] {
        std::fs::write(&path, line).unwrap();
        match read_jsonl(&path, Format::ShareGpt) {
            Ok(ex) => assert!(want.is_empty() && ex.len() == 1, "{line}"),
            Err(e) => assert!(!want.is_empty() && e.to_string().contains(want), "{e}"),
        }
    }
}

/// A UTF-8 byte-order mark and CRLF line ends are read through; bytes that
/// are not UTF-8 name their line; a llama-2 or gemma conversation out of
/// turn, or a system message to gemma, is refused, as transformers'
/// templates refuse them.
#[test]
fn jsonl_quirks_and_chat_turn_order() {
    let bom = tmp("bom.jsonl");
    std::fs::write(
        &bom,
        b"\xef\xbb\xbf{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n",
    )
    .unwrap();
    assert_eq!(read_jsonl(&bom, Format::Text).unwrap().len(), 2);
    let latin1 = tmp("latin1.jsonl");
    std::fs::write(&latin1, b"{\"text\": \"a\"}\n\n{\"text\": \"\xff\"}\n").unwrap();
    let e = read_jsonl(&latin1, Format::Text).unwrap_err().to_string();
    assert!(e.contains(":3: not UTF-8"), "{e}");

    let (_, sp) = load_tokenizer(&data_dir()).unwrap();
    let chat =
        |roles: &[Role]| Example::Chat(roles.iter().map(|&r| (r, "x".to_string())).collect());
    let good = [Role::System, Role::User, Role::Assistant, Role::User];
    assert!(render(Template::Llama2, &chat(&good), &sp).is_ok());
    for (t, bad) in [
        (Template::Llama2, &[Role::Assistant][..]),
        (Template::Llama2, &[Role::User, Role::User, Role::Assistant]),
        (Template::Llama2, &[Role::System, Role::Assistant]),
        (Template::Llama2, &[Role::User, Role::System]),
        (Template::Gemma, &[Role::Assistant, Role::User]),
        (
            Template::Gemma,
            &[Role::User, Role::Assistant, Role::Assistant],
        ),
        (Template::Mistral, &[Role::User, Role::User]),
    ] {
        let e = render(t, &chat(bad), &sp).unwrap_err().to_string();
        assert!(e.contains("alternating user/assistant"), "{bad:?}: {e}");
        assert!(e.contains(&format!("{} needs", t.name())), "{e}");
    }
    // Gemma's and Mistral's templates have no system role.
    for t in [Template::Gemma, Template::Mistral] {
        let e = render(t, &chat(&good), &sp).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} has no system role", t.name())),
            "{e}"
        );
    }
}

#[test]
fn plain_text_is_trained_whole_and_alpaca_records_fit_chat_templates() {
    let (tok, sp) = load_tokenizer(&data_dir()).unwrap();
    let r = render(Template::ChatMl, &Example::Text("hello world".into()), &sp).unwrap();
    assert_eq!(r.text, "<|begin_of_text|>hello world<|eot_id|>");
    let tk = tokenize(&tok, &r, false, usize::MAX).unwrap();
    assert_eq!(tk.labels[0], IGNORE, "BOS carries no loss");
    assert!(tk.labels[1..].iter().zip(&tk.ids[1..]).all(|(l, i)| l == i));

    let ex = Example::Alpaca {
        instruction: "Add.".into(),
        input: "3 4".into(),
        output: "7".into(),
    };
    let r = render(Template::Llama3, &ex, &sp).unwrap();
    assert!(
        r.text
            .contains("<|start_header_id|>user<|end_header_id|>\n\nAdd.\n\n3 4<|eot_id|>"),
        "{}",
        r.text
    );
    assert_eq!(&r.text[r.trainable[0].clone()], "7<|eot_id|>");

    let chat = Example::Chat(vec![
        (Role::User, "hi".into()),
        (Role::Assistant, "yo".into()),
    ]);
    let e = render(
        Template::Alpaca,
        &chat,
        &Specials {
            bos: None,
            eos: "</s>".into(),
            pad: None,
            chat_template: None,
        },
    )
    .unwrap_err();
    assert!(e
        .to_string()
        .contains("alpaca template takes alpaca records"));
}

#[test]
fn a_missing_tokenizer_names_the_file() {
    let e = load_tokenizer(&fixtures().join("llama/model"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama/model/tokenizer.json"), "{e}");
}

/// Words, whitespace runs, multi-byte characters and long words (one
/// unknown token of hundreds of bytes to a word-level tokenizer) that
/// tokenizers treat differently at a cut.
fn pieces() -> Vec<String> {
    let mut p: Vec<String> = [
        "hello",
        "world",
        "the",
        "Answer",
        "7",
        "12",
        "héllo",
        "日本語",
        "🙂",
        ".",
        " ",
        "   ",
        "\n",
        "\t\n  ",
    ]
    .map(String::from)
    .to_vec();
    p.extend(["12".repeat(100), " ".to_string() + &"x".repeat(300) + " "]);
    p
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// A long text encoded by prefixes gives the first tokens and labels
    /// of encoding it whole, at every limit, on a byte-level BPE tokenizer
    /// and on a word-level one.
    #[test]
    fn a_long_text_encoded_by_prefixes_starts_as_the_whole_encoding(
        picks in proptest::collection::vec(0usize..24, 100..2000),
        limit in 1usize..64,
        span in (0.0f64..1.0, 0.0f64..1.0),
        bpe in proptest::bool::ANY,
    ) {
        let dir = if bpe { data_dir() } else { graft_trainer::embedded::model_dir().unwrap() };
        let (tok, _) = load_tokenizer(&dir).unwrap();
        let all = pieces();
        // Long words are picked often, so a prefix holds few tokens.
        let text: String = picks.iter().map(|&i| all[i.min(all.len() - 1)].as_str()).collect();
        let mut cuts = [span.0, span.1].map(|f| {
            let mut at = (f * text.len() as f64) as usize;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        });
        cuts.sort();
        let r = Rendered { text, trainable: std::iter::once(cuts[0]..cuts[1]).collect() };
        let whole = tokenize(&tok, &r, false, usize::MAX).unwrap();
        let first = tokenize(&tok, &r, false, limit).unwrap();
        let n = limit.min(whole.ids.len());
        proptest::prop_assert!(first.ids.len() >= n);
        proptest::prop_assert_eq!(&first.ids[..n], &whole.ids[..n]);
        proptest::prop_assert_eq!(&first.labels[..n], &whole.labels[..n]);
    }
}

/// Encoding by prefixes on texts built to trip it (each caught by the
/// settled margin, and the first by the second cut too): a token cut by
/// the prefix's end is not taken ("12" cut to "1"), and a tokenizer whose
/// one token spans the whole text (word-level without a pre-tokenizer)
/// ends up encoding it whole.
#[test]
fn encoding_by_prefixes_takes_no_token_the_cut_may_have_changed() {
    let (words, _) = load_tokenizer(&graft_trainer::embedded::model_dir().unwrap()).unwrap();
    let text = " ".repeat(63) + "12" + &" 3".repeat(1000);
    let r = Rendered {
        trainable: std::iter::once(0..text.len()).collect(),
        text,
    };
    let first = tokenize(&words, &r, false, 1).unwrap();
    assert_eq!(first.ids[0], words.token_to_id("12").unwrap() as i32);

    let whole_word: tokenizers::Tokenizer = r#"{"version": "1.0", "model": {"type": "WordLevel",
        "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}"#
        .parse()
        .unwrap();
    let text = "a".repeat(10_000);
    let r = Rendered {
        trainable: std::iter::once(9_000..10_000).collect(),
        text,
    };
    let first = tokenize(&whole_word, &r, false, 1).unwrap();
    assert_eq!(first, tokenize(&whole_word, &r, false, usize::MAX).unwrap());
    assert_eq!(first.labels, [0], "the one token overlaps the trained span");
}

/// Exact match keeps only the examples that fit in max_len (generating past
/// the trained length measures nothing), and says how many it left out.
#[test]
fn exact_match_references_are_the_examples_that_fit() {
    use graft_trainer::data::batch::Overflow;
    use graft_trainer::data::prepare::{prepare, PrepareOptions};
    let (tok, sp) = load_tokenizer(&data_dir()).unwrap();
    let path = data_dir().join("alpaca.jsonl");
    let at = |max_len| {
        let opts = PrepareOptions {
            format: Format::Alpaca,
            template: Template::Llama3,
            max_len,
            overflow: Overflow::Truncate,
            train_on_inputs: false,
        };
        prepare(&path, &opts, &tok, &sp).unwrap()
    };
    let all = at(4096);
    assert_eq!((all.references.len(), all.unreferenced), (5, 0));
    assert_eq!(all.exact_match_note(), None);
    let lengths: Vec<usize> = all.docs.iter().map(|d| d.ids.len()).collect();
    let max_len = *lengths.iter().min().unwrap();
    let fits = lengths.iter().filter(|&&n| n <= max_len).count();
    let cut = at(max_len);
    assert_eq!((cut.references.len(), cut.unreferenced), (fits, 5 - fits));
    assert!(cut.truncated == 5 - fits && fits < 5, "{lengths:?}");
    let note = cut.exact_match_note().unwrap();
    assert!(
        note.contains(&format!("leaves out {} of 5", 5 - fits)),
        "{note}"
    );
}
