"""A data file as normalised conversations, and the rows held out for evaluation."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .files import _read_rows
from .formats import normalise_row
from .tools import row_tools


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    where: str  # "path:line" or "path:row N", for messages that point back at the source
    tools: list[dict[str, Any]] | None = field(default=None)  # the row's tool definitions, passed to the template


def load_conversations(path: str) -> list[Conversation]:
    """Every row of a data file as a normalised conversation; DataError on the first unusable row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    rows = _read_rows(p, p.suffix.lower())
    conversations = [Conversation(normalise_row(row, where), where, row_tools(row, where)) for where, row in rows]
    if not conversations:
        raise DataError(f"{path}: no rows (the file is empty)")
    return conversations


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """Which of n rows --val_split holds out for evaluation (at least one), reproducibly for a seed."""
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"--val_split {fraction} leaves no training rows out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:n_eval])


def split_validation(rows: list[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the rows (at least one) for evaluation, reproducibly for a seed."""
    held = held_out(len(rows), fraction, seed)
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
