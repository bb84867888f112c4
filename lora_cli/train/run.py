"""The training run itself: first evaluation, trainer.train(), the final adapter and its metrics file."""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from pathlib import Path
from typing import Any

from .. import checkpoints, config, fsutil, process
from ..config import TrainConfig
from ..encode import report
from ..filenames import RUN_CONFIG, TRAIN_METRICS
from .dataset import Prepared

log = logging.getLogger("lora_cli")


def run_training(cfg: TrainConfig, trainer: Any, prepared: Prepared, out: Path, resume_from: str | None = None,
                 data_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    main_process = trainer.is_world_process_zero()
    state = checkpoints.read_state(out) if resume_from else {}
    if main_process and not resume_from:
        if cfg.overwrite and out.is_dir():
            checkpoints.clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / RUN_CONFIG)
        state = {"data": data_hashes or {}}
        checkpoints.write_state(out, state)
    metrics: dict[str, Any] = {}
    process.resume_gc()  # set-up is over (paused by the lora-train command)
    if trainer.eval_dataset is not None:
        if "eval_loss_before" not in state:
            state["eval_loss_before"] = trainer.evaluate()["eval_loss"]
            if main_process:
                checkpoints.write_state(out, state)
        metrics["eval_loss_before"] = state["eval_loss_before"]
        log.info("eval loss before training: %.4f", metrics["eval_loss_before"])
    stopper = checkpoints.stop_on_signal_callback()
    trainer.add_callback(stopper)
    stopper.install()
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        stopper.uninstall()
    seconds = time.perf_counter() - start
    if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        raise checkpoints.Interrupted(
            f"stopped by {name} at step {trainer.state.global_step}; checkpoint saved in "
            f"{out / f'checkpoint-{trainer.state.global_step}'}. Continue with the same command plus --resume",
            stopper.signum)
    metrics.update(result.metrics)
    if prepared.streaming and prepared.train_stats.kept:  # the warnings a prepared dataset gives before training
        report(prepared.train_stats, cfg.train_path, cfg.max_seq_length, cfg.truncation)
    if trainer.eval_dataset is not None:
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        if evals and evals[-1].get("step") == trainer.state.global_step:  # the trainer just evaluated
            metrics["eval_loss"] = evals[-1]["eval_loss"]
        else:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics.update(
        train_loss_last=losses[-1] if losses else metrics.get("train_loss"),
        trained_tokens=trainer.trained_tokens_total,
        trained_tokens_per_second=trainer.trained_tokens / seconds if seconds else 0.0,  # this process's speed
        resumed_from=resume_from,
        train_seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(),
        optimizer_steps=trainer.state.global_step,
        data=prepared.train_stats.as_dict(),
        data_sources=prepared.train_sources,
        eval_data=prepared.eval_stats.as_dict() if prepared.eval_stats else None,
        base_model=prepared.base.display,
        base_model_path=prepared.base.path,
    )
    checkpoints.save_final(trainer, out, main_process)  # adapter_model.safetensors, adapter_config.json, tokenizer
    if main_process:
        fsutil.atomic_write(out / TRAIN_METRICS, json.dumps(_finite(metrics), indent=2) + "\n")
    log.info(summary_line(metrics, out))
    return metrics


def summary_line(m: dict[str, Any], out: Path) -> str:
    evals = (f", eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}" if "eval_loss" in m else "")
    return (f"done: {m['optimizer_steps']} steps, {m['trained_tokens']:,} trained tokens in {m['train_seconds']:.1f} s "
            f"({m['trained_tokens_per_second']:.1f} tokens/s), train loss {m['train_loss_last']:.4f}{evals}, "
            f"peak memory {m['peak_memory_bytes'] / 2**30:.2f} GiB; adapter in {out}")


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


