#!/usr/bin/env bash
# Set up lora_cli in ./.venv: torch first (pinned, see below), then lora_cli with its test extras.
#   bash scripts/setup.sh            # CPU machine: torch 2.13.0 (the CPU wheel where pip finds one first)
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/setup.sh   # GPU box
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Install torch on its own, pinned: an unpinned torch pulled in as a dependency brings a multi-GB CUDA build.
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, transformers, trl, peft; print(f'lora_cli ready: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
