"""Tutorial notebooks executed headless by nbconvert on the tunebook kernel."""

import pathlib
import re
import subprocess
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_notebook(name, tmp_path):
    src = ROOT / "notebooks" / name
    subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(src),
         "--ExecutePreprocessor.kernel_name=tunebook", "--ExecutePreprocessor.timeout=1800",
         "--ExecutePreprocessor.startup_timeout=120", "--output-dir", str(tmp_path)],
        check=True,
    )
    return nbformat.read(tmp_path / name, as_version=4)


def outputs_by_tag(nb):
    out = {}
    for cell in nb.cells:
        for tag in cell.get("metadata", {}).get("tags", []):
            out[tag] = cell.get("outputs", [])
    return out


def test_hello_notebook(tmp_path):
    nb = run_notebook("00-hello.ipynb", tmp_path)
    cells = outputs_by_tag(nb)

    info = cells["info"][-1]["data"]
    assert "tunebook" in info["text/plain"] and "<table>" in info["text/html"]

    frame = cells["frame"][-1]["data"]
    assert "<table>" in frame["text/html"] and "loss" in frame["text/html"]
    assert "shape: (5 rows, 2 columns)" in frame["text/plain"]

    plot = cells["plot"][-1]["data"]
    spec = plot["application/vnd.vegalite.v5+json"]
    assert [v["y"] for v in spec["data"]["values"]][:2] == [2.3, 1.9]
    assert plot["image/svg+xml"].lstrip().startswith("<svg")

    assert not [o for o in cells["progress"] if o["output_type"] == "execute_result"], "a loop shows no ()"
    progress = [o for o in cells["progress"] if o["output_type"] == "display_data"]
    # nbclient folds update_display_data into the original output.
    assert len(progress) == 1 and "100%" in progress[0]["data"]["text/plain"]

    summary = cells["summary"][-1]["data"]["text/plain"]
    assert summary == "1.4"


def test_finetune_notebook(tmp_path, monkeypatch):
    # A short run keeps CI fast; the quickstart trains for a full epoch.
    monkeypatch.setenv("TUNEBOOK_SAMPLE_DURATION", "10ba")
    monkeypatch.setenv("TUNEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nb = run_notebook("01-finetune.ipynb", tmp_path)
    cells = outputs_by_tag(nb)

    assert "<table>" in cells["data"][-1]["data"]["text/html"]
    assert "exact match" in cells["before"][-1]["data"]["text/plain"]

    # The live progress bar: one display, updated in place to the end.
    bars = [o for o in cells["wait"] if o["output_type"] == "display_data"]
    assert any("COMPLETED" in o["data"]["text/plain"] for o in bars), [o["data"]["text/plain"] for o in bars]

    compare = cells["compare"][-1]["data"]["text/plain"]
    before, after = map(int, re.findall(r"(\d+)%", compare))
    assert after > before, compare

    spec = cells["plot"][-1]["data"]["application/vnd.vegalite.v5+json"]
    steps = [v["x"] for v in spec["data"]["values"] if v["series"] == "train"]
    assert len(steps) >= 10, spec["data"]["values"][:3]

    answer = cells["query"][-1]["data"]["text/plain"]
    assert "2024-05" in answer, answer
