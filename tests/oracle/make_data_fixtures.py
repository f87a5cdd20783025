#!/usr/bin/env python3
"""Data-pipeline oracle fixtures for Graft (tokenizer, chat templates, JSONL datasets).

Writes tests/fixtures/data/:

    tokenizer.json          small byte-level BPE (GPT-2 style), trained here on a built-in corpus
    tokenizer_config.json   bos <|begin_of_text|>, eos <|eot_id|>, pad <pad>
    encodings.json          `tokenizers` encode ids / tokens and decode for edge-case strings
    templates.json          transformers `apply_chat_template` renderings (Llama-3, Llama-2, ChatML, Gemma)
                            with the loss spans, plus Alpaca prompt renderings
    alpaca.jsonl, messages.jsonl, text.jsonl, bad.jsonl   small datasets (bad.jsonl: line 3 is not JSON)
    VERSIONS.json

Nothing is downloaded: the tokenizer is trained from the sentences below and the four Jinja
chat templates are written out here verbatim (the `chat_template` strings of the official
tokenizer_config.json files). See tests/oracle/README.md ("Data fixtures").

Usage (from the repository root; ~5 s, byte-identical reruns):
    /work/venv/bin/python tests/oracle/make_data_fixtures.py
"""

import hashlib
import json
import platform
import re
import sys
from pathlib import Path

import jinja2
import tokenizers
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "data"
MAX_TOTAL_BYTES = 300_000

VOCAB_SIZE = 600  # BPE vocabulary (256 byte symbols + 344 merges); special tokens come after it
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
]

# ---------------------------------------------------------------------------------------------
# Chat templates, verbatim: each string below equals the JSON-decoded "chat_template" value of
# the tokenizer_config.json named in the comment above it. Llama-3's and ChatML's JSON write "\n" (so the Jinja
# source holds real newline characters inside its string literals: plain Python "\n" below);
# Llama-2's JSON writes "\\n" (so Jinja sees the escape sequence backslash-n: raw string r"\n"
# below). Both render as a newline.
# ---------------------------------------------------------------------------------------------

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template".
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template" (note the two spaces
# in `' '  + content.strip()`, as in the original).
LLAMA2_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    r"{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    r"{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# ChatML as in teknium/OpenHermes-2.5-Mistral-7B's tokenizer_config.json "chat_template" (the
# plain ChatML template; Qwen2's variant additionally inserts a default system message
# "You are a helpful assistant." when the first message is not a system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-7B-Instruct, tokenizer_config.json "chat_template": ChatML with a default system
# message when the conversation does not start with one.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-2-2b-it, tokenizer_config.json "chat_template" (google/gemma-7b-it's is the same):
# no system role, turns must alternate, the assistant is "model", contents `| trim`-ed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.2, tokenizer_config.json "chat_template" (v0.1's is the same):
# no system role (a system message fails the alternation check), contents as given, the
# assistant's content followed directly by eos_token, no generation prompt.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TEMPLATES = {
    # name: (jinja, bos_token, eos_token, end-of-turn marker, separator between the rendered
    #        content and the marker, how the template trims the assistant content, source)
    "llama-3": dict(
        jinja=LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        end_of_turn="<|eot_id|>",
        content_to_marker="",
        content_transform="strip",  # Jinja `| trim` = Python str.strip()
        source="meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template",
    ),
    "llama-2": dict(
        jinja=LLAMA2_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        end_of_turn="</s>",
        content_to_marker=" ",
        content_transform="strip",  # content.strip()
        source="meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template",
    ),
    "chatml": dict(
        jinja=CHATML_TEMPLATE,
        bos_token=None,
        eos_token="<|im_end|>",
        end_of_turn="<|im_end|>",
        content_to_marker="",
        content_transform="none",
        source="teknium/OpenHermes-2.5-Mistral-7B tokenizer_config.json chat_template (ChatML)",
    ),
    "qwen2": dict(
        jinja=QWEN2_TEMPLATE,
        bos_token=None,
        eos_token="<|im_end|>",
        end_of_turn="<|im_end|>",
        content_to_marker="",
        content_transform="none",
        source="Qwen/Qwen2-7B-Instruct tokenizer_config.json chat_template",
    ),
    "gemma": dict(
        jinja=GEMMA_TEMPLATE,
        bos_token="<bos>",
        eos_token="<eos>",
        end_of_turn="<end_of_turn>",
        content_to_marker="",
        content_transform="strip",  # Jinja `| trim`
        system="System role not supported",  # raised on a system message: those conversations are left out
        source="google/gemma-2-2b-it tokenizer_config.json chat_template",
    ),
    "mistral": dict(
        jinja=MISTRAL_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        end_of_turn="</s>",
        content_to_marker="",
        content_transform="none",
        system="Conversation roles must alternate",  # what a leading system message raises
        source="mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json chat_template",
    ),
}

# Stanford Alpaca prompts. Stanford's train.py ends both with "### Response:" (no newline; the
# output follows directly); alpaca-lora / axolotl / most trainers, and Graft, use
# "### Response:\n" as here.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# ---------------------------------------------------------------------------------------------
# Corpus (deterministic, 200 lines)
# ---------------------------------------------------------------------------------------------


def corpus():
    capitals = [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
        ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"),
        ("Chile", "Santiago"), ("India", "New Delhi"), ("Australia", "Canberra"),
        ("Brazil", "Brasilia"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
        ("Sweden", "Stockholm"), ("Mexico", "Mexico City"),
    ]
    lines = []
    for country, city in capitals:
        lines.append(f"The capital of {country} is {city}.")
        lines.append(f"What is the capital of {country}? It is {city}.")
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    for i in range(48):
        a, b = (i * 7) % 13 + 1, (i * 5) % 11 + 2
        sym, f = ops[i % 3]
        lines.append(f"{a} {sym} {b} = {f(a, b)}")
    instructions = [
        "Write a short poem about the sea.",
        "Summarize the following text in one sentence.",
        "Translate the sentence into French.",
        "Give three tips for staying healthy.",
        "Explain why the sky is blue.",
        "List five animals that live in the ocean.",
        "Describe a sunny day at the beach.",
        "Rewrite the sentence in the past tense.",
        "Classify the review as positive or negative.",
        "Answer the question using the context below.",
        "Name the largest planet in the solar system.",
        "Suggest a title for a story about a lost cat.",
        "Convert the temperature from Celsius to Fahrenheit.",
        "Count the words in the following sentence.",
        "Write a haiku about autumn leaves.",
        "Find the odd one out: apple, banana, carrot, grape.",
    ]
    for k, ins in enumerate(instructions):
        lines.append(ins)
        lines.append(f"### Instruction:\n{ins}\n\n### Response:\nSure, here is my answer number {k + 1}.")
    qa = [
        ("What color is the sky?", "The sky is blue."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
        ("What is water made of?", "Water is made of hydrogen and oxygen."),
        ("Is the sun a star?", "Yes, the sun is a star."),
        ("What do bees make?", "Bees make honey."),
        ("How many days are in a week?", "There are seven days in a week."),
        ("What is the opposite of hot?", "The opposite of hot is cold."),
        ("Where do penguins live?", "Most penguins live in the Southern Hemisphere."),
        ("Can you help me?", "Of course! I'm happy to help, and I'll do my best."),
    ]
    for q, a in qa:
        lines.append(f"Q: {q} A: {a}")
        lines.append(f"User: {q}\nAssistant: {a}")
        lines.append(f"You are a helpful assistant. {q} {a}")
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    animals = ["cat", "dog", "horse", "bird", "fish"]
    for k, (c, a) in enumerate((c, a) for c in colours for a in animals):
        lines.append(f"My favourite colour is {c} and my pet {a} is {k % 12 + 1} years old.")
    lines += [
        "Hello world! Hello there, how are you today?",
        "The quick brown fox jumps over the lazy dog.",
        "She said: \"don't worry, it's fine, we'll see.\"",
        "def add(a, b):\n    return a + b",
        "for i in range(10):\n    print(i * i)",
        "The price is $3.50, or about 3.14159 euros (roughly).",
        "Le café est très bon, merci beaucoup.",
        "Un café au lait et un croissant, s'il vous plaît.",
        "naïve résumé, déjà vu, façade, Ünïcödé",
        "日本の首都は東京です。",
        "日本語を話します。",
        "I love pizza 🍕 and parties 🎉!",
        "Good morning ☀️, good night 🌙.",
        "Emojis: 😀 😂 👍 ❤️",
        "Tabs\tand  double  spaces  are  whitespace.",
        "Lines end here.\nA new line starts.\n\nA blank line came before.",
        "In 2024, about 8000000000 people lived on Earth.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000",
        "An assistant answers questions; a user asks them.",
        "System prompts set the behaviour of the assistant.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer(lines):
    """GPT-2 style byte-level BPE: no normalizer, ByteLevel pre-tokenizer (GPT-2 split regex,
    no prefix space), ByteLevel decoder, no post-processor. Special tokens are added after
    training as special added tokens, so their ids come after the BPE vocabulary (as Llama-3's
    <|begin_of_text|> = 128000 etc.) and they are not in the model's vocab."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    assert tok.get_vocab_size(with_added_tokens=False) == VOCAB_SIZE, tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in SPECIAL_TOKENS]
    )
    assert tok.normalizer is None and tok.post_processor is None
    for k, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == VOCAB_SIZE + k
    return tok


ENCODE_STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    "3 + 4 = 7",
    " leading space",
    "trailing space ",
    "  two spaces both ends  ",
    "line one\nline two\n\nline four\n",
    "\tindented\twith tabs",
    "café au lait",
    "日本",
    "emoji 🍕🎉 end",
    "Stop here.<|eot_id|>Next turn",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "<s>[INST] Hi [/INST] Hello </s>",
    "<|im_start|>assistant\nOK<|im_end|>\n",
    "<bos><start_of_turn>model\nOK<end_of_turn>\n",
    "a<pad>b",
    "<|eot_id <|eot_id|",  # not special tokens (incomplete)
    "don't it's we'll I'M",
    "numbers 1234567890 and 3.14159",
    "xylophone quizzically jazz",  # rare letters, falls back to short merges / bytes
    "",
]


def encodings(tok):
    out = []
    for s in ENCODE_STRINGS:
        enc = tok.encode(s, add_special_tokens=False)
        enc_sp = tok.encode(s, add_special_tokens=True)
        assert enc_sp.ids == enc.ids, "no post-processor: add_special_tokens must add nothing"
        dec = tok.decode(enc.ids, skip_special_tokens=False)
        out.append(
            dict(
                text=s,
                ids=enc.ids,
                tokens=enc.tokens,
                decoded=dec,
                decoded_skip_special=tok.decode(enc.ids, skip_special_tokens=True),
                roundtrip=dec == s,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Conversations and datasets
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = [
    dict(
        name="single_turn",
        messages=[
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
    ),
    dict(
        name="system",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "3 + 4 = 7"},
        ],
    ),
    dict(
        name="multi_turn",
        messages=[
            {"role": "user", "content": "Name a planet."},
            {"role": "assistant", "content": "Jupiter is the largest planet."},
            {"role": "user", "content": "And the smallest?"},
            {"role": "assistant", "content": "Mercury is the smallest."},
        ],
    ),
    dict(
        # Whitespace around the contents (Llama-2/3 strip it, ChatML keeps it) and non-ASCII
        # text (character and byte offsets differ).
        name="system_multi_turn_whitespace_unicode",
        messages=[
            {"role": "system", "content": "Answer briefly.\n"},
            {"role": "user", "content": "  Un café, s'il vous plaît.  "},
            {"role": "assistant", "content": " Voilà votre café ☕ !\n"},
            {"role": "user", "content": "日本の首都は?"},
            {"role": "assistant", "content": "東京です。\n\nTokyo 🗼"},
        ],
    ),
    dict(
        # The same without the system message: what templates without a system role render.
        name="multi_turn_whitespace_unicode",
        messages=[
            {"role": "user", "content": "  Un café, s'il vous plaît.  "},
            {"role": "assistant", "content": " Voilà votre café ☕ !\n"},
            {"role": "user", "content": "日本の首都は?"},
            {"role": "assistant", "content": "東京です。\n\nTokyo 🗼"},
        ],
    ),
]

# Generation-prompt renderings (add_generation_prompt=True, ending with a user turn).
GENERATION_CONVERSATIONS = [
    dict(
        name="generation_prompt_multi_turn",
        messages=[
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4"},
            {"role": "user", "content": "And 3 + 3?"},
        ],
    ),
    dict(
        name="generation_prompt_system",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"},
        ],
    ),
]

ALPACA_RECORDS = [
    {"instruction": "Translate the sentence into French.", "input": "The cat is black.", "output": "Le chat est noir."},
    {"instruction": "Summarize the following text in one sentence.", "input": "Bees visit flowers.\nThey collect nectar and make honey.", "output": "Bees make honey from the nectar of flowers."},
    {"instruction": "Add the two numbers.", "input": "3, 4", "output": "3 + 4 = 7"},
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat vegetables.\n2. Sleep well.\n3. Exercise every day."},
    {"instruction": "Name the largest planet in the solar system.", "input": "", "output": "Jupiter."},
]

TEXT_RECORDS = [
    {"text": "The capital of France is Paris."},
    {"text": "def add(a, b):\n    return a + b\n"},
    {"text": "Le café est très bon. 日本の首都は東京です。 🍕"},
    {"text": "3 + 4 = 7, and 6 * 7 = 42."},
]

BAD_LINES = [
    '{"instruction": "Say hello.", "input": "", "output": "Hello!"}',
    '{"instruction": "Count to three.", "input": "", "output": "1, 2, 3"}',
    '{"instruction": "This line is broken", "input": "", "output": "no closing brace"',
    '{"instruction": "Say goodbye.", "input": "", "output": "Goodbye!"}',
]


def byte_span(text, start, end):
    return [len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))]


def overlap_labels(tok, text, char_spans):
    """ids of `text` (no special tokens added) and labels: the id where the token's character
    offsets overlap a span (start < span_end and span_start < end), else -100."""
    enc = tok.encode(text, add_special_tokens=False)
    labels = [
        i if any(s < e2 and s2 < e for (s2, e2) in char_spans) else -100
        for i, (s, e) in zip(enc.ids, enc.offsets)
    ]
    return enc.ids, labels


def span_record(text, spans, tok):
    ids, labels = overlap_labels(tok, text, spans)
    return dict(
        spans_char=[list(s) for s in spans],
        spans_byte=[byte_span(text, s, e) for s, e in spans],
        span_texts=[text[s:e] for s, e in spans],
        ids=ids,
        labels=labels,
    )


def render(hf, jinja, messages, add_generation_prompt):
    out = hf.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert isinstance(out, str), type(out)
    return out


def assistant_spans(hf, spec, messages, text, add_generation_prompt):
    """Loss spans of `text` = render(messages): for every assistant message, its content as the
    template renders it, plus everything after it up to and including the end-of-turn marker.

    How they are located (the template's output only, no knowledge of its internals beyond the
    marker): for the assistant message at index i,
      before  = render(messages[:i], add_generation_prompt=True)
      through = render(messages[:i+1], add_generation_prompt=False)
    Both must be prefixes of `text` and `before` a prefix of `through` (the templates are
    "prefix-stable": earlier turns render the same whatever follows). So the assistant turn is
    the text through[len(before):]. In it, the content appears as the template prints it:
    content.strip() for llama-3 (`| trim`) and llama-2 (`.strip()`), content unchanged for
    chatml. The turn must be exactly
      lead + rendered_content + content_to_marker + end_of_turn + tail
    with lead = " " for llama-2 ("' '  + content.strip()"), "" otherwise (llama-3/chatml's
    header, incl. "\\n\\n" / "\\n", is already in `before` via the generation prompt; llama-2
    has none), content_to_marker = " " for llama-2 (" ' ' + eos_token"), "" otherwise, and
    tail = "\\n" for chatml, "" otherwise. The span is [len(before) + len(lead),
    len(through) - len(tail)), i.e. rendered_content + content_to_marker + end_of_turn.
    All of this is asserted, so a template that renders differently fails loudly."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(hf, spec["jinja"], messages[:i], True)
        through = render(hf, spec["jinja"], messages[: i + 1], False)
        assert through.startswith(before) and text.startswith(through), (before, through, text)
        turn = through[len(before):]
        content = m["content"].strip() if spec["content_transform"] == "strip" else m["content"]
        lead = " " if spec["content_to_marker"] == " " else ""
        tail = "\n" if spec["end_of_turn"] in ("<|im_end|>", "<end_of_turn>") else ""
        assert turn == lead + content + spec["content_to_marker"] + spec["end_of_turn"] + tail, repr(turn)
        start = len(before) + len(lead)
        end = len(through) - len(tail)
        assert text[start:end] == content + spec["content_to_marker"] + spec["end_of_turn"]
        spans.append((start, end))
    return spans


def chat_renderings(base_tok):
    out = {}
    for name, spec in TEMPLATES.items():
        kw = dict(tokenizer_object=base_tok, eos_token=spec["eos_token"], pad_token="<pad>")
        if spec["bos_token"] is not None:
            kw["bos_token"] = spec["bos_token"]
        hf = PreTrainedTokenizerFast(**kw)
        rend = []
        # A template without a system role raises on one (checked), and renders the rest.
        has_system = lambda conv: any(m["role"] == "system" for m in conv["messages"])
        for conv in CONVERSATIONS + GENERATION_CONVERSATIONS:
            if "system" in spec and has_system(conv):
                try:
                    render(hf, spec["jinja"], conv["messages"], False)
                except jinja2.exceptions.TemplateError as e:
                    assert spec["system"] in str(e), e
                else:
                    raise AssertionError(f"{name} rendered a system message")
        keep = lambda convs: [c for c in convs if "system" not in spec or not has_system(c)]
        for conv in keep(CONVERSATIONS):
            text = render(hf, spec["jinja"], conv["messages"], False)
            spans = assistant_spans(hf, spec, conv["messages"], text, False)
            assert len(spans) == sum(m["role"] == "assistant" for m in conv["messages"])
            gen = render(hf, spec["jinja"], conv["messages"], True)
            if name in ("llama-2", "mistral"):
                assert gen == text  # these templates ignore add_generation_prompt
            else:
                assert gen.startswith(text) and gen != text
            rend.append(
                dict(name=conv["name"], messages=conv["messages"], add_generation_prompt=False, text=text,
                     **span_record(text, spans, base_tok))
            )
        for conv in keep(GENERATION_CONVERSATIONS):
            text = render(hf, spec["jinja"], conv["messages"], True)
            spans = assistant_spans(hf, spec, conv["messages"], text, True)
            rend.append(
                dict(name=conv["name"], messages=conv["messages"], add_generation_prompt=True, text=text,
                     **span_record(text, spans, base_tok))
            )
        out[name] = dict(
            source=spec["source"],
            chat_template=spec["jinja"],
            bos_token=spec["bos_token"],
            eos_token=spec["eos_token"],
            end_of_turn=spec["end_of_turn"],
            renderings=rend,
        )
    return out


def alpaca_renderings(tok, bos, eos):
    cases = []
    for k, r in enumerate(ALPACA_RECORDS):
        cases.append((f"alpaca.jsonl:{k + 1}", r))
        if r["input"]:
            cases.append((f"alpaca.jsonl:{k + 1} without input", dict(r, input="")))
    rend = []
    for name, r in cases:
        # Stanford's rule: the input variant when "input" is non-empty.
        prompt = (ALPACA_PROMPT_INPUT if r["input"] else ALPACA_PROMPT_NO_INPUT).format_map(r)
        text = prompt + r["output"]
        full = bos + prompt + r["output"] + eos
        full_span = (len(bos) + len(prompt), len(full))
        rend.append(
            dict(
                name=name,
                instruction=r["instruction"],
                input=r["input"],
                output=r["output"],
                prompt=prompt,
                text=text,
                output_span_char=[len(prompt), len(text)],
                output_span_byte=byte_span(text, len(prompt), len(text)),
                # With the tokenizer's BOS before and EOS after; the loss span is output + EOS.
                with_bos_eos=dict(text=full, **span_record(full, [full_span], tok)),
            )
        )
    return dict(
        prompt_no_input=ALPACA_PROMPT_NO_INPUT,
        prompt_input=ALPACA_PROMPT_INPUT,
        bos_token=bos,
        eos_token=eos,
        renderings=rend,
    )


def dumps(obj):
    """Indented JSON with lists of numbers on one line. Only whitespace that holds a newline is
    touched, and JSON strings cannot contain a raw newline, so string values stay as they are."""
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\n\s*(-?\d+(?:,\n\s*-?\d+)*)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    assert json.loads(text) == obj
    return text + "\n"


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus())
    files = {}

    tok.save(str(OUT_DIR / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<pad>",
    }
    files["tokenizer_config.json"] = dumps(cfg)

    # Reload from disk (what Graft reads) and use that from here on.
    tok = Tokenizer.from_file(str(OUT_DIR / "tokenizer.json"))
    enc = encodings(tok)
    files["encodings.json"] = dumps(
        dict(
            note="ids = Tokenizer.encode(text, add_special_tokens=False).ids (add_special_tokens=True gives the same: "
            "no post-processor); decoded = decode(ids, skip_special_tokens=False)",
            vocab_size_without_added=tok.get_vocab_size(with_added_tokens=False),
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            special_tokens={t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
            encodings=enc,
        )
    )

    templates = chat_renderings(tok)
    templates["alpaca"] = alpaca_renderings(tok, cfg["bos_token"], cfg["eos_token"])
    files["templates.json"] = dumps(
        dict(
            note="chat renderings: transformers apply_chat_template(messages, chat_template=..., tokenize=False, "
            "add_generation_prompt=...) with the template's bos/eos; spans_char / spans_byte: [start, end) of "
            "each assistant content as rendered plus the end-of-turn marker (see assistant_spans() in "
            "tests/oracle/make_data_fixtures.py); ids: tokenizer.json encode(text, add_special_tokens=False); "
            "labels: the id where the token's offsets overlap a span, else -100",
            templates=templates,
        )
    )

    files["alpaca.jsonl"] = jsonl(ALPACA_RECORDS)
    files["messages.jsonl"] = jsonl({"messages": c["messages"]} for c in CONVERSATIONS)
    files["text.jsonl"] = jsonl(TEXT_RECORDS)
    files["bad.jsonl"] = "".join(line + "\n" for line in BAD_LINES)
    for k, line in enumerate(BAD_LINES):
        try:
            json.loads(line)
            assert k != 2
        except json.JSONDecodeError:
            assert k == 2

    files["VERSIONS.json"] = dumps(
        {
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "jinja2": jinja2.__version__,
        }
    )
    for name, content in files.items():
        (OUT_DIR / name).write_text(content, encoding="utf-8")

    # transformers reads the directory the same way (no BOS/EOS added on encode).
    hf = AutoTokenizer.from_pretrained(str(OUT_DIR))
    assert hf.bos_token == "<|begin_of_text|>" and hf.eos_token == "<|eot_id|>" and hf.pad_token == "<pad>"
    for e in enc:
        assert hf.encode(e["text"], add_special_tokens=True) == e["ids"], e["text"]
        assert hf.decode(e["ids"], skip_special_tokens=False) == e["decoded"], e["text"]

    total = 0
    for p in sorted(OUT_DIR.iterdir()):
        size = p.stat().st_size
        total += size
        print(f"{p.relative_to(REPO_ROOT)}  {size:7d}  sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    print(f"total {total} bytes")
    assert total < MAX_TOTAL_BYTES, total
    return 0


if __name__ == "__main__":
    sys.exit(main())
