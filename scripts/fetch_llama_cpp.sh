#!/usr/bin/env bash
# Fetch a real llama.cpp for lora-export's verification and the GGUF tests: npm's node-llama-cpp, which ships prebuilt
# CPU binaries (nothing is compiled). Idempotent; installs into
#   ${LORA_CLI_TEST_ASSETS:-~/.cache/lora_cli/test-assets}/llama-cpp   (lora_cli finds it there, or via LORA_CLI_LLAMA_CPP)
# Without node/npm or a network it says so and exits 0: the llama.cpp tests then skip, naming this script.
set -uo pipefail
VERSION=3.22.1
ASSETS=${LORA_CLI_TEST_ASSETS:-${LORA_CLI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_cli}/test-assets}
DEST=${LORA_CLI_LLAMA_CPP:-$ASSETS/llama-cpp}
installed="$DEST/node_modules/node-llama-cpp/package.json"

if [ -f "$installed" ] && grep -q "\"version\": \"$VERSION\"" "$installed"; then
  echo "llama.cpp (node-llama-cpp $VERSION) already in $DEST"
  exit 0
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "fetch_llama_cpp: node and npm not found; llama.cpp checks will be skipped" >&2
  exit 0
fi
platform=$(node -p 'process.platform + "-" + process.arch')
mkdir -p "$DEST"
# Only this platform's CPU binaries: the optional CUDA/Vulkan builds are ~600 MB and never used (gpu: false).
if (cd "$DEST" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --loglevel=error \
      --omit=optional --save-exact "node-llama-cpp@$VERSION" "@node-llama-cpp/$platform@$VERSION"); then
  echo "llama.cpp (node-llama-cpp $VERSION, $platform) installed in $DEST"
else
  echo "fetch_llama_cpp: npm install failed; llama.cpp checks will be skipped" >&2
fi
exit 0
