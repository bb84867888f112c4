"""Source specs: `path[:weight]` items joined by commas, a Hub id `org/ds[:name][:split][@revision]`, or a YAML list."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import UsageError

YAML_SUFFIXES = (".yaml", ".yml")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", *YAML_SUFFIXES)
_GLOB = set("*?[")


@dataclass(frozen=True)
class Source:
    path: str  # a file, glob, folder, or Hub dataset id
    kind: str  # "file", "glob", "folder", "hub"
    name: str | None = None  # Hub configuration name
    split: str | None = None  # split of a Hub dataset or of a save_to_disk DatasetDict (default: train)
    revision: str | None = None  # Hub revision (branch, tag or commit)
    weight: float | None = None  # share of the mixture; None: every row once
    limit: int | None = None  # read at most this many rows

    @property
    def label(self) -> str:
        """How messages and train_metrics.json name the source."""
        parts = [self.path, *(p for p in (self.name, self.split) if p)]
        return ":".join(parts) + (f"@{self.revision}" if self.revision else "")


def parse(text: str, flag: str = "train_path") -> list[Source]:
    """The sources a --train_path / --eval_path value names; UsageError naming the flag when it names none."""
    text = text.strip()
    if text.lower().endswith(YAML_SUFFIXES) and os.path.isfile(text):
        return _from_yaml(text, flag)
    if os.path.exists(text):  # a path that exists is that path, commas and colons included
        return [_local(text, None, flag)]
    sources = [_item(part.strip(), flag) for part in text.split(",") if part.strip()]
    if not sources:
        raise UsageError(f"--{flag}: no data source given")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise UsageError(f"--{flag}: give every source a weight or none ({text})")
    return sources


def problem(flag: str, text: str, required: bool) -> str | None:
    """What is wrong with a data flag, for config validation (all problems at once); None when it parses."""
    if not text:
        return (f"--{flag} is required (a .jsonl/.json/.parquet/.csv chat dataset, a folder, a glob or a Hub "
                "dataset id; several joined by commas)") if required else None
    try:
        parse(text, flag)
    except UsageError as exc:
        return str(exc)
    return None


def _item(item: str, flag: str) -> Source:
    weight = None
    head, _, tail = item.rpartition(":")
    if head and _is_number(tail):
        item, weight = head, float(tail)
        if not weight > 0:
            raise UsageError(f"--{flag}: the weight of {item} must be above 0, got {tail}")
    if os.path.exists(item) or _GLOB & set(item):
        return _local(item, weight, flag)
    folder, _, split = item.rpartition(":")
    if folder and split and os.path.isdir(folder):  # a save_to_disk DatasetDict and one of its splits
        return _local(folder, weight, flag, split=split)
    return _hub(item, weight, flag)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _local(path: str, weight: float | None, flag: str, **extra) -> Source:
    if _GLOB & set(path) and not os.path.exists(path):
        if not glob.glob(path, recursive=True):
            raise UsageError(f"--{flag}: no files match {path}")
        return Source(path, "glob", weight=weight, **extra)
    if os.path.isdir(path):
        return Source(path, "folder", weight=weight, **extra)
    if os.path.isfile(path):
        return Source(path, "file", weight=weight, **extra)
    raise UsageError(f"--{flag}: file not found: {path}")


def _hub(item: str, weight: float | None, flag: str, **extra) -> Source:
    """`org/ds[:name][:split][@revision]`: one part after the id is a split, two are a configuration and a split."""
    if item.lower().endswith(_FILE_SUFFIXES):  # data/train.jsonl is a missing file, not a Hub id
        raise UsageError(f"--{flag}: file not found: {item}")
    item, _, revision = item.partition("@")
    repo, *rest = item.split(":")
    if repo.count("/") != 1 or not all(repo.split("/")) or len(rest) > 2 or not all(rest):
        raise UsageError(f"--{flag}: file not found: {item} (nor a Hub dataset id such as org/name[:split])")
    name, split = (None, rest[0]) if len(rest) == 1 else (rest[0], rest[1]) if rest else (None, None)
    return Source(repo, "hub", name=name, split=split, revision=revision or None, weight=weight, **extra)


def _from_yaml(path: str, flag: str) -> list[Source]:
    import yaml

    try:
        items = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"--{flag} {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(items, list) or not items:
        raise UsageError(f"--{flag} {path}: expected a list of sources, each with a 'path'")
    known = {f.name for f in fields(Source)} - {"kind"}
    sources = []
    for i, entry in enumerate(items, start=1):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UsageError(f"--{flag} {path}: source {i} has no 'path'")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise UsageError(f"--{flag} {path}: source {i} has unknown keys {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        weight, limit = entry.get("weight"), entry.get("limit")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            raise UsageError(f"--{flag} {path}: source {i}: weight must be a number above 0, got {weight!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise UsageError(f"--{flag} {path}: source {i}: limit must be a whole number above 0, got {limit!r}")
        extra = {k: (str(entry[k]) if entry.get(k) is not None else None) for k in ("name", "split", "revision")}
        where = entry["path"] if os.path.isabs(entry["path"]) else str(Path(path).parent / entry["path"])
        local = os.path.exists(where) or _GLOB & set(entry["path"])
        source = _local(where, weight, flag, limit=limit, split=extra["split"]) if local else \
            Source(entry["path"], "hub", weight=None if weight is None else float(weight), limit=limit, **extra)
        if source.kind == "hub" and entry["path"].count("/") != 1:
            raise UsageError(f"--{flag} {path}: source {i}: file not found: {where}")
        sources.append(source if weight is None else Source(**{**source.__dict__, "weight": float(weight)}))
    if len({s.weight is None for s in sources}) > 1:
        raise UsageError(f"--{flag} {path}: give every source a weight or none")
    return sources
