"""A run survives kill -9 and SIGTERM, resumes to the same result, refuses changed data, never half-saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_cli import checkpoints
from lora_cli.errors import RunFailure

from .conftest import ROOT, TINY_TRAIN, run_cli, write_jsonl

# Runs the real lora-train entry point, with a callback that sends its own process a signal at one step.
WRAPPER = """
import os, signal, sys
from transformers import TrainerCallback
import lora_cli.train.trainer as t

SIG, AT = getattr(signal, sys.argv[1]), int(sys.argv[2])
class SignalAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == AT:
            os.kill(os.getpid(), SIG)
original = t.progress_callbacks
t.progress_callbacks = lambda *a: original(*a) + [SignalAt()]
from lora_cli.cli.train import main
main(sys.argv[3:])
"""

RUN = [*TINY_TRAIN, "--max_steps", "8", "--save_steps", "2", "--save_total_limit", "2"]  # later flags win


def args(tiny_llama, data, out):
    return ["--base_model", str(tiny_llama), "--train_path", str(data), "--output_dir", str(out), *RUN]


def run_with_signal(tmp_path, sig: str, step: int, argv: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script), sig, str(step), *argv], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture()
def data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is number {i * 7}."}]} for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_llama, data, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert run_cli(args(tiny_llama, data, whole)) == 0
    killed = tmp_path / "killed"
    proc = run_with_signal(tmp_path, "SIGKILL", 5, args(tiny_llama, data, killed))
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter_config.json").exists()
    assert [p.name for p in checkpoints.complete_checkpoints(killed)] == ["checkpoint-2", "checkpoint-4"]
    (killed / "checkpoint-6").mkdir()  # as if killed while saving: no completion marker
    (killed / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"partial")

    assert run_cli(args(tiny_llama, data, killed) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-4" in err and "incomplete checkpoint" in err
    a, b = adapter(whole), adapter(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    ma, mb = (json.loads((d / "train_metrics.json").read_text()) for d in (whole, killed))
    assert mb["optimizer_steps"] == ma["optimizer_steps"] == 8
    assert mb["train_loss_last"] == pytest.approx(ma["train_loss_last"], abs=1e-4)
    assert mb["trained_tokens"] == ma["trained_tokens"]  # counted across the interruption
    # save_total_limit 2, pruned only after a newer checkpoint was complete.
    assert [p.name for p in checkpoints.complete_checkpoints(killed)] == ["checkpoint-6", "checkpoint-8"]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    proc = run_with_signal(tmp_path, "SIGTERM", 3, args(tiny_llama, data, out))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lora-train: error: stopped by SIGTERM at step 3") and "--resume" in last
    assert "Traceback" not in proc.stderr
    assert checkpoints.checkpoint_info(out / "checkpoint-3")["step"] == 3  # complete, off the save_steps schedule
    assert not (out / "adapter_config.json").exists()  # the run is not finished: no final adapter


def test_resume_refuses_changed_data_or_config(tiny_llama, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_with_signal(tmp_path, "SIGTERM", 2, args(tiny_llama, data, out)).returncode == 143
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[:-1]) + "\n")  # one row fewer
    assert run_cli(args(tiny_llama, data, out) + ["--resume", "--lora_r", "8"]) == 2
    err = capsys.readouterr().err
    assert "the run changed since its checkpoint" in err and "--train_path data changed" in err
    assert "lora_r: 4 -> 8" in err and "--resume_force" in err
    assert run_cli(args(tiny_llama, data, out) + ["--resume", "--resume_force"]) == 0
    assert (out / "adapter_config.json").is_file()


def test_resume_needs_a_complete_checkpoint(tiny_llama, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_with_signal(tmp_path, "SIGKILL", 1, args(tiny_llama, data, out)).returncode == -signal.SIGKILL
    assert run_cli(args(tiny_llama, data, out) + ["--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert run_cli(args(tiny_llama, data, out) + ["--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite" in capsys.readouterr().err


def test_interrupted_final_save_leaves_no_complete_looking_adapter(tiny_llama, data, tmp_path, monkeypatch):
    from .test_train import build

    _, _, trainer = build(tiny_llama, data, tmp_path / "out")
    out = tmp_path / "final"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # left by an earlier run
    real_replace = os.replace

    def crash_on_second(src, dst):
        if crash_on_second.calls == 1:
            raise OSError(28, "No space left on device")
        crash_on_second.calls += 1
        real_replace(src, dst)

    crash_on_second.calls = 0
    monkeypatch.setattr(checkpoints.os, "replace", crash_on_second)
    with pytest.raises(RunFailure, match=f"saving the adapter into {out}: the disk is full"):
        checkpoints.save_final(trainer, out)
    assert not (out / "adapter_config.json").exists()
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    checkpoints.save_final(trainer, out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / ".final.partial").exists()


def test_no_unsafe_loading_in_our_code():
    # Pickles can run code: every torch.load of ours is weights_only, and remote model code stays off by default.
    import re

    from lora_cli.config import TrainConfig

    for path in (ROOT / "lora_cli").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "pickle.load" not in path.read_text(), path.name
    assert TrainConfig().trust_remote_code is False
