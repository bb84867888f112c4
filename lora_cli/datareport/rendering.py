"""Text of a row rendered from the very ids and labels lora-train trains on: trained and masked runs."""

from __future__ import annotations

import itertools
import json
from typing import Any

from ..chat import IGNORE_INDEX


def token_runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """Maximal runs of trained or masked positions: (start, end, trained)."""
    runs, start = [], 0
    for trained, group in itertools.groupby(labels, key=lambda label: label != IGNORE_INDEX):
        length = sum(1 for _ in group)
        runs.append((start, start + length, trained))
        start += length
    return runs


def decoded_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The text of each run, decoded from the very ids and labels lora-train trains on."""
    return [(decode(tokenizer, ids[a:b]), trained) for a, b, trained in token_runs(labels)]


def render_plain(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The plain-text rendering: trained text wrapped in [[ ]]."""
    return "".join(bracket(text, trained) for text, trained in decoded_runs(tokenizer, ids, labels))


def bracket(text: str, trained: bool) -> str:
    return f"[[{text}]]" if trained else text


def span_boundaries(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """For --show_ids: each trained span's first and last token ids and the masked ids just outside it."""
    def token(i: int) -> str:
        return f"{ids[i]} {json.dumps(decode(tokenizer, ids[i:i + 1]), ensure_ascii=False)}"

    lines, spans = [], [(a, b) for a, b, trained in token_runs(labels) if trained]
    for n, (a, b) in enumerate(spans, start=1):
        before = f"{token(a - 1)} " if a > 0 else "(start) "
        after = f" {token(b)}" if b < len(ids) else " (end)"
        inner = token(a) if b - a == 1 else f"{token(a)} … {token(b - 1)}"
        lines.append(f"ids  span {n}, tokens {a}..{b - 1}: {before}[[ {inner} ]]{after}")
    return lines


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
