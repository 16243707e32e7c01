"""Reference data for GGUF export checks that need a SentencePiece vocabulary and
models written by transformers.

Writes, beside this file:
  - tiny_spm_tokenizer/: a Llama 2 style tokenizer. SentencePiece (BPE, byte_fallback,
    split digits, 512 pieces: <unk>, <s>, </s>, the 256 <0xXX> byte pieces, then merges
    and characters) is trained on CORPUS below and converted by transformers 5's own
    conversion (AutoTokenizer on tokenizer.model), which writes tokenizer.json and
    tokenizer_config.json as a Llama 2 / Mistral v0.1 checkpoint carries them.
  - export_reference.json:
      * "spm": what llama.cpp's converter takes from tokenizer.model for each piece (the
        SentencePiece score and token type), the ids SentencePiece itself gives each of
        TEXTS, and the ids the converted Hugging Face tokenizer gives (with specials parsed,
        as llama.cpp tokenizes with parse_special);
      * "models": three tiny models made by transformers 5 with this tokenizer's vocabulary
        (llama2: plain Llama; llama31: Llama 3.1 rope scaling; qwen2: q/k/v biases and tied
        embeddings), each with the exact config.json text save_pretrained wrote, the saved
        tensors' names, dtypes and shapes, and for PROMPTS (encoded with BOS by the Hugging
        Face tokenizer) the 16-token greedy continuation with the KV cache and its smallest
        top-1/top-2 logit margin.
No weight file is committed: the weights follow make_config_reference.py's WEIGHT_FORMULA.

Usage (in a venv with torch, transformers>=5, safetensors, numpy, sentencepiece; CPU):
    python lib/tests/data/make_export_reference.py
Made with: python 3.11.7, torch 2.15.0+cu132 (CPU), transformers 5.25.0, tokenizers 0.23.3,
sentencepiece 0.2.3.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_config_reference import WEIGHT_FORMULA, formula_values, r6, saved_tensors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "export_reference.json")
TOKENIZER_DIR = os.path.join(HERE, "tiny_spm_tokenizer")
STEPS = 16

CORPUS = """\
The quick brown fox jumps over the lazy dog. A fine-tuned model answers questions about dates,
capitals and colours: the capital of France is Paris, of Italy is Rome, of Japan is Tokyo.
Write the date 5 March 2024 as YYYY-MM-DD: 2024-03-05. Write 28 December 1992: 1992-12-28.
Training runs log their loss at every step; checkpoints are written to the run directory and
registered models are served behind an endpoint that speaks the OpenAI chat completions API.
    Indented lines keep their spaces,   and runs of spaces   are pieces too.
Numbers like 12345, 3.14159 and 1,000,000 are split into single digits by the tokenizer.
Punctuation (brackets), [squares], {braces}; quotes "double" and 'single' -- dashes -- and
slashes / back\\slashes. Tabs\tand newlines
are whitespace as well. Café, naïve, Zürich and São Paulo carry accents; 東京 and 日本語 are
written in other scripts, and emoji 🚀🙂 fall back to bytes when no piece covers them.
Evaluation compares exact match, ROUGE-L and BLEU between the base model and the fine-tune.
Quantized GGUF files run in llama.cpp and Ollama on laptops, phones and servers alike.
"""

# Texts tokenized by SentencePiece, by the converted tokenizer, and (in the tests) by
# llama.cpp from the exported GGUF.
TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "Write the date 5 March 2024 as YYYY-MM-DD.",
    "  two leading spaces and   three inside",
    "tabs\tand\nnewlines\n\nhere",
    "Ünïcödé, 日本語 and emoji 🚀 fall back to bytes",
    "Zürich, São Paulo, café",
    "12345 + 678 = 13023",
    "<s>special tokens</s> in the text",
    "trailing space ",
    "x",
]
PROMPTS = [
    "The capital of France is",
    "Write the date 5 March 2024 as",
    "Ünïcödé 🚀 and numbers 12345",
]

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256, bos_token_id=1,
              eos_token_id=2)

MODELS = [
    ("llama2", lambda v: LlamaConfig(vocab_size=v, **COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    ("llama31", lambda v: LlamaConfig(vocab_size=v, **COMMON, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32})),
    ("qwen2", lambda v: Qwen2Config(vocab_size=v, **COMMON, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                    use_sliding_window=False, max_window_layers=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
]


def train_tokenizer(work):
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(CORPUS * 3)
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(work, "m"), vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    src = os.path.join(work, "spm_src")
    os.makedirs(src)
    shutil.copy(os.path.join(work, "m.model"), os.path.join(src, "tokenizer.model"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}, f)
    tok = AutoTokenizer.from_pretrained(src)
    if os.path.exists(TOKENIZER_DIR):
        shutil.rmtree(TOKENIZER_DIR)
    tok.save_pretrained(TOKENIZER_DIR)
    assert sorted(os.listdir(TOKENIZER_DIR)) == ["tokenizer.json", "tokenizer_config.json"], os.listdir(TOKENIZER_DIR)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(work, "m.model"))
    return sp, AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def spm_reference(sp, tok):
    # llama.cpp's SentencePieceTokenTypes: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
    def ttype(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_unused(i):
            return 5
        if sp.is_byte(i):
            return 6
        return 1
    n = sp.get_piece_size()
    assert n == len(tok.get_vocab()), (n, len(tok.get_vocab()))
    assert all(tok.convert_ids_to_tokens(i) == sp.id_to_piece(i) for i in range(n))
    texts = []
    for t in TEXTS:
        texts.append({"text": t, "sentencepiece": sp.encode(t), "hf": tok.encode(t, add_special_tokens=False)})
    return {
        "pieces": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "token_types": [ttype(i) for i in range(n)],
        "texts": texts,
        "sentencepiece_and_hf_agree_on": [t["text"] for t in texts if t["sentencepiece"] == t["hf"]],
    }


def greedy(model, ids):
    out_ids, margins = [], []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(STEPS):
            logits = out.logits[0, -1]
            top2 = torch.topk(logits, 2).values
            nxt = int(logits.argmax())
            out_ids.append(nxt)
            margins.append(float(top2[0] - top2[1]))
            out = model(torch.tensor([[nxt]]), cache=out.cache, use_cache=True)
    return out_ids, r6(min(margins))


def build_model(name, make_config, vocab, tok, work):
    config = make_config(vocab)
    model = AutoModelForCausalLM.from_config(config)
    probe = os.path.join(work, name + "_probe")
    model.save_pretrained(probe)
    _, probe_tensors = saved_tensors(probe)
    sd = model.state_dict()
    with torch.no_grad():
        for tname, t in probe_tensors.items():
            sd[tname].copy_(torch.from_numpy(formula_values(tname, tuple(t.shape)).astype(np.float32)))
    d = os.path.join(work, name)
    model.save_pretrained(d)
    layout, tensors = saved_tensors(d)
    for tname, t in tensors.items():
        assert torch.equal(t, torch.from_numpy(formula_values(tname, tuple(t.shape)).astype(np.float32))), tname
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = []
    for p in PROMPTS:
        ids = tok.encode(p)
        assert ids[0] == 1, ids
        gen, margin = greedy(model, ids)
        prompts.append({"text": p, "input_ids": ids, "greedy_ids": gen, "min_top1_top2_margin": margin})
        assert margin > 1e-3, (name, p, margin)
    print(name, [p["greedy_ids"] for p in prompts], file=sys.stderr)
    return {"name": name, "model_type": config.model_type, "config": open(os.path.join(d, "config.json")).read(),
            "safetensors": layout, "prompts": prompts}


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
    with tempfile.TemporaryDirectory() as work:
        sp, tok = train_tokenizer(work)
        spm_ref = spm_reference(sp, tok)
        vocab = sp.get_piece_size()
        models = [build_model(name, make, vocab, tok, work) for name, make in MODELS]
    ref = {
        "generator": "lib/tests/data/make_export_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sentencepiece": spm.__version__,
        "greedy": f"{STEPS} steps, argmax, KV cache, f32, eager attention, not stopped at EOS",
        "weight_formula": WEIGHT_FORMULA,
        "spm": spm_ref,
        "models": models,
    }
    with open(OUT, "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", OUT, os.path.getsize(OUT), "bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
