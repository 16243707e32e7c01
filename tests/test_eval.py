"""End-to-end tests of `tunebook eval`: held-out rows from a Delta table, the SmolLM2 GGUF
evaluated in-process and through a real `tunebook serve` endpoint, logged to a real MLflow
server and read back with MLflow's own Python client (tables, traces, assessments, inputs).

One evaluation is shared by the module; the gate test runs its own (three rows).
"""

import csv
import json
import os
import subprocess
from types import SimpleNamespace

import mlflow
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from test_serve import Server

GGUF = os.environ.get("TUNEBOOK_SMOLLM2_GGUF", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 12
METRICS = ["exact_match", "f1", "rougeL", "bleu", "chrf"]
KEY = "sk-eval-key"

pytestmark = pytest.mark.skipif(not os.path.isfile(GGUF), reason="the SmolLM2 GGUF is installed by scripts/setup.sh")


def eval_cmd(*args):
    return subprocess.run(["tunebook", "eval", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    out = subprocess.run(["tunebook", "mlflow", "up", "--data-dir", str(d / "mlflow")], check=True, capture_output=True, text=True).stdout
    uri = next(l.split("=", 1)[1] for l in out.splitlines() if "export MLFLOW_TRACKING_URI=" in l).strip()
    with open(os.path.join(ROOT, "data/sample/dates-eval.jsonl")) as f:
        rows = [json.loads(l) for l in f][:ROWS]
    write_deltalake(str(d / "heldout"), pa.Table.from_pylist(rows))
    (d / "keys").write_text(KEY + "\n")
    # Two requests decoded at a time and one waiting: the evaluation (8 requests at once) and
    # the judge (4) get 429s with Retry-After and must retry until every row is answered.
    server = Server([GGUF, "--served-model-name", "smol", "--api-key-file", str(d / "keys"), "--max-concurrency", "2",
                     "--max-queue", "3", "--inference-table", str(d / "served")])
    try:
        proc = eval_cmd(
            str(d / "heldout"),
            "--model", f"local={GGUF}",
            "--model", f"served={server.url}",
            "--api-key-file", str(d / "keys"),
            "--metric", ",".join(METRICS),
            "--judge", server.url,
            "--judge-max-tokens", "24",
            "--max-new-tokens", "12",
            "--batch-size", "5",
            "--experiment", "e2e-eval",
            "--tracking-uri", uri,
            "--output", str(d / "rows.csv"),
        )
        yield SimpleNamespace(proc=proc, uri=uri, dir=d, rows=rows)
    finally:
        server.stop()
        subprocess.run(["tunebook", "mlflow", "down", "--data-dir", str(d / "mlflow")], check=False)


def test_eval_prints_metric_by_model_with_the_difference_and_writes_every_row(evaluated):
    p = evaluated.proc
    assert p.returncode == 0, p.stderr
    for s in ["local", "served", "Δ (95% CI)", "cut by max_new_tokens", "MLflow: http://", "correctness", *METRICS]:
        assert s in p.stdout, p.stdout
    with open(evaluated.dir / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ROWS
    assert [r["reference"] for r in rows] == [r["messages"][-1]["content"] for r in evaluated.rows]


def test_the_endpoint_answers_exactly_as_the_in_process_batched_engine(evaluated):
    # In-process: 12 rows, 5 decoded together; served: 12 concurrent HTTP requests, batched
    # however they arrived. Greedy answers must not depend on the batch.
    with open(evaluated.dir / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["local"] for r in rows] == [r["served"] for r in rows]
    assert all(r["local"].strip() for r in rows), rows


def test_mlflow_shows_one_run_per_model_the_tables_traces_and_the_differences(evaluated):
    mlflow.set_tracking_uri(evaluated.uri)
    mlflow.set_experiment("e2e-eval")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("e2e-eval")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tunebook.eval") == "comparison")
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(kids) == {"local", "served"}
    for r in kids.values():
        assert r.data.tags["mlflow.runType"] == "genai_evaluate"
        assert json.loads(r.data.tags["mlflow.loggedArtifacts"]) == [{"path": "eval_results_table.json", "type": "table"}]
        for m in METRICS:
            assert f"{m}/mean" in r.data.metrics and f"{m}/stderr" in r.data.metrics, r.data.metrics
        assert "bleu/corpus" in r.data.metrics and "truncated/rate" in r.data.metrics
        (inp,) = r.inputs.dataset_inputs
        assert inp.dataset.source_type == "delta_table"
        assert json.loads(inp.dataset.source)["path"] == os.path.realpath(evaluated.dir / "heldout")
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "eval"
    for m in METRICS:
        assert parent.data.metrics[f"delta/{m}"] == 0.0, "identical answers make no difference"
        assert parent.data.metrics[f"delta/{m}/ci_low"] == parent.data.metrics[f"delta/{m}/ci_high"] == 0.0

    # The Evaluation view's side by side: both runs' tables, row for row.
    ids = [kids["local"].info.run_id, kids["served"].info.run_id]
    table = mlflow.load_table("eval_results_table.json", run_ids=ids, extra_columns=["run_id"])
    assert len(table) == 2 * ROWS
    by_run = {rid: table[table.run_id == rid].sort_values("row") for rid in ids}
    assert list(by_run[ids[0]]["inputs"]) == list(by_run[ids[1]]["inputs"])
    assert list(by_run[ids[0]]["outputs"]) == list(by_run[ids[1]]["outputs"])
    assert {"targets", "exact_match/score", "rougeL/score", "token_count", "latency"} <= set(table.columns)

    # One trace per row with the request, the answer, the reference and every metric.
    traces = mlflow.search_traces(run_id=ids[0], return_type="list")
    assert len(traces) == ROWS
    local_rows = by_run[ids[0]].set_index("inputs")
    for t in traces:
        names = {a.name: a for a in t.info.assessments}
        assert set(METRICS) | {"expected_response"} <= set(names), names
        row = local_rows.loc[t.info.request_preview]
        assert t.info.response_preview == row["outputs"]
        assert names["expected_response"].value == row["targets"]
        assert names["rougeL"].value == pytest.approx(row["rougeL/score"])
        assert [s.name for s in t.data.spans] == ["generate"]
        # The judge (the served SmolLM2, asked in MLflow's format) left its verdict and rationale.
        judged = names["correctness"]
        assert judged.source.source_type == "LLM_JUDGE" and judged.source.source_id == "smol"
        assert judged.value in ("yes", "no", None) and judged.rationale, judged


def test_the_judge_asked_the_endpoint_at_temperature_0_in_mlflows_format_for_every_answer(evaluated):
    from deltalake import DeltaTable

    log = DeltaTable(str(evaluated.dir / "served")).to_pyarrow_table().to_pylist()
    judge = [json.loads(r["request"]) for r in log if r["status_code"] == 200 and "<claim>" in r["request"]]
    assert len(judge) == 2 * ROWS, "each model's every answer judged once"
    for req in judge:
        assert req["temperature"] == 0.0 and req["max_tokens"] == 24
        content = req["messages"][0]["content"]
        assert "<question>" in content and "<document>" in content and '"result": "yes|no"' in content


def test_a_gate_the_candidate_does_not_pass_exits_1_and_bad_arguments_exit_2(tmp_path):
    data = os.path.join(ROOT, "data/sample/dates-eval.jsonl")
    p = eval_cmd(data, "--model", f"base={GGUF}", "--model", f"same={GGUF}", "--limit", "3", "--max-new-tokens", "8",
                 "--gate", "exact_match:0.5")
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "gate: Δ exact_match = +0.0000 < +0.5000: FAILED" in p.stdout, p.stdout
    p = eval_cmd(data, "--model", f"base={GGUF}", "--metric", "rogue")
    assert p.returncode == 2 and "unknown metric `rogue`" in p.stderr, p.stderr
    p = eval_cmd(data, "--model", "no-equals-sign")
    assert p.returncode == 2 and "expected NAME=SOURCE" in p.stderr, p.stderr
