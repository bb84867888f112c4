"""The raw rows of one source, each with where it came from, through `datasets` where lora_cli does not read the
file itself (JSON Lines and CSV are read here so that errors name the line)."""

from __future__ import annotations

import glob
import itertools
import os
from pathlib import Path
from typing import Any, Iterator

from .. import data
from ..errors import DataError, one_line
from .spec import Source, parse

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
SUPPORTED = (*data.JSONL_SUFFIXES, ".json", ".csv", *data.DATASETS_SUFFIXES)


def scan(source: Source, streaming: bool = False) -> Iterator[tuple[str, Any]]:
    """Every raw row of the source (at most its limit) with where it is; a JSON Lines line that does not parse is
    yielded as its DataError (lora-data reports them all; training stops at the first). `streaming`: a Hub dataset
    is read as it downloads, never stored whole."""
    rows = _rows(source, streaming)
    return itertools.islice(rows, source.limit) if source.limit else rows


def _rows(source: Source, streaming: bool = False) -> Iterator[tuple[str, Any]]:
    if source.kind == "file":
        yield from data.scan_rows(source.path)
    elif source.kind == "glob":
        files = sorted(f for f in glob.glob(source.path, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{source.path}: no files match")
        for path in files:
            yield from data.scan_rows(path)
    elif source.kind == "folder" and any((Path(source.path) / m).is_file() for m in SAVED_MARKERS):
        yield from _saved(source)
    elif source.kind == "folder":
        shards = sorted(p for p in Path(source.path).rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
        if not shards:
            raise DataError(f"{source.path}: no data files in the folder (looked for {', '.join(SUPPORTED)})")
        for shard in shards:
            yield from data.scan_rows(str(shard))
    else:
        yield from _hub(source, streaming)


def files(source: Source) -> list[Path]:
    """The local files a source reads, in order (none for a Hub dataset: datasets keeps its own fingerprints)."""
    if source.kind == "file":
        return [Path(source.path)]
    if source.kind == "glob":
        return sorted(Path(f) for f in glob.glob(source.path, recursive=True) if Path(f).is_file())
    if source.kind == "folder":
        return sorted(p for p in Path(source.path).rglob("*") if p.is_file())
    return []


def fingerprint(text: str) -> str:
    """sha256 of what a data spec reads: each source's label, weight and limit, and the bytes of its local files
    (a Hub dataset by its id, configuration, split and revision). Hashed once per process while no file changes
    (lora-train asks for it for the data cache and for --resume)."""
    stamp = tuple((str(p), st.st_size, st.st_mtime_ns) for s in parse(text) for p in files(s) for st in [p.stat()])
    if (text, stamp) not in _fingerprints:
        if len(_fingerprints) > 8:
            _fingerprints.clear()
        _fingerprints[(text, stamp)] = _fingerprint(text)
    return _fingerprints[(text, stamp)]


_fingerprints: dict[tuple, str] = {}


def _fingerprint(text: str) -> str:
    import hashlib

    def add(digest: Any, path: Path) -> Any:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest

    if os.path.isfile(text):  # one file: the sha256 of its bytes (as run states before data sources have it)
        return add(hashlib.sha256(), Path(text)).hexdigest()
    digest = hashlib.sha256()
    for source in parse(text):
        digest.update(repr((source.label, source.weight, source.limit)).encode())
        for path in files(source):
            digest.update(str(path.relative_to(source.path) if source.kind == "folder" else path).encode())
            add(digest, path)
    return digest.hexdigest()


def _saved(source: Source) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(source.path)
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"{source.path}: cannot read as a datasets folder: {one_line(exc, 300)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or "train"
        if split not in loaded:
            raise DataError(f"{source.path}: no split {split!r} (it has {', '.join(loaded)}); name one: "
                            f"{source.path}:SPLIT or `split:` in a YAML list")
        loaded = loaded[split]
    yield from _numbered(source.label, loaded)


def _hub(source: Source, streaming: bool = False) -> Iterator[tuple[str, Any]]:
    """A Hub dataset through datasets.load_dataset (its own cache; HF_HUB_OFFLINE=1 reads only that cache)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(source.path, source.name, split=source.split or "train",
                                       revision=source.revision, streaming=streaming)
    except Exception as exc:  # network, missing dataset, wrong split: many types
        raise DataError(f"{source.label}: cannot load the dataset: {one_line(exc, 300)}") from None
    yield from _numbered(source.label, loaded)


def _numbered(label: str, dataset: Any) -> Iterator[tuple[str, Any]]:
    # Arrow gives absent fields as None; the rows are read as if those fields were not there, as in JSON.
    for number, row in enumerate(dataset, start=1):
        yield f"{label}:row {number}", {k: v for k, v in row.items() if v is not None}
