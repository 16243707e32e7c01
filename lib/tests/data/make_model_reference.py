"""Reference outputs of Hugging Face transformers on the SmolLM2-135M-Instruct GGUF (f32).

Writes smollm2_model_reference.json beside this file: for each prompt its token ids, the top-10
next-token ids and logits at the last position (and at a few earlier positions), and a
32-token greedy continuation (argmax every step, not stopped at EOS).

Usage (in a venv with torch, transformers, gguf):
    python lib/tests/data/make_model_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
The GGUF path defaults to $TUNEBOOK_SMOLLM2_GGUF.
"""
import json
import os
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = sys.argv[1] if len(sys.argv) > 1 else os.environ["TUNEBOOK_SMOLLM2_GGUF"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_model_reference.json")
STEPS = 32

PROMPTS = [
    {"kind": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"kind": "chat", "messages": [{"role": "user", "content": "Write a haiku about autumn leaves."}]},
    {"kind": "text", "text": "The quick brown fox jumps over the lazy dog. In 2024, the"},
    {"kind": "text", "text": "def fibonacci(n):\n    "},
    {"kind": "text", "text": "Café crème brûlée, 東京 and 12345 apples"},
]


def topk(logits, k=10):
    v, i = torch.topk(logits, k)
    return {"ids": i.tolist(), "logits": [float(x) for x in v.tolist()]}


def main():
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    d, f = os.path.split(os.path.abspath(GGUF))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    cases = []
    for p in PROMPTS:
        if p["kind"] == "chat":
            text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = p["text"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0]
        positions = sorted(set([0, len(ids) // 2, len(ids) - 1]))
        # Greedy continuation with the KV cache, never stopping early.
        gen, margins = [], []
        with torch.no_grad():
            out = model(x, use_cache=True)
            past = out.past_key_values
            last = out.logits[0, -1]
            for _ in range(STEPS):
                top2 = torch.topk(last, 2).values
                margins.append(float(top2[0] - top2[1]))
                nxt = int(torch.argmax(last))
                gen.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                last = out.logits[0, -1]
        case = dict(p)
        case.update({
            "prompt_text": text,
            "input_ids": ids,
            "top10": {str(pos): topk(logits[pos]) for pos in positions},
            "greedy_ids": gen,
            "greedy_text": tok.decode(gen),
            "greedy_min_margin": min(margins),
        })
        cases.append(case)
        print(repr(text[:60]), len(ids), "->", repr(case["greedy_text"][:60]), file=sys.stderr)
    ref = {
        "model": os.path.basename(GGUF),
        "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "float32",
        "cases": cases,
    }
    with open(OUT, "w") as fh:
        json.dump(ref, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print("wrote", OUT, file=sys.stderr)


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"{time.time() - t:.1f}s", file=sys.stderr)
