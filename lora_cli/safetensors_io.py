"""Safetensors folders read and written one tensor at a time with plain file reads and writes."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import integrity
from .errors import RunFailure, UsageError

INDEX = "model.safetensors.index.json"

# safetensors' own API maps whole files and serialises whole shards in memory; these stream one tensor at a time.

_ST_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
             "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str) -> Any:
    import torch

    name = _ST_CODES.get(code)
    if name is None or not hasattr(torch, name):
        raise UsageError(f"safetensors dtype {code} is not supported by this merge")
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


@dataclass
class Checkpoint:
    """The base model's safetensors shards, their tensor names, shapes and dtypes."""

    folder: Path
    files: list[SafetensorsFile]
    where: dict[str, SafetensorsFile]

    @classmethod
    def open(cls, folder: Path) -> Checkpoint | None:
        """None when the folder has no safetensors weights (e.g. only pytorch_model.bin)."""
        index = folder / INDEX
        if index.is_file():
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            names = ["model.safetensors"]
        else:
            return None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UsageError(f"--base_model {folder}: shard {missing[0]} listed in {INDEX} is missing")
        files = [SafetensorsFile(folder / n) for n in names]
        return cls(folder, files, {name: f for f in files for name in f.entries})

    def close(self) -> None:
        for f in self.files:
            f.close()
