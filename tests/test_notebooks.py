"""Tutorial notebooks executed headless by nbconvert on the tunebook kernel."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import nbformat
import pytest

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


@pytest.fixture
def mlflow_server(tmp_path):
    """A real local MLflow server started as the quickstart starts it (`tunebook mlflow up`)."""
    data = tmp_path / "mlflow"
    out = subprocess.run(["tunebook", "mlflow", "up", "--data-dir", str(data)], check=True, capture_output=True, text=True).stdout
    uri = next(l.split("=", 1)[1] for l in out.splitlines() if "export MLFLOW_TRACKING_URI=" in l)
    yield uri.strip()
    subprocess.run(["tunebook", "mlflow", "down", "--data-dir", str(data)], check=False)


def test_finetune_notebook(tmp_path, monkeypatch, mlflow_server):
    # The quickstart's path: tracked in a local MLflow server, registered, loaded back.
    # A short run keeps CI fast; the quickstart trains for a full epoch.
    monkeypatch.setenv("TUNEBOOK_SAMPLE_DURATION", "10ba")
    monkeypatch.setenv("TUNEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("TUNEBOOK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    try:
        nb = run_notebook("01-finetune.ipynb", tmp_path)
        # The second half of the pipeline, on what the first registered.
        nb2 = run_notebook("02-serve-and-evaluate.ipynb", tmp_path)
        # The way out: GGUF exports of the registered adapter, attached to its version.
        nb3 = run_notebook("03-export.ipynb", tmp_path)
    finally:
        # An endpoint the notebook started and did not stop (a failed cell) must not outlive the test.
        for f in (tmp_path / "home" / "endpoints").glob("*/endpoint.json"):
            try:
                os.kill(json.loads(f.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
    cells = outputs_by_tag(nb)

    assert "<table>" in cells["data"][-1]["data"]["text/html"]
    assert "exact_match" in cells["before"][-1]["data"]["text/plain"]
    # Base and fine-tuned side by side: every metric, the difference with its interval,
    # and the links to the MLflow runs the evaluation logged.
    after = cells["after"][-1]["data"]["text/plain"]
    for s in ("fine-tuned", "exact_match", "f1", "rougeL", "Δ (95% CI)", "MLflow: http://"):
        assert s in after, after

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

    # Served: the base model and the registered adapter side by side, and the official
    # OpenAI Python client against the same endpoint.
    shown = cells["serve"][-1]["data"]["text/plain"]
    assert "serving" in shown and "http://127.0.0.1:" in shown and "smol, dates" in shown, shown
    chat = cells["serve-chat"][-1]["data"]["text/plain"].strip('"').replace("\\n", "\n")
    lines = dict(l.split(": ", 1) for l in chat.splitlines())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", lines["fine-tuned"]), chat
    assert lines["fine-tuned"] == lines["in this process"], "the served adapter answers as the merged model does"
    assert lines["base"] != lines["fine-tuned"], chat
    assert lines["fine-tuned"] in cells["openai"][-1]["data"]["text/plain"]
    assert "running endpoints: 0" in cells["serve-stop"][-1]["data"]["text/plain"]

    # Registered in MLflow and loaded back from the registry by name/version.
    served = cells["registry"][-1]["data"]["text/plain"]
    assert served.startswith("main.samples.dates/1: 1977"), served
    import urllib.request, json as _json
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/registered-models/get?name=main.samples.dates") as r:
        model = _json.load(r)["registered_model"]
    assert model["name"] == "main.samples.dates"

    # 02: the registered adapter served next to its base, both evaluated through the
    # endpoint, logged to MLflow, and promoted only when the gate passed.
    cells = outputs_by_tag(nb2)
    assert "main.samples.dates/1" in cells["setup"][-1]["data"]["text/plain"]
    assert "smol, dates" in cells["serve"][-1]["data"]["text/plain"]
    shown = cells["evaluate"][-1]["data"]
    for s in ("smol", "dates", "exact_match", "chrf", "Δ (95% CI)", "gate: Δ exact_match", "MLflow: http://"):
        assert s in shown["text/plain"], shown["text/plain"]
    assert "<table>" in shown["text/html"] and "<a href=" in shown["text/html"]
    assert "<table>" in cells["rows"][-1]["data"]["text/html"]
    assert "ci_low" in cells["summary"][-1]["data"]["text/plain"]
    links = cells["links"][-1]["data"]["text/plain"]
    assert "experiment: http://" in links, links
    passed = "gate passed: Some(true)" in links
    assert passed or "gate passed: Some(false)" in links, links
    try:
        with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/registered-models/alias?name=main.samples.dates&alias=champion") as r:
            champion = _json.load(r)["model_version"]["version"]
    except urllib.error.HTTPError:
        champion = None
    assert champion == ("1" if passed else None), (links, champion)
    assert "running endpoints: 0" in cells["serve-stop"][-1]["data"]["text/plain"]

    # 03: a merged q8_0 GGUF with a Modelfile and an adapter GGUF, attached to the
    # registered version and loaded back from the registry by name.
    cells = outputs_by_tag(nb3)
    shown = cells["export"][-1]["data"]["text/plain"]
    for s in ("dates-q8_0.gguf", "model q8_0", "Q8_0", "Modelfile", "attached to the registered model"):
        assert s in shown, shown
    modelfile = cells["modelfile"][-1]["data"]["text/plain"]
    assert "FROM ./dates-q8_0.gguf" in modelfile and "PARAMETER stop" in modelfile and "<|im_end|>" in modelfile, modelfile
    assert "adapter f16" in cells["adapter"][-1]["data"]["text/plain"]
    loaded = cells["load"][-1]["data"]["text/plain"].strip('"').replace("\\n", "\n")
    lines = dict(l.split(": ", 1) for l in loaded.splitlines())
    assert "dates-q8_0.gguf" in lines["attached"], loaded
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", lines["registered adapter"]), loaded
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", lines["q8_0 GGUF"]), loaded

    # The fine-tune leaves for llama.cpp: the run exported merged (f32, q8_0, q4_k_m) and
    # answered by llama.cpp itself on held-out rows it tokenizes from the rendered chat.
    check_exports_in_llama_cpp(tmp_path)


def check_exports_in_llama_cpp(tmp_path, rows=20):
    from jinja2 import Environment
    from gguf import GGUFReader
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "status.json").is_file()]
    with open(ROOT / "data/sample/dates-eval.jsonl") as f:
        held = [json.loads(l) for l in f][:rows]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    ev = subprocess.run(["tunebook", "eval", str(tmp_path / "held.jsonl"), "--model", f"ft={run}", "--metric", "exact_match",
                         "--max-new-tokens", "16", "--output", str(tmp_path / "rows.csv")], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    import csv
    with open(tmp_path / "rows.csv") as f:
        ours = [r["ft"] for r in csv.DictReader(f)]
    refs = [r["messages"][-1]["content"] for r in held]
    em = lambda answers: sum(a.strip() == r for a, r in zip(answers, refs)) / len(refs)
    answers = {}
    for quant in ["f32", "q8_0", "q4_k_m"]:
        out = tmp_path / f"ft-{quant}.gguf"
        p = subprocess.run(["tunebook", "export", str(run), "--gguf", str(out), "--quant", quant], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        reader = GGUFReader(out)
        template = Environment(trim_blocks=True, lstrip_blocks=True).from_string(reader.fields["tokenizer.chat_template"].contents())
        prompts = [template.render(messages=r["messages"][:-1], add_generation_prompt=True) for r in held]
        (tmp_path / "prompts.json").write_text(json.dumps(prompts))
        g = subprocess.run(["node", str(ROOT / "tests/llamacpp_greedy.mjs"), "--model", str(out), "--prompts",
                            str(tmp_path / "prompts.json"), "--max-tokens", "16"], capture_output=True, text=True)
        assert g.returncode == 0, g.stderr
        answers[quant] = json.loads(g.stdout)["texts"]
    print("exact match: tunebook", em(ours), {q: em(a) for q, a in answers.items()})
    # f32: llama.cpp answers every row as tunebook does.
    assert [a.strip() for a in answers["f32"]] == [a.strip() for a in ours], (answers["f32"], ours)
    assert abs(em(answers["q8_0"]) - em(ours)) <= 1 / rows + 1e-9, (answers["q8_0"], ours)
    assert em(answers["q4_k_m"]) >= em(answers["f32"]) - 0.10, (answers["q4_k_m"], answers["f32"])
