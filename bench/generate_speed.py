"""Greedy generation speed on SmolLM2-135M-Instruct (GGUF, f32): tunebook's CLI vs Hugging Face
transformers, same prompt, same number of new tokens (EOS ignored), in the same run.

    ~/.cache/tunebook/refvenv/bin/python bench/generate_speed.py [--tokens 128] [--runs 3]
Runs the CLI through `cargo_ run` (dev profile: dependencies at opt-level 3) and a Python with torch + transformers + gguf.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
PROMPT = "Write a short story about a robot who learns to paint."


def ours(tokens, runs):
    cmd = f'. scripts/env.sh && cargo_ run -q -p tunebook -- generate --model "{GGUF}" --chat "{PROMPT}" --max-tokens {tokens} --ignore-eos'
    rates = []
    for _ in range(runs):
        out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True)
        m = re.search(r"(\d+) generated in ([\d.]+)s", out.stderr)
        if not m:
            sys.exit(f"tunebook generate failed:\n{out.stderr[-2000:]}")
        rates.append(int(m.group(1)) / float(m.group(2)))
    return statistics.median(rates), out.stdout.strip()


def reference(tokens, runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    d, f = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    x = tok(text, return_tensors="pt", add_special_tokens=False)
    rates = []
    with torch.inference_mode():
        model.generate(**x, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            out = model.generate(**x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            rates.append((out.shape[1] - x["input_ids"].shape[1]) / (time.perf_counter() - t))
    return statistics.median(rates), tok.decode(out[0, x["input_ids"].shape[1]:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    us, us_text = ours(a.tokens, a.runs)
    ref, ref_text = reference(a.tokens, a.runs)
    print(f"greedy generation, {a.tokens} new tokens, SmolLM2-135M f32, {os.cpu_count()} cores (median of {a.runs})")
    print(f"  tunebook      {us:8.1f} tok/s")
    print(f"  transformers  {ref:8.1f} tok/s")
    print(f"  ratio         {us / ref:8.2f}x")
    same = us_text.strip()[:80] == ref_text.replace("<|im_end|>", "").strip()[:80]
    print(f"  same first 80 characters of text: {same}")


if __name__ == "__main__":
    main()
