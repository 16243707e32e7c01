# Shared environment for the project scripts. Source it: `. scripts/env.sh`.
# Everything heavy lives outside the clone so that CI and later checkouts reuse it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ROOT
export TUNEBOOK_CACHE="${TUNEBOOK_CACHE:-$HOME/.cache/tunebook}"
# One target dir for tests, the CLI, the kernel and the kernel's evcxr slot 0.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TUNEBOOK_CACHE/target}"
export TUNEBOOK_MODELS="${TUNEBOOK_MODELS:-$TUNEBOOK_CACHE/models}"
export TUNEBOOK_SMOLLM2_GGUF="$TUNEBOOK_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
export VENV="$ROOT/.venv"
export PATH="$VENV/bin:$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/debug:$PATH"
export JUPYTER_PLATFORM_DIRS=1
# Workspace binaries link libstd dynamically (see ARCHITECTURE.md, "One dependency build").
if RUST_LIBDIR="$(rustc --print target-libdir 2>/dev/null)"; then
  export LD_LIBRARY_PATH="$RUST_LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# mold intercepts the linker for cargo and for the kernel's cell builds alike.
# `CI` is removed from cargo's environment: rust-analyzer's crates behind the kernel
# read it at compile time (`option_env!("CI")`), so a build with it set and one
# without would each recompile them (about 3.5 minutes) after the other.
cargo_() {
  if command -v mold >/dev/null; then env -u CI mold -run cargo "$@"; else env -u CI cargo "$@"; fi
}
