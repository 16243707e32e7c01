"""Evaluation speed on SmolLM2-135M-Instruct, 2 threads, both systems in the same run:

1. Generation: the 100 held-out prompts of the sample task, greedy, up to 64 new tokens,
   for the base model and a fine-tuned one (a rank-16 LoRA adapter on q/v, merged):
   `tunebook eval` (batch 16, through the serving engine) against transformers
   `generate` with batch 16 (left padding, the same chat template). Goal: <= 0.5x
   transformers' wall time.
2. Multiple choice: 100 four-choice items scored by log-likelihood: `tunebook eval
   --choices` against lm-evaluation-harness's `hf` backend (`simple_evaluate`, batch 16)
   on the same items and the same f32 weights. Goal: >= 2x faster, same accuracy.

tunebook runs the Q4_1 GGUF for generation (what users serve) and, for multiple choice,
the f32 Hugging Face folder transformers writes from that GGUF (the weights lm-eval
scores with), so accuracies compare like with like. Wall times include loading.

    ~/.cache/tunebook/refvenv/bin/pip install lm-eval==0.4.13   # once (torch, transformers, peft, gguf there)
    . scripts/env.sh && ~/.cache/tunebook/refvenv/bin/python bench/eval_speed.py [--runs 1]

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
sys.path.insert(0, os.path.join(ROOT, "tests"))
from peft_adapter import write_adapter  # noqa: E402

GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", os.path.expanduser("~/.cache/tunebook/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
CACHE = os.path.expanduser("~/.cache/tunebook/bench")
HF_DIR = os.path.join(CACHE, "smollm2-135m-f32")
DATA = os.path.join(ROOT, "data/sample/dates-eval.jsonl")
THREADS = 2


def hf_folder():
    """The GGUF dequantized to f32 in Hugging Face layout (written once)."""
    if not os.path.isfile(os.path.join(HF_DIR, "config.json")):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d, f = os.path.split(GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain one.
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(HF_DIR)
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(HF_DIR)
    return HF_DIR


def rows():
    with open(DATA) as f:
        return [json.loads(l) for l in f]


def tunebook_eval(args):
    t0 = time.perf_counter()
    p = subprocess.run(["tunebook", "eval", *args], capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": str(THREADS)})
    if p.returncode != 0:
        sys.exit(f"tunebook eval failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stdout


def transformers_generate(adapter, gen):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(HF_DIR)
    tok.padding_side = "left"
    answers, tokens = {}, 0
    for name, ad in [("base", None), ("tuned", adapter)]:
        model = AutoModelForCausalLM.from_pretrained(HF_DIR, torch_dtype=torch.float32)
        if ad:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, ad).merge_and_unload()
        model.eval()
        prompts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in rows()]
        out = []
        for i in range(0, len(prompts), 16):
            enc = tok(prompts[i:i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                g = model.generate(**enc, max_new_tokens=gen, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            new = g[:, enc["input_ids"].shape[1]:]
            for row in new:
                ids = [t for t in row.tolist() if t != (tok.pad_token_id or tok.eos_token_id)]
                tokens += len(ids)
                out.append(tok.decode(ids, skip_special_tokens=True))
        answers[name] = out
    return time.perf_counter() - t0, answers, tokens


def mc_items(path):
    """Four-choice items from the held-out dates: the right YYYY-MM-DD and three near misses."""
    items = []
    for i, r in enumerate(rows()):
        y, m, d = r["messages"][-1]["content"].split("-")
        wrong = [f"{y}-{d}-{m}" if int(d) <= 12 and d != m else f"{int(y) + 1}-{m}-{d}", f"{int(y) - 1}-{m}-{d}", f"{y}-{m}-{int(d) % 28 + 1:02d}"]
        # A trailing period keeps `datasets` from reading the choices as timestamps.
        choices = [f"{c}." for c in (r["messages"][-1]["content"], *wrong)]
        k = i % 4
        choices[0], choices[k] = choices[k], choices[0]
        q = r["messages"][0]["content"].replace("Answer with the date only.\n", "")
        items.append({"prompt": f"{q}\nAnswer:", "choices": choices, "answer": k})
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return items


def lm_eval_mc(path, workdir):
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(THREADS)
    task_dir = os.path.join(workdir, "tasks")
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, "dates_mc.yaml"), "w") as f:
        f.write(f"""task: dates_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={HF_DIR},dtype=float32", tasks=["dates_mc"], batch_size=16,
                                  task_manager=TaskManager(include_path=task_dir), device="cpu")
    wall = time.perf_counter() - t0
    r = res["results"]["dates_mc"]
    return wall, r["acc,none"], r["acc_norm,none"]


def summary_value(stdout, metric, model):
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("┆")]
        if cells and cells[0] == metric:
            return float(cells[1 + model].split()[0])
    raise ValueError(f"{metric} not in the summary:\n{stdout}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--only", choices=["generation", "mc"], help="run one part")
    a = ap.parse_args()
    hf_folder()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = os.path.join(tmp, "adapter")
        write_adapter(adapter, GGUF, rank=16, seed=3)
        ours, theirs = [], []
        for _ in range(a.runs if a.only != "mc" else 0):
            wall, out = tunebook_eval([DATA, "--model", f"base={GGUF}", "--model", f"tuned={adapter}", "--metric", "exact_match,answer_length",
                                       "--max-new-tokens", str(a.gen), "--batch-size", "16", "--output", os.path.join(tmp, "rows.csv")])
            ours.append(wall)
            tok_ours = 100 * (summary_value(out, "answer_length", 0) + summary_value(out, "answer_length", 1))
            wall, answers, tok_theirs = transformers_generate(adapter, a.gen)
            theirs.append(wall)
        if a.only != "mc":
            o, t = statistics.median(ours), statistics.median(theirs)
            print(f"generation, 100 prompts x <= {a.gen} tokens, base + fine-tuned, batch 16, {THREADS} threads:")
            print(f"  tunebook eval (Q4_1 GGUF): {o:.1f} s ({tok_ours:.0f} tokens)   transformers generate (f32): {t:.1f} s ({tok_theirs} tokens)")
            print(f"  ratio tunebook / transformers = {o / t:.2f}x (goal <= 0.5x)")
        if a.only == "generation":
            return

        path = os.path.join(tmp, "mc.jsonl")
        mc_items(path)
        wall_o, out = tunebook_eval([path, "--model", f"smol={HF_DIR}", "--choices", "choices", "--answer", "answer", "--metric", "acc,acc_norm",
                                     "--no-chat-template"])
        acc_o, accn_o = summary_value(out, "acc", 0), summary_value(out, "acc_norm", 0)
        try:
            wall_l, acc_l, accn_l = lm_eval_mc(path, tmp)
        except ImportError:
            sys.exit("lm-evaluation-harness is not installed: ~/.cache/tunebook/refvenv/bin/pip install lm-eval==0.4.13")
        print("multiple choice, 100 items x 4 choices, f32 weights:")
        print(f"  tunebook eval: {wall_o:.1f} s, acc {acc_o:.4f}, acc_norm {accn_o:.4f}")
        print(f"  lm-eval hf:    {wall_l:.1f} s, acc {acc_l:.4f}, acc_norm {accn_l:.4f}")
        print(f"  speed-up = {wall_l / wall_o:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
