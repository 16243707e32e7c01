"""One LoRA training step (forward + backward) on SmolLM2-135M, batch 4 x 256:
tunebook vs PyTorch + PEFT, in the same run. Prints step time, tokens/s and peak RSS for both,
the ratios, and tunebook's per-op breakdown.

Run with a Python that has torch, transformers, gguf and peft (e.g. ~/.cache/tunebook/refvenv):
    ~/.cache/tunebook/refvenv/bin/python bench/lora_step.py
LoRA: r 16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down; f32; labels = inputs.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = int(os.environ.get("BENCH_BATCH", "4"))
T = int(os.environ.get("BENCH_SEQ", "256"))
STEPS = int(os.environ.get("BENCH_STEPS", "3"))
GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))


def reference():
    """Runs in a child process so its peak RSS is its own."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count())))
    d, f = os.path.split(GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    fwd, bwd = [], []
    for step in range(STEPS + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if step > 0:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        print(f"  reference step {step}: loss {loss.item():.4f} forward {t1 - t0:.2f}s backward {t2 - t1:.2f}s", file=sys.stderr)
    f, b = statistics.median(fwd), statistics.median(bwd)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("REF " + json.dumps({"forward_s": f, "backward_s": b, "step_s": f + b, "tokens_per_s": B * T / (f + b),
                               "peak_rss_mib": rss, "torch": torch.__version__, "threads": torch.get_num_threads()}))


def ours():
    env = dict(os.environ, TUNEBOOK_PROFILE="1", BENCH_BATCH=str(B), BENCH_SEQ=str(T), BENCH_STEPS=str(STEPS))
    cmd = ". scripts/env.sh && cargo_ test -q -p tunebook --test smollm2_reference bench_lora_step_smollm2 -- --ignored --nocapture"
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    for line in out.stderr.splitlines():
        if line.startswith("step "):
            print("  tunebook " + line, file=sys.stderr)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    sys.exit(f"tunebook benchmark failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--reference-child":
        reference()
        return
    print(f"LoRA step on {os.path.basename(GGUF)}, batch {B}x{T}, f32, {os.cpu_count()} cores", file=sys.stderr)
    us = ours()
    child = subprocess.run([sys.executable, __file__, "--reference-child"], capture_output=True, text=True)
    sys.stderr.write(child.stderr[-2000:] if child.returncode else "".join(l + "\n" for l in child.stderr.splitlines() if "reference step" in l))
    ref = next((json.loads(l[4:]) for l in child.stdout.splitlines() if l.startswith("REF ")), None)
    if ref is None:
        sys.exit("reference failed")
    print(f"{'':24}{'tunebook':>12}{'PyTorch+PEFT':>14}{'ratio':>8}")
    for key, label in [("forward_s", "forward (s)"), ("backward_s", "backward (s)"), ("step_s", "step (s)")]:
        print(f"{label:24}{us[key]:12.2f}{ref[key]:14.2f}{ref[key] / us[key]:7.2f}x")
    print(f"{'tokens/s':24}{us['tokens_per_s']:12.1f}{ref['tokens_per_s']:14.1f}{us['tokens_per_s'] / ref['tokens_per_s']:7.2f}x")
    print(f"{'peak RSS (MiB)':24}{us['peak_rss_mib']:12.0f}{ref['peak_rss_mib']:14.0f}{us['peak_rss_mib'] / ref['peak_rss_mib']:7.2f}x")
    print(f"tunebook GEMM: {us['gemm']}, {us['threads']} threads; reference torch {ref['torch']}, {ref['threads']} threads")
    print("where tunebook's step goes (fused ops; the rest is candle's elementwise ops and autograd bookkeeping):")
    total = us["step_s"]
    accounted = 0.0
    for p in us["profile"]:
        accounted += p["seconds_per_step"]
        print(f"  {p['op']:20}{p['seconds_per_step']:8.3f}s {100 * p['seconds_per_step'] / total:5.1f}%  ({p['calls_per_step']} calls)")
    print(f"  {'other':20}{total - accounted:8.3f}s {100 * (total - accounted) / total:5.1f}%")


if __name__ == "__main__":
    main()
