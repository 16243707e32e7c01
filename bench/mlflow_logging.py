"""MLflow logging: tunebook's tracker vs the Python MLflow client, against the same real
server in the same run.

    . scripts/env.sh && $VENV/bin/python bench/mlflow_logging.py [--steps 100] [--metrics 50000]

Starts a throw-away server with `tunebook mlflow up --data-dir <tmp>` and stops it after.

1. Per-step logging overhead of a training loop at 10 steps/s (8 metrics per step):
   - tunebook: the trainer appends to the run's write-ahead log; a background thread ships
     (lib/examples/mlflow_bench.rs);
   - Python, synchronous `mlflow.log_metrics(..., step=)` (what most training scripts do);
   - Python, `mlflow.log_metrics(..., synchronous=False)` (MLflow's async logging).
   Reported: time the training thread spends in the logging call per step, as a share of the
   100 ms step (goal < 1 %).
2. Shipping throughput (metrics/s) of a backlog: tunebook's shipper (1000 per log-batch, cursor
   after each accepted batch) vs `MlflowClient.log_batch` with 1000 metrics per call.
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
KEYS = [
    "loss/train/total", "lr", "throughput/tokens_per_sec", "throughput/samples_per_sec",
    "metrics/train/LanguagePerplexity", "memory/peak_reserved_mem", "time/remaining_estimate", "grad_norm",
]


def sh(cmd):
    out = subprocess.run(["bash", "-c", f". scripts/env.sh && {cmd}"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"`{cmd}` failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def ours(uri, steps, metrics):
    out = sh(f'"$CARGO_TARGET_DIR"/x86_64-unknown-linux-gnu/debug/examples/mlflow_bench {uri} {steps} {metrics}')
    return {r["what"]: r for r in map(json.loads, out.strip().splitlines())}


def python_loop(steps, synchronous):
    import mlflow

    mlflow.set_experiment("tunebook-bench")
    costs = []
    with mlflow.start_run(run_name=f"python-{'sync' if synchronous else 'async'}"):
        start = time.perf_counter()
        for step in range(steps):
            slot = start + 0.1 * (step + 1)
            t0 = time.perf_counter()
            mlflow.log_metrics({k: step * 0.01 + i for i, k in enumerate(KEYS)}, step=step, synchronous=synchronous)
            costs.append(time.perf_counter() - t0)
            time.sleep(max(0.0, slot - time.perf_counter()))
        t0 = time.perf_counter()
        if not synchronous:
            mlflow.flush_async_logging()
        drain = time.perf_counter() - t0
    costs.sort()
    return {
        "median_us": costs[len(costs) // 2] * 1e6,
        "p99_us": costs[int((len(costs) - 1) * 0.99)] * 1e6,
        "share_pct": statistics.mean(costs) / 0.1 * 100,
        "drain_s": drain,
    }


def python_throughput(metrics):
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    c = MlflowClient()
    exp = c.get_experiment_by_name("tunebook-bench").experiment_id
    run = c.create_run(exp, run_name="python-throughput")
    per_key = metrics // len(KEYS)
    recs = [Metric(k, float(s), 1_700_000_000_000 + s, s) for s in range(per_key) for k in KEYS]
    t0 = time.perf_counter()
    for i in range(0, len(recs), 1000):
        c.log_batch(run.info.run_id, metrics=recs[i:i + 1000])
    secs = time.perf_counter() - t0
    c.set_terminated(run.info.run_id)
    return len(recs) / secs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--metrics", type=int, default=50_000)
    a = ap.parse_args()
    sh("cargo_ build -q -p tunebook --bin tunebook --example mlflow_bench")
    data = tempfile.mkdtemp(prefix="tunebook-mlflow-bench-")
    up = sh(f"tunebook mlflow up --data-dir {data}")
    uri = next(l.split("=", 1)[1] for l in up.splitlines() if "MLFLOW_TRACKING_URI=" in l).strip()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        us = ours(uri, a.steps, a.metrics)
        sync = python_loop(a.steps, True)
        asyn = python_loop(a.steps, False)
        py_rate = python_throughput(a.metrics)
    finally:
        sh(f"tunebook mlflow down --data-dir {data}")
    loop, thr = us["loop"], us["throughput"]
    print(f"MLflow logging against a local mlflow server (sqlite, 1 worker), {os.cpu_count()} cores, {a.steps} steps at 10 steps/s, 8 metrics/step")
    print("  per-step cost on the training thread     median      p99   share of a 100 ms step")
    print(f"  tunebook (WAL + shipper thread)      {loop['log_call_us_median']:8.1f} us {loop['log_call_us_p99']:7.1f} us   {loop['log_call_share_of_step_pct']:.4f} %")
    print(f"  python mlflow.log_metrics (sync)     {sync['median_us']:8.1f} us {sync['p99_us']:7.1f} us   {sync['share_pct']:.4f} %")
    print(f"  python mlflow.log_metrics (async)    {asyn['median_us']:8.1f} us {asyn['p99_us']:7.1f} us   {asyn['share_pct']:.4f} %")
    print(f"  tunebook process CPU per step (logging + shipping): {loop['process_cpu_ms_per_step']:.3f} ms; drain at finish {loop['finish_drain_s']:.2f} s")
    print(f"  shipping a backlog of {thr['metrics']} metrics: tunebook {thr['metrics_per_s']:.0f} metrics/s, python log_batch(1000) {py_rate:.0f} metrics/s")


if __name__ == "__main__":
    main()
