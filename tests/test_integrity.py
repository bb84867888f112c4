"""Folders prove themselves: a completion marker's sizes and checksums find truncated, bit-flipped and missing files;
without a marker, the structure of safetensors files and torch archives does."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli import integrity

from .conftest import TINY_TRAIN, run_cli, write_jsonl


def flip_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def middle_of_largest_entry(archive) -> int:
    """The file offset of the middle of a torch archive's largest stored entry (a tensor's bytes)."""
    import struct
    import zipfile

    with zipfile.ZipFile(archive) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(archive, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2


@pytest.fixture()
def folder(tmp_path):
    """A folder like a checkpoint: safetensors weights, a torch archive, JSON and a template."""
    f = tmp_path / "ckpt"
    f.mkdir()
    torch.manual_seed(0)
    save_file({"a": torch.randn(64, 8), "b": torch.randn(8, 64)}, f / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.randn(512)}}}, f / "optimizer.pt")
    (f / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (f / "chat_template.jinja").write_text("{{ messages }}")
    return f


def test_marker_records_every_file_with_size_checksum_and_versions(folder):
    marker = integrity.write_marker(folder, step=4)
    assert marker["step"] == 4 and set(marker["versions"]) >= {"torch", "transformers", "peft", "safetensors"}
    assert set(marker["files"]) == {"adapter_model.safetensors", "optimizer.pt", "adapter_config.json",
                                    "chat_template.jinja"}
    import xxhash

    weights = folder / "adapter_model.safetensors"
    assert marker["files"]["adapter_model.safetensors"] == {
        "size": weights.stat().st_size, "checksum": "xxh3_64:" + xxhash.xxh3_64(weights.read_bytes()).hexdigest()}
    assert json.loads((folder / integrity.MARKER).read_text()) == marker
    assert integrity.verify(folder) == []


def test_blake2b_checksums_verify_too(folder):
    weights = folder / "adapter_model.safetensors"
    expected = hashlib.blake2b(weights.read_bytes(), digest_size=16).hexdigest()
    assert integrity.checksum(weights, "blake2b") == f"blake2b:{expected}"
    marker = integrity.write_marker(folder)
    marker["files"]["adapter_model.safetensors"]["checksum"] = f"blake2b:{expected}"  # written without xxhash
    (folder / integrity.MARKER).write_text(json.dumps(marker))
    assert integrity.verify(folder) == []
    flip_bit(weights, weights.stat().st_size - 3)
    assert "corrupt" in integrity.verify(folder)[0].problem


def test_truncated_bitflipped_and_missing_files_are_named(folder):
    integrity.write_marker(folder)
    weights, optimizer = folder / "adapter_model.safetensors", folder / "optimizer.pt"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)
    flip_bit(optimizer, optimizer.stat().st_size // 2)
    (folder / "chat_template.jinja").unlink()
    found = {d.path.name: d.problem for d in integrity.verify(folder)}
    assert found == {"adapter_model.safetensors": f"truncated: {size - 100:,} of {size:,} bytes",
                     "optimizer.pt": found["optimizer.pt"], "chat_template.jinja": "missing"}
    assert found["optimizer.pt"].startswith("corrupt: its contents changed")
    with pytest.raises(integrity.DamagedFiles) as exc:
        integrity.require_intact(folder, "--adapter x", "copy it again")
    assert str(exc.value).startswith(f"--adapter x: {weights}: truncated") and str(exc.value).endswith(
        "(copy it again)") and exc.value.exit_code == 1


def test_a_text_file_edited_on_purpose_is_a_warning_not_damage(folder, caplog):
    integrity.write_marker(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA", "base_model": "x"}))
    assert integrity.verify(folder) == []
    assert "adapter_config.json changed since lora_cli wrote it" in caplog.text
    (folder / "adapter_config.json").write_text('{"r": 4, "peft_')  # cut short: no longer JSON
    assert [d.path.name for d in integrity.verify(folder)] == ["adapter_config.json"]


def test_a_damaged_marker_is_damage(folder):
    integrity.write_marker(folder)
    marker = folder / integrity.MARKER
    marker.write_text(marker.read_text()[:40])
    assert "not valid JSON" in integrity.verify(folder)[0].problem


def test_without_a_marker_structure_finds_truncation_and_corruption(folder):
    assert integrity.verify(folder) == []  # no marker: structural checks, all sound
    weights, optimizer = folder / "adapter_model.safetensors", folder / "optimizer.pt"
    original = weights.read_bytes()
    os.truncate(weights, len(original) - 8)
    assert integrity.safetensors_problem(weights).startswith("truncated:")
    weights.write_bytes(original + b"\0" * 16)
    assert "longer than its header lists" in integrity.safetensors_problem(weights)
    weights.write_bytes(original[:4])
    assert "too short" in integrity.safetensors_problem(weights)
    weights.write_bytes(b"\xff" * 8 + original[8:])  # the header length itself is damaged
    assert "header claims" in integrity.safetensors_problem(weights)
    weights.write_bytes(original)
    archive = optimizer.read_bytes()
    optimizer.write_bytes(archive[: len(archive) // 2])
    assert "not a readable torch archive" in integrity.torch_archive_problem(optimizer)
    optimizer.write_bytes(archive)
    flip_bit(optimizer, middle_of_largest_entry(optimizer))  # inside a tensor's bytes: only its CRC can tell
    assert "fails its checksum" in integrity.torch_archive_problem(optimizer)
    assert [d.path.name for d in integrity.verify(folder)] == ["optimizer.pt"]


def test_model_folder_missing_a_shard_is_named(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w1": torch.zeros(4)}, folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"w1": "model-00001-of-00002.safetensors",
                                            "w2": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    [damage] = integrity.check_model_folder(folder)
    assert damage.path.name == "model-00002-of-00002.safetensors" and damage.problem.startswith("missing (listed in")


# --- through the real entry points -----------------------------------------------------------------------------------

RUN = [*TINY_TRAIN, "--max_steps", "8", "--save_steps", "2", "--save_total_limit", "2"]  # later flags win


def train_args(tiny_llama, data, out):
    return ["--base_model", str(tiny_llama), "--train_path", str(data), "--output_dir", str(out), *RUN]


@pytest.fixture()
def data(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is number {i * 7}."}]} for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture()
def finished(tiny_llama, data, tmp_path):
    """A finished 8-step run (checkpoints 6 and 8 kept) and its adapter's tensors."""
    out = tmp_path / "run"
    assert run_cli(train_args(tiny_llama, data, out)) == 0
    return out, load_file(out / "adapter_model.safetensors")


def test_resume_skips_a_damaged_newest_checkpoint_and_finishes_from_the_previous_one(tiny_llama, data, finished,
                                                                                      capsys):
    out, adapter = finished
    for name in ("adapter_model.safetensors", "optimizer.pt"):
        assert integrity.read_marker(out / "checkpoint-8")["files"][name]["size"] > 0
    weights = out / "checkpoint-8" / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a cut copy: the header is intact, the data is not
    capsys.readouterr()
    assert run_cli(train_args(tiny_llama, data, out) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint-8 is damaged, skipping it: {weights}: truncated" in err
    assert f"resuming from {out / 'checkpoint-6'}" in err
    resumed = load_file(out / "adapter_model.safetensors")  # steps 7 and 8 again, from checkpoint-6's state
    assert resumed.keys() == adapter.keys()
    for key in adapter:
        torch.testing.assert_close(resumed[key], adapter[key], atol=1e-5, rtol=1e-4)
    assert integrity.verify(out / "checkpoint-8") == []  # saved again, whole
    assert integrity.verify(out) == []  # the final adapter has its own marker


def test_resume_with_no_intact_checkpoint_names_each_damaged_file(tiny_llama, data, finished, capsys):
    out, _ = finished
    optimizer = out / "checkpoint-8" / "optimizer.pt"
    flip_bit(optimizer, optimizer.stat().st_size // 2)
    scheduler = out / "checkpoint-6" / "scheduler.pt"
    os.truncate(scheduler, 100)
    capsys.readouterr()
    assert run_cli(train_args(tiny_llama, data, out) + ["--resume"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"lora-train: error: --resume: no intact checkpoint in {out}: {optimizer}: corrupt")
    assert f"{scheduler}: truncated: 100 of" in last


def test_a_damaged_resume_from_checkpoint_is_an_error(tiny_llama, data, finished, capsys):
    out, _ = finished
    rng_state = out / "checkpoint-6" / "rng_state.pth"
    os.truncate(rng_state, 10)
    capsys.readouterr()
    size = integrity.read_marker(out / "checkpoint-6")["files"]["rng_state.pth"]["size"]
    code = run_cli(train_args(tiny_llama, data, out) + ["--resume_from_checkpoint", str(out / "checkpoint-6")])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lora-train: error: --resume_from_checkpoint {out / 'checkpoint-6'} is damaged (--resume picks the newest "
        f"intact checkpoint): {rng_state}: truncated: 10 of {size:,} bytes")


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err, err
    return err.strip().splitlines()[-1]


def test_damaged_adapter_and_model_files_end_in_one_line_in_every_command(tiny_llama, data, finished, tmp_path,
                                                                          capsys):
    from lora_cli.cli.eval import main as eval_main
    from lora_cli.cli.export import main as export_main
    from lora_cli.cli.merge import main as merge_main

    out, _ = finished
    merged = tmp_path / "merged"
    assert run_cli([str(out), str(merged), "--no-verify"], main=merge_main) == 0
    assert integrity.verify(merged) == [] and "model.safetensors" in integrity.read_marker(merged)["files"]

    shard = merged / "model.safetensors"
    size = shard.stat().st_size
    os.truncate(shard, size - 4096)
    assert run_cli([str(merged), str(tmp_path / "m.gguf")], main=export_main) == 1
    assert last_error(capsys) == (f"lora-export: error: MODEL_DIR {merged}: {shard}: truncated: {size - 4096:,} of "
                                  f"{size:,} bytes (merge or copy the model again)")

    weights = out / "adapter_model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    assert run_cli([str(out), str(tmp_path / "m2")], main=merge_main) == 1
    assert last_error(capsys) == (f"lora-merge: error: ADAPTER_DIR: {weights}: truncated: {size // 2:,} of {size:,} "
                                  "bytes (copy the adapter again, or train it again)")
    assert run_cli(["--adapter", str(out), "--eval_path", str(data)], main=eval_main) == 1
    assert last_error(capsys).startswith(f"lora-eval: error: --adapter: {weights}: truncated")
    (out / integrity.MARKER).unlink()  # an adapter from elsewhere: its structure still tells
    assert run_cli([str(out), str(tmp_path / "m2")], main=merge_main) == 1
    assert f"{weights}: truncated: {size // 2:,} bytes, its header lists {size:,}" in last_error(capsys)
    assert not (tmp_path / "m2").exists()


def test_a_damaged_or_incomplete_base_model_is_named(tiny_llama, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM


    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_llama / name).is_file():
            (sharded / name).write_bytes((tiny_llama / name).read_bytes())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    size = shards[1].stat().st_size
    os.truncate(shards[1], size - 1)
    argv = ["--base_model", str(sharded), "--train_path", str(data), "--output_dir", str(tmp_path / "run"),
            *TINY_TRAIN]
    assert run_cli(argv) == 1
    assert last_error(capsys) == (f"lora-train: error: --base_model {sharded}: {shards[1]}: truncated: "
                                  f"{size - 1:,} bytes, its header lists {size:,} (download or copy the model again)")
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder the lock needed

    shards[1].unlink()
    assert run_cli(argv) == 1
    assert last_error(capsys) == (f"lora-train: error: --base_model {sharded}: {shards[1]}: missing (listed in "
                                  "model.safetensors.index.json) (download or copy the model again)")


def test_a_damaged_file_in_the_hub_cache_is_named(tiny_llama, data, tmp_path):
    """--base_model org/name read offline from the Hugging Face cache, one of whose files a failing disk cut short."""
    import shutil
    import subprocess
    import sys

    from .conftest import ROOT

    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", "from lora_cli.cli.train import main; main()", "--base_model",
                           "someorg/tiny", "--train_path", str(data), "--output_dir", str(tmp_path / "run"),
                           *TINY_TRAIN], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lora-train: error: --base_model someorg/tiny: {weights}: truncated: {size - 1000:,} bytes, its header "
        f"lists {size:,} (download or copy the model again)")
