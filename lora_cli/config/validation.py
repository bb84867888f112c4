"""Checks on a parsed config that need no model: every problem is returned (not raised), each naming the flag as the
user types it, so that parse_args reports them all at once."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..chat import template_kwargs_problem
from .fields import typed
from .train import LOSS_TYPES


def validate(cfg: Any) -> list[str]:
    """Every problem with a config: values outside a field's choices, then the command's own checks."""
    errors: list[str] = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata["choices"]
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            errors.append(f"{typed(cfg, f.name)}: {value!r} is not one of {', '.join(choices)}")
    return errors + cfg.problems()


def data_file_problem(flag: str, path: str, required: bool) -> str | None:
    """What is wrong with a data flag (lora-train, lora-eval, lora-data): missing when required, or no source."""
    from .. import sources

    return sources.problem(flag, path, required)


def template_problems(cfg: Any) -> list[str]:
    """--chat_template and --chat_template_kwargs (TemplateOptions), as every command that renders chats checks them."""
    errors = []
    if cfg.chat_template and cfg.chat_template != "chatml" and not os.path.isfile(cfg.chat_template):
        errors.append(f"--chat_template: {cfg.chat_template!r} is neither 'chatml' nor an existing .jinja file")
    if cfg.max_seq_length <= 0:
        errors.append(f"{typed(cfg, 'max_seq_length')}: must be > 0, got {cfg.max_seq_length}")
    return errors + [p for p in [template_kwargs_problem(cfg.chat_template_kwargs)] if p]


def train_problems(cfg: Any) -> list[str]:
    errors: list[str] = []

    if not cfg.output_dir:
        errors.append("--output_dir is required (where the adapter is written)")
    if (cfg.resume or cfg.resume_from_checkpoint) and cfg.overwrite:
        errors.append("--resume and --overwrite both set: resuming keeps the output dir, overwriting clears it")
    if cfg.resume_from_checkpoint and not os.path.isdir(cfg.resume_from_checkpoint):
        errors.append(f"--resume_from_checkpoint: folder not found: {cfg.resume_from_checkpoint}")
    errors += filter(None, (data_file_problem("train_path", cfg.train_path, required=True),
                            data_file_problem("eval_path", cfg.eval_path, required=False)))
    if cfg.eval_path and cfg.val_split > 0:
        errors.append("--eval_path and --val_split both set: choose one source of evaluation data")
    if not 0 <= cfg.val_split < 1:
        errors.append(f"--val_split: must be in [0, 1), got {cfg.val_split}")
    if cfg.streaming:
        errors += [f"--streaming {why}" for bad, why in (
            (cfg.max_steps <= 0, "needs --max_steps (the length of a stream is not known in advance)"),
            (cfg.val_split > 0, "cannot hold out --val_split rows: give --eval_path"),
            (cfg.packing, "with --packing is not supported: packing needs the rows' lengths in advance"),
            (cfg.method != "sft", f"is for --method sft, not {cfg.method}")) if bad]
    if cfg.quantization != "none" and cfg.init_lora_weights in ("pissa", "olora"):
        errors.append(f"--init_lora_weights {cfg.init_lora_weights} needs full-precision base weights: drop it or "
                      f"drop {typed(cfg, 'quantization')}")
    errors += template_problems(cfg)
    positive = ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            errors.append(f"{typed(cfg, name)}: must be > 0, got {getattr(cfg, name)}")
    for name in ("eval_steps", "save_total_limit", "weight_decay", "max_grad_norm", "tokens_per_batch", "num_proc"):
        if getattr(cfg, name) < 0:
            errors.append(f"{typed(cfg, name)}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        errors.append(f"--learning_rate: must be > 0, got {cfg.learning_rate}")
    if not 0 <= cfg.lora_dropout < 1:
        errors.append(f"--lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        errors.append(f"--warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.max_steps <= 0 and cfg.max_steps != -1:
        errors.append(f"--max_steps: must be > 0, or -1 to train for --num_train_epochs, got {cfg.max_steps}")
    if cfg.max_steps == -1 and cfg.num_train_epochs <= 0:
        errors.append(f"--num_train_epochs: must be > 0, got {cfg.num_train_epochs}")
    if not split_list(cfg.target_modules):
        errors.append(f"{typed(cfg, 'target_modules')}: empty; use all-linear or a list such as q_proj,v_proj")
    from . import trainer_args

    return errors + _preference_problems(cfg) + trainer_args.problems(cfg)


def _preference_problems(cfg: Any) -> list[str]:
    errors: list[str] = []
    if cfg.adapter and not os.path.isfile(os.path.join(cfg.adapter, "adapter_config.json")):
        errors.append(f"--adapter {cfg.adapter}: not a LoRA adapter folder (no adapter_config.json)")
    kind = _preference_kind(cfg.train_path)
    if cfg.method == "sft":
        if kind:
            errors.append(f"--train_path {cfg.train_path} holds preference rows ("
                          f"{'prompt, chosen, rejected' if kind == 'paired' else 'prompt, completion, label'}): add "
                          f"--method {'dpo or --method orpo' if kind == 'paired' else 'kto'}")
        return errors
    allowed = LOSS_TYPES.get(cfg.method, ())
    if cfg.loss_type and cfg.loss_type not in allowed:
        errors.append(f"--loss_type {cfg.loss_type!r} is not a {cfg.method} loss" +
                      (f"; choose one of {', '.join(allowed)}" if allowed else f" ({cfg.method} has one loss)"))
    if cfg.beta <= 0:
        errors.append(f"--beta: must be > 0, got {cfg.beta}")
    if cfg.max_prompt_length < 0 or cfg.max_prompt_length >= cfg.max_seq_length:
        errors.append(f"--max_prompt_length: must be >= 0 and below --max_seq_length {cfg.max_seq_length}, "
                      f"got {cfg.max_prompt_length}")
    for flag in ("packing", "train_on_inputs"):
        if getattr(cfg, flag):
            errors.append(f"--{flag} is for --method sft; {cfg.method} scores whole answers")
    if cfg.method == "kto" and cfg.batch_size < 2:
        errors.append("--method kto needs --batch_size >= 2 (its KL term pairs each prompt with another row's answer)")
    return errors


def _preference_kind(path: str) -> str | None:
    """The kind of preference rows a data file holds (None: chat rows, or unreadable: reported when it is read)."""
    if not path:
        return None
    from ..errors import DataError, UsageError
    from ..preference import rows

    try:
        return rows.file_kind(path)
    except (DataError, UsageError):  # reported by the data flag's own check, or when the data is read
        return None


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
