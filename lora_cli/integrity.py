"""File manifests that let a folder prove itself: what lora_cli wrote (size and checksum of every file, library
versions) in a completion marker, and checks that the files are still those, before anything loads them."""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import fsutil
from .errors import RunFailure
from .filenames import COMPLETE_MARKER, SAFETENSORS_INDEX

log = logging.getLogger("lora_cli")

MARKER = COMPLETE_MARKER  # written into a folder once every file of it is on disk
LIBRARIES = ("lora-cli", "torch", "transformers", "peft", "trl", "accelerate", "safetensors", "bitsandbytes")
TEXT_SUFFIXES = (".json", ".jinja", ".txt", ".yaml", ".md")  # files a user may edit on purpose
_BLOCK = 1 << 20  # xxh3 reads fastest in blocks of about 1 MiB (measured: 3.6 GB/s, 8 MiB blocks 2.4 GB/s)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class DamagedFiles(RunFailure):
    """A file lora_cli is about to load is not what was written: truncated, corrupt or missing (exit 1)."""

    def __init__(self, damage: list[Damage], what: str = "", hint: str = ""):
        self.damage = damage
        super().__init__((f"{what}: " if what else "") + "; ".join(str(d) for d in damage) + (f" ({hint})" if hint
                                                                                               else ""))


@dataclass
class Damage:
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def checksum(path: Path, algorithm: str = "") -> str:
    """'xxh3_64:<hex>' (fast; xxhash comes with datasets), else 'blake2b:<hex>'; `algorithm` picks one."""
    name, digest = _hasher(algorithm)
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return f"{name}:{digest.hexdigest()}"


def _hasher(algorithm: str) -> tuple[str, Any]:
    import hashlib

    if algorithm in ("", "xxh3_64"):
        try:
            import xxhash

            return "xxh3_64", xxhash.xxh3_64()
        except ImportError:  # xxhash is a dependency of datasets, not of ours
            if algorithm:
                raise
    return "blake2b", hashlib.blake2b(digest_size=16)


def manifest(folder: Path, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, checksum}} of `names` in `folder` (default: every file below it but the marker)."""
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {name: {"size": (folder / name).stat().st_size, "checksum": checksum(folder / name)}
            for name in names if name != MARKER}


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_marker(folder: Path, names: Iterable[str] | None = None, **info: Any) -> dict[str, Any]:
    """Record `folder`'s files (all, or `names`) with `info`; written under a temporary name and renamed, so a marker
    is either whole or absent."""
    marker = {**info, "files": manifest(folder, names), "versions": versions()}
    fsutil.atomic_write(folder / MARKER, json.dumps(marker, indent=1) + "\n")
    return marker


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, None if it has none; a marker that does not parse is itself damage."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFiles([Damage(path, f"not valid JSON ({exc})")]) from None
    if not isinstance(marker, dict):
        raise DamagedFiles([Damage(path, "not a lora_cli completion marker")])
    return marker


def verify(folder: Path, names: Iterable[str] | None = None) -> list[Damage]:
    """What is wrong with `folder`'s files: against the marker's sizes and checksums where it has them, else (older
    markers, folders written by other tools) by reading the structure of `names` (default: every file). Empty when
    intact."""
    try:
        marker = read_marker(folder)
    except DamagedFiles as exc:
        return exc.damage
    recorded = (marker or {}).get("files")
    if not recorded:
        return check_structure(folder, names)
    damage = []
    for name, entry in recorded.items():
        if problem := _changed(folder / name, entry):
            if name.endswith(TEXT_SUFFIXES) and problem != "missing" and _readable_text(folder / name):
                log.warning("%s changed since lora_cli wrote it (edited?); using it as it is", folder / name)
            else:
                damage.append(Damage(folder / name, problem))
    return damage


def _changed(path: Path, entry: dict[str, Any]) -> str | None:
    """How `path` differs from its manifest entry, in words; None if it does not."""
    if not path.is_file():
        return "missing"
    size, expected = path.stat().st_size, entry["size"]
    if size < expected:
        return f"truncated: {size:,} of {expected:,} bytes"
    if size > expected:
        return f"{size:,} bytes where {expected:,} were written: the file is damaged"
    algorithm = entry["checksum"].split(":", 1)[0]
    try:
        now = checksum(path, algorithm)
    except ImportError:  # written where xxhash was installed, checked where it is not: the size is all we know
        return None
    return None if now == entry["checksum"] else f"corrupt: its contents changed since it was written ({algorithm} " \
                                                  f"{now.split(':')[1]}, written {entry['checksum'].split(':')[1]})"


def require_intact(folder: Path, what: str, hint: str = "", names: Iterable[str] | None = None) -> None:
    """Raise DamagedFiles naming every damaged file of `folder` (see verify), introduced by `what` (e.g. "--adapter
    runs/x") and followed by `hint` (what to do)."""
    damage = verify(folder, names)
    if damage:
        raise DamagedFiles(damage, what, hint)


def check_structure(folder: Path, names: Iterable[str] | None = None) -> list[Damage]:
    """Damage found without a manifest: safetensors headers against the file size, torch zip archives against their
    CRCs, JSON files that do not parse."""
    paths = [folder / n for n in names] if names is not None else sorted(p for p in folder.iterdir() if p.is_file())
    damage = []
    for path in paths:
        if not path.is_file():
            damage.append(Damage(path, "missing"))
        elif problem := file_problem(path):
            damage.append(Damage(path, problem))
    return damage


def check_model_folder(folder: Path) -> list[Damage]:
    """A Hugging Face model folder's damage: shards its index lists but the folder lacks, weight files whose structure
    is broken. Checked after a load failed, to name the file instead of repeating the library's message."""
    if read_marker(folder) is not None:
        return verify(folder)
    names = {p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")}
    for index in (SAFETENSORS_INDEX, "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                listed = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError):
                return [Damage(folder / index, "not a valid shard index: the file is damaged")]
            missing = sorted(set(listed) - names)
            if missing:
                return [Damage(folder / name, f"missing (listed in {index})") for name in missing]
    return check_structure(folder, sorted(names))


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be what its name says (truncated, corrupt), or None if its structure is sound."""
    suffix = path.suffix
    if suffix == ".safetensors":
        return safetensors_problem(path)
    if suffix in (".pt", ".pth", ".bin") and path.stat().st_size:
        return torch_archive_problem(path)
    if suffix == ".json" and path.name != MARKER:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"not valid JSON ({exc}): the file is damaged"
    return None


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data starts, once the file is known to hold exactly the bytes
    the header lists (8-byte length, JSON, data); DamagedFiles naming the file otherwise."""
    def damaged(problem: str) -> DamagedFiles:
        return DamagedFiles([Damage(path, problem)], hint="copy or download it again")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"truncated: {size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise damaged(f"truncated or not a safetensors file: its header claims {length:,} bytes, the file holds "
                          f"{size:,}")
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError, ValueError):
            raise damaged("corrupt safetensors header") from None
    expected = 8 + length + end
    if size < expected:
        raise damaged(f"truncated: {size:,} bytes, its header lists {expected:,}")
    if size > expected:
        raise damaged(f"{size - expected:,} bytes longer than its header lists: the file is damaged")
    return header, 8 + length


def safetensors_problem(path: Path) -> str | None:
    try:
        safetensors_header(path)
    except DamagedFiles as exc:
        return exc.damage[0].problem
    return None


def torch_archive_problem(path: Path) -> str | None:
    """torch.save writes a zip archive with a CRC per entry: reading them all finds truncation and bit flips."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch's pre-1.6 pickle format, or not torch at all: nothing to check
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return "truncated or corrupt (not a readable torch archive)"
    except (OSError, EOFError, ValueError, zipfile.LargeZipFile, NotImplementedError) as exc:
        return f"truncated or corrupt ({exc})"
    return f"corrupt: {bad} fails its checksum" if bad else None


def _readable_text(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True
