"""The sources as an iterable dataset (--streaming): rows are read, normalised and mixed as training asks for them,
never stored whole, for data larger than memory or the data cache."""

from __future__ import annotations

from typing import Any, Iterator

from .. import data
from ..errors import DataError
from .mixture import canonical
from .read import scan
from .spec import Source, parse


def stream(text: str, seed: int, flag: str = "train_path") -> Any:
    """A datasets.IterableDataset with columns `row` (canonical text) and `source` (its label). Without weights the
    sources follow each other; with weights each next row comes from a source drawn by weight (seeded), until every
    source has been read once (datasets.interleave_datasets, "all_exhausted"): the trainer then starts another pass."""
    from datasets import Features, IterableDataset, Value, interleave_datasets

    sources = parse(text, flag)
    features = Features({"row": Value("string"), "source": Value("string")})
    parts = [IterableDataset.from_generator(_rows, features=features, gen_kwargs={"source": s}) for s in sources]
    if len(parts) == 1:
        return parts[0]
    if sources[0].weight is None:
        from datasets import concatenate_datasets

        return concatenate_datasets(parts)
    total = sum(s.weight for s in sources)
    return interleave_datasets(parts, probabilities=[s.weight / total for s in sources], seed=seed,
                               stopping_strategy="all_exhausted")


def _rows(source: Source) -> Iterator[dict[str, str]]:
    for where, raw in scan(source, streaming=True):
        if isinstance(raw, DataError):
            raise raw
        yield {"row": canonical(where, data.normalise_row(raw, where), data.row_tools(raw, where)),
               "source": source.label}
