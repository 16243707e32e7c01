"""Fine-tuning throughput on SmolLM2-135M: tunebook's trainer vs PyTorch + PEFT, in the same run.

Both do full optimizer steps (forward, backward, gradient clipping, AdamW) on batches of
4 x 256 tokens, f32, every token a target, on the same CPU:
  - LoRA r=8, alpha 16, dropout 0.05 on every linear projection (q/k/v/o/gate/up/down);
  - full fine-tuning (`BENCH_FULL=1`, or `--full`).
tunebook runs `tunebook train CONFIG.toml` (the real trainer, data packing included) and
reads each step's tokens/s from its metric log; the reference is a plain PyTorch loop.
Prints medians over the steps after the first, the ratio, and peak RSS of each process.

Run with a Python that has torch, transformers, gguf and peft (e.g. ~/.cache/tunebook/refvenv),
after `. scripts/env.sh`:
    ~/.cache/tunebook/refvenv/bin/python bench/finetune_speed.py [--full]
"""
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 4, 256
STEPS = int(os.environ.get("BENCH_STEPS", "6"))
FULL = "--full" in sys.argv or os.environ.get("BENCH_FULL") == "1"
GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reference():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    d, f = os.path.split(GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    if not FULL:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(STEPS):
        x = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        times.append(dt)
        print(f"  reference step {step + 1}: loss {loss.item():.4f} {dt:.2f}s", file=sys.stderr)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_s = statistics.median(times[1:])
    print("REF " + json.dumps({"step_s": step_s, "tokens_per_s": B * T / step_s, "peak_rss_mib": rss}))


def ours():
    tmp = tempfile.mkdtemp(prefix="tunebook-bench-")
    # Continued pretraining on random words: every window is full, every token a target.
    rnd = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with open(os.path.join(tmp, "text.jsonl"), "w") as f:
        for _ in range(B * (STEPS + 1) * 2):
            f.write(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(400))}) + "\n")
    lora = "" if FULL else "[lora]\nr = 8\nalpha = 16.0\ndropout = 0.05\n"
    cfg = os.path.join(tmp, "bench.toml")
    with open(cfg, "w") as f:
        f.write(
            f'model = "{GGUF}"\nname = "bench"\ntask = "continued_pretrain"\ntrain_data = "{tmp}/text.jsonl"\n'
            f'training_duration = "{STEPS}ba"\nlearning_rate = 1e-4\ncontext_length = {T}\nbatch_size = {B}\n'
            f"max_grad_norm = 1.0\ndevice = \"cpu\"\n{lora}"
        )
    env = dict(os.environ, TUNEBOOK_RUNS=os.path.join(tmp, "runs"))
    bin_ = os.environ.get("TUNEBOOK_BIN", "tunebook")
    cmd = ["/usr/bin/time", "-f", "MAXRSS %M"] + os.environ.get("BENCH_WRAP", "").split() + [bin_, "train", cfg]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"tunebook train failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rss = next(int(l.split()[1]) for l in out.stderr.splitlines() if l.startswith("MAXRSS")) / 1024
    tps = []
    with open(os.path.join(tmp, "runs", "bench", "metrics.wal")) as f:
        for line in f:
            r = json.loads(line)
            if r["key"] == "throughput/tokens_per_sec":
                tps.append(r["value"])
                print(f"  tunebook step {r['step']}: {B * T / r['value']:.2f}s", file=sys.stderr)
    tokens_per_s = statistics.median(tps[1:])
    return {"step_s": B * T / tokens_per_s, "tokens_per_s": tokens_per_s, "peak_rss_mib": rss}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-child":
        reference()
        return
    kind = "full fine-tuning" if FULL else "LoRA r=8 on all linear layers"
    print(f"SmolLM2-135M {kind}, batch {B}x{T}, f32, {STEPS} steps, {os.cpu_count()} cores", file=sys.stderr)
    us = ours()
    args = [sys.executable, __file__, "--reference-child"] + (["--full"] if FULL else [])
    child = subprocess.run(args, capture_output=True, text=True)
    sys.stderr.write(child.stderr[-3000:] if child.returncode else "".join(l + "\n" for l in child.stderr.splitlines() if "reference step" in l))
    ref = next((json.loads(l[4:]) for l in child.stdout.splitlines() if l.startswith("REF ")), None)
    if ref is None:
        sys.exit("reference failed")
    print(f"{kind}: {'':4}{'tunebook':>12}{'PyTorch+PEFT':>14}{'ratio':>8}")
    print(f"{'step (s, median)':24}{us['step_s']:12.2f}{ref['step_s']:14.2f}{ref['step_s'] / us['step_s']:7.2f}x")
    print(f"{'tokens/s':24}{us['tokens_per_s']:12.1f}{ref['tokens_per_s']:14.1f}{us['tokens_per_s'] / ref['tokens_per_s']:7.2f}x")
    print(f"{'peak RSS (MiB)':24}{us['peak_rss_mib']:12.0f}{ref['peak_rss_mib']:14.0f}{us['peak_rss_mib'] / ref['peak_rss_mib']:7.2f}x")


if __name__ == "__main__":
    main()
