"""lora-train: parse -> validate -> load data -> load model -> attach LoRA -> train -> save."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .. import checkpoints, config, distributed, fsutil, models
from ..config import TrainConfig
from ..errors import UsageError
from ..filenames import COMPLETE_MARKER
from ..lock import LOCK_FILE, OutputLock
from .adapter import attach_lora, check_quantization_available, save_initial_adapter, training_only
from .dataset import Prepared, prepare
from .plan import quantization, step_plan
from .run import run_training
from .trainer import build_trainer

log = logging.getLogger("lora_cli")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """One run, holding --output_dir's lock from before anything is written (rank 0 of a launch holds it for all;
    a dry run writes nothing and takes none)."""
    locked = not cfg.dry_run and distributed.is_main_process()
    with OutputLock(Path(cfg.output_dir)) if locked else contextlib.nullcontext():
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    resuming = cfg.resume or bool(cfg.resume_from_checkpoint)
    check_output_dir(out, cfg.overwrite or resuming)
    precision = models.choose_precision(cfg.precision)
    check_quantization_available(cfg)
    prepare_data, plan_steps, build = method_steps(cfg)
    prepared = prepare_data(cfg)
    if cfg.dry_run:
        return dry_run(cfg, prepared, precision, plan_steps)
    data_hashes = checkpoints.fingerprint(train_path=cfg.train_path, eval_path=cfg.eval_path)
    resume_from = find_resume_checkpoint(cfg, out, data_hashes) if resuming else None
    log.info("loading %s (%s%s)", prepared.base.display, precision,
             {"4bit": ", 4-bit NF4", "8bit": ", 8-bit"}.get(cfg.quantization, ""))
    from transformers import set_seed

    set_seed(cfg.seed)  # the trainer seeds only later: without this the adapter's initial weights vary per run
    model = models.load_model(prepared.base, precision=precision, quantization=cfg.quantization,
                              trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    model = attach_lora(model, cfg)
    check_disk_space(out, model, cfg.save_total_limit)
    plan = plan_steps(cfg, model, precision, prepared.train_stats)
    resumed_tokens = checkpoints.checkpoint_info(resume_from).get("trained_tokens", 0) if resume_from else 0
    with tempfile.TemporaryDirectory(prefix="lora-cli-") as scratch:
        initial_adapter = save_initial_adapter(model, cfg, Path(scratch))  # PiSSA/OLoRA, for the plain-LoRA save
        with training_only(model, plan, precision, cfg.use_dora, cheaper_dropout=cfg.method == "sft") as per_sequence:
            log.info("each optimizer step: %s", plan.describe(per_sequence))
            trainer = build(cfg, model, prepared, plan, precision, resumed_tokens)
            trainer.initial_adapter = initial_adapter
            return run_training(cfg, trainer, prepared, out, resume_from, data_hashes)


def method_steps(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(prepare, step_plan, build_trainer) for --method: SFT here, preference tuning in lora_cli.preference."""
    if cfg.method == "sft":
        return prepare, step_plan, build_trainer
    from ..preference import training

    return training.prepare, training.step_plan, training.build_trainer


def dry_run(cfg: TrainConfig, prepared: Prepared, precision: str, plan_steps: Any = step_plan) -> dict[str, Any]:
    from .. import estimate

    model = attach_lora(models.meta_model(prepared.base.path, cfg.trust_remote_code), cfg)
    stats = prepared.train_stats
    plan = plan_steps(cfg, model, precision, stats)
    est = estimate.estimate(model, precision=precision, quantization=quantization(cfg), optim=cfg.optim,
                            batch_size=plan.micro_batch * plan.sequences_per_row, seq_len=plan.seq_len,
                            reference_forward=plan.reference_forward,
                            gradient_checkpointing=plan.gradient_checkpointing,
                            trained_fraction=stats.trained_tokens / max(1, stats.tokens))
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        stats.kept / (cfg.batch_size * cfg.gradient_accumulation_steps) * cfg.num_train_epochs)
    log.info("dry run: %s optimizer steps of %d conversations (micro-batches of %d x accumulation %d)", steps,
             cfg.batch_size * cfg.gradient_accumulation_steps, plan.micro_batch, plan.accumulation)
    log.info("GPU memory per device, %s%s, micro-batch %d x %d tokens%s:\n%s", precision,
             {"4bit": " + 4-bit base", "8bit": " + 8-bit base"}.get(cfg.quantization, ""), plan.micro_batch,
             plan.seq_len, ", gradient checkpointing" if plan.gradient_checkpointing else "", "\n".join(est.lines()))
    return {"dry_run": True, "optimizer_steps": steps, "trainable_params": est.trainable_params,
            "total_params": est.total_params, "estimated_peak_bytes": est.total, "data": stats.as_dict()}


def find_resume_checkpoint(cfg: TrainConfig, out: Path, data_hashes: dict[str, str]) -> str:
    """The checkpoint to resume from, after checking that config and data are those of the interrupted run."""
    checkpoints.check_resume(out, config.to_dict(cfg), data_hashes, cfg.resume_force)
    if distributed.is_main_process():  # the others only read; they skip incomplete checkpoints all the same
        checkpoints.remove_incomplete(out)
    if cfg.resume_from_checkpoint:
        chosen = Path(cfg.resume_from_checkpoint)
        if not (chosen / COMPLETE_MARKER).is_file():
            raise UsageError(f"--resume_from_checkpoint {chosen}: not a complete lora-train checkpoint")
        checkpoints.require_intact(chosen)
    else:
        chosen = checkpoints.newest_intact(out)
    log.info("resuming from %s", chosen)
    return str(chosen)


def check_disk_space(out: Path, model: Any, keep: int) -> None:
    """Checkpoints hold the adapter and its two Adam moments in fp32: refuse to start a run that cannot save them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_checkpoint = trainable * 4 * 3 + (64 << 20)  # + tokenizer, RNG and trainer state
    need = per_checkpoint * ((keep or 1) + 1)  # pruning happens after the next checkpoint is complete
    fsutil.check_free_space(out, need, f"--output_dir {out}: checkpoints", margin=1.0, error=UsageError,
                            hint="; free space, choose another disk or lower --save_total_limit")


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out}: exists and is not a folder")
    # Only the first process checks: the others may start after it has created the folder.
    if distributed.is_main_process() and out.is_dir() and not overwrite and \
            any(p.name != LOCK_FILE for p in out.iterdir()):
        raise UsageError(f"--output_dir {out}: not empty; pass --overwrite to write into it, or choose a new folder")
    if not os.access(fsutil.existing_ancestor(out), os.W_OK):
        raise UsageError(f"--output_dir {out}: not writable")
