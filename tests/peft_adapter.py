"""A random PEFT LoRA adapter for SmolLM2-135M-Instruct, written with numpy only (no
torch, no safetensors package): used by tests/test_serve.py and bench/serve_speed.py."""

import json
import os
import struct

import numpy as np


# (module, in, out) of SmolLM2-135M's projections.
SHAPES = {
    "q_proj": ("self_attn", 576, 576), "k_proj": ("self_attn", 576, 192), "v_proj": ("self_attn", 576, 192),
    "o_proj": ("self_attn", 576, 576), "gate_proj": ("mlp", 576, 1536), "up_proj": ("mlp", 576, 1536),
    "down_proj": ("mlp", 1536, 576),
}


def write_adapter(path, base, rank=16, seed=0, targets=("q_proj", "v_proj")):
    """A PEFT LoRA adapter for SmolLM2-135M (`targets` of its 30 layers) with random A
    and B, written as adapter_config.json + adapter_model.safetensors."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(30):
        for name in targets:
            block, inp, out = SHAPES[name]
            p = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{p}.lora_A.weight"] = (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float32)
            tensors[f"{p}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.3).astype(np.float32)
    header, offset, blobs = {}, 0, []
    for k in sorted(tensors):
        b = tensors[k].tobytes()
        header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank, "lora_alpha": 2 * rank,
           "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none"}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
