"""Size and quality of each GGUF quantization on the sample task (dates → YYYY-MM-DD).

    .venv/bin/python bench/export_quality.py --run RUN [--rows 100]

Exports RUN (a LoRA fine-tune of SmolLM2 on data/sample) merged at every file type,
then evaluates all of them in one `tunebook eval` on the held-out rows (greedy, the
model's chat template): file size and exact match per type, next to the unquantized run.
Without --run, fine-tunes one first as the quickstart does (`tunebook train`, one epoch).
"""
import argparse
import csv
import json
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
QUANTS = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_1", "q4_0"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--rows", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run = a.run
        if run is None:
            cfg = os.path.join(d, "run.toml")
            with open(cfg, "w") as f:
                f.write(f'model = {json.dumps(GGUF)}\ntrain_data = {json.dumps(os.path.join(ROOT, "data/sample/dates-train.jsonl"))}\n'
                        'name = "quality"\ntraining_duration = "1ep"\nlearning_rate = 1e-3\nwarmup_steps = 3\ncontext_length = 256\nbatch_size = 4\n[lora]\nr = 8\nalpha = 16.0\ndropout = 0.0\n')
            env = dict(os.environ, TUNEBOOK_RUNS=os.path.join(d, "runs"))
            subprocess.run(["tunebook", "train", cfg], check=True, env=env, capture_output=True)
            run = os.path.join(d, "runs", "quality")
        sizes, models = {}, ["--model", f"run={run}"]
        for q in QUANTS:
            out = os.path.join(d, f"{q}.gguf")
            subprocess.run(["tunebook", "export", run, "--gguf", out, "--quant", q], check=True, capture_output=True)
            sizes[q] = os.path.getsize(out)
            models += ["--model", f"{q}={out}"]
        rows = os.path.join(d, "rows.csv")
        subprocess.run(["tunebook", "eval", os.path.join(ROOT, "data/sample/dates-eval.jsonl"), *models, "--metric", "exact_match",
                        "--max-new-tokens", "16", "--limit", str(a.rows), "--output", rows], check=True, capture_output=True)
        with open(rows) as f:
            r = list(csv.DictReader(f))
        em = lambda name: sum(float(x[f"{name}/exact_match"]) for x in r) / len(r)
        print(f"{len(r)} held-out rows, greedy, tunebook's engine")
        print(f"{'type':>8} {'MB':>7} {'exact match':>12}")
        print(f"{'run':>8} {'':>7} {em('run'):12.2f}")
        for q in QUANTS:
            print(f"{q:>8} {sizes[q] / 1e6:7.1f} {em(q):12.2f}")


if __name__ == "__main__":
    main()
