"""Turn normalised conversations into token ids and labels, and count what happens to each row."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from .chat import IGNORE_INDEX, encode
from .data import Conversation
from .errors import DataError

log = logging.getLogger("lora_cli")


@dataclass
class EncodeStats:
    rows: int = 0  # rows read
    kept: int = 0  # rows that will be trained on
    too_long: int = 0  # rows over --max_seq_length
    truncated: int = 0  # ... of which were cut (--truncation truncate)
    dropped_too_long: int = 0  # ... of which were dropped (--truncation drop, or nothing left to train after cutting)
    dropped_no_trained_tokens: int = 0  # rows whose masks leave no token to train on
    tokens: int = 0  # tokens in kept rows
    trained_tokens: int = 0  # tokens with a label in kept rows
    assistant_turns: int = 0
    turns_missing_end_of_turn: int = 0  # assistant turns whose end-of-turn token is not in the loss
    longest: int = 0  # longest row before any truncation
    first_problem_rows: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_rows(tokenizer: Any, rows: list[Conversation], *, max_seq_length: int, truncation: str,
                train_on_inputs: bool, name: str) -> tuple[dict[str, list], EncodeStats]:
    """Columns `input_ids` and `labels` for the rows that can be trained on, and the counts of the rest."""
    stats = EncodeStats(rows=len(rows))
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for row in rows:
        enc = encode(tokenizer, row.messages, train_on_inputs, row.where)
        ids, labels = enc.input_ids, enc.labels
        stats.longest = max(stats.longest, len(ids))
        stats.assistant_turns += enc.turns
        stats.turns_missing_end_of_turn += enc.turns - enc.turns_with_end
        if len(ids) > max_seq_length:
            stats.too_long += 1
            if truncation == "drop":
                stats.dropped_too_long += 1
                _note(stats, row.where)
                continue
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if all(label == IGNORE_INDEX for label in labels):
                stats.dropped_too_long += 1
                _note(stats, row.where)
                continue
            stats.truncated += 1
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        if trained == 0:
            stats.dropped_no_trained_tokens += 1
            _note(stats, row.where)
            continue
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        stats.kept += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
    _report(stats, name, max_seq_length, truncation)
    return columns, stats


def _note(stats: EncodeStats, where: str) -> None:
    if len(stats.first_problem_rows) < 5:
        stats.first_problem_rows.append(where)


def _report(stats: EncodeStats, name: str, max_seq_length: int, truncation: str) -> None:
    examples = f" (e.g. {', '.join(stats.first_problem_rows[:3])})" if stats.first_problem_rows else ""
    if stats.too_long:
        what = (f"dropped {stats.dropped_too_long}" if truncation == "drop" else
                f"truncated {stats.truncated}, dropped {stats.dropped_too_long} with nothing left to train")
        log.warning("%s: %d of %d rows are longer than --max_seq_length %d (longest %d tokens): %s%s",
                    name, stats.too_long, stats.rows, max_seq_length, stats.longest, what, examples)
    if stats.dropped_no_trained_tokens:
        log.warning("%s: dropped %d of %d rows with no assistant token to train on%s", name,
                    stats.dropped_no_trained_tokens, stats.rows, examples)
    if stats.turns_missing_end_of_turn:
        log.warning("%s: %d of %d assistant turns end without a special end-of-turn token; the model may not "
                    "learn to stop (check the chat template)", name, stats.turns_missing_end_of_turn,
                    stats.assistant_turns)
    if stats.kept == 0:
        raise DataError(f"{name}: none of the {stats.rows} rows can be trained on ({stats.dropped_too_long} too "
                        f"long for --max_seq_length {max_seq_length}, {stats.dropped_no_trained_tokens} with no "
                        "assistant tokens)")
