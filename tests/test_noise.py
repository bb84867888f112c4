"""Quiet by default: a tiny lora-train run prints only its own lines and progress; the library warnings it hides are
exactly those listed in lora_cli/noise.py, and --debug shows them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from lora_cli import noise

from .conftest import ROOT, TINY_TRAIN

# tqdm bars (with or without a label, e.g. "Loading weights: 100%|...| 21/21 [...]") and the trainer's step lines
PROGRESS = re.compile(r"^\s*(\x1b\[A)*\s*([\w ]*:?\s*\d+%\|.*\|.*\]|step \d+/\d+: .*)?\s*(\x1b\[A)*\s*$")


def lora_train(*argv: str) -> list[str]:
    """stderr of a fresh lora-train process (import-time warnings included), one line per printed line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-c", "from lora_cli.cli.train import main; main()", *argv],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # A progress bar may end without a newline right before one of our lines: split there too.
    return [line for line in re.split(r"[\r\n]|(?=lora-train: )", proc.stderr) if line.strip()]


def test_a_default_run_prints_no_library_warnings_and_debug_shows_them(tiny_llama, chat_file, tmp_path):
    # batch 1 with an eval split and the default (paged) optimizer: the settings that draw the most library warnings
    argv = ["--base_model", str(tiny_llama), "--train_path", str(chat_file), *TINY_TRAIN, "--batch_size", "1",
            "--optim", "paged_adamw_32bit", "--val_split", "0.2", "--save_steps", "2"]
    default = lora_train(*argv, "--output_dir", str(tmp_path / "a"))
    foreign = [line for line in default if not line.startswith("lora-train: ") and not PROGRESS.match(line)]
    assert foreign == []
    debug = lora_train(*argv, "--output_dir", str(tmp_path / "b"), "--debug")
    hidden = [line for line in debug if not line.startswith("lora-train: ") and not PROGRESS.match(line)
              and not line.startswith("  ")]  # a warning's source line follows it, indented
    assert hidden, "the run drew none of the library warnings it is meant to show under --debug"
    patterns = [re.compile(pattern) for pattern, _ in noise.MESSAGES]
    assert [line for line in hidden if not any(p.search(line) for p in patterns)] == []
    assert any("per_device_train_batch_size of 1 with padding-free training" in line for line in hidden)
