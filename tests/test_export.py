"""GGUF exports of the SmolLM2 model read by the `gguf` Python package (llama.cpp's own
reader and quantizer): every key and tensor reads back, and every tensor of a type the
package can quantize is byte-for-byte its quantization of the same f32 tensor.

The exports are made once per module with the `tunebook export` CLI. llama.cpp itself
runs the exports in lib/tests/export_gguf.rs.
"""

import os
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", "")
QUANTS = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m"]
# What the gguf package quantizes (bit-exact with ggml's reference code).
PACKAGE_TYPES = {T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
# Tensors compared byte for byte: the embedding and three layers (all would take minutes in numpy).
CHECKED_LAYERS = ("blk.0.", "blk.14.", "blk.29.")

pytestmark = pytest.mark.skipif(not os.path.isfile(GGUF), reason="the SmolLM2 GGUF is installed by scripts/setup.sh")


def export(out, quant, *extra):
    p = subprocess.run(["tunebook", "export", GGUF, "--gguf", str(out), "--quant", quant, *extra],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    files = {"f32": d / "smol-f32.gguf"}
    export(files["f32"], "f32")
    for q in QUANTS:
        files[q] = d / f"smol-{q}.gguf"
        export(files[q], q)
    return files


def arrays(path):
    """Tensors of a file as numpy arrays in row-major (Hugging Face) shape."""
    return {t.name: t for t in GGUFReader(path).tensors}


def test_every_export_is_read_whole_by_the_gguf_package(exports):
    source = GGUFReader(GGUF)
    for quant, path in exports.items():
        r = GGUFReader(path)
        for name, field in r.fields.items():
            field.contents()  # every value decodes
        assert r.fields["general.architecture"].contents() == "llama"
        assert r.fields["general.name"].contents() == source.fields["general.name"].contents()
        assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
        assert r.fields["tokenizer.chat_template"].contents() == source.fields["tokenizer.chat_template"].contents()
        assert r.fields["tokenizer.ggml.tokens"].contents() == source.fields["tokenizer.ggml.tokens"].contents()
        assert len(r.tensors) == len(source.tensors) == 272, quant
        for t in r.tensors:
            if not t.name.startswith(("token_embd", "blk.29.")):
                continue
            x = dequantize(t.data, t.tensor_type)
            assert x.shape == tuple(int(n) for n in reversed(t.shape)), (quant, t.name)
            assert np.isfinite(x).all(), (quant, t.name)


def test_quantized_tensors_are_byte_for_byte_the_gguf_packages_quantization(exports):
    ref = arrays(exports["f32"])
    compared = {}
    for quant in QUANTS:
        for t in GGUFReader(exports[quant]).tensors:
            if t.tensor_type not in PACKAGE_TYPES or not t.name.startswith(("token_embd",) + CHECKED_LAYERS):
                continue
            src = ref[t.name]
            assert src.tensor_type == T.F32
            values = np.asarray(src.data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(src.shape)))
            want = quantize(values, t.tensor_type)
            assert want.tobytes() == np.asarray(t.data).tobytes(), f"{quant}: {t.name} ({t.tensor_type.name})"
            compared.setdefault(t.tensor_type.name, 0)
            compared[t.tensor_type.name] += 1
    assert set(compared) == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}, compared


def test_q4_k_m_gives_each_tensor_the_type_llama_quantize_gives_it(exports):
    types = {t.name: t.tensor_type for t in GGUFReader(exports["q4_k_m"]).tensors}
    n = 30
    more = [l for l in range(n) if l < n // 8 or l >= 7 * n // 8 or (l - n // 8) % 3 == 2]
    assert types["token_embd.weight"] == T.Q8_0  # tied: the output head's rule, 576 is not whole 256-blocks
    for l in range(n):
        # Rows of 576 values fall back from Q4_K to Q5_0 (from Q6_K to Q8_0); ffn_down rows are 1536.
        assert types[f"blk.{l}.attn_q.weight"] == T.Q5_0
        assert types[f"blk.{l}.attn_v.weight"] == (T.Q8_0 if l in more else T.Q5_0)
        assert types[f"blk.{l}.ffn_down.weight"] == (T.Q6_K if l in more else T.Q4_K)
        assert types[f"blk.{l}.attn_norm.weight"] == T.F32
    # The k-quant tensors decode close to the f32 weights.
    ref = arrays(exports["f32"])
    for t in GGUFReader(exports["q4_k_m"]).tensors:
        if t.name in ("blk.3.ffn_down.weight", "blk.2.ffn_down.weight"):
            x = dequantize(t.data, t.tensor_type)
            y = np.asarray(ref[t.name].data, dtype=np.float32).reshape(x.shape)
            rel = np.sqrt(((x - y) ** 2).mean() / (y ** 2).mean())
            assert rel < (0.12 if t.tensor_type == T.Q4_K else 0.04), (t.name, t.tensor_type.name, rel)


def test_an_unknown_quantization_is_refused_with_the_known_ones(tmp_path):
    p = subprocess.run(["tunebook", "export", GGUF, "--gguf", str(tmp_path / "x.gguf"), "--quant", "q3_k_s"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "q4_k_m" in p.stderr and not (tmp_path / "x.gguf").exists()
