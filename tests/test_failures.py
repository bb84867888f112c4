"""Library failures a user can cause (a full disk, too little memory, an adapter for another base) end in one line
that says what to do, through the real entry points, never "unexpected <ExceptionName>"."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from lora_cli import errors

from .conftest import ROOT, TINY_TRAIN, run_cli

FILE_SIZE_LIMIT = 1 << 20  # below the tokenizer.json (3.5 MB) every checkpoint holds


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes beyond `limit` bytes per file fail as on a full disk (EFBIG instead of ENOSPC, same code paths)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_every_library_says_a_failed_write_in_words_we_recognise(tmp_path, tokenizer):
    from safetensors.torch import save_file

    big = {"w": torch.zeros(1 << 16)}  # 256 KiB
    writers = {"torch.save": lambda: torch.save(big, tmp_path / "a.pt"),
               "safetensors": lambda: save_file(big, tmp_path / "a.safetensors"),
               "tokenizers": lambda: tokenizer.save_pretrained(tmp_path / "tok"),
               "python": lambda: (tmp_path / "a.bin").write_bytes(b"\0" * (1 << 18))}
    caught = {}
    with file_size_limit(64 << 10):
        for name, write in writers.items():
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - each library raises its own type
                caught[name] = exc
    assert set(caught) == set(writers)
    assert all(errors.write_failed(exc) for exc in caught.values()), caught
    assert not errors.write_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tiny_llama, chat_file, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-c", "from lora_cli.cli.train import main; main()", "--base_model", str(tiny_llama),
            "--train_path", str(chat_file), "--output_dir", str(out), "--no-data_cache", *TINY_TRAIN,
            "--save_steps", "2"]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lora-train: error: saving checkpoint-2 into {out}: the disk is full (or a quota or file size limit was "
        "reached): free space, then re-run with --overwrite")
    assert not (out / "checkpoint-2").exists()  # the half-written save stays in the staging area


def test_out_of_memory_is_one_line(tiny_llama, chat_file, tmp_path, monkeypatch, capsys):
    from lora_cli.train import trainer

    def allocate_too_much(model, inputs):
        torch.empty(1 << 60, dtype=torch.uint8)  # beyond any address space: the allocator's own failure

    monkeypatch.setattr(trainer, "compact_loss_positions", allocate_too_much)
    code = run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir",
                    str(tmp_path / "run"), *TINY_TRAIN])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err
    assert err.strip().splitlines()[-1].startswith("lora-train: error: out of memory: lower --batch_size")


def test_an_adapter_for_another_base_is_one_line(tiny_llama, chat_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lora_cli.cli.eval import main as eval_main

    adapter = tmp_path / "adapter"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(adapter),
                    *TINY_TRAIN]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    wider = tmp_path / "wider"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    tok.save_pretrained(wider)
    capsys.readouterr()
    code = run_cli(["--adapter", str(adapter), "--base_model", str(wider), "--eval_path", str(chat_file)],
                   main=eval_main)
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lora-eval: error: --adapter {adapter}: does not fit {wider}") and "--base_model" in line


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_from_before_manifests_is_found_by_its_structure(tiny_llama, tmp_path, damage, capsys):
    """Checkpoints written before markers held checksums ({"step", "trained_tokens"} only) are still checked."""
    import json

    from lora_cli import checkpoints, integrity

    from .test_integrity import flip_bit, middle_of_largest_entry

    out = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Item {i}?"},
                                                      {"role": "assistant", "content": f"It is {i * 7}."}]}) + "\n"
                            for i in range(12)))
    argv = ["--base_model", str(tiny_llama), "--train_path", str(data), "--output_dir", str(out), *TINY_TRAIN,
            "--max_steps", "4", "--save_steps", "2"]
    assert run_cli(argv) == 0
    newest = out / "checkpoint-4"
    marker = integrity.read_marker(newest)
    (newest / integrity.MARKER).write_text(json.dumps({"step": 4, "trained_tokens": marker["trained_tokens"]}))
    optimizer = newest / "optimizer.pt"
    if damage == "truncate":
        os.truncate(optimizer, optimizer.stat().st_size // 2)
    else:  # a bit inside the largest tensor's bytes (not in zip padding, which nothing reads)
        flip_bit(optimizer, middle_of_largest_entry(optimizer))
    capsys.readouterr()
    assert run_cli(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint-4 is damaged, skipping it: {optimizer}" in err
    assert f"resuming from {out / 'checkpoint-2'}" in err
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_a_damaged_file_no_caller_could_name_is_still_one_clear_line(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:4])
    with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever safetensors raises is what users would see
        safe_open(str(path), framework="pt")
    known = errors.from_library(raised.value)
    assert isinstance(known, errors.RunFailure)
    assert str(known).startswith("a file being loaded is damaged (Error while deserializing header")
    assert errors.from_library(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
