"""lora-eval's outputs: report.json, generations.jsonl and the side-by-side table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import chat, fsutil
from ..filenames import GENERATIONS
from .config import EvalConfig
from .inputs import Prepared, split_final_turn
from .metrics import METRICS
from .scoring import ModelScore

log = logging.getLogger("lora_cli")


def build_report(cfg: EvalConfig, prepared: Prepared, scores: list[ModelScore], precision: str,
                 stop_ids: list[int], seconds: float) -> dict[str, Any]:
    base = scores[0]
    entries = []
    for score in scores:
        entry = score.metrics()
        if score is not base:
            entry["vs_base"] = {k: _difference(entry[k], getattr(base, k)) for k in METRICS}
        entries.append(entry)
    output = Path(cfg.output)
    return {
        "eval_path": cfg.eval_path,
        "rows": len(prepared.rows),
        "rows_read": prepared.rows_read,
        "limit": cfg.limit or None,
        "base_model": prepared.base.display,
        "base_model_path": prepared.base.path,
        "quantization": prepared.quantization,
        "precision": precision,
        "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                       "batch_size": cfg.batch_size, "seed": cfg.seed,
                       "stop_tokens": prepared.tokenizer.convert_ids_to_tokens(stop_ids)},
        "data": prepared.stats.as_dict(),
        "models": entries,
        "generations": str(output.parent / GENERATIONS),
        "seconds": seconds,
    }


def _difference(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def write_outputs(output: Path, report: dict[str, Any], prepared: Prepared, scores: list[ModelScore]) -> None:
    fsutil.atomic_write(output, json.dumps(report, indent=2) + "\n")
    with fsutil.staged_file(Path(report["generations"])) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, (row, reference) in enumerate(zip(prepared.rows, prepared.references)):
            prompt, _ = split_final_turn(row.messages)
            line = {"where": row.where, "prompt": chat.render(prepared.tokenizer, prompt, True, row.tools),
                    "reference": reference,
                    "answers": {s.name: {"answer": s.answers[i], **s.row_scores[i]} for s in scores}}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    log.info("report: %s; answers per row: %s", output, report["generations"])


def print_table(report: dict[str, Any]) -> None:
    """Models side by side; under each adapter, its difference to the base (green: better, red: worse)."""
    from rich.console import Console
    from rich import box
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file or a pipe: as wide as the table, not cut at 80 columns
        console = Console(width=400)
    quant = {"4bit": ", 4-bit NF4", "8bit": ", 8-bit"}.get(report["quantization"] or "", "")
    table = Table(title=f"{report['eval_path']}: {report['rows']} rows",
                  caption=f"base: {report['base_model']} ({report['precision']}{quant})", title_justify="left",
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)  # fits 80 columns
    table.add_column("model", overflow="fold", min_width=12)  # a path is its name: wrap it, never cut it
    headers = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match", "contains": "contains",
               "rouge_l": "ROUGE-L", "tokens_per_second": "tokens/s"}
    for key in METRICS:
        table.add_column(headers[key], justify="right", no_wrap=True)
    for entry in report["models"]:
        table.add_row(entry["name"], *(_format(key, entry[key]) for key in METRICS))
        if "vs_base" in entry:
            table.add_row("  vs base", *(_format_difference(key, entry["vs_base"][key]) for key in METRICS))
    console.print(table)


DIGITS = {"loss": 4, "perplexity": 2, "rouge_l": 3, "tokens_per_second": 1}


def _format(key: str, value: float | None, difference: bool = False) -> str:
    if value is None:
        return "inf" if key == "perplexity" and not difference else "n/a"
    sign = "+" if difference else ""
    if key in ("exact_match", "contains"):
        return f"{100 * value:{sign}.1f}" + (" pts" if difference else "%")
    return f"{value:{sign}.{DIGITS[key]}f}"


def _format_difference(key: str, value: float | None) -> str:
    text = _format(key, value, difference=True)
    if value is None or value == 0 or key == "tokens_per_second":  # speed is not a quality
        return f"[dim]{text}[/dim]"
    better = (value > 0) == METRICS[key]
    return f"[green]{text}[/green]" if better else f"[red]{text}[/red]"
