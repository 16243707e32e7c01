#!/usr/bin/env bash
# Installs node-llama-cpp (prebuilt llama.cpp binaries, CPU only) into a cache
# directory outside the repo, for bench/llamacpp_ref.mjs. Idempotent: does
# nothing when the pinned versions are already there. Prints the install dir.
#
#   bash bench/llamacpp_setup.sh            # -> ~/.cache/tunebook/node-llama-cpp
#   NODE_PATH="$(bash bench/llamacpp_setup.sh)/node_modules" node bench/llamacpp_ref.mjs ...
set -euo pipefail

VERSION="${NODE_LLAMA_CPP_VERSION:-3.22.1}"
DIR="${TUNEBOOK_NODE_LLAMA_CPP_DIR:-$HOME/.cache/tunebook/node-llama-cpp}"

installed_version() {
    node -e 'try { console.log(require(process.argv[1]).version) } catch { }' "$DIR/node_modules/$1/package.json" 2>/dev/null || true
}

if [[ "$(installed_version node-llama-cpp)" == "$VERSION" && "$(installed_version @node-llama-cpp/linux-x64)" == "$VERSION" ]]; then
    echo "$DIR"
    exit 0
fi

command -v npm >/dev/null || { echo "npm not found (node >= 20 required)" >&2; exit 1; }
mkdir -p "$DIR"
cat > "$DIR/package.json" <<JSON
{
  "name": "tunebook-llamacpp-ref",
  "private": true,
  "type": "module",
  "dependencies": {
    "node-llama-cpp": "$VERSION",
    "@node-llama-cpp/linux-x64": "$VERSION"
  }
}
JSON

# NODE_LLAMA_CPP_SKIP_DOWNLOAD: the postinstall step never downloads or builds
# llama.cpp. --omit=optional: skip the CUDA/Vulkan prebuilt packages (large and
# unused); the plain CPU one is a direct dependency above.
(
    cd "$DIR"
    NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --omit=optional --loglevel=error >&2
)

if [[ "$(installed_version node-llama-cpp)" != "$VERSION" || "$(installed_version @node-llama-cpp/linux-x64)" != "$VERSION" ]]; then
    echo "node-llama-cpp $VERSION install failed in $DIR" >&2
    exit 1
fi
echo "$DIR"
