"""lora-data: show exactly what lora-train will train on, before any GPU hour is spent.

The data goes through lora-train's own code: data.normalise_row for every row, the tokenizer and chat template as
lora-train resolves them, and encode.encode_row / EncodeStats.add for masking and --max_seq_length. Unlike
lora-train, which stops at the first bad row, every row is checked and every problem is listed. Errors (the data
cannot train as it is) end in exit 2; warnings (it can, but look) leave exit 0, so the command can guard a script.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import chat, data, fsutil, models
from .chat import IGNORE_INDEX
from .config import data_file_problem, opt
from .data import Conversation
from .encode import KEPT, NO_TRAINED_TOKENS, TOO_LONG, TRUNCATED, EncodedRow, EncodeStats, encode_row
from .errors import DataError
from .filenames import DATA_REPORT

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
class DataConfig:
    PROG = "lora-data"
    DESCRIPTION = ("Check a chat dataset before training and show exactly what lora-train will train on: every "
                   "row's schema, a few rows rendered with the trained tokens marked, token and mask statistics, "
                   "and (with --report_dir) histograms and a JSON report. Uses lora-train's own loading, chat "
                   "template, masking and --max_seq_length handling.")
    EPILOG = ("Exit status: 0 when lora-train can use the data (warnings allowed), 2 when it cannot. Example: "
              "lora-data --train_path data/sample/train.jsonl --report_dir runs/data_report && lora-train ...")
    GROUPS = {"data": "data and chat template (as in lora-train)", "model": "base model", "report": "report",
              "run": "run"}

    # --- data --------------------------------------------------------------------------------------------------------
    train_path: str = opt("", "Data to check (required): .jsonl/.json/.parquet/.csv with OpenAI messages, ShareGPT "
                              "conversations, Alpaca or prompt/completion rows.", group="data", metavar="FILE")
    max_seq_length: int = opt(2048, "Longest tokenised conversation trained on, as in lora-train.", group="data")
    truncation: str = opt("drop", "What lora-train does with conversations longer than --max_seq_length: drop or "
                                  "truncate them.", group="data", choices=("drop", "truncate"))
    chat_template: str = opt("", "Override the model's chat template: 'chatml' or a path to a .jinja file. Empty: "
                                 "the model's own (ChatML with a warning when it has none).", group="data",
                             metavar="NAME|PATH")
    chat_template_kwargs: str = opt("", chat.TEMPLATE_KWARGS_HELP, group="data", metavar="JSON")
    train_on_inputs: bool = opt(False, "Check the data as lora-train --train_on_inputs trains it: every token, not "
                                       "only the assistant turns.", group="data")

    # --- model -------------------------------------------------------------------------------------------------------
    base_model: str = opt("", "Base model whose tokenizer and chat template are used (only the tokenizer is loaded): "
                              "a Hub id, a local Hugging Face folder or a .gguf file. Empty: the embedded demo model "
                              "(SmolLM2-135M-Instruct, works offline).", group="model", metavar="MODEL")
    trust_remote_code: bool = opt(False, "Run tokenizer code shipped with the model repository.", group="model")

    # --- report ------------------------------------------------------------------------------------------------------
    show: int = opt(3, "Print this many rows as the model sees them, trained tokens marked (0: none).",
                    group="report", metavar="N")
    show_ids: bool = opt(False, "Also print the token ids on both sides of each trained span in the shown rows.",
                         group="report")
    report_dir: str = opt("", "Write data_report.json (every statistic and problem) and the histograms "
                              "token_lengths.png and trained_fraction.png into this folder.", group="report",
                          metavar="DIR")
    color: str = opt("auto", "Mark trained tokens with colour (auto: when printing to a terminal and NO_COLOR is "
                             "unset). Without colour, trained text is wrapped in [[ ]].", group="report",
                     choices=("auto", "always", "never"))

    # --- run ---------------------------------------------------------------------------------------------------------
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run")

    def problems(self) -> list[str]:
        problem = data_file_problem("train_path", self.train_path, required=True)
        errors: list[str] = [problem] if problem else []
        if self.max_seq_length <= 0:
            errors.append(f"--max_seq_length: must be > 0, got {self.max_seq_length}")
        if self.show < 0:
            errors.append(f"--show: must be >= 0, got {self.show}")
        if self.chat_template and self.chat_template != "chatml" and not os.path.isfile(self.chat_template):
            errors.append(f"--chat_template: {self.chat_template!r} is neither 'chatml' nor an existing .jinja file")
        errors += [p for p in [chat.template_kwargs_problem(self.chat_template_kwargs)] if p]
        if self.report_dir and os.path.exists(self.report_dir) and not os.path.isdir(self.report_dir):
            errors.append(f"--report_dir {self.report_dir}: exists and is not a folder")
        return errors


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
        return [_trained(r.encoded.labels) / len(r.encoded.labels) for r in self.rows if r.encoded and r.encoded.kept]

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
            "tokens_per_row": _spread(lengths),
            "trained_fraction_per_row": _spread(fractions, digits=4),
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
            found = f"{_count(len(self.warnings), 'warning')} (see above)" if self.warnings else "no problems found"
            return (f"ready to train: {self.stats.kept:,} rows, {self.stats.trained_tokens:,} tokens in the loss; "
                    f"{found}")
        kinds = Counter(p.check for p in self.errors if p.check not in SET_CHECKS)
        parts = [f"{_count(n, 'row')} {CHECKS[check]}" for check, n in kinds.items()]
        parts += [p.message for p in self.errors if p.check in SET_CHECKS]
        return f"cannot train on {self.cfg.train_path}: {'; '.join(parts)}; every problem is listed above"

    def as_dict(self) -> dict[str, Any]:
        return {"train_path": self.cfg.train_path, "base_model": self.model, "chat_template": self.chat_template,
                "max_seq_length": self.cfg.max_seq_length, "truncation": self.cfg.truncation,
                "train_on_inputs": self.cfg.train_on_inputs, "can_train": self.can_train, "summary": self.summary(),
                "statistics": self.statistics(), "encode_stats": self.stats.as_dict(),
                "problems": [asdict(p) for p in self.problems]}


def run(cfg: DataConfig) -> Report:
    """Check, print and (with --report_dir) write the report; DataError with a one-line summary when it cannot
    train."""
    from .preference import report as preference_report, rows as preference_rows

    kind = preference_rows.file_kind(cfg.train_path)
    if kind:  # prompt/chosen/rejected or prompt/completion/label rows: checked as lora-train --method dpo/kto reads them
        return preference_report.run(cfg, kind)
    report = build_report(cfg)
    console = make_console(cfg.color)
    print_report(console, report)
    if cfg.report_dir:
        written = write_report_dir(report, Path(cfg.report_dir))
        console.print(f"\nreport written: {', '.join(str(p) for p in written)}", soft_wrap=True, markup=False)
    if not report.can_train:
        raise DataError(report.summary())
    console.print(f"\nlora-data: {report.summary()}", soft_wrap=True, markup=False)
    return report


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
    for where, raw in data.scan_rows(path):
        report.rows_read += 1
        try:
            if isinstance(raw, DataError):  # a line that is not JSON
                raise raw
            messages = data.normalise_row(raw, where)
            tools = data.row_tools(raw, where)
        except DataError as exc:
            report.add(ERROR, "schema", where, _without_where(str(exc), where))
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
            report.add(ERROR, "template", row.where, _without_where(str(exc), row.where))
            continue
        report.stats.add(row.encoded, row.where)
        check_encoding(report, row)


def check_encoding(report: Report, row: Row) -> None:
    enc, cfg = row.encoded, report.cfg
    length = len(enc.full.input_ids)
    if enc.fate == TRUNCATED:
        cut = enc.full.labels[cfg.max_seq_length:]
        report.add(WARNING, "too_long", row.where, f"{length:,} tokens: truncated to {cfg.max_seq_length:,}, losing "
                                                   f"{len(cut):,} tokens ({_trained(cut):,} of them trained)")
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


# --- terminal output --------------------------------------------------------------------------------------------------

def make_console(color: str) -> Any:
    from rich.console import Console

    if color == "always":
        return Console(force_terminal=True, color_system="standard", highlight=False)
    if color == "never":
        return Console(color_system=None, highlight=False)
    return Console(highlight=False)  # rich decides: a terminal, NO_COLOR and TERM=dumb are honoured


def styled(console: Any) -> bool:
    """Whether colour marks the trained tokens; otherwise [[ ]] does."""
    return bool(console.is_terminal and console.color_system and not console.no_color)


def print_report(console: Any, report: Report) -> None:
    _print_header(console, report)
    if report.cfg.show and any(r.encoded for r in report.rows):
        _print_rows(console, report)
    _print_statistics(console, report)
    _print_problems(console, report)


def _heading(console: Any, title: str) -> None:
    from rich.text import Text

    console.print()
    console.print(Text(title, style="bold"), soft_wrap=True)


def _lines(console: Any, pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        console.print(f"  {key.ljust(width)}  {value}", soft_wrap=True, markup=False)


def _print_header(console: Any, report: Report) -> None:
    cfg = report.cfg
    _heading(console, f"lora-data: {cfg.train_path}")
    loss = "every token (--train_on_inputs)" if cfg.train_on_inputs else \
        "assistant turns and their end-of-turn token"
    _lines(console, [("model", report.model), ("chat template", report.chat_template),
                     ("max length", f"{cfg.max_seq_length:,} tokens (longer rows: {cfg.truncation})"),
                     ("loss on", loss)])


def _print_rows(console: Any, report: Report) -> None:
    from rich.text import Text

    shown = [r for r in report.rows if r.encoded][: report.cfg.show]
    _heading(console, f"Rows as the model sees them ({len(shown)} of {len(report.rows)})")
    if styled(console):
        legend = Text("  legend: ").append("trained text", style=TRAINED_STYLE).append(" is in the loss; ") \
            .append("dim text", style=MASKED_STYLE).append(" is masked (label -100: read, not learned)")
    else:
        legend = Text("  legend: [[text]] is in the loss; text outside [[ ]] is masked (label -100: read, not "
                      "learned)")
    console.print(legend, soft_wrap=True)
    for number, row in enumerate(shown, start=1):
        _print_row(console, report, number, row)


def _print_row(console: Any, report: Report, number: int, row: Row) -> None:
    from rich.text import Text

    enc, tokenizer, limit = row.encoded, report.tokenizer, report.cfg.max_seq_length
    ids, labels = (enc.input_ids, enc.labels) if enc.kept else (enc.full.input_ids, enc.full.labels)
    trained = _trained(labels)
    note = {KEPT: "", TRUNCATED: f" · truncated at {limit:,} of {len(enc.full.input_ids):,} tokens",
            TOO_LONG: f" · DROPPED by lora-train: longer than {limit:,} tokens (shown whole)",
            NO_TRAINED_TOKENS: " · DROPPED by lora-train: no trained token"}[enc.fate]
    console.print()
    console.print(Text(f"── row {number} · {row.where} · {len(ids):,} tokens, {trained:,} trained "
                       f"({100 * trained / max(len(ids), 1):.0f}%){note}", style="bold"), soft_wrap=True)
    runs = decoded_runs(tokenizer, ids, labels)
    if runs and not runs[-1][1] and runs[-1][0].endswith("\n"):  # print() ends the line already
        runs[-1] = (runs[-1][0][:-1], False)
    text = Text()
    for piece, is_trained in runs:
        if styled(console):
            text.append(piece, style=TRAINED_STYLE if is_trained else MASKED_STYLE)
        else:
            text.append(bracket(piece, is_trained))
    console.print(text, soft_wrap=True)
    if enc.fate == TRUNCATED:
        console.print(Text(f"  ✂ cut here: {len(enc.full.input_ids) - limit:,} more tokens are not trained on",
                           style="yellow"), soft_wrap=True)
    if report.cfg.show_ids:
        for line in span_boundaries(tokenizer, ids, labels):
            console.print(f"  {line}", soft_wrap=True, markup=False)


def _print_statistics(console: Any, report: Report) -> None:
    st, s = report.statistics(), report.stats
    formats = ", ".join(f"{name} {n:,}" for name, n in st["formats"].items()) or "none"
    lengths, fractions = st["tokens_per_row"], st["trained_fraction_per_row"]
    over = "none" if not s.too_long else (
        f"{_count(s.too_long, 'row')}, dropped" if report.cfg.truncation == "drop" else
        f"{_count(s.too_long, 'row')}: {s.truncated:,} truncated, {s.dropped_too_long:,} dropped with no trained "
        "token left")
    in_loss = f" ({100 * s.trained_tokens / s.tokens:.1f}%)" if s.tokens else ""
    _heading(console, "Statistics")
    _lines(console, [
        ("rows", f"{st['rows_read']:,} read, {st['rows_valid']:,} valid ({formats}), "
                 f"{_count(st['duplicates'], 'duplicate')}, {st['rows_trained_on']:,} trained on"),
        ("tokens", f"{st['tokens_total']:,} in all rows; {s.tokens:,} in the rows trained on, "
                   f"{s.trained_tokens:,} of them in the loss{in_loss}"),
        ("tokens per row", _spread_text(lengths, _tokens) if lengths else "none: no row could be encoded"),
        ("trained per row", _spread_text(fractions, "{:.0%}".format) + " of each trained row's tokens" if fractions
         else "none: no row is trained on"),
        (f"over {report.cfg.max_seq_length:,} tokens", over),
        ("no trained tokens", f"{_count(s.dropped_no_trained_tokens, 'row')}, dropped" if s.dropped_no_trained_tokens
         else "none"),
        ("end of turn", f"{s.assistant_turns - s.turns_missing_end_of_turn:,} of {s.assistant_turns:,} assistant "
                        "turns end with an end-of-turn token in the loss"),
        ("tool calls", f"{_count(st['tool_call_turns'], 'assistant turn')} with tool calls (trained), "
                       f"{_count(st['tool_results'], 'tool result')} (not trained)"
         if st["tool_call_turns"] or st["tool_results"] else "none"),
        ("reasoning", _reasoning_text(s)),
    ])


def _reasoning_text(s: EncodeStats) -> str:
    """What of the data's reasoning is trained: only what the chat template renders."""
    if not s.reasoning_turns:
        return "none in the data (Qwen3-style templates add an empty <think> block: see README)"
    dropped = s.reasoning_turns - s.reasoning_trained
    text = f"{_count(s.reasoning_turns, 'assistant turn')} with reasoning: {s.reasoning_trained:,} trained"
    return text + (f", {dropped:,} dropped by the chat template (e.g. Qwen3 keeps reasoning only after the last "
                   "user message)" if dropped else " (the chat template renders it)")


def _print_problems(console: Any, report: Report) -> None:
    from rich.text import Text

    errors, warnings = _count(len(report.errors), "error"), _count(len(report.warnings), "warning")
    _heading(console, f"Problems: {errors}, {warnings}")
    if not report.problems:
        console.print("  none", soft_wrap=True)
        return
    for problem in report.errors[:MAX_ERRORS_SHOWN]:
        console.print(Text("  error    ", style="bold red").append(f"{problem.where}: {problem.message}"),
                      soft_wrap=True)
    if len(report.errors) > MAX_ERRORS_SHOWN:
        console.print(f"  ... and {len(report.errors) - MAX_ERRORS_SHOWN:,} more errors (all of them in "
                      f"{DATA_REPORT} with --report_dir)", soft_wrap=True, markup=False)
    for check, problems in itertools.groupby(sorted(report.warnings, key=lambda p: list(CHECKS).index(p.check)),
                                             key=lambda p: p.check):
        problems = list(problems)
        if check in SET_CHECKS:
            console.print(Text("  warning  ", style="bold yellow").append(f"{problems[0].where}: "
                                                                         f"{problems[0].message}"), soft_wrap=True)
            continue
        headline = f"{_count(len(problems), 'row')} {CHECKS[check]}"
        console.print(Text("  warning  ", style="bold yellow").append(headline), soft_wrap=True)
        for problem in problems[:EXAMPLES_SHOWN]:
            console.print(f"             {problem.where}: {problem.message}", soft_wrap=True, markup=False)
        if len(problems) > EXAMPLES_SHOWN:
            console.print(f"             ... and {len(problems) - EXAMPLES_SHOWN:,} more", soft_wrap=True)


# --- rendering from the training labels -------------------------------------------------------------------------------

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
    return [(_decode(tokenizer, ids[a:b]), trained) for a, b, trained in token_runs(labels)]


def render_plain(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The plain-text rendering: trained text wrapped in [[ ]]."""
    return "".join(bracket(text, trained) for text, trained in decoded_runs(tokenizer, ids, labels))


def bracket(text: str, trained: bool) -> str:
    return f"[[{text}]]" if trained else text


def span_boundaries(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """For --show_ids: each trained span's first and last token ids and the masked ids just outside it."""
    def token(i: int) -> str:
        return f"{ids[i]} {json.dumps(_decode(tokenizer, ids[i:i + 1]), ensure_ascii=False)}"

    lines, spans = [], [(a, b) for a, b, trained in token_runs(labels) if trained]
    for n, (a, b) in enumerate(spans, start=1):
        before = f"{token(a - 1)} " if a > 0 else "(start) "
        after = f" {token(b)}" if b < len(ids) else " (end)"
        inner = token(a) if b - a == 1 else f"{token(a)} … {token(b - 1)}"
        lines.append(f"ids  span {n}, tokens {a}..{b - 1}: {before}[[ {inner} ]]{after}")
    return lines


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --- files ------------------------------------------------------------------------------------------------------------

def write_report_dir(report: Report, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / DATA_REPORT, folder / LENGTHS_PNG, folder / FRACTION_PNG]
    fsutil.atomic_write(paths[0], json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")
    plot_lengths(report, paths[1])
    plot_fractions(report, paths[2])
    return paths


def plot_lengths(report: Report, path: Path) -> None:
    """Histogram of whole-row token lengths with the --max_seq_length line and the region past it shaded."""
    import numpy as np

    cfg, lengths = report.cfg, report.lengths()
    fig, ax = _figure()
    limit, log_scale = cfg.max_seq_length, False
    if lengths:
        longest = max(lengths + [1])
        # A limit far beyond the data would squash the bars into a sliver: use a log axis then.
        log_scale = limit > 3 * longest
        high = max(longest, limit) * 1.08
        bins = np.geomspace(max(min(lengths), 1), high, 50) if log_scale else np.linspace(0, high, 50)
        ax.hist(lengths, bins=bins, color="#4C72B0", edgecolor="white", linewidth=0.5, label="conversations")
        if log_scale:
            _plain_log_ticks(ax)
        ax.axvline(statistics.median(lengths), color="#555555", linestyle=":", linewidth=1.5,
                   label=f"median {_tokens(statistics.median(lengths))} tokens")
        ax.set_xlim(right=high)
    else:
        _no_data(ax)
    over = report.stats.too_long
    ax.axvline(limit, color="#C44E52", linestyle="--", linewidth=2, label=f"--max_seq_length {limit:,}")
    ax.axvspan(limit, ax.get_xlim()[1], color="#C44E52", alpha=0.08,
               label=f"over the limit: {over:,} rows ({_fate_word(cfg.truncation)})")
    ax.set_title(f"Token length per conversation: {Path(cfg.train_path).name} ({len(lengths):,} rows)")
    ax.set_xlabel("tokens per conversation (chat template applied)" + (", log scale" if log_scale else ""))
    ax.set_ylabel("conversations")
    if ax.get_legend_handles_labels()[0]:  # no rows, no labelled artists: matplotlib would warn on stderr
        ax.legend(loc="best", frameon=True, framealpha=0.9, edgecolor="none")
    fig.savefig(path)


def plot_fractions(report: Report, path: Path) -> None:
    """Histogram of each trained row's trained-token share, with rows that train nothing marked at 0."""
    import numpy as np

    fractions = [100 * f for f in report.trained_fractions()]
    zero = report.stats.dropped_no_trained_tokens
    fig, ax = _figure()
    bins = np.linspace(0, 100, 41)
    if fractions:
        ax.hist(fractions, bins=bins, color="#55A868", edgecolor="white", linewidth=0.5, label="rows trained on")
        median = statistics.median(fractions)
        ax.axvline(median, color="#555555", linestyle=":", linewidth=1.5, label=f"median {median:.0f}%")
    if zero:
        ax.hist([0.0] * zero, bins=bins, color="#C44E52", label=f"no trained token: {zero:,} rows (dropped)")
    if not fractions and not zero:
        _no_data(ax)
    ax.set_xlim(0, 100)
    ax.xaxis.set_major_formatter("{x:.0f}%")
    what = "every token" if report.cfg.train_on_inputs else "assistant turns + end-of-turn"
    ax.set_title(f"Trained tokens per conversation ({what}): {Path(report.cfg.train_path).name}")
    ax.set_xlabel("tokens in the loss, as a share of the row's tokens")
    ax.set_ylabel("conversations")
    if ax.get_legend_handles_labels()[0]:  # no rows, no labelled artists: matplotlib would warn on stderr
        ax.legend(loc="best", frameon=True, framealpha=0.9, edgecolor="none")
    fig.savefig(path)


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend and no global state, Agg renders the PNG

    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _plain_log_ticks(ax: Any) -> None:
    """A log axis labelled 50, 100, 200, 500, ... rather than 10^2, 10^3."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no row can be trained on", transform=ax.transAxes, ha="center", va="center",
            color="#C44E52", fontsize=14)


def _fate_word(truncation: str) -> str:
    return "dropped" if truncation == "drop" else "truncated"


# --- small helpers ----------------------------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _trained(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


def _spread(values: list[float], digits: int = 1) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def _spread_text(spread: dict[str, float], fmt: Any) -> str:
    return " · ".join(f"{key} {fmt(value)}" for key, value in spread.items())


def _tokens(value: float) -> str:
    """A token count; a median may end in .5."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _without_where(message: str, where: str) -> str:
    """DataError messages start with the row's place, which the report shows in its own column."""
    return message[len(where) + 2:] if message.startswith(f"{where}: ") else message
