"""lora-eval on preference pairs: for the base and each adapter, how often the chosen answer gets the higher
log-probability (preference accuracy) and the mean log-probability margin, scored on the tokens lora-train's
preference methods score (each answer's assistant turn with its end-of-turn token, after the prompt rendered once).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import evaluate, models
from ..adapters import Adapter, read_adapter
from . import encoding, rows

log = logging.getLogger("lora_cli")

PER_ROW = "preferences.jsonl"
# What the table shows and the differences to the base, and whether a higher value is better.
METRICS = {"preference_accuracy": True, "mean_margin": True, "mean_logp_chosen": True, "mean_logp_rejected": False}


@dataclass
class Prepared:
    """What evaluate.load_models needs, plus the encoded pairs."""

    base: models.BaseModel
    adapters: list[Adapter]
    quantization: str | None
    tokenizer: Any
    examples: list[encoding.EncodedExample]
    stats: encoding.PreferenceStats
    rows_read: int


def prepare(cfg: evaluate.EvalConfig) -> Prepared:
    adapters = [read_adapter(path, "--adapter") for path in cfg.adapter_paths]
    spec = evaluate.base_spec(cfg, adapters)
    quantization = evaluate.choose_quantization(cfg, adapters)
    pairs = rows.load(cfg.eval_path, rows.PAIRED)
    rows_read = len(pairs)
    pairs = pairs[:cfg.limit] if cfg.limit else pairs
    evaluate.check_output(Path(cfg.output))
    base = models.resolve(spec)
    tokenizer = evaluate.load_tokenizer(cfg, base, adapters)
    examples, stats = encoding.encode_examples(tokenizer, pairs, max_length=cfg.max_seq_length, max_prompt_length=0,
                                               truncation=cfg.truncation, name=cfg.eval_path)
    return Prepared(base, adapters, quantization, tokenizer, examples, stats, rows_read)


def evaluate_preferences(cfg: evaluate.EvalConfig) -> dict[str, Any]:
    start = time.perf_counter()
    prepared = prepare(cfg)
    runs = [(evaluate.BASE, None)] + [(str(a.path), i) for i, a in enumerate(prepared.adapters)]
    log.info("evaluating %d model%s on %d preference pairs of %s", len(runs), "s" * (len(runs) > 1),
             len(prepared.examples), cfg.eval_path)
    precision = models.choose_precision(cfg.precision)
    model = evaluate.load_models(cfg, prepared, precision)
    scores = []
    for name, index in runs:
        with evaluate.active(model, index):
            chosen, rejected = answer_logps(model, prepared, cfg.batch_size)
        scores.append(summarise(name, chosen, rejected))
        log.info("%s: preference accuracy %.1f%%, mean margin %+.3f", name, 100 * scores[-1]["preference_accuracy"],
                 scores[-1]["mean_margin"])
    report = build_report(cfg, prepared, scores, precision, time.perf_counter() - start)
    write_outputs(Path(cfg.output), report, prepared, scores)
    print_table(report)
    return report


def answer_logps(model: Any, prepared: Prepared, batch_size: int) -> tuple[list[float], list[float]]:
    """Each pair's summed log-probability of the chosen and of the rejected answer given the prompt."""
    import torch

    sequences, labels = [], []
    for e in prepared.examples:
        for answer in e.completions:
            sequences.append(e.prompt_ids + answer)
            labels.append([-100] * len(e.prompt_ids) + answer)
    device = next(model.parameters()).device
    pad = prepared.tokenizer.pad_token_id if prepared.tokenizer.pad_token_id is not None else 0
    totals = [0.0] * len(sequences)
    for batch in evaluate.batches([len(s) for s in sequences], batch_size):
        ids, mask = evaluate.pad([sequences[i] for i in batch], pad)
        target, _ = evaluate.pad([labels[i] for i in batch], -100)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        target = target[:, 1:].to(logits.device)  # the logits at position t predict token t + 1
        scored = target != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        for row, total in zip(batch, (logp * scored).sum(dim=1).tolist()):
            totals[row] = total
    return totals[0::2], totals[1::2]


def summarise(name: str, chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    n = len(chosen)
    return {"name": name, "adapter": None if name == evaluate.BASE else name,
            "preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "mean_logp_chosen": sum(chosen) / n, "mean_logp_rejected": sum(rejected) / n,
            "logp": {"chosen": chosen, "rejected": rejected}}


def build_report(cfg: evaluate.EvalConfig, prepared: Prepared, scores: list[dict], precision: str,
                 seconds: float) -> dict[str, Any]:
    base = scores[0]
    entries = []
    for score in scores:
        entry = {k: v for k, v in score.items() if k != "logp"}
        if score is not base:
            entry["vs_base"] = {k: score[k] - base[k] for k in METRICS}
        entries.append(entry)
    return {"eval_path": cfg.eval_path, "kind": "preference pairs", "rows": len(prepared.examples),
            "rows_read": prepared.rows_read, "limit": cfg.limit or None, "base_model": prepared.base.display,
            "base_model_path": prepared.base.path, "quantization": prepared.quantization, "precision": precision,
            "data": prepared.stats.as_dict(), "models": entries,
            "per_row": str(Path(cfg.output).parent / PER_ROW), "seconds": seconds}


def write_outputs(output: Path, report: dict[str, Any], prepared: Prepared, scores: list[dict]) -> None:
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    with open(report["per_row"], "w", encoding="utf-8") as f:
        for i, example in enumerate(prepared.examples):
            line = {"where": example.where, "logp": {s["name"]: {"chosen": s["logp"]["chosen"][i],
                                                                  "rejected": s["logp"]["rejected"][i]}
                                                     for s in scores}}
            f.write(json.dumps(line) + "\n")
    log.info("report: %s; log-probabilities per pair: %s", output, report["per_row"])


def print_table(report: dict[str, Any]) -> None:
    """Models side by side; under each adapter, its difference to the base (green: better, red: worse)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=400)
    table = Table(title=f"{report['eval_path']}: {report['rows']} preference pairs",
                  caption=f"base: {report['base_model']} ({report['precision']})", title_justify="left",
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    table.add_column("model", overflow="fold", min_width=12)
    for header in ("accuracy", "mean margin", "logp chosen", "logp rejected"):
        table.add_column(header, justify="right", no_wrap=True)
    for entry in report["models"]:
        table.add_row(entry["name"], *(_format(k, entry[k]) for k in METRICS))
        if "vs_base" in entry:
            table.add_row("  vs base", *(_difference(k, entry["vs_base"][k]) for k in METRICS))
    console.print(table)


def _format(key: str, value: float, sign: str = "") -> str:
    if key == "preference_accuracy":
        return f"{100 * value:{sign}.1f}" + (" pts" if sign else "%")
    return f"{value:{sign}.3f}"


def _difference(key: str, value: float) -> str:
    text = _format(key, value, "+")
    if value == 0:
        return f"[dim]{text}[/dim]"
    return f"[green]{text}[/green]" if (value > 0) == METRICS[key] else f"[red]{text}[/red]"
