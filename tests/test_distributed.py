"""Several processes through the launcher users use (gloo on CPU): one adapter, equal to a single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT, run_cli, write_jsonl

STEPS = ["--max_steps", "3", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--optim",
         "adamw_torch", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0", "--logging_steps", "1",
         "--save_steps", "2", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def four_rows(tmp_path):
    # Every step sees all four rows, so the data order across processes cannot change the result.
    rows = [{"messages": [{"role": "user", "content": f"Item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is number {i * 7}."}]} for i in range(4)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_two_process_ddp_equals_single_process(tiny_llama, four_rows, tmp_path):
    ddp = tmp_path / "ddp"
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "scripts/launch.sh"), "--base_model", str(tiny_llama), "--train_path",
                           str(four_rows), "--output_dir", str(ddp), "--batch_size", "2", *STEPS],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes: effective batch 4 conversations" in proc.stderr
    assert proc.stderr.count("lora-train: done:") == 1  # only the first process reports
    assert "another lora-train run" not in proc.stderr  # the output folder's lock is rank 0's, for the launch
    single = tmp_path / "single"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(four_rows), "--output_dir", str(single),
                    "--batch_size", "4", *STEPS]) == 0
    # Exactly one adapter, and checkpoints hold both processes' RNG states.
    assert sorted(p.name for p in ddp.glob("**/adapter_model.safetensors")) == ["adapter_model.safetensors"] * 3
    assert {p.name for p in (ddp / "checkpoint-2").iterdir()} >= {"rng_state_0.pth", "rng_state_1.pth"}
    a, b = load_file(ddp / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    ma, mb = (json.loads((d / "train_metrics.json").read_text()) for d in (ddp, single))
    assert ma["trained_tokens"] == mb["trained_tokens"]  # counted over both processes
    assert ma["train_loss_last"] == pytest.approx(mb["train_loss_last"], abs=1e-4)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    text = path.read_text()
    assert f"--config_file configs/accelerate/{path.name}" in text and "--num_machines 2" in text
