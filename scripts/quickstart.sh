#!/usr/bin/env bash
# The main job: set up, then execute the fine-tuning tutorial headless on the
# tunebook kernel and say where the result is and how to open it in JupyterLab.
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
cat <<MSG

Executed notebook: $out/01-finetune.ipynb
Open it in JupyterLab:
  $VENV/bin/jupyter lab $out/01-finetune.ipynb
(choose the "Rust (tunebook)" kernel for new notebooks)
MLflow UI (runs and registered models): $MLFLOW_TRACKING_URI
  export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI   # in the shell you start JupyterLab from
  tunebook mlflow down                             # stops the server
MSG
