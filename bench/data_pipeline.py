#!/usr/bin/env python3
"""Data pipeline benchmark: tunebook against a Python baseline, same run, same data.

A 100k-row chat Delta table goes through read -> validate -> chat template ->
tokenize (with assistant-only loss masks) -> pack into 2048-token windows, once
with `tunebook data prepare` and once with deltalake + polars + transformers
(`apply_chat_template`, fast tokenizer in batches). Prints rows/s for both, the
ratio, and each process's peak RSS.

Run it with a Python that has deltalake, polars, pyarrow, transformers, gguf and
jinja2 (kept outside the repository), after building the CLI:

    . scripts/env.sh && cargo_ build -p tunebook --bin tunebook
    python3 -m venv ~/.cache/tunebook/refvenv-data
    ~/.cache/tunebook/refvenv-data/bin/pip install deltalake polars pyarrow transformers gguf jinja2
    ~/.cache/tunebook/refvenv-data/bin/python bench/data_pipeline.py

`TUNEBOOK_BIN` overrides the binary (the shared target dir is written by every
checkout, so copying the freshly built binary aside keeps the run honest).
The tunebook binary is the dev-profile build (dependencies at opt-level 3,
tunebook at 2), the one tests and notebooks use.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TUNEBOOK_CACHE", Path.home() / ".cache/tunebook"))
GGUF = Path(os.environ.get("TUNEBOOK_SMOLLM2_GGUF", CACHE / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
BIN = Path(os.environ.get("TUNEBOOK_BIN", TARGET / "x86_64-unknown-linux-gnu/debug/tunebook"))
CONTEXT = 2048
SEED = 0

WORDS = (
    "the model answers questions about data tables code and numbers 42 3.14 2024 café naïve 你好 "
    "please explain why how what when which delta lake parquet polars rust python tokens "
    "assistant user system helpful concise answer example function return value list map"
).split()


def make_table(path: Path, rows: int) -> None:
    """A chat Delta table of `rows` conversations (2 to 6 turns, some with a system prompt)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    rng = random.Random(1234)
    conversations = []
    for _ in range(rows):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a concise assistant."})
        for t in range(rng.randint(1, 3)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) + "."
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        conversations.append(msgs)
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "messages": pa.array(conversations, msg_type)})
    if path.exists():
        shutil.rmtree(path)
    write_deltalake(str(path), table)


def load_hf_tokenizer():
    """SmolLM2's tokenizer as Hugging Face builds it from the GGUF (with SmolLM2's own pre-tokenizer)."""
    sys.path.insert(0, str(ROOT / "lib/tests/data"))
    import make_reference
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    d, template, arch = make_reference.read_gguf_tokenizer(str(GGUF))
    backend, _ = convert_gguf_tokenizer(arch, d)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokens = d["tokens"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tokens[d["bos_token_id"]], eos_token=tokens[d["eos_token_id"]], pad_token=tokens[d["pad_token_id"]]
    )
    tok.chat_template = template
    return tok


def valid(messages) -> bool:
    """The product's chat rules (as tunebook checks them)."""
    if not isinstance(messages, list) or len(messages) < 2:
        return False
    prev = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(k for k, v in m.items() if v is not None) != {"role", "content"}:
            return False
        r, c = m["role"], m["content"]
        if r not in ("system", "user", "assistant") or (r == "system" and i > 0) or r == prev:
            return False
        if not isinstance(c, str) or not c.strip():
            return False
        prev = r
    return messages[-1]["role"] == "assistant"


def baseline(table: str) -> dict:
    """read -> validate -> template -> tokenize (+ assistant masks) -> pack, in Python."""
    import polars as pl
    from deltalake import DeltaTable

    tok = load_hf_tokenizer()
    t0 = time.perf_counter()
    df = pl.from_arrow(DeltaTable(table).to_pyarrow_table())
    rows = df["messages"].to_list()
    t1 = time.perf_counter()
    good = [m for m in rows if valid(m)]
    t2 = time.perf_counter()
    texts, spans = [], []
    for msgs in good:
        full = tok.apply_chat_template(msgs, tokenize=False)
        sp = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False).rstrip()
                sp.append((len(prompt), len(upto)))
        texts.append(full)
        spans.append(sp)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        mask = [int(e > s and any(a <= s < b for a, b in sp)) for s, e in offs]
        examples.append((ids, mask))
    t3 = time.perf_counter()
    rng = random.Random(SEED)
    order = list(range(len(examples)))
    rng.shuffle(order)
    windows, cur = [], ([], [], [], [])
    for i in order:
        ids, mask = examples[i]
        ids, mask = ids[:CONTEXT], mask[:CONTEXT]
        if len(cur[0]) + len(ids) > CONTEXT:
            windows.append(cur)
            cur = ([], [], [], [])
        seg = len(set(cur[2])) + 1
        cur[0].extend(ids)
        cur[1].extend(mask)
        cur[2].extend([seg] * len(ids))
        cur[3].extend(range(len(ids)))
    windows.append(cur)
    t4 = time.perf_counter()
    return {
        "rows": len(rows), "windows": len(windows), "tokens": sum(len(e[0]) for e in examples),
        "read_s": t1 - t0, "validate_s": t2 - t1, "tokenize_s": t3 - t2, "pack_s": t4 - t3, "total_s": t4 - t0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--baseline-only", metavar="TABLE")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    if args.baseline_only:
        print(json.dumps(baseline(args.baseline_only)))
        return
    if not GGUF.is_file():
        raise SystemExit(f"{GGUF} is missing: run scripts/setup.sh")
    if not BIN.is_file():
        raise SystemExit(f"{BIN} is missing: run `. scripts/env.sh && cargo_ build -p tunebook --bin tunebook`")
    table = CACHE / f"bench/chat{args.rows}"
    if not (table / "_delta_log").is_dir():
        print(f"writing a {args.rows}-row chat Delta table to {table} ...", flush=True)
        make_table(table, args.rows)
    # the dev profile links libstd dynamically (-Cprefer-dynamic)
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [f"{sysroot}/lib/rustlib/x86_64-unknown-linux-gnu/lib", env.get("LD_LIBRARY_PATH")]))
    results = {"tunebook": [], "python": []}
    for _ in range(args.runs):
        for name, cmd in (
            ("tunebook", [str(BIN), "data", "prepare", str(table), "--model", str(GGUF), "--context-length", str(CONTEXT), "--seed", str(SEED)]),
            ("python", [sys.executable, __file__, "--baseline-only", str(table)]),
        ):
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            t0 = time.perf_counter()
            _, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            out, err = p.stdout.read(), p.stderr.read()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{name} failed:\n{err}")
            if name == "tunebook":
                line = out.strip().splitlines()[-1]
                r = {k: float(v) for k, v in (kv.split("=") for kv in line.split())}
            else:
                r = json.loads(out.strip().splitlines()[-1])
            r["peak_rss_mib"] = usage.ru_maxrss / 1024
            r["process_wall_s"] = wall
            results[name].append(r)
            print(f"{name:9s} rows={int(r['rows'])} windows={int(r['windows'])} tokens={int(r['tokens'])} "
                  f"read={r['read_s']:.2f}s validate={r['validate_s']:.2f}s template+tokenize={r['tokenize_s']:.2f}s "
                  f"pack={r['pack_s']:.2f}s total={r['total_s']:.2f}s rows/s={r['rows'] / r['total_s']:.0f} "
                  f"peak_rss={r['peak_rss_mib']:.0f}MiB", flush=True)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    ours = median([r["rows"] / r["total_s"] for r in results["tunebook"]])
    theirs = median([r["rows"] / r["total_s"] for r in results["python"]])
    print(f"\ntunebook: {ours:.0f} rows/s, peak RSS {max(r['peak_rss_mib'] for r in results['tunebook']):.0f} MiB")
    print(f"python baseline (deltalake + polars + transformers): {theirs:.0f} rows/s, peak RSS {max(r['peak_rss_mib'] for r in results['python']):.0f} MiB")
    print(f"ratio: {ours / theirs:.2f}x (goal >= 3x, peak RSS < 2048 MiB)")


if __name__ == "__main__":
    main()
