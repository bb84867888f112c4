"""Safetensors folders read and written one tensor at a time agree with the safetensors library itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli.errors import RunFailure, UsageError
from lora_cli.safetensors_io import SafetensorsFolder, has_safetensors, write_safetensors

TENSORS = {"a.weight": torch.randn(3, 5, dtype=torch.bfloat16), "a.bias": torch.randn(3),
           "b.weight": torch.randn(4, 2, dtype=torch.float16), "b.steps": torch.arange(6, dtype=torch.int64),
           "empty": torch.zeros(0, 4)}


def _sharded(folder):
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": ["a.weight", "a.bias"],
              "model-00002-of-00002.safetensors": ["b.weight", "b.steps", "empty"]}
    for name, keys in shards.items():
        save_file({k: TENSORS[k] for k in keys}, folder / name)
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return shards


def test_a_sharded_folder_reads_back_every_tensor_through_its_index(tmp_path):
    _sharded(tmp_path / "m")
    weights = SafetensorsFolder.open(tmp_path / "m", "MODEL_DIR")
    assert weights.shapes == {k: tuple(v.shape) for k, v in TENSORS.items()}
    for name, tensor in TENSORS.items():
        got = weights.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    weights.close()


def test_a_folder_without_safetensors_and_a_missing_shard(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    assert not has_safetensors(tmp_path / "bin") and SafetensorsFolder.open(tmp_path / "bin", "x") is None
    shards = _sharded(tmp_path / "m")
    (tmp_path / "m" / next(iter(shards))).unlink()
    with pytest.raises(UsageError, match=r"^--base_model .*: shard model-00001-of-00002.safetensors listed in "
                                         r"model.safetensors.index.json is missing$"):
        SafetensorsFolder.open(tmp_path / "m", "--base_model")


def test_streamed_writing_is_a_file_the_library_loads(tmp_path):
    entries = [(name, tuple(t.shape), t.dtype) for name, t in TENSORS.items()]
    path = tmp_path / "model.safetensors"
    size = write_safetensors(path, entries, lambda name: TENSORS[name])
    loaded = load_file(path)
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], TENSORS[k]) for k in TENSORS)
    assert size == sum(t.numel() * t.element_size() for t in TENSORS.values())
    wrong = r"^internal error: b.steps came out \(6,\) torch.float64, planned \(6,\) torch.int64$"
    with pytest.raises(RunFailure, match=wrong):
        write_safetensors(tmp_path / "bad.safetensors", entries, lambda name: TENSORS[name].double())
