"""Every source's rows, normalised and validated, in one Arrow table on disk, with each source's share picked by
weight: memory holds a batch of rows at a time, never the dataset."""

from __future__ import annotations

import atexit
import json
import logging
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import data
from ..errors import DataError
from .read import scan
from .spec import Source, parse

log = logging.getLogger("lora_cli")


def canonical(where: str, messages: list[dict], tools: list[dict] | None) -> str:
    """A normalised row as one string: what the Arrow table stores and the data cache key digests."""
    return json.dumps([where, messages, tools], ensure_ascii=False, sort_keys=True, default=str)


def conversation(text: str) -> data.Conversation:
    where, messages, tools = json.loads(text)
    return data.Conversation(messages, where, tools)


@dataclass
class Mixture:
    """The rows to train (or evaluate) on: `rows` is a datasets.Dataset with one column `row` (canonical())."""

    rows: Any
    counts: dict[str, int] = field(default_factory=dict)  # source label: rows in the mixture
    read: dict[str, int] = field(default_factory=dict)  # source label: rows read

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, batch_size: int = 4096) -> Iterator[str]:
        for batch in self.rows.iter(batch_size=batch_size):
            yield from batch["row"]

    def conversations(self) -> Iterator[data.Conversation]:
        return (conversation(text) for text in self.texts())

    def split(self, fraction: float, seed: int) -> tuple[Mixture, Mixture]:
        """Hold out `fraction` of the rows (at least one) for evaluation, the rows data.split_validation holds out."""
        held = data.held_out(len(self.rows), fraction, seed)
        kept = [i for i in range(len(self.rows)) if i not in held]
        return Mixture(self.rows.select(kept), self.counts, self.read), Mixture(self.rows.select(sorted(held)))


def load(text: str, seed: int, flag: str = "train_path") -> Mixture:
    """The sources `text` names, read and validated (DataError at the first bad row, naming it), mixed by weight."""
    from datasets import concatenate_datasets

    sources = parse(text, flag)
    tables = [_table(source) for source in sources]
    picks = pick(sources, [len(t) for t in tables], seed)
    picked = [t if p is None else t.select(p) for t, p in zip(tables, picks)]
    rows = picked[0] if len(picked) == 1 else concatenate_datasets(picked)
    return Mixture(rows, *report(sources, [len(t) for t in tables], [len(t) for t in picked]))


def pick(sources: list[Source], sizes: list[int], seed: int) -> list[list[int] | None]:
    """Which rows of each source the mixture takes (None: all, once). With weights, the mixture has as many rows
    as were read, each source's share by weight: whole copies of a source while its share exceeds it, then a sample
    without repeats, reproducible under the seed."""
    if sources[0].weight is None:
        return [None] * len(sources)
    total, weights = sum(sizes), sum(s.weight for s in sources)
    rng = random.Random(seed)
    picks = []
    for source, size in zip(sources, sizes):
        whole, rest = divmod(round(total * source.weight / weights), size)
        picks.append(list(range(size)) * whole + sorted(rng.sample(range(size), rest)))
    return picks


def report(sources: list[Source], read: list[int], taken: list[int]) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per source in the mixture and read, logged when there are several sources."""
    counts = {s.label: n for s, n in zip(sources, taken)}
    read_by = {s.label: n for s, n in zip(sources, read)}
    if len(sources) > 1:
        log.info("data sources: %s", ", ".join(
            f"{label} {counts[label]:,} rows" + (f" of {read_by[label]:,} read" if counts[label] != read_by[label]
                                                 else "") for label in counts))
    return counts, read_by


def _table(source: Source) -> Any:
    """The source's rows, normalised, as a memory-mapped Arrow table in a work folder removed at exit."""
    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter

    path = Path(_work_dir()) / f"rows-{next(_counter)}.arrow"
    with ArrowWriter(path=str(path), features=Features({"row": Value("string")})) as writer:
        n, batch = 0, []
        for where, raw in scan(source):
            if isinstance(raw, DataError):
                raise raw
            batch.append(canonical(where, data.normalise_row(raw, where), data.row_tools(raw, where)))
            if len(batch) == 10_000:  # whole batches: ArrowWriter.write converts row by row
                writer.write_batch({"row": batch})
                n, batch = n + len(batch), []
        if batch:
            writer.write_batch({"row": batch})
            n += len(batch)
        writer.finalize()
    if n == 0:
        raise DataError(f"{source.label}: no rows (the file is empty)")
    return Dataset.from_file(str(path))


_counter = iter(range(1 << 62))
_work: list[str] = []


def _work_dir() -> str:
    if not _work:
        _work.append(tempfile.mkdtemp(prefix="lora-cli-rows-"))
        atexit.register(shutil.rmtree, _work[0], True)
    return _work[0]
