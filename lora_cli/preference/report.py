"""lora-data on preference rows: every bad row named (file:line), the length rules counted, and a few rows shown as
the trainer sees them: the prompt once (read, not scored) and each answer's scored tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import chat, datareport, fsutil, models
from ..errors import DataError
from ..filenames import DATA_REPORT
from . import encoding, rows


def run(cfg: Any, kind: str) -> dict[str, Any]:
    """Check, print and (with --report_dir) write data_report.json; DataError when lora-train cannot use the file."""
    console = datareport.make_console(cfg.color)
    good, problems, read = [], [], 0
    for where, row in rows.scan(cfg.train_path, kind):
        read += 1
        if isinstance(row, DataError):
            problems.append(str(row))
        else:
            good.append(row)
    base = models.resolve(cfg.base_model)
    tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    chat.resolve_chat_template(tokenizer, cfg.chat_template)
    what = "preference pairs (dpo, orpo)" if kind == rows.PAIRED else "judged answers (kto)"
    datareport.heading(console, f"lora-data: {cfg.train_path}: {what}")
    datareport.lines(console, [("model", base.display), ("chat template", cfg.chat_template or "the model's own"),
                                ("max length", f"{cfg.max_seq_length:,} tokens (longer rows: {cfg.truncation})"),
                                ("scored", "each answer's assistant turn and its end-of-turn token")])
    examples, stats = [], encoding.PreferenceStats()
    if good:
        try:
            examples, stats = encoding.encode_examples(tokenizer, good, max_length=cfg.max_seq_length,
                                                       max_prompt_length=0, truncation=cfg.truncation,
                                                       name=cfg.train_path)
        except DataError as exc:
            problems.append(str(exc))
    _print_examples(console, tokenizer, examples[:cfg.show])
    datareport.heading(console, "Statistics")
    datareport.lines(console, [("rows read", f"{read:,}"), ("usable", f"{stats.kept:,}"),
                                ("bad rows", f"{len(problems):,}"),
                                ("cut / dropped by length", f"{stats.truncated:,} / {stats.dropped_too_long:,}"),
                                ("tokens (answers scored)", f"{stats.tokens:,} ({stats.trained_tokens:,})"),
                                ("longest prompt + answer", f"{stats.longest:,} tokens")])
    if problems:
        datareport.heading(console, f"Problems ({len(problems)})")
        for problem in problems[:datareport.MAX_ERRORS_SHOWN]:
            console.print(f"  error: {problem}", soft_wrap=True, markup=False)
    summary = {"train_path": cfg.train_path, "kind": kind, "rows_read": read, "usable": stats.kept,
               "can_train": not problems and stats.kept > 0, "problems": problems, "encode_stats": stats.as_dict()}
    if cfg.report_dir:
        Path(cfg.report_dir).mkdir(parents=True, exist_ok=True)
        path = Path(cfg.report_dir) / DATA_REPORT
        fsutil.atomic_write(path, json.dumps(summary, indent=2) + "\n")
        console.print(f"\nreport written: {path}", soft_wrap=True, markup=False)
    line = f"{stats.kept:,} of {read:,} rows usable, {len(problems):,} with errors"
    if not summary["can_train"]:
        raise DataError(f"{line}; lora-train would stop at the first: {problems[0] if problems else 'no rows'}")
    console.print(f"\nlora-data: {line}", soft_wrap=True, markup=False)
    return summary


def _print_examples(console: Any, tokenizer: Any, examples: list[encoding.EncodedExample]) -> None:
    from rich.text import Text

    if not examples:
        return
    datareport.heading(console, f"Rows as the trainer sees them ({len(examples)} shown)")
    styled = datareport.styled(console)
    console.print("  legend: " + ("bold green: scored answer tokens; dim: the prompt, read once" if styled else
                                  "[[text]] is scored; the prompt outside [[ ]] is read, not scored"), markup=False)
    names = ["chosen", "rejected"] if len(examples[0].completions) == 2 else ["completion"]
    for number, example in enumerate(examples, start=1):
        label = "" if example.label is None else f" · label {str(example.label).lower()}"
        console.print()
        heading = f"── row {number} · {example.where} · prompt {len(example.prompt_ids):,} tokens{label}"
        console.print(Text(heading, style="bold"), soft_wrap=True)
        prompt = datareport.decode(tokenizer, example.prompt_ids)
        console.print(Text(prompt, style=datareport.MASKED_STYLE) if styled else Text(prompt), soft_wrap=True, end="")
        for name, answer in zip(names, example.completions):
            text = datareport.decode(tokenizer, answer)
            console.print(Text(f"  {name} ({len(answer)} tokens): ", style="bold"), end="", soft_wrap=True)
            console.print(Text(text, style=datareport.TRAINED_STYLE) if styled else
                          Text(datareport.bracket(text, True)), soft_wrap=True)
