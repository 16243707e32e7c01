"""Data-parallel training on this machine: 2 MPI ranks x 1 thread against 1 process x 2
threads, and the all-reduce of SmolLM2-135M's full gradient, in one run.

1. SmolLM2 LoRA (r=8 on every linear layer, f32), global batch 2 micro-batches x 2 windows
   x 128 tokens: `tunebook train` in one process with 2 threads, then
   `mpirun -n 2 tunebook train` with 1 thread per rank (each rank runs one micro-batch per
   step). Prints the median tokens/s of each (the job's tokens over the step's wall time,
   steps after the first) and their ratio, plus the loss curves' largest relative
   difference.
2. SmolLM2 full fine-tuning under `mpirun -n 2` with TUNEBOOK_PROFILE=1 (which adds a
   barrier before the all-reduce, to separate waiting for the slower rank from the
   transfer): the time in the gradient all-reduce per step (134.5 M f32 values, 538 MB),
   its share of the step, and the bandwidth MPI reached; then the same with `zero_stage = 1` (the weight
   gather adds a second all-reduce of the same size, the moments kept per rank halve).

Needs mpirun (MPICH) and the SmolLM2 GGUF (scripts/setup.sh). After `. scripts/env.sh`:
    python3 bench/scale_out.py
"""
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
BIN = os.environ.get("TUNEBOOK_BIN", "tunebook")
B, T, ACCUM = 2, 128, 2
STEPS = int(os.environ.get("BENCH_STEPS", "8"))
FULL_STEPS = int(os.environ.get("BENCH_FULL_STEPS", "4"))


def write_data(tmp):
    rnd = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    path = os.path.join(tmp, "text.jsonl")
    with open(path, "w") as f:
        for _ in range(B * ACCUM * (STEPS + 2) * 2):
            f.write(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(200))}) + "\n")
    return path


def config(tmp, data, name, steps, extra):
    path = os.path.join(tmp, f"{name}.toml")
    with open(path, "w") as f:
        f.write(
            f'model = "{GGUF}"\nname = "{name}"\ntask = "continued_pretrain"\ntrain_data = "{data}"\n'
            f'training_duration = "{steps}ba"\nlearning_rate = 1e-4\ncontext_length = {T}\nbatch_size = {B}\n'
            f"grad_accum = {ACCUM}\nmax_grad_norm = 1.0\nseed = 1\ndevice = \"cpu\"\n{extra}"
        )
    return path


def run(tmp, cfg, ranks, threads, profile=False):
    env = dict(os.environ, TUNEBOOK_RUNS=os.path.join(tmp, "runs"), RAYON_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    if profile:
        env["TUNEBOOK_PROFILE"] = "1"
    cmd = ([BIN] if ranks == 1 else ["mpirun", "-n", str(ranks), BIN]) + ["train", cfg]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def metric(tmp, name, key):
    vals = []
    with open(os.path.join(tmp, "runs", name, "metrics.wal")) as f:
        for line in f:
            r = json.loads(line)
            if r["key"] == key:
                vals.append((r["step"], r["value"]))
    return [v for _, v in sorted(vals)]


def profile_table(stderr):
    """{timer name: [seconds per step]} from TUNEBOOK_PROFILE lines (both ranks print; the
    lines of one step come in one block per rank, rank 0's first)."""
    per = {}
    for line in stderr.splitlines():
        m = re.match(r"profile step (\d+): (.+?)\s+([0-9.]+)s\s+(\d+) calls", line)
        if m:
            per.setdefault(m.group(2).strip(), []).append((int(m.group(1)), float(m.group(3))))
    return per


def full_ft(tmp, data, zero):
    name = f"full-zero{zero}"
    cfg = config(tmp, data, name, FULL_STEPS, f"zero_stage = {zero}\n")
    out = run(tmp, cfg, 2, 1, profile=True)
    table = profile_table(out.stderr)
    # Both ranks print every timer once per step: take the larger of the two per step
    # (the slower rank's view), steps after the first.
    def per_step(timer):
        by_step = {}
        for step, secs in table.get(timer, []):
            by_step[step] = max(by_step.get(step, 0.0), secs)
        return [v for s, v in sorted(by_step.items()) if s > 1]
    tps = metric(tmp, name, "throughput/tokens_per_sec")[1:]
    step_s = statistics.median(B * ACCUM * T / v for v in tps)
    return {"all_reduce": per_step("step: all-reduce"), "transfer": per_step("step: all-reduce: transfer"),
            "wait": per_step("step: wait for ranks"), "gather": per_step("step: gather weights"), "step_s": step_s,
            "events": [json.loads(l)["message"] for l in open(os.path.join(tmp, "runs", name, "events.jsonl")) if "ZeRO" in l]}


def main():
    tmp = tempfile.mkdtemp(prefix="tunebook-scale-")
    data = write_data(tmp)
    print(f"SmolLM2-135M, global batch {ACCUM} x {B} x {T} tokens, f32, {os.cpu_count()} cores", file=sys.stderr)
    lora = "[lora]\nr = 8\nalpha = 16.0\ndropout = 0.0\n"
    run(tmp, config(tmp, data, "lora-1x2", STEPS, lora), 1, 2)
    run(tmp, config(tmp, data, "lora-2x1", STEPS, lora), 2, 1)
    one = metric(tmp, "lora-1x2", "throughput/tokens_per_sec")[1:]
    two = metric(tmp, "lora-2x1", "throughput/tokens_per_sec")[1:]
    l1, l2 = metric(tmp, "lora-1x2", "loss/train/total"), metric(tmp, "lora-2x1", "loss/train/total")
    diff = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
    print(f"LoRA r=8, {STEPS} steps (medians of steps 2..{STEPS}):")
    print(f"  1 process x 2 threads: {statistics.median(one):8.1f} tokens/s")
    print(f"  2 ranks x 1 thread:    {statistics.median(two):8.1f} tokens/s   ratio {statistics.median(two) / statistics.median(one):.2f}x")
    print(f"  losses: largest relative difference {diff:.2e} over {len(l1)} steps")
    values = 134_515_008
    for zero in (0, 1):
        r = full_ft(tmp, data, zero)
        ar, tr, wait = (statistics.median(r[k]) for k in ("all_reduce", "transfer", "wait"))
        print(f"full fine-tuning, 2 ranks x 1 thread, zero_stage = {zero} ({FULL_STEPS} steps, medians of steps 2..):")
        print(f"  gradient all-reduce: {ar:.3f} s per step, {ar / r['step_s'] * 100:.0f}% of a {r['step_s']:.2f} s step; of it MPI_Allreduce "
              f"{tr:.3f} s ({values * 4 / 1e6:.0f} MB of f32, {values * 4 / tr / 1e9:.2f} GB/s), the rest copying to and from one buffer")
        print(f"  (before it, waiting for the slower rank: {wait:.3f} s per step)")
        if r["gather"]:
            g = statistics.median(r["gather"])
            print(f"  weight gather: {g:.3f} s per step ({g / r['step_s'] * 100:.0f}% of the step)")
        for e in r["events"]:
            print(f"  {e}")


if __name__ == "__main__":
    main()
