"""Checks that Python PEFT loads a tunebook LoRA adapter and computes the same logits.

Runs the Rust export (`export_tiny_lora_for_peft`), then with transformers + PEFT loads
the tiny base model, applies the adapter, compares logits with tunebook's, and also loads
tunebook's merged model as a plain transformers model.

    ~/.cache/tunebook/refvenv/bin/python lib/tests/data/check_peft_interop.py
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TUNEBOOK_EXPORT_DIR=d)
        cmd = ". scripts/env.sh && cargo_ test -q -p tunebook --lib export_tiny_lora_for_peft -- --ignored"
        subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, check=True, capture_output=True)
        exp = json.load(open(os.path.join(d, "expected.json")))
        x = torch.tensor([exp["input_ids"]])
        want = torch.tensor(exp["logits"])
        base = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, os.path.join(d, "adapter")).eval()
        with torch.no_grad():
            got = model(x).logits[0]
        err = (got - want).abs().max().item()
        print(f"PEFT adapter vs tunebook: max |Δlogit| = {err:.2e}")
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged"), dtype=torch.float32).eval()
        with torch.no_grad():
            got_m = merged(x).logits[0]
        err_m = (got_m - want).abs().max().item()
        print(f"merged model (transformers) vs tunebook: max |Δlogit| = {err_m:.2e}")
        ok = err < 1e-4 and err_m < 1e-3
        print("OK" if ok else "MISMATCH")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
