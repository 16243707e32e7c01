#!/usr/bin/env python3
"""Regenerates the tokenizer and chat-template reference data in this folder.

The references come from Hugging Face `tokenizers` and `transformers`, which
tunebook's tokenizer module must match token for token. Run it from a venv that
is not the project's (it needs tokenizers, transformers, gguf and jinja2):

    python3 -m venv ~/.cache/tunebook/refvenv-data
    ~/.cache/tunebook/refvenv-data/bin/pip install tokenizers transformers gguf jinja2
    ~/.cache/tunebook/refvenv-data/bin/python lib/tests/data/make_reference.py

Writes:
* `tiny_tokenizer/tokenizer.json` + `tokenizer_config.json`: a small byte-level
  BPE trained here (Llama-3-style split regex, a BOS-adding post-processor and a
  chat template that writes `{{ bos_token }}` itself: the double-BOS trap).
* `tiny_tokenizer_reference.json`: ids for the test texts, with and without
  special tokens, decodings, and `apply_chat_template` ids.
* `smollm2_reference.json` (needs `$TUNEBOOK_SMOLLM2_GGUF`): SmolLM2 ids for the
  test texts and the chat template rendered and tokenized. The reference is HF
  `tokenizers` built from the GGUF vocabulary and merges with the pre-tokenizer
  SmolLM2's own `tokenizer.json` declares (`Digits(individual_digits)` then
  `ByteLevel`), which is what llama.cpp's `smollm` pre-tokenizer implements.
  transformers' GGUF loader does not know the `smollm` pre-tokenizer and falls
  back to plain GPT-2 splitting (digit runs stay together); its ids are recorded
  too, as `gguf_loader_ids`, to show where it differs.
* `chat_templates_reference.json`: templates exercising what HF's Jinja
  environment offers (trim/lstrip blocks, loop controls, namespace, tojson,
  raise_exception, Python string methods), rendered by transformers.
"""
import json
import os
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent

TEXTS = [
    "",
    " ",
    "\n",
    "Hello world",
    "Hello, World!",
    "  leading and trailing spaces  ",
    "multiple   internal    spaces",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Numbers 12345 and 3.14159 and 1,000,000 on 2024-01-31",
    "ABC123def456 x²+y³ ½ ٣٤ ①",
    "Café naïve résumé façade Ångström",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ ー",
    "한국어 텍스트입니다",
    "Россия и Україна",
    "مرحبا بالعالم",
    "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "zero\u200bwidth and\u00a0nbsp",
    "def foo(x):\n    return x ** 2  # comment\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).collect();\n\tprintln!(\"{v:?}\");\n}\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "    indented\n        more\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "<|im_start|>user\nhi<|im_end|>\n",
]

MESSAGE_SETS = {
    "user_only": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user_assistant": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name three primes."},
        {"role": "assistant", "content": "2, 3 and 5."},
    ],
    "awkward_content": [
        {"role": "user", "content": "  <b>bold</b> & 'quotes' \"double\"\n\ttabs  "},
        {"role": "assistant", "content": "Ünïcödé 你好 😀\n\n```json\n{\"a\": [1, 2]}\n```"},
    ],
}

# Templates written for these tests, one feature set each.
TEMPLATES = {
    "chatml_default_system": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3_style": (
        "{{ bos_token }}\n"
        "{% set ns = namespace(system='') %}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}\n"
        "        {% set ns.system = message['content'] | trim %}\n"
        "        {% continue %}\n"
        "    {% endif %}\n"
        "    {% if loop.index0 == 0 or (loop.index0 == 1 and messages[0]['role'] == 'system') %}\n"
        "        {{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + (ns.system if ns.system else 'Be helpful.') + '<|eot_id|>' }}\n"
        "    {% endif %}\n"
        "    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "    {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{% endif %}\n"
    ),
    "alternating_strict": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is not none %}{{ '[INST] ' + system + '\\n\\n' + message['content'].strip() + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% endif %}"
        "{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "tools_and_string_methods": (
        "{%- if tools %}\n"
        "{{- '<tools>\\n' }}\n"
        "{%- for tool in tools %}\n"
        "{{- tool | tojson(indent=2) }}\n"
        "{{- '\\n' }}\n"
        "{%- endfor %}\n"
        "{{- '</tools>\\n' }}\n"
        "{%- endif %}\n"
        "{%- for message in messages %}\n"
        "{%- set role = message.role | upper %}\n"
        "{%- if message.content is string and message.content.startswith('  ') %}\n"
        "{{- role + ' (indented): ' + message.content.lstrip() }}\n"
        "{%- else %}\n"
        "{{- role + ': ' + message.content.replace('\\n', ' / ') }}\n"
        "{%- endif %}\n"
        "{{- ' [' + (message.content.split() | length) | string + ' words]\\n' }}\n"
        "{%- endfor %}\n"
        "{{- {'n': messages | length, 'last': messages[-1].role, 'text': '<&>'} | tojson }}\n"
        "{%- if add_generation_prompt %}{{- '\\nASSISTANT:' }}{%- endif %}\n"
    ),
    "gemma_style_loop_break": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set first = messages[0]['content'] | trim + '\\n\\n' %}{% set rest = messages[1:] %}"
        "{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
        "{% for message in rest %}"
        "{% if loop.index > 6 %}{% break %}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def write_json(name, value):
    path = HERE / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    print("wrote", path)


def tiny_tokenizer():
    corpus = [t for t in TEXTS if t] * 4 + [
        "The assistant answers questions about capitals, primes and code.",
        "user assistant system You are a helpful assistant. Be helpful.",
        "What is the capital of France? Paris is the capital of France.",
    ] * 8
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    out = HERE / "tiny_tokenizer"
    out.mkdir(exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
        "add_bos_token": True,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": TEMPLATES["llama3_style"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    ref = {
        "texts": TEXTS,
        "ids_with_special": [hf.encode(t, add_special_tokens=True) for t in TEXTS],
        "ids": [hf.encode(t, add_special_tokens=False) for t in TEXTS],
        "decoded": [hf.decode(hf.encode(t, add_special_tokens=False)) for t in TEXTS],
        "bos_id": hf.bos_token_id,
        "eos_id": hf.eos_token_id,
        "pad_id": hf.pad_token_id,
        "chats": {},
    }
    for name, messages in MESSAGE_SETS.items():
        for agp in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp, return_dict=False)
            assert ids.count(hf.bos_token_id) == 1, "reference shows a double BOS"
            ref["chats"][f"{name}/{agp}"] = {"messages": messages, "add_generation_prompt": agp, "text": text, "ids": ids}
    write_json("tiny_tokenizer_reference.json", ref)


def read_gguf_tokenizer(path):
    """The tokenizer fields of a GGUF file, named as transformers' GGUF loader names them."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        vals = [f.parts[i] for i in f.data]
        if f.types and f.types[0].name == "ARRAY":
            if f.types[-1].name == "STRING":
                return [bytes(v).decode("utf-8") for v in vals]
            return [v.tolist()[0] for v in vals]
        if f.types[0].name == "STRING":
            return bytes(vals[0]).decode("utf-8")
        return vals[0].tolist()[0]

    d = {
        "tokenizer_type": field("tokenizer.ggml.model"),
        "pre_tokenizer_type": field("tokenizer.ggml.pre"),
        "tokens": field("tokenizer.ggml.tokens"),
        "token_type": field("tokenizer.ggml.token_type"),
        "merges": field("tokenizer.ggml.merges"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": field("tokenizer.ggml.padding_token_id"),
    }
    return d, field("tokenizer.chat_template"), field("general.architecture")


def smollm2(gguf_path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    d, template, arch = read_gguf_tokenizer(gguf_path)
    backend, _ = convert_gguf_tokenizer(arch, d)
    loader_ids = [backend.encode(t, add_special_tokens=False).ids for t in TEXTS]
    # SmolLM2's published tokenizer.json pre-tokenizer (llama.cpp calls it `smollm`).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    )
    tokens = d["tokens"]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[d["bos_token_id"]],
        eos_token=tokens[d["eos_token_id"]],
        pad_token=tokens[d["pad_token_id"]],
    )
    hf.chat_template = template
    ref = {
        "pre_tokenizer_type": d["pre_tokenizer_type"],
        "texts": TEXTS,
        "ids": [hf.encode(t, add_special_tokens=False) for t in TEXTS],
        "gguf_loader_ids": loader_ids,
        "decoded": [hf.decode(hf.encode(t, add_special_tokens=False)) for t in TEXTS],
        "bos_id": d["bos_token_id"],
        "eos_id": d["eos_token_id"],
        "pad_id": d["pad_token_id"],
        "special_tokens": [t for t, ty in zip(tokens, d["token_type"]) if ty == 3],
        "chats": {},
    }
    for name, messages in MESSAGE_SETS.items():
        for agp in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp, return_dict=False)
            ref["chats"][f"{name}/{agp}"] = {"messages": messages, "add_generation_prompt": agp, "text": text, "ids": ids}
    write_json("smollm2_reference.json", ref)


def chat_templates():
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    cases = []
    for tname, template in TEMPLATES.items():
        for mname, messages in MESSAGE_SETS.items():
            for agp in (False, True):
                case = {"template": tname, "messages": mname, "add_generation_prompt": agp}
                kwargs = {"tools": TOOLS} if tname == "tools_and_string_methods" and mname == "user_only" else {}
                case["with_tools"] = bool(kwargs)
                try:
                    case["rendered"] = hf.apply_chat_template(
                        messages, chat_template=template, tokenize=False, add_generation_prompt=agp, **kwargs
                    )
                except Exception as e:  # the template raised: the Rust side must raise too
                    case["error"] = str(e)
                cases.append(case)
    # a conversation that breaks the alternation rule of `alternating_strict`
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    try:
        hf.apply_chat_template(bad, chat_template=TEMPLATES["alternating_strict"], tokenize=False)
        raise SystemExit("expected the template to raise")
    except Exception as e:
        cases.append({"template": "alternating_strict", "messages": "_two_users", "add_generation_prompt": False, "with_tools": False, "error": str(e)})
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write_json(
        "chat_templates_reference.json",
        {"templates": TEMPLATES, "message_sets": {**MESSAGE_SETS, "_two_users": bad}, "tools": TOOLS, "special_tokens": special, "cases": cases},
    )


if __name__ == "__main__":
    tiny_tokenizer()
    chat_templates()
    gguf = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if os.path.exists(gguf):
        smollm2(gguf)
    else:
        print(f"skipped SmolLM2 references: {gguf} not found", file=sys.stderr)
