"""Everything lora-eval knows before a model loads: adapters, base, tokenizer, encoded rows and prompts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import chat, data, models, sources
from ..adapters import Adapter, load_adapter_tokenizer, read_adapter
from ..encode import EncodeStats, encode_rows
from ..errors import DataError, UsageError
from .config import EvalConfig

log = logging.getLogger("lora_cli")


@dataclass
class Prepared:
    """Everything known before the model loads: fast to build, so bad input fails in seconds."""

    base: models.BaseModel
    adapters: list[Adapter]
    quantization: str | None  # "4bit", "8bit" or None
    tokenizer: Any
    rows: list[data.Conversation]  # the rows scored: after --limit and lora-train's length rules
    loss: dict[str, list]  # input_ids and labels of those rows, exactly as lora-train encodes them
    prompts: list[list[int]]  # per row: the conversation up to its final assistant turn, plus the generation prompt
    references: list[str]  # per row: the final assistant turn
    stats: EncodeStats
    rows_read: int  # rows in --eval_path (before --limit)


def prepare(cfg: EvalConfig) -> Prepared:
    """Read the adapters and the data, choose the base, tokenise: every bad-input error surfaces here."""
    adapters = [read_adapter(path, "--adapter") for path in cfg.adapter_paths]
    spec = base_spec(cfg, adapters)
    quantization = choose_quantization(cfg, adapters)
    rows = list(sources.load(cfg.eval_path, 0, "eval_path").conversations())
    rows_read = len(rows)
    rows = rows[:cfg.limit] if cfg.limit else rows
    check_output(Path(cfg.output))
    base = models.resolve(spec)
    tokenizer = load_tokenizer(cfg, base, adapters)
    columns, stats = encode_rows(tokenizer, rows, max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                                 train_on_inputs=False, name=cfg.eval_path, row_index=True)
    rows = [rows[i] for i in columns.pop("row")]  # every metric covers the same rows
    prompts, references = [], []
    for row in rows:
        prompt, reference = split_final_turn(row.messages)
        try:
            prompts.append(chat.encode_prompt(tokenizer, prompt, row.tools))
        except Exception as exc:  # jinja raises several types, e.g. for a template that wants a user turn first
            raise DataError(f"{row.where}: the chat template cannot render the prompt before the final assistant "
                            f"turn: {exc}") from None
        references.append(reference)
    return Prepared(base, adapters, quantization, tokenizer, rows, columns, prompts, references, stats, rows_read)


def base_spec(cfg: EvalConfig, adapters: list[Adapter]) -> str:
    """--base_model, else the base model the adapters record (they must agree), else "" (the demo model)."""
    recorded: dict[str, list[str]] = {}
    for adapter in adapters:
        recorded.setdefault(adapter.base_spec, []).append(str(adapter.path))
    if cfg.base_model:
        for spec, paths in recorded.items():
            if spec != cfg.base_model:
                log.info("%s: trained on %s; evaluating on --base_model %s", ", ".join(paths), spec_name(spec),
                         cfg.base_model)
        return cfg.base_model
    if len(recorded) > 1:
        listing = "; ".join(f"{', '.join(paths)}: {spec_name(spec)}" for spec, paths in recorded.items())
        raise UsageError(f"--adapter: the adapters record different base models ({listing}); evaluate them "
                         "separately, or pass --base_model to put them all on one")
    return next(iter(recorded), "")


def spec_name(spec: str) -> str:
    return spec or "the embedded demo model"


def choose_quantization(cfg: EvalConfig, adapters: list[Adapter]) -> str | None:
    """--quantization (or --load_in_4bit/--load_in_8bit/--no-...) decides; when not given (auto), the base is loaded
    as the adapters were trained."""
    if cfg.quantization != "auto":
        return None if cfg.quantization == "none" else cfg.quantization
    recorded: dict[str | None, list[str]] = {}
    for adapter in adapters:
        recorded.setdefault(adapter.quantization, []).append(str(adapter.path))
    if len(recorded) > 1:
        listing = "; ".join(f"{', '.join(paths)}: {q or 'full precision'}" for q, paths in recorded.items())
        raise UsageError(f"--adapter: the adapters were trained on differently quantised bases ({listing}); pass "
                         "--quantization 4bit, 8bit or none to evaluate them all one way")
    quantization = next(iter(recorded), None)
    if quantization:
        log.info("loading the base in %s as the adapters were trained (QLoRA); --quantization none evaluates on "
                 "full-precision weights", quantization)
    return quantization


def load_tokenizer(cfg: EvalConfig, base: models.BaseModel, adapters: list[Adapter]) -> Any:
    """One tokenizer for every model, so that all score the same tokens: the adapters' own (it carries the chat
    template they were trained with), else the base model's; --chat_template overrides the template."""
    if not adapters:
        tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    else:
        tokenizers = [load_adapter_tokenizer(a, base, cfg.trust_remote_code) for a in adapters]
        if not cfg.chat_template and len({t.chat_template for t in tokenizers}) > 1:
            raise UsageError("--adapter: the adapters were trained with different chat templates, so they would not "
                             "score the same tokens; pass --chat_template to evaluate all with one")
        tokenizer = tokenizers[0]
    chat.resolve_chat_template(tokenizer, cfg.chat_template, template_kwargs(cfg, adapters))
    return tokenizer


def template_kwargs(cfg: EvalConfig, adapters: list[Adapter]) -> dict[str, Any]:
    """--chat_template_kwargs, else those the (first) adapter was trained with, so prompts render as in training."""
    if cfg.chat_template_kwargs or not adapters:
        return chat.parse_template_kwargs(cfg.chat_template_kwargs)
    saved = (adapters[0].run_config or {}).get("chat_template_kwargs") or ""
    return dict(saved) if isinstance(saved, dict) else chat.parse_template_kwargs(saved)


def split_final_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation before its final assistant turn (the prompt), and that turn's text (the reference)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def check_output(path: Path) -> None:
    """Create the report's folder now, so that an unwritable --output fails before the models load."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--output {path}: not writable")
