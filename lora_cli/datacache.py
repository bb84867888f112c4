"""Tokenised training data kept across runs: a dataset is encoded once per (rows, tokenizer, chat template, encoding
settings, encoding code) and memory-mapped afterwards, so sweeps, resumed runs and every process of a multi-GPU
launch skip the tokenisation (datasets' own cache does not apply: our rows are encoded before they become a
Dataset)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from . import chat, fsutil
from .data import Conversation
from .encode import ENCODING_VERSION, EncodeStats
from .errors import one_line
from .filenames import ENCODE_STATS, SOURCES
from .sources.mixture import canonical

log = logging.getLogger("lora_cli")

FORMAT = 2  # bump when the stored layout changes


def root() -> Path:
    """$LORA_CLI_DATA_CACHE, else the datasets folder of lora_cli's cache ($LORA_CLI_CACHE, ~/.cache/lora_cli)."""
    from .models import cache_dir

    return Path(os.environ["LORA_CLI_DATA_CACHE"]).expanduser() if os.environ.get("LORA_CLI_DATA_CACHE") else \
        cache_dir() / "datasets"


def key(tokenizer: Any, rows: Iterable[Conversation | str], settings: dict[str, Any]) -> str:
    """A digest of everything the encoded columns depend on; any change gives a new entry. `rows`: the rows, their
    canonical texts, or one text that stands for them all (train.dataset's digest of the files they are read from,
    so that a cached run need not read them)."""
    h = hashlib.sha256()
    # ENCODING_VERSION stands for the encoding rules themselves (tests/test_golden_encoding.py guards it)
    h.update(json.dumps({"format": FORMAT, "encoding": ENCODING_VERSION, "settings": settings,
                         "class": type(tokenizer).__name__,
                         "template": getattr(tokenizer, "chat_template", None),
                         "template_kwargs": chat.template_kwargs(tokenizer),
                         "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                         "added": {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()},
                         "init": {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                                  if k not in ("name_or_path", "tokenizer_file", "vocab_file", "merges_file")},
                         "libraries": _versions("transformers", "tokenizers", "jinja2", "sentencepiece")},
                        sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)  # vocabulary, merges, normaliser, post-processor
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for row in rows:  # a Conversation, or the same as sources' canonical text
        h.update((row if isinstance(row, str) else canonical(row.where, row.messages, row.tools)).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def known_valid(identity: str) -> bool:
    """Whether rows with this identity (train.dataset's digest of their files) were read and validated before: then
    lora-train may resolve the model before reading them, as the data cache will likely spare reading them at all."""
    return bool(identity) and (_validated() / _digest(identity)).is_file()


def mark_valid(identity: str) -> None:
    try:
        _validated().mkdir(parents=True, exist_ok=True)
        (_validated() / _digest(identity)).touch()
    except OSError:  # a read-only cache: the data is read first next time too
        pass


def _validated() -> Path:
    return root() / ".validated"


def _digest(identity: str) -> str:
    # the reading rules (data.normalise_row) are part of ENCODING_VERSION: a new version validates again
    return hashlib.sha256(f"{FORMAT}:{ENCODING_VERSION}:{identity}".encode()).hexdigest()[:32]


def _versions(*packages: str) -> dict[str, str | None]:
    """Library versions that decide how text and templates tokenise."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def load(digest: str) -> tuple[Any, EncodeStats, dict[str, int]] | None:
    """The cached columns (a memory-mapped Dataset), their counts and the rows per data source, or None when absent
    or unreadable (a damaged entry is removed so that this run's encoding replaces it)."""
    path = root() / digest
    try:
        if not path.exists():
            return None
        from datasets import Dataset, disable_caching

        disable_caching()  # maps on a file-backed dataset (TRL's packing) go to temporary files, not into the entry
        stats = EncodeStats(**json.loads((path / ENCODE_STATS).read_text(encoding="utf-8")))
        counts = json.loads((path / SOURCES).read_text(encoding="utf-8")) if (path / SOURCES).is_file() else {}
        return Dataset.load_from_disk(str(path / "data")), stats, counts
    except Exception as exc:  # never trusted when it does not read back whole
        log.warning("ignoring unreadable data cache %s (%s); tokenising again", path, one_line(exc, None))
        _discard(path)
        return None


def _discard(path: Path) -> None:
    """Remove an entry: renamed aside first, so no other process reads it half deleted."""
    aside = path.with_name(f".{path.name}-discarded-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:  # gone already, or not ours to remove
        return
    shutil.rmtree(aside, ignore_errors=True)


def save(digest: str, dataset: Any, stats: EncodeStats, counts: dict[str, int] | None = None) -> Any:
    """Store the encoded Dataset (input_ids, labels) and return it; the entry appears
    whole or not at all (written aside, then renamed), so concurrent processes and interrupted runs never leave a
    half entry that would be read."""
    final = root() / digest
    try:
        # Readable by the cache's other users; the move fails when another process stored the same entry first:
        # theirs is kept.
        with fsutil.staged_folder(final) as staging:
            dataset.save_to_disk(str(staging / "data"))
            (staging / ENCODE_STATS).write_text(json.dumps(stats.as_dict()) + "\n", encoding="utf-8")
            (staging / SOURCES).write_text(json.dumps(counts or {}) + "\n", encoding="utf-8")
    except OSError as exc:
        if not final.is_dir():  # a read-only or full cache disk must not stop training
            log.warning("could not write the data cache in %s (%s); continuing without it", final.parent, exc)
    return dataset
