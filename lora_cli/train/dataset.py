"""The training data as the trainer takes it: read, validated and tokenised before any model weights load."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .. import chat, models, sources
from ..config import TrainConfig
from ..encode import EncodeStats, encode_stream, encode_table, report
from ..errors import DataError

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
    streaming: bool = False  # train is an IterableDataset; train_stats and train_sources grow as it is read



def prepare(cfg: TrainConfig) -> Prepared:
    """Read, validate and tokenise the data (and the tokenizer it needs), before any model weights load. Data not
    seen before is read and validated before the model is even resolved, so bad rows fail in seconds; a run whose
    files were encoded before (same files, tokenizer, template and settings) takes them from the data cache without
    reading them again."""
    from .. import datacache

    if cfg.streaming:
        return _streaming(cfg, *load_tokenizer(cfg))
    names = {"train": cfg.train_path, **({"eval": cfg.eval_path or "validation split"}
                                          if cfg.eval_path or cfg.val_split > 0 else {})}
    identities = {role: _identity(cfg, role) for role in names}
    mixtures = None
    if not all(identities.values()) or not all(map(datacache.known_valid, identities.values())):
        mixtures = _read(cfg)
        if not cfg.dry_run:
            for identity in filter(None, identities.values()):
                datacache.mark_valid(identity)
    base, tokenizer = load_tokenizer(cfg)
    keys = {role: datacache.key(tokenizer, [identities[role]], _settings(cfg)) if identities[role] else ""
            for role in names}
    found = {role: _cached(keys[role], names[role], cfg) for role in names if keys[role]}
    counts = found["train"][2] if found.get("train") else {}
    if not all(found.get(role) for role in names):
        mixtures = mixtures or _read(cfg)
        counts = mixtures["train"].counts
        for role in names:
            if not found.get(role):
                found[role] = encode_dataset(cfg, tokenizer, mixtures[role], names[role], keys[role])
    (train, train_stats, _), evaluation = found["train"], found.get("eval")
    eval_stats = evaluation[1] if evaluation else None
    log.info("data: %d training conversations (%s tokens, %s trained = %.0f%%, longest %d)%s", train_stats.kept,
             f"{train_stats.tokens:,}", f"{train_stats.trained_tokens:,}",
             100 * train_stats.trained_tokens / train_stats.tokens, train_stats.longest,
             f", {eval_stats.kept} evaluation conversations" if eval_stats else "")
    return Prepared(base, tokenizer, train, evaluation[0] if evaluation else None, train_stats, eval_stats, counts)


def load_tokenizer(cfg: TrainConfig) -> tuple[models.BaseModel, Any]:
    """The base model (resolved, not loaded) and its tokenizer with the chat template lora-train uses (--chat_template,
    --chat_template_kwargs): every --method trains with this one."""
    base = models.resolve(cfg.base_model)
    tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    chat.resolve_chat_template(tokenizer, cfg.chat_template, chat.parse_template_kwargs(cfg.chat_template_kwargs))
    return base, tokenizer


def _streaming(cfg: TrainConfig, base: models.BaseModel, tokenizer: Any) -> Prepared:
    """--streaming: the training rows as an iterable dataset tokenised as the trainer reads it; the counts (and
    train_stats) fill in as it goes. The first row is read now, so that a source that cannot be read fails here."""
    probe = EncodeStats()
    next(iter(encode_stream(tokenizer, sources.stream(cfg.train_path, cfg.seed), probe, {}, **_settings(cfg))), None)
    if not probe.rows:
        raise DataError(f"{cfg.train_path}: no rows")
    stats, counts = EncodeStats(), {}
    train = encode_stream(tokenizer, sources.stream(cfg.train_path, cfg.seed), stats, counts, **_settings(cfg))
    evaluation = eval_stats = None
    if cfg.eval_path:
        evaluation, eval_stats, _ = encode_dataset(cfg, tokenizer, sources.load(cfg.eval_path, cfg.seed, "eval_path"),
                                                   cfg.eval_path)
    log.info("data: streaming %s (tokenised as training reads it; counts in train_metrics.json)%s", cfg.train_path,
             f", {eval_stats.kept} evaluation conversations" if eval_stats else "")
    return Prepared(base, tokenizer, train, evaluation, stats, eval_stats, counts, streaming=True)


def _read(cfg: TrainConfig) -> dict[str, sources.Mixture]:
    train = sources.load(cfg.train_path, cfg.seed, "train_path")
    if cfg.val_split > 0:
        train, held = train.split(cfg.val_split, cfg.seed)
        return {"train": train, "eval": held}
    return {"train": train, **({"eval": sources.load(cfg.eval_path, cfg.seed, "eval_path")} if cfg.eval_path else {})}


def _identity(cfg: TrainConfig, role: str) -> str:
    """What the training or evaluation rows are, from the digest of the files they are read from (so that a cached
    run reads none of them); empty without the cache, or for Hub data (keyed by its rows once read)."""
    path = cfg.train_path if role == "train" or cfg.val_split > 0 else cfg.eval_path
    specs = sources.parse(path, "train_path" if path == cfg.train_path else "eval_path")
    if not cfg.data_cache or any(s.kind == "hub" for s in specs):
        return ""
    seeded = cfg.val_split > 0 or specs[0].weight is not None  # the seed picks the rows
    return json.dumps({"role": role, "files": sources.fingerprint(path), "val_split": cfg.val_split,
                       "seed": cfg.seed if seeded else None})


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    return dict(max_seq_length=cfg.max_seq_length, truncation=cfg.truncation, train_on_inputs=cfg.train_on_inputs)


def _cached(digest: str, name: str, cfg: TrainConfig) -> tuple[Any, EncodeStats, dict[str, int]] | None:
    from .. import datacache

    cached = datacache.load(digest)
    if cached is not None:
        report(cached[1], name, cfg.max_seq_length, cfg.truncation)  # the same warnings as when it was encoded
        log.info("%s: tokenised rows reused from the data cache (%s)", name, datacache.root() / digest)
    return cached


def encode_dataset(cfg: TrainConfig, tokenizer: Any, rows: sources.Mixture, name: str,
                   digest: str = "") -> tuple[Any, EncodeStats, dict[str, int]]:
    """The rows' token ids and labels as a Dataset (tokenised on --num_proc processes), stored in the data cache
    unless this is a dry run; rows keyed by their text where the files could not key them (Hub data)."""
    from .. import datacache

    if cfg.data_cache and not digest:
        digest = datacache.key(tokenizer, rows.texts(), _settings(cfg))
        cached = _cached(digest, name, cfg)
        if cached is not None:
            return cached
    dataset, stats = encode_table(tokenizer, rows.rows, name=name, num_proc=num_processes(cfg.num_proc),
                                  **_settings(cfg))
    if digest and not cfg.dry_run:
        dataset = datacache.save(digest, dataset, stats, rows.counts)
    return dataset, stats, rows.counts


def num_processes(requested: int) -> int:
    """--num_proc, or the cores this process may use (0)."""
    import os

    if requested > 0:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
