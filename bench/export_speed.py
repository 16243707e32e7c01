"""GGUF export: time and peak memory of `tunebook export`, and llama.cpp's decode speed on
what it writes, in the same run.

    bash bench/llamacpp_setup.sh          # once: prebuilt llama.cpp into ~/.cache/tunebook
    .venv/bin/python bench/export_speed.py [--source RUN_OR_MODEL] [--runs 5]

1. Exports SOURCE (default: the SmolLM2-135M-Instruct GGUF; give a LoRA run to include
   the merge) to q8_0 and q4_k_m, and to f32 for the size of one f32 copy. Prints wall
   time and the peak RSS of each export process (goal: peak RSS < 1.5x the f32 model's
   size, i.e. the loaded model plus about one tensor).
2. llama.cpp decode tok/s (2 pinned threads, 128-token prompt, 64 greedy tokens) on the
   original GGUF and on our exports, interleaved --runs times; medians and ratios to the
   original (goal for q4_k_m >= 0.95x). Also q4_1 (the original's own types, like for
   like), q5_0 (what q4_k_m falls back to on SmolLM2's 576-wide rows) and `--quant
   source` (its bytes copied: the bench's own noise floor).
Run it on an idle machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))


def export(source, out, quant):
    """Wall seconds and peak RSS (bytes) of one `tunebook export` process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["tunebook", "export", source, "--gguf", out, "--quant", quant], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"tunebook export {quant} failed:\n{p.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def decode_tok_s(model):
    out = subprocess.run(["node", os.path.join(ROOT, "bench/llamacpp_ref.mjs"), "--model", model, "--threads", "2",
                          "--prompt-tokens", "128", "--gen-tokens", "64", "--sequences", "1"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"llama.cpp failed (run bash bench/llamacpp_setup.sh first):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["single"]["decode_tok_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=GGUF)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        files = {}
        rows = []
        for quant in ["f32", "q8_0", "q4_k_m", "q4_1", "q5_0", "source"]:
            files[quant] = os.path.join(d, f"out-{quant}.gguf")
            wall, rss = export(a.source, files[quant], quant)
            rows.append((quant, wall, rss, os.path.getsize(files[quant])))
        f32_size = rows[0][3]
        print(f"source: {a.source}")
        print(f"{'export':>8} {'seconds':>8} {'peak RSS MB':>12} {'file MB':>8} {'RSS / f32 model':>16}")
        for quant, wall, rss, size in rows:
            print(f"{quant:>8} {wall:8.2f} {rss / 1e6:12.1f} {size / 1e6:8.1f} {rss / f32_size:15.2f}x")
        models = {"original": GGUF, "q4_k_m": files["q4_k_m"], "q4_1": files["q4_1"], "q5_0": files["q5_0"], "source": files["source"]}
        speeds = {k: [] for k in models}
        for _ in range(a.runs):
            for k, m in models.items():
                speeds[k].append(decode_tok_s(m))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        print(f"llama.cpp decode tok/s, 2 threads, median of {a.runs} interleaved runs:")
        for k, v in speeds.items():
            print(f"  {k:>8} {med[k]:6.1f}  {med[k] / med['original']:.2f}x  {v}")
        print(f"ratio q4_k_m / original: {med['q4_k_m'] / med['original']:.2f}x (goal >= 0.95x)")


if __name__ == "__main__":
    main()
