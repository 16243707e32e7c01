#!/usr/bin/env python3
"""Kernel latency benchmark (run after `tunebook-kernel install`).

Prints medians over several kernel starts:
  * start -> first cell result (kernel start, preload, first library call);
  * warm cell latency for a one-line library call;
  * resident memory of the kernel and of its cell process.
Kernel starts are measured twice: cold (no standby kernel; evcxr context,
preload and rust-analyzer from nothing) and with a standby kernel waiting (what
a start finds once an earlier kernel on the machine has been idle or shut down;
see kernel/src/standby.rs). Also runs the same measurements against the stock
IPython kernel as a reference point for what "a notebook that feels instant"
means on this machine.

Usage: .venv/bin/python bench/kernel_latency.py [--starts N] [--cells N]
"""

import argparse
import os
import statistics
import subprocess
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


def kernel_home():
    return os.environ.get("TUNEBOOK_CACHE", os.path.expanduser("~/.cache/tunebook"))


def kernel_exe():
    spec = jupyter_client.kernelspec.KernelSpecManager().get_kernel_spec("tunebook")
    return spec.argv[0]


def standby_pid(ready_only):
    """Pid of a waiting standby kernel (only once warmed up with ready_only)."""
    root = os.path.join(kernel_home(), "kernel")
    path = os.path.join(root, "standby.ready" if ready_only else "standby.pid")
    try:
        pid = int(open(path).read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def wait_for_standby(timeout=900):
    """Waits until a standby has preloaded; starts one if none is running."""
    if standby_pid(False) is None:
        subprocess.Popen([kernel_exe(), "standby"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if standby_pid(True) is not None:
            return
        time.sleep(0.5)
    raise SystemExit("no standby kernel became ready")


def stop_standby():
    subprocess.run([kernel_exe(), "standby", "--stop"], check=False, stdout=subprocess.DEVNULL)
    time.sleep(1)


def kernel_pids(km):
    """The launcher, and the standby that serves it when one was claimed."""
    launcher = km.provisioner.process.pid
    pids = [launcher]
    try:
        pids.append(int(open(os.path.join(kernel_home(), "kernel", f"claimed-{launcher}")).read()))
    except (OSError, ValueError):
        pass
    return pids


def measure(kernel_name, first_code, warm_code, starts, cells, env=None, before_start=None):
    first, warm, rss = [], [], []
    for _ in range(starts):
        if before_start:
            before_start()
        t0 = time.perf_counter()
        km = jupyter_client.KernelManager(kernel_name=kernel_name)
        km.start_kernel(**({"env": env} if env else {}))
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        run_cell(kc, first_code)
        first.append(time.perf_counter() - t0)
        for _ in range(cells):
            t1 = time.perf_counter()
            run_cell(kc, warm_code)
            warm.append(time.perf_counter() - t1)
        rss.append(sum(rss_mb(p) for p in kernel_pids(km)))
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return statistics.median(first), statistics.median(warm), statistics.median(rss), min(warm), max(warm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-cold", action="store_true", help="skip starts without a standby kernel")
    args = ap.parse_args()

    first_code, warm_code = "tunebook::info()", "tunebook::VERSION.len()"
    rows = []
    if not args.no_cold:
        stop_standby()
        cold_env = {**os.environ, "TUNEBOOK_KERNEL_STANDBY": "0"}
        rows.append(("tunebook, cold start",) + measure("tunebook", first_code, warm_code, args.starts, args.cells, env=cold_env))
    # A start that finds a standby kernel waiting (what every start after the
    # first one on a machine sees, once the standby has had time to preload).
    standby_env = {**os.environ, "TUNEBOOK_KERNEL_STANDBY": "1"}
    rows.append(("tunebook, standby",) + measure("tunebook", first_code, warm_code, args.starts, args.cells,
                                                 env=standby_env, before_start=wait_for_standby))
    if not args.no_reference:
        rows.append(("python3 (ipykernel)",) + measure("python3", "import sys; sys.version", "len('x')", args.starts, args.cells))
    print(f"\nkernel latency, medians over {args.starts} starts x {args.cells} warm cells")
    print(f"{'kernel':<24}{'start->first result':>22}{'warm cell':>12}{'(min..max)':>16}{'RSS MB':>9}")
    for name, first, warm, rss, lo, hi in rows:
        print(f"{name:<24}{first:>20.2f} s{warm:>10.3f} s{f'{lo:.2f}..{hi:.2f}':>16}{rss:>9.0f}")
    print("goals: start->first result < 3 s, warm cell < 1 s")
    print("RSS: the kernel and its cell process; a waiting standby adds about as much again")


if __name__ == "__main__":
    main()
