"""Preference rows as token ids: the prompt rendered once with the model's chat template, each answer cut to its
assistant turn with the end-of-turn token, and every length rule counted, never applied silently.

The answer's tokens are found by lora-train's own SFT masking (chat.encode on prompt + answer): the trained span of
the assistant turn is the completion the preference loss scores; what the template renders before it is the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import chat
from ..errors import DataError
from .rows import Judged, PreferencePair

log = logging.getLogger("lora_cli")

KEPT, TRUNCATED, DROPPED = "kept", "truncated", "dropped"


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # the assistant turn's trained tokens, end-of-turn token included
    has_end_of_turn: bool


@dataclass
class EncodedExample:
    """One row as the trainer gets it: a shared prompt and one (KTO) or two (chosen, rejected) completions."""

    prompt_ids: list[int]
    completions: list[list[int]]
    fate: str  # KEPT, TRUNCATED or DROPPED
    full_length: int  # prompt + longest completion, before any length rule
    reason: str = ""  # why it was cut or dropped
    label: bool | None = None  # KTO: whether the completion is desirable
    where: str = ""  # path:line of the row

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(c) for c in self.completions)


@dataclass
class PreferenceStats:
    """Counts with the names EncodeStats uses where they mean the same (lora-train's plan and dry run read them)."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    prompt_too_long: int = 0  # ... of the cut or dropped rows, those whose prompt exceeds --max_prompt_length
    tokens: int = 0  # tokens of every sequence scored (a pair's prompt counts twice: once per answer)
    trained_tokens: int = 0  # completion tokens scored
    turns_missing_end_of_turn: int = 0
    longest: int = 0  # longest prompt + answer before any length rule
    first_problem_rows: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def completion(tokenizer: Any, prompt: list[dict], answer: str, where: str) -> Completion:
    """The prompt's ids and the answer's trained ids, as lora-train's SFT masking finds the assistant turn."""
    enc = chat.encode(tokenizer, [*prompt, {"role": "assistant", "content": answer}], where=where)
    trained = [i for i, label in enumerate(enc.labels) if label != chat.IGNORE_INDEX]
    if not trained:
        raise DataError(f"{where}: the chat template leaves no token of the answer to score")
    first, last = trained[0], trained[-1]
    return Completion(enc.input_ids[:first], enc.input_ids[first:last + 1], enc.turns_with_end == enc.turns)


def encode_pair(tokenizer: Any, pair: PreferencePair) -> EncodedExample:
    chosen = completion(tokenizer, pair.prompt, pair.chosen, pair.where)
    rejected = completion(tokenizer, pair.prompt, pair.rejected, pair.where)
    prompt = _shared_prompt(chosen.prompt_ids, rejected.prompt_ids)
    # Tokens of a prompt that the two renderings do not share belong to each answer's sequence.
    answers = [chosen.prompt_ids[len(prompt):] + chosen.ids, rejected.prompt_ids[len(prompt):] + rejected.ids]
    ends = chosen.has_end_of_turn + rejected.has_end_of_turn
    example = EncodedExample(prompt, answers, KEPT, 0, where=pair.where)
    example.full_length = example.length
    example.reason = "" if ends == 2 else "missing end-of-turn"
    return example


def encode_judged(tokenizer: Any, row: Judged) -> EncodedExample:
    done = completion(tokenizer, row.prompt, row.completion, row.where)
    example = EncodedExample(done.prompt_ids, [done.ids], KEPT, 0, label=row.label, where=row.where)
    example.full_length = example.length
    example.reason = "" if done.has_end_of_turn else "missing end-of-turn"
    return example


def _shared_prompt(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def apply_lengths(example: EncodedExample, max_length: int, max_prompt_length: int, truncation: str) -> str:
    """Apply --max_prompt_length and --max_seq_length to one example (in place); returns why it changed, or ""."""
    why = ""
    if max_prompt_length and len(example.prompt_ids) > max_prompt_length:
        why = f"prompt of {len(example.prompt_ids)} tokens over --max_prompt_length {max_prompt_length}"
        if truncation == "drop":
            example.fate = DROPPED
            return why
        example.prompt_ids = example.prompt_ids[-max_prompt_length:]  # keep the turn the answers reply to
        example.fate = TRUNCATED
    if example.length > max_length:
        why = why or f"{example.length} tokens over --max_seq_length {max_length}"
        room = max_length - len(example.prompt_ids)
        if truncation == "drop" or room <= 0:
            example.fate = DROPPED
            return why
        example.completions = [c[:room] for c in example.completions]  # their ends (and end-of-turn) are lost
        example.fate = TRUNCATED
    return why


def encode_examples(tokenizer: Any, rows: list, *, max_length: int, max_prompt_length: int, truncation: str,
                    name: str) -> tuple[list[EncodedExample], PreferenceStats]:
    """Every row encoded and its length rules applied; the kept ones are returned, the rest counted and reported."""
    stats = PreferenceStats()
    kept = []
    for row in rows:
        example = encode_pair(tokenizer, row) if isinstance(row, PreferencePair) else encode_judged(tokenizer, row)
        stats.rows += 1
        stats.longest = max(stats.longest, example.full_length)
        stats.turns_missing_end_of_turn += example.reason == "missing end-of-turn"
        why = apply_lengths(example, max_length, max_prompt_length, truncation)
        if example.fate != KEPT:
            stats.prompt_too_long += why.startswith("prompt")
            if len(stats.first_problem_rows) < 5:
                stats.first_problem_rows.append(row.where)
        if example.fate == DROPPED:
            stats.dropped_too_long += 1
            continue
        stats.truncated += example.fate == TRUNCATED
        stats.kept += 1
        stats.tokens += sum(len(example.prompt_ids) + len(c) for c in example.completions)
        stats.trained_tokens += sum(len(c) for c in example.completions)
        kept.append(example)
    report(stats, name, max_length, max_prompt_length, truncation)
    return kept, stats


def report(stats: PreferenceStats, name: str, max_length: int, max_prompt_length: int, truncation: str) -> None:
    """Warn about every row a length rule cut or dropped; DataError when none is left."""
    examples = f" (e.g. {', '.join(stats.first_problem_rows[:3])})" if stats.first_problem_rows else ""
    changed = stats.truncated + stats.dropped_too_long
    if changed:
        limits = f"--max_seq_length {max_length}" + (f" or --max_prompt_length {max_prompt_length}"
                                                     if max_prompt_length else "")
        log.warning("%s: %d of %d rows exceed %s (longest %d tokens, %d by their prompt): truncated %d, dropped %d%s",
                    name, changed, stats.rows, limits, stats.longest, stats.prompt_too_long, stats.truncated,
                    stats.dropped_too_long, examples)
    if stats.turns_missing_end_of_turn:
        log.warning("%s: %d rows have an answer without a special end-of-turn token; the model may not learn to stop "
                    "(check the chat template)", name, stats.turns_missing_end_of_turn)
    if stats.kept == 0:
        raise DataError(f"{name}: none of the {stats.rows} rows fits --max_seq_length {max_length}"
                        f"{' with --truncation drop' if truncation == 'drop' else ''}")


def pair_columns(examples: list[EncodedExample]) -> dict[str, list]:
    """DPO/ORPO columns as TRL's DataCollatorForPreference names them."""
    return {"prompt_ids": [e.prompt_ids for e in examples], "chosen_ids": [e.completions[0] for e in examples],
            "rejected_ids": [e.completions[1] for e in examples]}


def judged_columns(examples: list[EncodedExample]) -> dict[str, list]:
    """KTO columns as TRL's DataCollatorForUnpairedPreference names them."""
    return {"prompt_ids": [e.prompt_ids for e in examples], "completion_ids": [e.completions[0] for e in examples],
            "label": [e.label for e in examples]}
