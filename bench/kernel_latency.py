#!/usr/bin/env python3
"""Kernel latency benchmark (run after `tunebook-kernel install`).

Prints medians over several kernel starts:
  * start -> first cell result (kernel start, preload, first library call);
  * warm cell latency for a one-line library call;
  * resident memory of the kernel and of its cell process.
Also runs the same measurements against the stock IPython kernel as a reference
point for what "a notebook that feels instant" means on this machine.

Usage: .venv/bin/python bench/kernel_latency.py [--starts N] [--cells N]
"""

import argparse
import os
import statistics
import time

import jupyter_client


def rss_mb(pid):
    """RSS of a process and its descendants, in MB."""
    total = 0
    todo = [pid]
    seen = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return total / 1024


def run_cell(kc, code):
    reply = kc.execute_interactive(code, timeout=900, output_hook=lambda m: None)
    assert reply["content"]["status"] == "ok", reply["content"]
    return reply


def measure(kernel_name, first_code, warm_code, starts, cells):
    first, warm, rss = [], [], []
    for _ in range(starts):
        t0 = time.perf_counter()
        km = jupyter_client.KernelManager(kernel_name=kernel_name)
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        run_cell(kc, first_code)
        first.append(time.perf_counter() - t0)
        for _ in range(cells):
            t1 = time.perf_counter()
            run_cell(kc, warm_code)
            warm.append(time.perf_counter() - t1)
        rss.append(rss_mb(km.provisioner.process.pid))
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return statistics.median(first), statistics.median(warm), statistics.median(rss), min(warm), max(warm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()

    rows = [("tunebook",) + measure("tunebook", "tunebook::info()", "tunebook::VERSION.len()", args.starts, args.cells)]
    if not args.no_reference:
        rows.append(("python3 (ipykernel)",) + measure("python3", "import sys; sys.version", "len('x')", args.starts, args.cells))
    print(f"\nkernel latency, medians over {args.starts} starts x {args.cells} warm cells")
    print(f"{'kernel':<22}{'start->first result':>22}{'warm cell':>12}{'(min..max)':>16}{'RSS MB':>9}")
    for name, first, warm, rss, lo, hi in rows:
        print(f"{name:<22}{first:>20.2f} s{warm:>10.3f} s{f'{lo:.2f}..{hi:.2f}':>16}{rss:>9.0f}")
    print("goals: start->first result < 3 s, warm cell < 1 s")


if __name__ == "__main__":
    main()
