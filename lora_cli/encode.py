"""Turn normalised conversations into token ids and labels, and count what happens to each row."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from .chat import IGNORE_INDEX, Encoded, encode
from .data import Conversation
from .errors import DataError

log = logging.getLogger("lora_cli")

# The version of what encode_row produces (ids, labels, fates) for given rows, tokenizer and settings. The data cache
# keys on it: bump it whenever that output changes. tests/test_golden_encoding.py fails until it is bumped and the
# golden file regenerated, so that moving or rewriting the encoding code never reuses stale cached rows.
ENCODING_VERSION = 1


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
    reasoning_turns: int = 0  # assistant turns that carry reasoning (reasoning_content or inline <think>)
    reasoning_trained: int = 0  # ... whose reasoning the chat template renders, so it is trained
    longest: int = 0  # longest row before any truncation
    first_problem_rows: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, row: EncodedRow, where: str) -> None:
        """Count one encoded row (encode_rows and lora-data count through here, so their numbers agree)."""
        self.rows += 1
        self.longest = max(self.longest, len(row.full.input_ids))
        self.assistant_turns += row.full.turns
        self.turns_missing_end_of_turn += row.full.turns - row.full.turns_with_end
        self.reasoning_turns += row.full.reasoning_turns
        self.reasoning_trained += row.full.reasoning_trained
        if row.fate in (TRUNCATED, TOO_LONG):
            self.too_long += 1
        if row.fate == TRUNCATED:
            self.truncated += 1
        elif row.fate == TOO_LONG:
            self.dropped_too_long += 1
            _note(self, where)
        elif row.fate == NO_TRAINED_TOKENS:
            self.dropped_no_trained_tokens += 1
            _note(self, where)
        if row.kept:
            self.kept += 1
            self.tokens += len(row.input_ids)
            self.trained_tokens += sum(1 for label in row.labels if label != IGNORE_INDEX)


# What happens to a row in training (EncodedRow.fate).
KEPT, TRUNCATED, TOO_LONG, NO_TRAINED_TOKENS = "kept", "truncated", "too_long", "no_trained_tokens"


@dataclass
class EncodedRow:
    """One conversation as lora-train sees it: its whole encoding, and what of it is trained on."""

    full: Encoded  # the whole conversation, before --max_seq_length applies
    input_ids: list[int]  # the sequence trained on: cut at --max_seq_length when truncated, empty when dropped
    labels: list[int]
    fate: str  # KEPT, TRUNCATED, or dropped: TOO_LONG, NO_TRAINED_TOKENS

    @property
    def kept(self) -> bool:
        return self.fate in (KEPT, TRUNCATED)


def encode_row(tokenizer: Any, row: Conversation, *, max_seq_length: int, truncation: str,
               train_on_inputs: bool) -> EncodedRow:
    """One conversation's token ids and labels, and what --max_seq_length and the loss mask leave of it."""
    enc = encode(tokenizer, row.messages, train_on_inputs, row.where, row.tools)
    ids, labels, fate = enc.input_ids, enc.labels, KEPT
    if len(ids) > max_seq_length:
        if truncation == "drop":
            return EncodedRow(enc, [], [], TOO_LONG)
        ids, labels, fate = ids[:max_seq_length], labels[:max_seq_length], TRUNCATED
        if all(label == IGNORE_INDEX for label in labels):
            return EncodedRow(enc, [], [], TOO_LONG)  # the cut left no assistant token: nothing to train
    if all(label == IGNORE_INDEX for label in labels):
        return EncodedRow(enc, [], [], NO_TRAINED_TOKENS)
    return EncodedRow(enc, ids, labels, fate)


def encode_rows(tokenizer: Any, rows: list[Conversation], *, max_seq_length: int, truncation: str,
                train_on_inputs: bool, name: str, row_index: bool = False) -> tuple[dict[str, list], EncodeStats]:
    """Columns `input_ids` and `labels` for the rows that can be trained on, and the counts of the rest. With
    `row_index`, a column `row` also gives each kept row's position in `rows`."""
    stats = EncodeStats()
    columns: dict[str, list] = {"input_ids": [], "labels": [], **({"row": []} if row_index else {})}
    for index, row in enumerate(rows):
        encoded = encode_row(tokenizer, row, max_seq_length=max_seq_length, truncation=truncation,
                             train_on_inputs=train_on_inputs)
        stats.add(encoded, row.where)
        if encoded.kept:
            columns["input_ids"].append(encoded.input_ids)
            columns["labels"].append(encoded.labels)
            if row_index:
                columns["row"].append(index)
    report(stats, name, max_seq_length, truncation)
    return columns, stats


_STATS = ("fate", "length", "turns", "turns_with_end", "reasoning_turns", "reasoning_trained", "trained", "where")


def encode_table(tokenizer: Any, table: Any, *, max_seq_length: int, truncation: str, train_on_inputs: bool,
                 name: str, num_proc: int = 1, batch_size: int = 1000) -> tuple[Any, EncodeStats]:
    """encode_rows for a datasets.Dataset of canonical rows (sources.Mixture.rows): the same columns and counts, but
    tokenised on `num_proc` processes through datasets.map, batch by batch into Arrow files, so that memory holds
    a batch per process and never the whole dataset."""
    import numpy as np
    from datasets import Features, Sequence, Value

    from .sources.mixture import conversation

    settings = dict(max_seq_length=max_seq_length, truncation=truncation, train_on_inputs=train_on_inputs)

    def encode_batch(texts: list[str]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], **{k: [] for k in _STATS}}
        for text in texts:
            row = conversation(text)
            encoded = encode_row(tokenizer, row, **settings)
            full = encoded.full
            out["input_ids"].append(encoded.input_ids)
            out["labels"].append(encoded.labels)
            out["fate"].append(encoded.fate)
            out["length"].append(len(full.input_ids))
            out["turns"].append(full.turns)
            out["turns_with_end"].append(full.turns_with_end)
            out["reasoning_turns"].append(full.reasoning_turns)
            out["reasoning_trained"].append(full.reasoning_trained)
            out["trained"].append(sum(1 for label in encoded.labels if label != IGNORE_INDEX))
            out["where"].append("" if encoded.kept else row.where)  # named in warnings about dropped rows
        return out

    ints = Value("int32")
    features = Features({"input_ids": Sequence(ints), "labels": Sequence(ints), "fate": Value("string"),
                         **{k: ints for k in _STATS[1:-1]}, "where": Value("string")})
    procs = max(1, min(num_proc, len(table) // batch_size))  # a process per batch at least: starting one costs ~1 s
    if procs > 1:
        log.info("%s: tokenising %s rows on %d processes", name, f"{len(table):,}", procs)
    mapped = table.map(encode_batch, input_columns="row", batched=True, batch_size=batch_size,
                       num_proc=procs if procs > 1 else None, remove_columns=table.column_names, features=features)
    stats = _table_stats(mapped, np)
    report(stats, name, max_seq_length, truncation)
    kept = np.flatnonzero(np.isin(mapped.data.column("fate").to_numpy(zero_copy_only=False), [KEPT, TRUNCATED]))
    return mapped.select(kept).select_columns(["input_ids", "labels"]), stats


def encode_stream(tokenizer: Any, stream: Any, stats: EncodeStats, counts: dict[str, int], *, max_seq_length: int,
                  truncation: str, train_on_inputs: bool, batch_size: int = 64) -> Any:
    """The kept rows of an iterable dataset of canonical rows (sources.stream), tokenised as training reads them;
    `stats` and `counts` (rows per source) grow with every row read, as encode_rows counts them."""
    from datasets import Features, Sequence, Value

    from .sources.mixture import conversation

    settings = dict(max_seq_length=max_seq_length, truncation=truncation, train_on_inputs=train_on_inputs)

    def encode_batch(texts: list[str], labels: list[str]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for text, label in zip(texts, labels):
            row = conversation(text)
            encoded = encode_row(tokenizer, row, **settings)
            stats.add(encoded, row.where)
            counts[label] = counts.get(label, 0) + 1
            if encoded.kept:
                out["input_ids"].append(encoded.input_ids)
                out["labels"].append(encoded.labels)
        return out

    ints = Sequence(Value("int32"))
    return stream.map(encode_batch, input_columns=["row", "source"], batched=True, batch_size=batch_size,
                      remove_columns=["row", "source"], features=Features({"input_ids": ints, "labels": ints}))


def _table_stats(mapped: Any, np: Any) -> EncodeStats:
    """The counts EncodeStats.add makes row by row, from encode_table's columns."""
    col = {k: mapped.data.column(k).to_numpy(zero_copy_only=False) for k in _STATS}
    fate = col["fate"]
    kept = np.isin(fate, [KEPT, TRUNCATED])
    import pyarrow.compute as pc

    lengths = pc.list_value_length(mapped.data.column("input_ids")).to_numpy(zero_copy_only=False)
    dropped = np.flatnonzero(np.isin(fate, [TOO_LONG, NO_TRAINED_TOKENS]))[:5]
    return EncodeStats(
        rows=len(fate), kept=int(kept.sum()), too_long=int(np.isin(fate, [TRUNCATED, TOO_LONG]).sum()),
        truncated=int((fate == TRUNCATED).sum()), dropped_too_long=int((fate == TOO_LONG).sum()),
        dropped_no_trained_tokens=int((fate == NO_TRAINED_TOKENS).sum()), tokens=int(lengths[kept].sum()),
        trained_tokens=int(col["trained"][kept].sum()), assistant_turns=int(col["turns"].sum()),
        turns_missing_end_of_turn=int((col["turns"] - col["turns_with_end"]).sum()),
        reasoning_turns=int(col["reasoning_turns"].sum()), reasoning_trained=int(col["reasoning_trained"].sum()),
        longest=int(col["length"].max(initial=0)), first_problem_rows=[str(col["where"][i]) for i in dropped])


def _note(stats: EncodeStats, where: str) -> None:
    if len(stats.first_problem_rows) < 5:
        stats.first_problem_rows.append(where)


def report(stats: EncodeStats, name: str, max_seq_length: int, truncation: str) -> None:
    """Warn about what --max_seq_length and the loss mask did to the rows; DataError when none is left."""
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
