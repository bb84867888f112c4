"""lora-train: parse -> validate -> load data -> load model -> attach LoRA -> train -> save."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import chat, config, data, models
from .config import TrainConfig, split_list
from .encode import EncodeStats, encode_rows
from .errors import DataError, UsageError

log = logging.getLogger("lora_cli")

RUN_CONFIG = "run_config.yaml"
METRICS = "train_metrics.json"


@dataclass
class Prepared:
    """Everything known before the model loads: fast to build, so bad input fails in seconds."""

    base: models.BaseModel
    tokenizer: Any
    train: dict[str, list]
    eval: dict[str, list] | None
    train_stats: EncodeStats
    eval_stats: EncodeStats | None


def train(cfg: TrainConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    check_output_dir(out, cfg.overwrite)
    prepared = prepare(cfg)
    precision = models.choose_precision(cfg.precision)
    log.info("loading %s (%s%s)", prepared.base.display, precision,
             ", 4-bit NF4" if cfg.load_in_4bit else ", 8-bit" if cfg.load_in_8bit else "")
    model = models.load_model(prepared.base, precision=precision, load_in_4bit=cfg.load_in_4bit,
                              load_in_8bit=cfg.load_in_8bit, trust_remote_code=cfg.trust_remote_code,
                              attn_implementation=cfg.attn_implementation)
    model = attach_lora(model, cfg)
    trainer = build_trainer(cfg, model, prepared, precision)
    return run_training(cfg, trainer, prepared, out)


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {out}: not empty; pass --overwrite to write into it, or choose a new folder")
    if not os.access(out if out.exists() else _existing_parent(out), os.W_OK):
        raise UsageError(f"--output_dir {out}: not writable")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def prepare(cfg: TrainConfig) -> Prepared:
    """Read, validate and tokenise the data (and the tokenizer it needs), before any model weights load."""
    train_rows = data.load_conversations(cfg.train_path)
    eval_rows = data.load_conversations(cfg.eval_path) if cfg.eval_path else []
    if cfg.val_split > 0:
        train_rows, eval_rows = data.split_validation(train_rows, cfg.val_split, cfg.seed)
    base = models.resolve(cfg.base_model)
    tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    chat.resolve_chat_template(tokenizer, cfg.chat_template)
    encode = dict(tokenizer=tokenizer, max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                  train_on_inputs=cfg.train_on_inputs)
    train_cols, train_stats = encode_rows(rows=train_rows, name=cfg.train_path, **encode)
    eval_cols = eval_stats = None
    if eval_rows:
        eval_cols, eval_stats = encode_rows(rows=eval_rows, name=cfg.eval_path or "validation split", **encode)
    log.info("data: %d training conversations (%d tokens, %d trained, %.0f%%)%s", train_stats.kept,
             train_stats.tokens, train_stats.trained_tokens, 100 * train_stats.trained_tokens / train_stats.tokens,
             f", {eval_stats.kept} evaluation conversations" if eval_stats else "")
    return Prepared(base, tokenizer, train_cols, eval_cols, train_stats, eval_stats)


def attach_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit or cfg.load_in_8bit:
        # Casts norms to fp32 and enables input gradients, which gradient checkpointing on a frozen base needs.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    targets: str | list[str] = "all-linear" if cfg.target_modules == "all-linear" else split_list(cfg.target_modules)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        modules_to_save=split_list(cfg.modules_to_save) or None)
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in
                            ("Linear", "Linear4bit", "Linear8bitLt")})
            raise UsageError(f"--target_modules {cfg.target_modules}: not found in the model; its linear modules "
                             f"are {','.join(names)}") from None
        raise
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable parameters (%.2f%% of %s)", cfg.lora_r, cfg.lora_alpha,
             cfg.target_modules, f"{trainable:,}", 100 * trainable / total, f"{total:,}")
    return model


def _trainer_class():
    from trl import SFTTrainer

    class LoraSFTTrainer(SFTTrainer):
        """SFTTrainer that also counts the tokens that carry a loss (TRL counts every input token)."""

        trained_tokens = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.trained_tokens += int((inputs["labels"] != chat.IGNORE_INDEX).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    return LoraSFTTrainer


def build_trainer(cfg: TrainConfig, model: Any, prepared: Prepared, precision: str) -> Any:
    from datasets import Dataset
    from trl import SFTConfig

    has_eval = prepared.eval is not None
    args = SFTConfig(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        packing_strategy="bfd",  # whole conversations only; with padding-free batches, no cross-attention
        dataset_num_proc=None,
        model_init_kwargs=None,
    )
    train_ds = Dataset.from_dict(prepared.train)
    eval_ds = Dataset.from_dict(prepared.eval) if has_eval else None
    return _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=prepared.tokenizer)


def run_training(cfg: TrainConfig, trainer: Any, prepared: Prepared, out: Path) -> dict[str, Any]:
    main_process = trainer.is_world_process_zero()
    if main_process:
        if cfg.overwrite and out.is_dir():
            for old in out.glob("checkpoint-*"):
                shutil.rmtree(old, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / RUN_CONFIG)
    metrics: dict[str, Any] = {}
    if trainer.eval_dataset is not None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        log.info("eval loss before training: %.4f", metrics["eval_loss_before"])
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    metrics.update(result.metrics)
    if trainer.eval_dataset is not None:
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        if evals and evals[-1].get("step") == trainer.state.global_step:  # the trainer just evaluated
            metrics["eval_loss"] = evals[-1]["eval_loss"]
        else:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics.update(
        train_loss_last=losses[-1] if losses else metrics.get("train_loss"),
        trained_tokens=trainer.trained_tokens,
        trained_tokens_per_second=trainer.trained_tokens / seconds if seconds else 0.0,
        train_seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(),
        optimizer_steps=trainer.state.global_step,
        data=prepared.train_stats.as_dict(),
        eval_data=prepared.eval_stats.as_dict() if prepared.eval_stats else None,
        base_model=prepared.base.display,
        base_model_path=prepared.base.path,
    )
    if main_process:
        trainer.save_model(str(out))  # adapter_model.safetensors, adapter_config.json and the tokenizer
        (out / METRICS).write_text(json.dumps(_finite(metrics), indent=2) + "\n", encoding="utf-8")
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


__all__ = ["train", "prepare", "attach_lora", "build_trainer", "check_output_dir", "DataError"]
