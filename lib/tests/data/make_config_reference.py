"""Reference logits of Hugging Face transformers 5 for config.json files in both layouts.

Writes config_layouts_reference.json beside this file. For each of 4 tiny models (llama31,
qwen2, mistral, llama_bias_linear) it holds:
  - config_v5: the exact text of the config.json that transformers 5's save_pretrained wrote
    (rope_theta and rope scaling inside "rope_parameters");
  - config_legacy: the same config rewritten by hand in the older layout (top-level "rope_theta"
    and "rope_scaling" with "rope_type", or the even older "type"; "torch_dtype" for "dtype"),
    which transformers 5 is checked to load to bit-identical logits (qwen2's legacy config also
    drops layer_types and sets sliding_window 4 with use_sliding_window false, which must be
    ignored, as in Qwen2/2.5 checkpoints);
  - safetensors: the files written, each with its tensors' names, dtypes and shapes, and the
    text of model.safetensors.index.json for the sharded one (llama31);
  - input_ids, the logits at every position (6 significant digits), a 16-token greedy
    continuation (argmax each step with the KV cache, not stopped at EOS) with the top-1/top-2
    margin at each step, and "checks": what the script verified (scaling and window change the
    logits, old layout identical, cached greedy == recomputed greedy).
No weight file is committed: every saved tensor is filled by the formula in WEIGHT_FORMULA
(FNV-1a 64 of the tensor name seeds a splitmix64 stream), so a test can rebuild it.

Usage (in a venv with torch, transformers>=5, safetensors, numpy; CPU is enough):
    python lib/tests/data/make_config_reference.py
Made with: python 3.11.7, torch 2.15.0+cu132 (run on CPU), transformers 5.25.0,
safetensors 0.8.0, numpy 2.4.6.
"""
import json
import os
import sys
import tempfile

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_layouts_reference.json")
INPUT_IDS = [(5 + 17 * i) % 64 for i in range(12)]
STEPS = 16

WEIGHT_FORMULA = (
    "For every tensor saved in the safetensors files, with name `name` and n elements: "
    "seed = FNV-1a 64 of the UTF-8 name (offset basis 0xcbf29ce484222325, prime 0x100000001b3, "
    "for each byte: h ^= byte; h *= prime mod 2^64). splitmix64 stream with state = seed; for element "
    "k = 0..n-1 in row-major order: state += 0x9E3779B97F4A7C15; z = state; "
    "z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB; "
    "z ^= z >> 31 (all mod 2^64); u = (z >> 11) / 2^53. value = 1.0 + (2u - 1) * 0.1 if the name ends "
    "with 'norm.weight', else (2u - 1) * 0.2; computed in f64, cast to f32 (then to bf16 with "
    "round-to-nearest-even where the file stores bf16). Tied lm_head is not saved and equals "
    "model.embed_tokens.weight."
)

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def formula_values(name: str, shape) -> np.ndarray:
    """The formula's values for one tensor, in float64, shaped."""
    n = int(np.prod(shape)) if len(shape) else 1
    with np.errstate(over="ignore"):
        state = np.uint64(fnv1a64(name.encode())) + np.arange(1, n + 1, dtype=np.uint64) * GOLDEN
        z = state
        z = (z ^ (z >> np.uint64(30))) * M1
        z = (z ^ (z >> np.uint64(27))) * M2
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(2**53)
    if name.endswith("norm.weight"):
        v = 1.0 + (2.0 * u - 1.0) * 0.1
    else:
        v = (2.0 * u - 1.0) * 0.2
    return v.reshape(shape)


def formula_scalar_check(name: str, count: int = 5):
    """Plain-integer splitmix64, to cross-check the vectorised version."""
    mask = 0xFFFFFFFFFFFFFFFF
    state = fnv1a64(name.encode())
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
        u = (z >> 11) / 2**53
        out.append(1.0 + (2 * u - 1) * 0.1 if name.endswith("norm.weight") else (2 * u - 1) * 0.2)
    return out


COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, hidden_act="silu", max_position_embeddings=128)

MODELS = [
    {
        "name": "llama31",
        "config": lambda: LlamaConfig(
            **COMMON, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, bos_token_id=1,
            eos_token_id=[2, 3], tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}),
        "save_dtype": torch.float32,
        "max_shard_size": "20KB",
        "legacy_rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    },
    {
        "name": "qwen2",
        "config": lambda: Qwen2Config(
            **COMMON, num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=True, use_sliding_window=False, sliding_window=4, max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        "save_dtype": torch.bfloat16,
        "legacy_rope_scaling": None,  # written as "rope_scaling": null, as Qwen2 checkpoints do
        # As Qwen2/2.5 checkpoints: no layer_types, and a numeric sliding_window that must be
        # ignored because use_sliding_window is false (here smaller than the sequence, as a trap).
        "legacy_edit": lambda c: (c.pop("layer_types"), c.update(sliding_window=4)),
    },
    {
        "name": "mistral",
        "config": lambda: MistralConfig(
            **COMMON, num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, sliding_window=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "save_dtype": torch.float32,
        "legacy_rope_scaling": "absent",  # no rope_scaling key at all, as Mistral checkpoints
    },
    {
        "name": "llama_bias_linear",
        "config": lambda: LlamaConfig(
            **COMMON, num_key_value_heads=4, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "save_dtype": torch.float32,
        "legacy_rope_scaling": {"type": "linear", "factor": 2.0},  # the very old key
    },
]


def saved_tensors(d):
    """[(file, [(name, dtype, shape)])] exactly as saved, and {name: tensor}."""
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        weight_map = json.load(open(idx))["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    layout, tensors = [], {}
    for f in files:
        entries = []
        with safe_open(os.path.join(d, f), framework="pt") as sf:
            for name in sorted(sf.keys()):
                t = sf.get_tensor(name)
                tensors[name] = t
                entries.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""),
                                "shape": list(t.shape)})
        layout.append({"file": f, "tensors": entries})
    if os.path.exists(idx):
        assert weight_map == {e["name"]: l["file"] for l in layout for e in l["tensors"]}
    return layout, tensors


def legacy_config_text(v5_text, spec, edit=None):
    c = json.loads(v5_text)
    if edit is not None:
        edit(c)
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp["rope_theta"]
    if spec == "absent":
        pass
    elif spec is None:
        c["rope_scaling"] = None
    else:
        c["rope_scaling"] = spec
        # what we moved must be all that rope_parameters held
        assert {k: v for k, v in rp.items() if k not in ("rope_theta",)} == \
            {("rope_type" if k == "type" else k): v for k, v in spec.items()}, (rp, spec)
    c["torch_dtype"] = c.pop("dtype")
    return json.dumps(c, indent=2, sort_keys=True) + "\n"


def load(d, **kw):
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager", **kw)
    m.eval()
    return m


def logits_of(model, ids=INPUT_IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy(model):
    x = torch.tensor([INPUT_IDS])
    out_ids, margins = [], []
    with torch.no_grad():
        out = model(x, use_cache=True)
        for _ in range(STEPS):
            top2 = torch.topk(out.logits[0, -1], 2).values
            nxt = int(out.logits[0, -1].argmax())
            out_ids.append(nxt)
            margins.append(r6(float(top2[0] - top2[1])))
            out = model(torch.tensor([[nxt]]), cache=out.cache, use_cache=True)
    return out_ids, margins


def greedy_no_cache(model):
    ids = list(INPUT_IDS)
    for _ in range(STEPS):
        ids.append(int(logits_of(model, ids)[-1].argmax()))
    return ids[len(INPUT_IDS):]


def r6(x):
    return float(f"{x:.6g}")


def build(spec, workdir):
    config = spec["config"]()
    model = AutoModelForCausalLM.from_config(config)  # f32
    assert next(model.parameters()).dtype == torch.float32
    # First save only to learn the exact names save_pretrained writes.
    probe = os.path.join(workdir, spec["name"] + "_probe")
    model.save_pretrained(probe)
    _, probe_tensors = saved_tensors(probe)
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in probe_tensors.items():
            sd[name].copy_(torch.from_numpy(formula_values(name, tuple(t.shape)).astype(np.float32)))
        if config.tie_word_embeddings:
            assert "lm_head.weight" not in probe_tensors
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if spec["save_dtype"] != torch.float32:
        model = model.to(spec["save_dtype"])
    d5 = os.path.join(workdir, spec["name"] + "_v5")
    kw = {"max_shard_size": spec["max_shard_size"]} if "max_shard_size" in spec else {}
    model.save_pretrained(d5, **kw)
    # The saved tensors are exactly the formula's values (cast to the file's dtype).
    layout, tensors = saved_tensors(d5)
    assert sorted(tensors) == sorted(probe_tensors)
    for name, t in tensors.items():
        want = torch.from_numpy(formula_values(name, tuple(t.shape)).astype(np.float32)).to(spec["save_dtype"])
        assert t.dtype == spec["save_dtype"] and torch.equal(t, want), name
    v5_text = open(os.path.join(d5, "config.json")).read()
    dl = os.path.join(workdir, spec["name"] + "_legacy")
    os.makedirs(dl)
    for f in os.listdir(d5):
        if f != "config.json":
            os.link(os.path.join(d5, f), os.path.join(dl, f))
    legacy_text = legacy_config_text(v5_text, spec["legacy_rope_scaling"], spec.get("legacy_edit"))
    open(os.path.join(dl, "config.json"), "w").write(legacy_text)
    idx = os.path.join(d5, "model.safetensors.index.json")
    index_text = open(idx).read() if os.path.exists(idx) else None
    return d5, dl, v5_text, legacy_text, layout, index_text


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
    for name in ("model.norm.weight", "lm_head.weight"):
        got = formula_values(name, (5,)).tolist()
        assert got == formula_scalar_check(name), name
    cases, checks = [], {}
    with tempfile.TemporaryDirectory() as work:
        for spec in MODELS:
            name = spec["name"]
            d5, dl, v5_text, legacy_text, layout, index_text = build(spec, work)
            m5 = load(d5)
            logits = logits_of(m5)
            ml = load(dl)
            assert ml.config.rope_parameters == m5.config.rope_parameters or \
                {k: v for k, v in ml.config.rope_parameters.items() if k != "type"} == m5.config.rope_parameters, \
                (ml.config.rope_parameters, m5.config.rope_parameters)
            legacy_logits = logits_of(ml)
            assert torch.equal(logits, legacy_logits), name
            if spec["save_dtype"] == torch.bfloat16 or m5.config.tie_word_embeddings:
                assert torch.equal(m5.lm_head.weight, m5.model.embed_tokens.weight)
            gen, margins = greedy(m5)
            assert (gen, margins) == greedy(ml), name
            gen_nc = greedy_no_cache(m5)
            assert gen == gen_nc, (name, gen, gen_nc)
            chk = {"legacy_layout_logits_bit_identical": True,
                   "legacy_rope_parameters_after_load": ml.config.rope_parameters,
                   "greedy_with_cache_equals_without_cache": True}
            # Does the configured feature change anything?
            if name in ("llama31", "llama_bias_linear"):
                cfg = AutoConfig.from_pretrained(d5)
                cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
                plain = load(d5, config=cfg)
                inv_a = m5.model.rotary_emb.inv_freq
                inv_b = plain.model.rotary_emb.inv_freq
                chk["inv_freq_scaled"] = [r6(v) for v in inv_a.tolist()]
                chk["inv_freq_unscaled"] = [r6(v) for v in inv_b.tolist()]
                chk["inv_freq_entries_changed_by_scaling"] = int((inv_a != inv_b).sum())
                if name == "llama31":
                    # all three llama3 bands: kept (high freq), divided by factor (low), smoothed (between)
                    kept = int((inv_a == inv_b).sum())
                    divided = int(torch.isclose(inv_a, inv_b / 8.0, rtol=1e-6, atol=0).sum())
                    chk["llama3_bands_kept_divided_smoothed"] = [kept, divided, len(inv_a) - kept - divided]
                    assert kept > 0 and divided > 0 and len(inv_a) - kept - divided > 0, chk
                d = float((logits_of(plain) - logits).abs().max())
                chk["max_abs_logit_diff_vs_no_rope_scaling"] = d
                assert chk["inv_freq_entries_changed_by_scaling"] > 0 and d > 1e-4, (name, d)
            if name == "mistral":
                cfg = AutoConfig.from_pretrained(d5)
                cfg.sliding_window = None
                full = load(d5, config=cfg)
                d = float((logits_of(full) - logits).abs().max())
                chk["max_abs_logit_diff_vs_no_sliding_window"] = d
                assert d > 1e-4
                # positions before the window is full must agree
                chk["max_abs_logit_diff_vs_no_window_first_4_positions"] = float(
                    (logits_of(full)[:4] - logits[:4]).abs().max())
                sd = AutoModelForCausalLM.from_pretrained(d5, dtype=torch.float32, attn_implementation="sdpa")
                chk["max_abs_logit_diff_sdpa_vs_eager"] = float((logits_of(sd) - logits).abs().max())
            if name == "qwen2":
                f32 = AutoModelForCausalLM.from_pretrained(d5, attn_implementation="eager")
                chk["dtype_when_loaded_without_dtype_arg"] = str(f32.dtype)
                chk["layer_types"] = m5.config.layer_types
                chk["legacy_loaded_sliding_window_and_layer_types"] = [ml.config.sliding_window, ml.config.layer_types]
                assert ml.config.sliding_window is None and ml.config.layer_types == m5.config.layer_types
                # the trap is real: with the window applied the logits would differ
                cfg = AutoConfig.from_pretrained(d5)
                cfg.use_sliding_window, cfg.sliding_window = True, 4
                cfg.layer_types = ["full_attention", "sliding_attention"]
                win = load(d5, config=cfg)
                chk["max_abs_logit_diff_if_window_4_were_applied_to_layer_1"] = float((logits_of(win) - logits).abs().max())
                assert chk["max_abs_logit_diff_if_window_4_were_applied_to_layer_1"] > 1e-4
            checks[name] = chk
            cases.append({
                "name": name,
                "model_type": m5.config.model_type,
                "config_v5": v5_text,
                "config_legacy": legacy_text,
                "safetensors": layout,
                "safetensors_index_json": index_text,
                "input_ids": INPUT_IDS,
                "logits_shape": list(logits.shape),
                "logits": [[r6(v) for v in row] for row in logits.tolist()],
                "greedy_ids": gen,
                "greedy_top1_top2_margins": margins,
                "checks": chk,
            })
            print(name, "logits", tuple(logits.shape), "greedy", gen, file=sys.stderr)
    ref = {
        "generator": "lib/tests/data/make_config_reference.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "attn_implementation": "eager",
        "reference_dtype": "float32 (bf16 weights of qwen2 upcast exactly on load)",
        "logits_rounding": "6 significant digits",
        "greedy": f"{STEPS} steps, argmax, KV cache, not stopped at EOS",
        "weight_formula": WEIGHT_FORMULA,
        "weight_formula_samples": [
            {"name": n, "fnv1a64": f"0x{fnv1a64(n.encode()):016x}",
             "first_f64": [repr(v) for v in formula_values(n, (4,)).tolist()],
             "first_f32_bits": [f"0x{int(b):08x}" for b in formula_values(n, (4,)).astype(np.float32).view(np.uint32)],
             "first_bf16_bits": [f"0x{int(b):04x}" for b in torch.from_numpy(formula_values(n, (4,)).astype(np.float32))
                                 .to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)]}
            for n in ("model.norm.weight", "model.embed_tokens.weight")
        ],
        "models": cases,
    }
    with open(OUT, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print("wrote", OUT, os.path.getsize(OUT), "bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
