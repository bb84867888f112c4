"""lora-data's terminal output: header, rows with the trained tokens marked, statistics, problems."""

from __future__ import annotations

import itertools
from typing import Any

from ..encode import KEPT, NO_TRAINED_TOKENS, TOO_LONG, TRUNCATED, EncodeStats
from ..filenames import DATA_REPORT
from .rendering import bracket, decoded_runs, span_boundaries
from .report import (CHECKS, EXAMPLES_SHOWN, MASKED_STYLE, MAX_ERRORS_SHOWN, SET_CHECKS, TRAINED_STYLE, Report, Row,
                     plural, spread_text, tokens_text, trained_count)


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


def heading(console: Any, title: str) -> None:
    from rich.text import Text

    console.print()
    console.print(Text(title, style="bold"), soft_wrap=True)


def lines(console: Any, pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        console.print(f"  {key.ljust(width)}  {value}", soft_wrap=True, markup=False)


def _print_header(console: Any, report: Report) -> None:
    cfg = report.cfg
    heading(console, f"lora-data: {cfg.train_path}")
    loss = "every token (--train_on_inputs)" if cfg.train_on_inputs else \
        "assistant turns and their end-of-turn token"
    lines(console, [("model", report.model), ("chat template", report.chat_template),
                     ("max length", f"{cfg.max_seq_length:,} tokens (longer rows: {cfg.truncation})"),
                     ("loss on", loss)])


def _print_rows(console: Any, report: Report) -> None:
    from rich.text import Text

    shown = [r for r in report.rows if r.encoded][: report.cfg.show]
    heading(console, f"Rows as the model sees them ({len(shown)} of {len(report.rows)})")
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
    trained = trained_count(labels)
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
        f"{plural(s.too_long, 'row')}, dropped" if report.cfg.truncation == "drop" else
        f"{plural(s.too_long, 'row')}: {s.truncated:,} truncated, {s.dropped_too_long:,} dropped with no trained "
        "token left")
    in_loss = f" ({100 * s.trained_tokens / s.tokens:.1f}%)" if s.tokens else ""
    heading(console, "Statistics")
    lines(console, [
        ("rows", f"{st['rows_read']:,} read, {st['rows_valid']:,} valid ({formats}), "
                 f"{plural(st['duplicates'], 'duplicate')}, {st['rows_trained_on']:,} trained on"),
        ("tokens", f"{st['tokens_total']:,} in all rows; {s.tokens:,} in the rows trained on, "
                   f"{s.trained_tokens:,} of them in the loss{in_loss}"),
        ("tokens per row", spread_text(lengths, tokens_text) if lengths else "none: no row could be encoded"),
        ("trained per row", spread_text(fractions, "{:.0%}".format) + " of each trained row's tokens" if fractions
         else "none: no row is trained on"),
        (f"over {report.cfg.max_seq_length:,} tokens", over),
        ("no trained tokens", f"{plural(s.dropped_no_trained_tokens, 'row')}, dropped" if s.dropped_no_trained_tokens
         else "none"),
        ("end of turn", f"{s.assistant_turns - s.turns_missing_end_of_turn:,} of {s.assistant_turns:,} assistant "
                        "turns end with an end-of-turn token in the loss"),
        ("tool calls", f"{plural(st['tool_call_turns'], 'assistant turn')} with tool calls (trained), "
                       f"{plural(st['tool_results'], 'tool result')} (not trained)"
         if st["tool_call_turns"] or st["tool_results"] else "none"),
        ("reasoning", _reasoning_text(s)),
    ])


def _reasoning_text(s: EncodeStats) -> str:
    """What of the data's reasoning is trained: only what the chat template renders."""
    if not s.reasoning_turns:
        return "none in the data (Qwen3-style templates add an empty <think> block: see README)"
    dropped = s.reasoning_turns - s.reasoning_trained
    text = f"{plural(s.reasoning_turns, 'assistant turn')} with reasoning: {s.reasoning_trained:,} trained"
    return text + (f", {dropped:,} dropped by the chat template (e.g. Qwen3 keeps reasoning only after the last "
                   "user message)" if dropped else " (the chat template renders it)")


def _print_problems(console: Any, report: Report) -> None:
    from rich.text import Text

    errors, warnings = plural(len(report.errors), "error"), plural(len(report.warnings), "warning")
    heading(console, f"Problems: {errors}, {warnings}")
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
        headline = f"{plural(len(problems), 'row')} {CHECKS[check]}"
        console.print(Text("  warning  ", style="bold yellow").append(headline), soft_wrap=True)
        for problem in problems[:EXAMPLES_SHOWN]:
            console.print(f"             {problem.where}: {problem.message}", soft_wrap=True, markup=False)
        if len(problems) > EXAMPLES_SHOWN:
            console.print(f"             ... and {len(problems) - EXAMPLES_SHOWN:,} more", soft_wrap=True)
