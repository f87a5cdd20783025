//! The official Jinja chat templates Graft renders, verbatim (each equals
//! the JSON-decoded `chat_template` of the tokenizer_config.json named by
//! `source` in tests/fixtures/data/templates.json, which transformers
//! rendered to make the fixtures; a test holds these to them): how
//! `data.template = "auto"` recognises a checkpoint's own template, and how a
//! template that is not the checkpoint's is noticed.

/// meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template.
pub const LLAMA2: &str = concat!(
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}",
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}",
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}",
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}",
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}",
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}",
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}",
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
);

/// meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template.
pub const LLAMA3: &str = concat!(
    "{% set loop_messages = messages %}{% for message in loop_messages %}",
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}",
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}",
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}",
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
);

/// teknium/OpenHermes-2.5-Mistral-7B tokenizer_config.json chat_template (ChatML).
pub const CHATML: &str = concat!(
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}",
    "{% endif %}",
);

/// Qwen/Qwen2-7B-Instruct tokenizer_config.json chat_template.
pub const QWEN2: &str = concat!(
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}",
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}",
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}",
    "{% endif %}",
);

/// google/gemma-2-2b-it tokenizer_config.json chat_template.
pub const GEMMA: &str = concat!(
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}",
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}",
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}",
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}",
    "{% endif %}",
);

/// mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json chat_template.
pub const MISTRAL: &str = concat!(
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}",
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}",
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}",
    "{% endif %}{% endfor %}",
);
