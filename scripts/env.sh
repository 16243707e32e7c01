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
#
# cargo_ also runs cargo without the variables that dependencies read at compile time
# (`option_env!` in sources, `rerun-if-env-changed` in build scripts): with them, a build
# in one environment recompiles what a build in another made. `CI` alone, read by
# rust-analyzer's crates behind the kernel, cost every CI run after a local build (and
# the other way round) about 3.5 minutes; SOURCE_DATE_EPOCH, CC/CFLAGS and pkg-config's
# variables would recompile the C-backed crates and everything above them; RUSTFLAGS
# would replace .cargo/config.toml's flags (see ARCHITECTURE.md, "One dependency build").
# The project sets none of them; `scripts/build-cuda.sh` passes what it needs itself.
build_env_unset() {
  local v
  for v in $(compgen -e); do
    case "$v" in
      CI|SOURCE_DATE_EPOCH|RUSTFLAGS|RUSTDOCFLAGS|CARGO_INCREMENTAL|CARGO_BUILD_RUSTFLAGS|CC|CXX|AR|CFLAGS|CXXFLAGS|ARFLAGS|\
      CPATH|C_INCLUDE_PATH|CPLUS_INCLUDE_PATH|OBJC_INCLUDE_PATH|OBJCPLUS_INCLUDE_PATH|COMPILER_PATH|GCC_EXEC_PREFIX|SYSROOT|\
      CRATE_CC_NO_DEFAULTS|CC_*|CFLAGS_*|CXX_*|CXXFLAGS_*|AR_*|ARFLAGS_*|HOST_*|PKG_CONFIG*|AWS_LC_*|OPENSSL_*|LIBCRYPTO_*|\
      RUSTONIG_*|ZSTD_SYS_*|RING_*)
        printf -- '-u %s ' "$v" ;;
    esac
  done
}
cargo_() {
  # shellcheck disable=SC2046
  if command -v mold >/dev/null; then
    env $(build_env_unset) mold -run cargo "$@"
  else
    env $(build_env_unset) cargo "$@"
  fi
}
