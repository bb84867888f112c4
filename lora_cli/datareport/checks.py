"""Every check lora-data runs, through lora-train's own reading, template, masking and length code."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .. import chat, data, models, sources
from ..chat import IGNORE_INDEX
from ..data import Conversation
from ..encode import NO_TRAINED_TOKENS, TOO_LONG, TRUNCATED, encode_row
from ..errors import DataError
from .config import DataConfig
from .report import ERROR, WARNING, Report, Row, trained_count


def build_report(cfg: DataConfig) -> Report:
    """Every check and statistic, with the tokenizer kept on the report for rendering."""
    report = Report(cfg)
    read_rows(report)  # before the tokenizer loads: an unreadable file fails in a second
    report.tokenizer = load_tokenizer(report)
    encode_all(report, report.tokenizer)
    check_dataset(report)
    return report


def read_rows(report: Report) -> None:
    """Normalise every row as lora-train does, collecting each row's problems instead of stopping at the first."""
    path = report.cfg.train_path
    for where, raw in (row for source in sources.parse(path) for row in sources.scan(source)):
        report.rows_read += 1
        try:
            if isinstance(raw, DataError):  # a line that is not JSON
                raise raw
            messages = data.normalise_row(raw, where)
            tools = data.row_tools(raw, where)
        except DataError as exc:
            report.add(ERROR, "schema", where, without_where(str(exc), where))
            continue
        report.rows.append(Row(Conversation(messages, where, tools), data.row_format(raw)))
        check_turns(report, messages, where)
    if not report.rows_read:
        report.add(ERROR, "nothing_to_train", path, "the file has no rows")


def check_turns(report: Report, messages: list[dict[str, str]], where: str) -> None:
    """Turn order problems lora-train accepts but that usually mean broken data."""
    turns = [(i, m["role"]) for i, m in enumerate(messages, start=1) if m["role"] != "system"]
    if turns and turns[0][1] == "assistant":
        report.add(WARNING, "roles", where, f"message {turns[0][0]} (assistant) comes before any user turn")
    for (i, role), (j, next_role) in zip(turns, turns[1:]):
        if role == next_role:
            report.add(WARNING, "roles", where, f"messages {i} and {j} are both {role} turns")
    for i, m in enumerate(messages, start=1):
        if m["role"] != "assistant" and not m["content"].strip():
            report.add(WARNING, "empty_content", where, f"message {i} ({m['role']}) is empty")
    trailing = len(messages) - max(i for i, m in enumerate(messages, start=1) if m["role"] == "assistant")
    if trailing:
        fate = "trained on with no answer after them" if report.cfg.train_on_inputs else "never trained on"
        report.add(WARNING, "trailing_turn", where, f"ends with {trailing} message{'s' if trailing > 1 else ''} "
                                                    f"after the last assistant turn, {fate}")


def load_tokenizer(report: Report) -> Any:
    """The tokenizer and chat template exactly as lora-train resolves them."""
    cfg = report.cfg
    base = models.resolve(cfg.base_model)
    tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    has_own = bool(getattr(tokenizer, "chat_template", None))
    chat.resolve_chat_template(tokenizer, cfg.chat_template, chat.parse_template_kwargs(cfg.chat_template_kwargs))
    report.model = base.display
    report.chat_template = cfg.chat_template or ("the model's own" if has_own else "chatml (the model has none)")
    if cfg.chat_template_kwargs:
        report.chat_template += f", with {cfg.chat_template_kwargs}"
    if not cfg.chat_template and not has_own:
        report.add(WARNING, "no_template", base.display, "the tokenizer has no chat template, so ChatML is used: "
                                                         "pass --chat_template if the model was trained on another")
    return tokenizer


def encode_all(report: Report, tokenizer: Any) -> None:
    """Encode, mask and length-check every valid row with lora-train's per-row code, counting as it counts."""
    cfg = report.cfg
    for row in report.rows:
        try:
            row.encoded = encode_row(tokenizer, row.conversation, max_seq_length=cfg.max_seq_length,
                                     truncation=cfg.truncation, train_on_inputs=cfg.train_on_inputs)
        except DataError as exc:
            report.add(ERROR, "template", row.where, without_where(str(exc), row.where))
            continue
        report.stats.add(row.encoded, row.where)
        check_encoding(report, row)


def check_encoding(report: Report, row: Row) -> None:
    enc, cfg = row.encoded, report.cfg
    length = len(enc.full.input_ids)
    if enc.fate == TRUNCATED:
        cut = enc.full.labels[cfg.max_seq_length:]
        report.add(WARNING, "too_long", row.where, f"{length:,} tokens: truncated to {cfg.max_seq_length:,}, losing "
                                                   f"{len(cut):,} tokens ({trained_count(cut):,} of them trained)")
    elif enc.fate == TOO_LONG:
        why = "dropped" if cfg.truncation == "drop" else "dropped, as no trained token is left before the cut"
        report.add(WARNING, "too_long", row.where, f"{length:,} tokens > {cfg.max_seq_length:,}: {why}")
    elif enc.fate == NO_TRAINED_TOKENS:
        report.add(WARNING, "no_trained_tokens", row.where, "the mask leaves no token to train on: dropped")
    masked = sum(1 for label in enc.full.labels if label == IGNORE_INDEX)
    if not cfg.train_on_inputs and masked <= 1:  # at most a BOS: prompt and headers are in the loss too
        report.add(WARNING, "all_trained", row.where, f"all {length:,} tokens are trained on; check the chat "
                                                      "template")
    missing = enc.full.turns - enc.full.turns_with_end
    if missing:
        report.add(WARNING, "end_of_turn", row.where, f"{missing} of {enc.full.turns} assistant turns end without "
                                                      "a special end-of-turn token: the model may not learn to stop")


def check_dataset(report: Report) -> None:
    """Problems of the rows together: mixed formats, duplicates, and whether anything at all can train."""
    formats = Counter(row.format for row in report.rows)
    if len(formats) > 1:
        main = formats.most_common(1)[0][0]
        for row in report.rows:
            if row.format != main:
                report.add(WARNING, "format", row.where, f"{row.format} row; {formats[main]} of "
                                                         f"{len(report.rows)} rows are {main}")
    first_seen: dict[str, str] = {}
    for row in report.rows:
        key = json.dumps([row.conversation.messages, row.conversation.tools], ensure_ascii=False, sort_keys=True)
        if key in first_seen:
            report.add(WARNING, "duplicate", row.where, f"same conversation as {first_seen[key]}")
        else:
            first_seen[key] = row.where
    s = report.stats
    if report.rows and not s.kept:
        report.add(ERROR, "nothing_to_train", report.cfg.train_path,
                   f"none of the {s.rows} encoded rows can be trained on ({s.dropped_too_long} too long for "
                   f"--max_seq_length {report.cfg.max_seq_length} with --truncation {report.cfg.truncation}, "
                   f"{s.dropped_no_trained_tokens} with no trained tokens)")
    elif report.rows_read and not report.rows:
        report.add(ERROR, "nothing_to_train", report.cfg.train_path, "no row can be read")


def without_where(message: str, where: str) -> str:
    """DataError messages start with the row's place, which the report shows in its own column."""
    return message[len(where) + 2:] if message.startswith(f"{where}: ") else message
