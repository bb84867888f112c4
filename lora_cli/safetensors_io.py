"""Safetensors model folders, read and written one tensor at a time with plain file reads and writes.

safetensors' own API maps whole files and serialises whole shards in memory; these stream one tensor at a time, so
lora-merge and lora-export stay near one tensor of memory whatever the model's size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import integrity
from .errors import RunFailure, UsageError
from .filenames import SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS

_ST_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
             "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str) -> Any:
    import torch

    name = _ST_CODES.get(code)
    if name is None or not hasattr(torch, name):
        raise UsageError(f"safetensors dtype {code} is not supported")
    return getattr(torch, name)


def _st_code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, n in _ST_CODES.items() if n == name)


class SafetensorsFile:
    """One .safetensors file: its header, and tensors read one at a time (no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        header, self.data_start = integrity.safetensors_header(path)  # a damaged file fails here, named
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header  # name -> dtype, shape, data_offsets
        self._file = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> Any:
        return _torch_dtype(self.entries[name]["dtype"])

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> Any:
        import torch

        begin, end = self.entries[name]["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self.data_start + begin)
        buffer = bytearray(end - begin)
        if self._file.readinto(buffer) != len(buffer):
            raise RunFailure(f"{self.path}: truncated file (tensor {name} is cut short)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_safetensors(path: Path, entries: list[tuple[str, tuple, Any]], produce) -> int:
    """Write tensors (name, shape, dtype) that `produce(name)` builds one at a time; returns the bytes of data."""
    import torch

    # Larger items first keeps every tensor aligned to its item size, as safetensors itself orders them.
    ordered = sorted(entries, key=lambda e: (-e[2].itemsize, e[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in ordered:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _st_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in ordered:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RunFailure(f"internal error: {name} came out {tuple(tensor.shape)} {tensor.dtype}, planned "
                                 f"{tuple(shape)} {dtype}")
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


def has_safetensors(folder: Path) -> bool:
    """Whether the folder holds safetensors weights (one file, or shards listed in an index); reads no tensor."""
    return (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS_WEIGHTS).is_file()


def shard_names(folder: Path, label: str) -> list[str] | None:
    """The folder's safetensors files (from the index when sharded), checked to exist; None when it has none."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / SAFETENSORS_WEIGHTS).is_file():
        names = [SAFETENSORS_WEIGHTS]
    else:
        return None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"{label} {folder}: shard {missing[0]} listed in {SAFETENSORS_INDEX} is missing")
    return names


@dataclass
class SafetensorsFolder:
    """A model folder's safetensors weights: its shards (through the index when sharded), and which shard holds each
    tensor, with the tensors' names, shapes and dtypes from the headers."""

    folder: Path
    files: list[SafetensorsFile]
    where: dict[str, SafetensorsFile]  # tensor name -> the shard holding it

    @classmethod
    def open(cls, folder: Path, label: str) -> SafetensorsFolder | None:
        """None when the folder has no safetensors weights (e.g. only pytorch_model.bin). `label` names the folder in
        errors, as the user gave it (e.g. "--base_model")."""
        names = shard_names(folder, label)
        if names is None:
            return None
        files = [SafetensorsFile(folder / n) for n in names]
        return cls(folder, files, {name: f for f in files for name in f.entries})

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: f.shape(name) for name, f in self.where.items()}

    def read(self, name: str) -> Any:
        return self.where[name].read(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
