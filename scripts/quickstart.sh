#!/usr/bin/env bash
# The main job: set up, then execute the fine-tuning tutorial headless on the
# tunebook kernel and say where the result is and how to open it in JupyterLab.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
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
MSG
