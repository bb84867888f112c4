"""The training data as the trainer takes it: read, validated and tokenised before any model weights load."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .. import chat, models, sources
from ..config import TrainConfig
from ..encode import EncodeStats, encode_rows, report

log = logging.getLogger("lora_cli")


@dataclass
class Prepared:
    """Everything known before the model loads: fast to build, so bad input fails in seconds."""

    base: models.BaseModel
    tokenizer: Any
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any
    train_stats: EncodeStats
    eval_stats: EncodeStats | None
    train_sources: dict[str, int] = field(default_factory=dict)  # source: rows in the training mixture



def prepare(cfg: TrainConfig) -> Prepared:
    """Read, validate and tokenise the data (and the tokenizer it needs), before any model weights load."""
    train_rows = sources.load(cfg.train_path, cfg.seed, "train_path")
    eval_rows = sources.load(cfg.eval_path, cfg.seed, "eval_path") if cfg.eval_path else None
    if cfg.val_split > 0:
        train_rows, eval_rows = train_rows.split(cfg.val_split, cfg.seed)
    base = models.resolve(cfg.base_model)
    tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    chat.resolve_chat_template(tokenizer, cfg.chat_template, chat.parse_template_kwargs(cfg.chat_template_kwargs))
    train_cols, train_stats = encode_dataset(cfg, tokenizer, train_rows, cfg.train_path)
    eval_cols = eval_stats = None
    if eval_rows is not None:
        eval_cols, eval_stats = encode_dataset(cfg, tokenizer, eval_rows, cfg.eval_path or "validation split")
    log.info("data: %d training conversations (%s tokens, %s trained = %.0f%%, longest %d)%s", train_stats.kept,
             f"{train_stats.tokens:,}", f"{train_stats.trained_tokens:,}",
             100 * train_stats.trained_tokens / train_stats.tokens, train_stats.longest,
             f", {eval_stats.kept} evaluation conversations" if eval_stats else "")
    return Prepared(base, tokenizer, train_cols, eval_cols, train_stats, eval_stats, train_rows.counts)


def encode_dataset(cfg: TrainConfig, tokenizer: Any, rows: sources.Mixture,
                   name: str) -> tuple[Any, EncodeStats]:
    """The rows' token ids and labels as a Dataset: from the data cache when these rows were encoded before with
    the same tokenizer, template and settings, else encoded now (and cached, except in a dry run)."""
    from datasets import Dataset

    from .. import datacache

    settings = dict(max_seq_length=cfg.max_seq_length, truncation=cfg.truncation, train_on_inputs=cfg.train_on_inputs)
    digest = datacache.key(tokenizer, rows.texts(), settings) if cfg.data_cache else ""
    cached = datacache.load(digest) if digest else None
    if cached is not None:
        dataset, stats = cached
        report(stats, name, cfg.max_seq_length, cfg.truncation)  # the same warnings as when it was encoded
        log.info("%s: tokenised rows reused from the data cache (%s)", name, datacache.root() / digest)
        return dataset, stats
    columns, stats = encode_rows(tokenizer, rows.conversations(), name=name, **settings)
    if digest and not cfg.dry_run:
        return datacache.save(digest, columns, stats), stats
    return Dataset.from_dict(columns), stats
