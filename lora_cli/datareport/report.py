"""What lora-data found: the kinds of problem, the rows, and the report with its statistics and summary."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..chat import IGNORE_INDEX
from ..data import Conversation
from ..encode import EncodedRow, EncodeStats
from .config import DataConfig

LENGTHS_PNG = "token_lengths.png"
FRACTION_PNG = "trained_fraction.png"
ERROR, WARNING = "error", "warning"
MAX_ERRORS_SHOWN = 100  # per run in the terminal; data_report.json holds them all
EXAMPLES_SHOWN = 3  # rows quoted per kind of warning in the terminal
TRAINED_STYLE, MASKED_STYLE = "bold green", "dim"

# Kinds of problem. Row checks: what the rows that fail them are ("3 rows" + phrase), for grouping in the
# terminal and the summary line. Set checks (SET_CHECKS) concern the whole file or model and print their message.
CHECKS = {
    "schema": "lora-train cannot read",
    "template": "the chat template cannot mask",
    "nothing_to_train": "nothing to train on",
    "roles": "whose user and assistant turns do not alternate",
    "trailing_turn": "not ending with an assistant turn",
    "empty_content": "with an empty system or user message",
    "format": "in a different format from the rest of the file",
    "duplicate": "repeating an earlier conversation",
    "too_long": "longer than --max_seq_length",
    "no_trained_tokens": "with no token to train on (lora-train drops them)",
    "all_trained": "trained on every token (the mask does not separate prompt from answer)",
    "end_of_turn": "whose assistant turns end without an end-of-turn token in the loss",
    "no_template": "the model has no chat template",
}
SET_CHECKS = ("nothing_to_train", "no_template")



@dataclass
class Problem:
    severity: str  # ERROR: lora-train cannot use the data as it is; WARNING: it can, but look
    check: str  # a key of CHECKS
    where: str  # file:line of the row, or the file (or model) for a problem of the whole set
    message: str


@dataclass
class Row:
    conversation: Conversation
    format: str
    encoded: EncodedRow | None = None  # None when the chat template cannot mask it

    @property
    def where(self) -> str:
        return self.conversation.where


@dataclass
class Report:
    cfg: DataConfig
    model: str = ""
    chat_template: str = ""
    rows_read: int = 0
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    stats: EncodeStats = field(default_factory=EncodeStats)
    tokenizer: Any = field(default=None, repr=False)  # for rendering rows; not part of the saved report

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def can_train(self) -> bool:
        return not self.errors

    def add(self, severity: str, check: str, where: str, message: str) -> None:
        self.problems.append(Problem(severity, check, where, message))

    def lengths(self) -> list[int]:
        """Every encoded row's whole length, before --max_seq_length."""
        return [len(r.encoded.full.input_ids) for r in self.rows if r.encoded]

    def trained_fractions(self) -> list[float]:
        """Trained share of the tokens each kept row contributes to training."""
        kept = [r.encoded for r in self.rows if r.encoded and r.encoded.kept]
        return [trained_count(e.labels) / len(e.labels) for e in kept]

    def statistics(self) -> dict[str, Any]:
        s, lengths, fractions = self.stats, self.lengths(), self.trained_fractions()
        return {
            "rows_read": self.rows_read,
            "rows_valid": len(self.rows),
            "rows_with_errors": len({p.where for p in self.errors if p.where != self.cfg.train_path}),
            "rows_trained_on": s.kept,
            "formats": dict(Counter(r.format for r in self.rows).most_common()),
            "duplicates": sum(1 for p in self.problems if p.check == "duplicate"),
            "tokens_total": sum(lengths),  # every valid row, whole
            "tokens_trained_on": s.tokens,  # in the rows lora-train keeps, after truncation
            "tokens_in_loss": s.trained_tokens,
            "tokens_per_row": spread(lengths),
            "trained_fraction_per_row": spread(fractions, digits=4),
            "rows_over_max_seq_length": s.too_long,
            "rows_truncated": s.truncated,
            "rows_dropped_too_long": s.dropped_too_long,
            "rows_zero_trained_tokens": s.dropped_no_trained_tokens,
            "assistant_turns": s.assistant_turns,
            "turns_missing_end_of_turn": s.turns_missing_end_of_turn,
            "tool_call_turns": sum(1 for r in self.rows for m in r.conversation.messages if m.get("tool_calls")),
            "tool_results": sum(1 for r in self.rows for m in r.conversation.messages if m["role"] == "tool"),
            "reasoning_turns": s.reasoning_turns,
            "reasoning_trained": s.reasoning_trained,
        }

    def summary(self) -> str:
        """One line: why the data cannot train, or that it can."""
        if self.can_train:
            found = f"{plural(len(self.warnings), 'warning')} (see above)" if self.warnings else "no problems found"
            return (f"ready to train: {self.stats.kept:,} rows, {self.stats.trained_tokens:,} tokens in the loss; "
                    f"{found}")
        kinds = Counter(p.check for p in self.errors if p.check not in SET_CHECKS)
        parts = [f"{plural(n, 'row')} {CHECKS[check]}" for check, n in kinds.items()]
        parts += [p.message for p in self.errors if p.check in SET_CHECKS]
        return f"cannot train on {self.cfg.train_path}: {'; '.join(parts)}; every problem is listed above"

    def as_dict(self) -> dict[str, Any]:
        return {"train_path": self.cfg.train_path, "base_model": self.model, "chat_template": self.chat_template,
                "max_seq_length": self.cfg.max_seq_length, "truncation": self.cfg.truncation,
                "train_on_inputs": self.cfg.train_on_inputs, "can_train": self.can_train, "summary": self.summary(),
                "statistics": self.statistics(), "encode_stats": self.stats.as_dict(),
                "problems": [asdict(p) for p in self.problems]}


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def trained_count(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


def spread(values: list[float], digits: int = 1) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def spread_text(spread: dict[str, float], fmt: Any) -> str:
    return " · ".join(f"{key} {fmt(value)}" for key, value in spread.items())


def tokens_text(value: float) -> str:
    """A token count; a median may end in .5."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
