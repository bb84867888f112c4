"""Preference rows read and validated, each problem naming file:line.

Paired rows (DPO, ORPO): {"prompt", "chosen", "rejected"}, optionally "system". Unpaired rows (KTO): {"prompt",
"completion", "label": true|false}. In both, the prompt is a string (one user turn) or a list of messages (TRL's
conversational format) and each completion a string or a list holding one assistant message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .. import data, sources
from ..errors import DataError

PAIRED, UNPAIRED = "paired", "unpaired"
ROLES = ("system", "user", "assistant")


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # the conversation before the answers, ending with a user turn
    chosen: str  # the preferred assistant answer
    rejected: str
    where: str  # path:line


@dataclass
class Judged:
    """One unpaired (KTO) row: an answer and whether it is desirable."""

    prompt: list[dict[str, str]]
    completion: str
    label: bool
    where: str


def row_kind(row: Any) -> str | None:
    """PAIRED or UNPAIRED for a preference row, None for anything else (e.g. an SFT row)."""
    if not isinstance(row, dict):
        return None
    if "chosen" in row or "rejected" in row:
        return PAIRED
    if "label" in row and "completion" in row:
        return UNPAIRED
    return None


def file_kind(path: str) -> str | None:
    """The kind of the data's first readable row: lets lora-train, lora-eval and lora-data tell preference data
    from chat data. A JSON Lines file is read only up to its first row; of several sources, the first is read."""
    if path.lower().endswith(data.JSONL_SUFFIXES) and os.path.isfile(path):
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        return row_kind(json.loads(line))
                    except (ValueError, RecursionError):
                        return None  # reported with its line when the file is read
        return None
    for _, raw in sources.scan(sources.parse(path)[0]):
        return None if isinstance(raw, DataError) else row_kind(raw)
    return None


def scan(path: str, kind: str) -> Iterator[tuple[str, PreferencePair | Judged | DataError]]:
    """Every row of every source, parsed, or the DataError saying what is wrong with it (lora-data reports them
    all)."""
    for source in sources.parse(path):
        yield from _scan_source(source, kind)


def _scan_source(source: sources.Source, kind: str) -> Iterator[tuple[str, PreferencePair | Judged | DataError]]:
    for where, raw in sources.scan(source):
        if isinstance(raw, DataError):
            yield where, raw
            continue
        try:
            yield where, parse_row(raw, where, kind)
        except DataError as exc:
            yield where, exc


def load(path: str, kind: str, seed: int = 0) -> list[PreferencePair] | list[Judged]:
    """Every row of the sources, mixed by their weights as chat data is (sources.pick); DataError on the first bad
    row."""
    specs = sources.parse(path)
    per_source = []
    for source in specs:
        rows = []
        for _, row in _scan_source(source, kind):
            if isinstance(row, DataError):
                raise row
            rows.append(row)
        if not rows:
            raise DataError(f"{source.label}: no rows (the file is empty)")
        per_source.append(rows)
    picks = sources.pick(specs, [len(r) for r in per_source], seed)
    mixed = [r if p is None else [r[i] for i in p] for r, p in zip(per_source, picks)]
    sources.report(specs, [len(r) for r in per_source], [len(r) for r in mixed])
    return [row for rows in mixed for row in rows]


def parse_row(row: Any, where: str, kind: str) -> PreferencePair | Judged:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {data._type_name(row)}")
    needed = ("prompt", "chosen", "rejected") if kind == PAIRED else ("prompt", "completion", "label")
    missing = [key for key in needed if key not in row]
    if missing:
        expected = ("'prompt', 'chosen' and 'rejected'" if kind == PAIRED else
                    "'prompt', 'completion' and 'label' (true or false)")
        raise DataError(f"{where}: missing {', '.join(repr(k) for k in missing)}; a "
                        f"{'preference pair' if kind == PAIRED else 'KTO row'} needs {expected}")
    prompt = _prompt(row["prompt"], row.get("system"), where)
    if kind == UNPAIRED:
        if not isinstance(row["label"], bool):
            raise DataError(f"{where}: 'label' must be true or false, got {data._type_name(row['label'])}")
        return Judged(prompt, _answer(row["completion"], where, "completion"), row["label"], where)
    chosen = _answer(row["chosen"], where, "chosen")
    rejected = _answer(row["rejected"], where, "rejected")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer, so there is no preference to learn")
    return PreferencePair(prompt, chosen, rejected, where)


def _prompt(prompt: Any, system: Any, where: str) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _messages(prompt, where, "prompt")
    else:
        raise DataError(f"{where}: 'prompt' must be a string or an array of messages, got {data._type_name(prompt)}")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string, got {data._type_name(system)}")
        if messages and messages[0]["role"] == "system":
            raise DataError(f"{where}: both 'system' and a system message in 'prompt'; keep one")
        messages = [{"role": "system", "content": system}, *messages]
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: 'prompt' has no user turn, so there is nothing the answers reply to")
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: 'prompt' must end with a user turn (the answers follow it), "
                        f"not a {messages[-1]['role']} message")
    for i, m in enumerate(messages, start=1):
        if m["role"] == "system" and i != 1:
            raise DataError(f"{where}: prompt message {i} is a system message; only the first may be one")
        if m["role"] == "user" and not m["content"].strip():
            raise DataError(f"{where}: prompt message {i} (user) has empty content")
    return messages


def _messages(messages: list, where: str, field: str) -> list[dict[str, str]]:
    if not messages:
        raise DataError(f"{where}: '{field}' is empty")
    out = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].content must be a string, got {data._type_name(content)}")
        out.append({"role": role, "content": content})
    return out


def _answer(answer: Any, where: str, field: str) -> str:
    """A completion as the assistant's text: a string, or TRL's list holding one assistant message."""
    if isinstance(answer, list):
        messages = _messages(answer, where, field)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{where}: '{field}' must hold exactly one assistant message, got "
                            f"{', '.join(m['role'] for m in messages)}")
        answer = messages[0]["content"]
    elif not isinstance(answer, str):
        raise DataError(f"{where}: '{field}' must be a string or a list with one assistant message, got "
                        f"{data._type_name(answer)}")
    if not answer.strip():
        raise DataError(f"{where}: '{field}' is empty")
    return answer
