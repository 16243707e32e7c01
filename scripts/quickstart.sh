#!/usr/bin/env bash
# The main job: set up, then execute the tutorials headless on the tunebook kernel
# (fine-tune -> register -> serve -> evaluate -> export) and say where the results are and how
# to open them in JupyterLab.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
printf '\n== local MLflow server (tunebook mlflow up)\n'
# Runs started from the notebooks are tracked there; it keeps running afterwards.
up_out="$(tunebook mlflow up)"
printf '%s\n' "$up_out"
MLFLOW_TRACKING_URI="$(printf '%s\n' "$up_out" | sed -n 's/^ *export MLFLOW_TRACKING_URI=//p')"
export MLFLOW_TRACKING_URI
out="$ROOT/notebooks/executed"
mkdir -p "$out"
printf '\n== executing notebooks/01-finetune.ipynb (fine-tunes SmolLM2 on the sample task)\n'
jupyter nbconvert --to notebook --execute notebooks/01-finetune.ipynb \
  --ExecutePreprocessor.kernel_name=tunebook --ExecutePreprocessor.timeout=1800 \
  --ExecutePreprocessor.startup_timeout=120 --output-dir "$out"
printf '\n== executing notebooks/02-serve-and-evaluate.ipynb (serves the registered adapter, evaluates base vs fine-tuned)\n'
jupyter nbconvert --to notebook --execute notebooks/02-serve-and-evaluate.ipynb \
  --ExecutePreprocessor.kernel_name=tunebook --ExecutePreprocessor.timeout=1800 \
  --ExecutePreprocessor.startup_timeout=120 --output-dir "$out"
printf '\n== executing notebooks/03-export.ipynb (GGUF for llama.cpp / Ollama, attached to the registered model)\n'
jupyter nbconvert --to notebook --execute notebooks/03-export.ipynb \
  --ExecutePreprocessor.kernel_name=tunebook --ExecutePreprocessor.timeout=1800 \
  --ExecutePreprocessor.startup_timeout=120 --output-dir "$out"
printf '\n== the evaluation summary\n'
"$VENV/bin/python" - "$out/02-serve-and-evaluate.ipynb" <<'PY'
import json, sys
nb = json.load(open(sys.argv[1]))
for c in nb["cells"]:
    if "evaluate" in c.get("metadata", {}).get("tags", []):
        for o in c["outputs"]:
            if "data" in o:
                print(o["data"]["text/plain"])
PY
cat <<MSG

Executed notebooks: $out/01-finetune.ipynb, $out/02-serve-and-evaluate.ipynb, $out/03-export.ipynb
GGUF exports (llama.cpp: llama-cli -m FILE -cnv; Ollama: ollama create dates -f Modelfile): ${TUNEBOOK_HOME:-$HOME/.tunebook}/exports
Open them in JupyterLab:
  $VENV/bin/jupyter lab $out/01-finetune.ipynb
(choose the "Rust (tunebook)" kernel for new notebooks)
MLflow UI (runs, registered models, the evaluation's runs, tables and traces): $MLFLOW_TRACKING_URI
  export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI   # in the shell you start JupyterLab from
  tunebook mlflow down                             # stops the server
MSG
