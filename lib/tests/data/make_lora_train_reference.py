"""Reference losses of PyTorch + PEFT for 20 LoRA training steps on the SmolLM2-135M-Instruct
GGUF (f32), for the numerical-parity test in lib/tests/smollm2_reference.rs.

Both sides start from the same LoRA A matrices, given by a formula (not random draws):
    A[i, j] = 0.02 * sin(0.7 * (i * in_features + j) + 1.3 * layer + 2.1 * module)
with `module` the index in TARGETS, and B = 0 (PEFT's default). LoRA r=8, alpha=16,
dropout 0 on all seven projections; AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight
decay, constant learning rate, no clipping; four batches of 2 x 64 token ids from a fixed LCG, cycled,
labels = inputs (every next token is a target). Writes smollm2_lora_train_reference.json
beside this file: the batches and the loss of every step (before its update).

Usage (in a venv with torch, transformers, gguf, peft):
    python lib/tests/data/make_lora_train_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import math
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

GGUF = sys.argv[1] if len(sys.argv) > 1 else os.environ["TUNEBOOK_SMOLLM2_GGUF"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_lora_train_reference.json")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, B, T, R, ALPHA, LR = 20, 2, 64, 8, 16.0, 1e-3


def batches(vocab):
    # Four distinct batches, cycled: the model memorises them, so the loss falls
    # steeply and a wrong gradient or update shows within a few steps.
    s = 12345
    out = []
    for _ in range(4):
        ids = []
        for _ in range(B * T):
            s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            ids.append((s >> 33) % vocab)
        out.append(ids)
    return [out[i % 4] for i in range(STEPS)]


def lora_a(layer, module, r, fan_in):
    idx = torch.arange(r * fan_in, dtype=torch.float64).reshape(r, fan_in)
    return (0.02 * torch.sin(0.7 * idx + 1.3 * layer + 2.1 * module)).to(torch.float32)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "2")))
    d, f = os.path.split(GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                layer = int(name.split(".layers.")[1].split(".")[0])
                module = TARGETS.index(name.rsplit(".", 1)[1])
                w = mod.lora_A["default"].weight
                w.copy_(lora_a(layer, module, w.shape[0], w.shape[1]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    data = batches(model.config.vocab_size)
    losses = []
    for step, ids in enumerate(data):
        x = torch.tensor(ids).reshape(B, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        print(f"step {step + 1}: loss {loss.item():.6f}", file=sys.stderr)
    with open(OUT, "w") as fh:
        json.dump({"gguf": os.path.basename(GGUF), "steps": STEPS, "batch": B, "seq": T, "r": R, "alpha": ALPHA,
                   "lr": LR, "batches": data, "losses": losses}, fh)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
