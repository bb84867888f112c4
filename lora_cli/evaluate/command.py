"""lora-eval: the base once, then each adapter switched on top of it, scored on the same rows."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .. import chat, models
from .config import EvalConfig
from .inputs import prepare
from .report import build_report, print_table, write_outputs
from .scoring import BASE, active, load_models, score_model

log = logging.getLogger("lora_cli")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from ..preference import rows as preference_rows

    if preference_rows.file_kind(cfg.eval_path) == preference_rows.PAIRED:  # prompt, chosen, rejected
        from ..preference.evaluation import evaluate_preferences

        return evaluate_preferences(cfg)
    start = time.perf_counter()
    prepared = prepare(cfg)
    # (name, adapter index): the base first, with every adapter switched off, then each adapter on it.
    runs = [(BASE, None)] + [(str(a.path), i) for i, a in enumerate(prepared.adapters)]
    log.info("evaluating %d model%s on %d rows of %s (%d trained tokens)", len(runs), "s" * (len(runs) > 1),
             len(prepared.rows), cfg.eval_path, prepared.stats.trained_tokens)
    precision = models.choose_precision(cfg.precision)
    model = load_models(cfg, prepared, precision)
    stop_ids = chat.end_of_turn_ids(prepared.tokenizer)
    scores = []
    for name, adapter_index in runs:
        with active(model, adapter_index):
            scores.append(score_model(model, prepared, cfg, name, stop_ids))
    report = build_report(cfg, prepared, scores, precision, stop_ids, time.perf_counter() - start)
    write_outputs(Path(cfg.output), report, prepared, scores)
    print_table(report)
    return report
