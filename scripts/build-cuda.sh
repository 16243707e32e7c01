#!/usr/bin/env bash
# Builds tunebook with its CUDA backend (`--features cuda`), on a machine with or without a GPU.
#
#   ./scripts/build-cuda.sh            # the library, plus the CLI when the CUDA libraries are here
#   ./scripts/build-cuda.sh --release  # extra arguments go to cargo
#
# nvcc comes from PyPI (the CUDA 13.0 packages `nvidia-cuda-nvcc`, `-crt`, `-runtime`,
# `nvidia-nvvm`, `nvidia-cuda-cccl`), installed into a venv in the tunebook cache, so no
# CUDA toolkit is needed to compile candle's kernels. CUDA_COMPUTE_CAP (default 90, H100)
# picks the GPU generation the kernels are compiled for. Linking a CUDA binary needs the
# driver library (libcuda) and cuBLAS, cuRAND and NVRTC, which only a CUDA machine has: without
# them only the library is built, which checks that every CUDA code path compiles.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

CUDA_VENV="$TUNEBOOK_CACHE/cuda/venv"
if [ ! -x "$CUDA_VENV/bin/python" ]; then
  python3 -m venv "$CUDA_VENV"
fi
NV="$CUDA_VENV/lib/python3*/site-packages/nvidia/cu13"
# shellcheck disable=SC2086
if ! ls $NV/bin/nvcc >/dev/null 2>&1 || ! ls $NV/include/cccl >/dev/null 2>&1; then
  "$CUDA_VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
# shellcheck disable=SC2086
NV="$(cd $NV && pwd)"
export PATH="$NV/bin:$PATH" CUDA_ROOT="$NV" CUDA_PATH="$NV"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "nvcc: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP" >&2

targets=(--lib)
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' && ldconfig -p | grep -q 'libcublas\.so'; then
  targets=(--lib --bins)
else
  echo "no libcuda/libcublas here: building the library only (the CLI links on a CUDA machine)" >&2
fi
cd "$ROOT"
cargo_ build -p tunebook --features cuda "${targets[@]}" "$@"
