"""Serving speed on SmolLM2-135M-Instruct (Q4_1 GGUF, 2 threads): `tunebook serve` through
HTTP (the official `openai` client, streaming) against llama.cpp on the same GGUF and
thread count (through node-llama-cpp, bench/llamacpp_ref.mjs), in the same run.

    bash bench/llamacpp_setup.sh          # once: prebuilt llama.cpp into ~/.cache/tunebook
    .venv/bin/python bench/serve_speed.py [--runs 3] [--gen 64] [--prompt-tokens 128]

Prints, with medians over --runs and ratios:
  * single-stream greedy decode tok/s (goal >= 1.0x llama.cpp),
  * aggregate decode tok/s of 8 concurrent streams (goal >= 3x our single stream and
    >= 1.0x llama.cpp with 8 sequences), and time to first token p50/p95 under that load,
  * decode tok/s of an unmerged rank-16 adapter on all seven projections vs the base
    (goal >= 0.85x),
each for the exact default and for `--int8-activations` (activations rounded to 8 bits
for the Q4 weights, as llama.cpp computes).
Decode tok/s of a stream = (tokens - 1) / (time of its last token - time of its first):
prefill is reported separately as time to first token, as llama.cpp's script does.
Run it on an idle machine: a build alongside makes every number meaningless.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from peft_adapter import write_adapter  # noqa: E402

import openai  # noqa: E402

GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
TEXT = ("The history of computing is a story of people finding ways to make machines do arithmetic, store information, "
        "and communicate. Early mechanical calculators gave way to electronic computers, and the transistor made them "
        "small and cheap enough for every office and home. ")


def llamacpp(threads, prompt_tokens, gen, sequences):
    out = subprocess.run(["node", os.path.join(ROOT, "bench/llamacpp_ref.mjs"), "--model", GGUF, "--threads", str(threads),
                          "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen), "--sequences", str(sequences)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"llama.cpp reference failed (run bash bench/llamacpp_setup.sh first):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stream_one(client, model, prompt, gen, out, i):
    t0 = time.perf_counter()
    times = []
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=gen, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    # Each chunk carries one token's text except where UTF-8 or a stop string holds text back;
    # the count is the request's `max_tokens` (EOS ignored).
    out[i] = {"ttft": times[0] - t0, "decode_tok_s": (gen - 1) / (times[-1] - times[0]), "start": t0, "end": times[-1], "times": times}


def concurrent(client, model, prompt, gen, n):
    out = [None] * n
    threads = [threading.Thread(target=stream_one, args=(client, model, prompt, gen, out, i)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Aggregate decode rate: tokens per second while every stream is decoding (from the
    # last stream's first token to the first stream's end), as llama.cpp's figure counts
    # decode steps only; and over the whole run, prefills included.
    t0, t1 = max(o["times"][0] for o in out), min(o["end"] for o in out)
    steady = sum(sum(1 for t in o["times"] if t0 < t <= t1) for o in out) / (t1 - t0) if t1 > t0 else float("nan")
    whole = n * gen / (max(o["end"] for o in out) - min(o["start"] for o in out))
    return out, steady, whole


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as d:
        write_adapter(os.path.join(d, "r16"), GGUF, rank=16, seed=3, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        runs = {label: measure(args, env, d, extra) for label, extra in (("exact", []), ("int8", ["--int8-activations"]))}
    ref = llamacpp(args.threads, args.prompt_tokens, args.gen, args.streams)
    med = statistics.median
    ls, la = ref["single"]["decode_tok_s"], ref["multi"]["aggregate_decode_tok_s"]
    ex, i8 = runs["exact"], runs["int8"]
    print(f"SmolLM2-135M Q4_1, {args.threads} threads, prompt {ex['prompt_tokens']} tokens, {args.gen} new tokens, {args.runs} runs (medians)")
    print(f"{'':40s}{'tunebook':>10s}{'(ratio)':>8s}{'--int8-act.':>12s}{'(ratio)':>8s}{'llama.cpp':>11s}")
    def row(name, a, b, ref_value, goal):
        ra = f"{a / ref_value:8.2f}" if ref_value else " " * 8
        rb = f"{b / ref_value:8.2f}" if ref_value else " " * 8
        refs = f"{ref_value:11.1f}" if ref_value else " " * 11
        print(f"{name:40s}{a:10.1f}{ra}{b:12.1f}{rb}{refs}   {goal}")
    s, a, s8, a8 = med(ex["single"]), med(ex["aggregate"]), med(i8["single"]), med(i8["aggregate"])
    row("single-stream decode tok/s", s, s8, ls, "goal >= 1.0x llama.cpp")
    row(f"{args.streams} streams aggregate decode tok/s", a, a8, la, "goal >= 1.0x llama.cpp")
    print(f"{f'{args.streams} streams / our single stream':40s}{a / s:10.2f}{'':8s}{a8 / s8:12.2f}{'':8s}{la / ls:11.2f}   goal >= 3.0")
    print(f"{f'{args.streams} streams tok/s incl. prefill (wall)':40s}{med(ex['whole']):10.1f}{'':8s}{med(i8['whole']):12.1f}")
    for label, r in (("", ex), (" int8", i8)):
        print(f"{f'TTFT p50 / p95 under load{label} (ms)':40s}{1000 * pct(r['ttft'], 50):10.0f} / {1000 * pct(r['ttft'], 95):.0f}"
              f"   (llama.cpp, all {args.streams} prompts prefilled together: {ref['multi']['ttft_ms']:.0f})")
    row("rank-16 adapter / base decode", med(ex["adapter"]) / s, med(i8["adapter"]) / s8, 0, "goal >= 0.85")
    print(json.dumps({"exact": ex, "int8": i8, "llamacpp": {"single": ls, "aggregate": la, "ttft_ms": ref["multi"]["ttft_ms"],
                                                           "versions": ref["versions"]}}))


def measure(args, env, d, extra):
    proc = subprocess.Popen(["tunebook", "serve", GGUF, "--served-model-name", "smol", "--adapter", f"r16={d}/r16",
                             "--max-concurrency", str(args.streams), *extra], stdout=subprocess.PIPE, text=True, env=env)
    url = None
    for line in proc.stdout:
        if "ready at " in line:
            url = line.split("ready at ", 1)[1].strip()
            break
    if url is None:
        sys.exit("tunebook serve did not start")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    # A prompt of about --prompt-tokens tokens: scale a word count, then step it.
    count = lambda text: client.completions.create(model="smol", prompt=text, max_tokens=1).usage.prompt_tokens
    words = (TEXT * 20).split(" ")
    k = int(args.prompt_tokens * len(TEXT.split(" ")) / count(TEXT))
    while count(" ".join(words[:k])) > args.prompt_tokens:
        k -= 1
    while count(" ".join(words[: k + 1])) <= args.prompt_tokens:
        k += 1
    prompt = " ".join(words[:k])
    r = {"prompt_tokens": count(prompt), "single": [], "adapter": [], "aggregate": [], "whole": [], "ttft": []}
    for _ in range(args.runs):
        o = [None]
        stream_one(client, "smol", prompt, args.gen, o, 0)
        r["single"].append(o[0]["decode_tok_s"])
        stream_one(client, "r16", prompt, args.gen, o, 0)
        r["adapter"].append(o[0]["decode_tok_s"])
        out, rate, w = concurrent(client, "smol", prompt, args.gen, args.streams)
        r["aggregate"].append(rate)
        r["whole"].append(w)
        r["ttft"] += [x["ttft"] for x in out]
    proc.terminate()
    proc.wait(30)
    return r


if __name__ == "__main__":
    main()
