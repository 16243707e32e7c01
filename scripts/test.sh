#!/usr/bin/env bash
# Runs every test: set-up, Rust unit and integration tests, then the end-to-end
# tests (a real Jupyter client against the installed kernel, notebooks executed
# by nbconvert). Exit status is non-zero if anything fails.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
printf '\n== cargo test (library)\n'
# The SmolLM2 GGUF was just installed: tests that need it fail without it.
export TUNEBOOK_REQUIRE_SMOLLM2=1
# ... and so was node-llama-cpp: GGUF exports are checked in llama.cpp itself.
export TUNEBOOK_REQUIRE_LLAMACPP=1
# ... and so was MPICH: training across processes runs under a real mpirun.
export TUNEBOOK_REQUIRE_MPI=1
# ... and SeaweedFS (`weed`, in the venv): Delta tables on S3 are tested against it.
export TUNEBOOK_REQUIRE_S3=1
cargo_ test -p tunebook
printf '\n== cargo test (kernel)\n'
cargo_ test -p tunebook-kernel
printf '\n== end-to-end tests\n'
"$VENV/bin/python" -m pytest -v --durations=8 tests/ "$@"
