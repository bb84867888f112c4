"""Attention for padding-free batches without a variable-length kernel.

A padding-free micro-batch is one row holding several conversations. flash-attention's varlen kernel attends within
each conversation; with sdpa, transformers instead builds a block-diagonal mask over the whole row, so every layer
computes (and, in the backward, differentiates) attention between all pairs of tokens in the row and masks most of it
away: with --tokens_per_batch 8192 and 512-token conversations, 16x the attention work. Here sdpa runs once per
conversation (causal, no mask), using the boundaries the collator passes (cu_seq_lens_q): the same result, only the
work that counts.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lora_cli")

NAME = "lora_cli_sdpa_per_sequence"


def sdpa_per_sequence(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    """transformers attention function: sdpa per packed sequence of a padding-free row (query: batch, heads, tokens,
    head dim); batches without sequence boundaries go to plain sdpa, causal. transformers builds no attention mask
    for an implementation it does not know, so this is for padding-free training only: use_plain_sdpa undoes it."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    if bounds is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    cuts = _cuts(bounds)
    if len(cuts) <= 2:  # one sequence: one call
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
             for a, b in zip(cuts, cuts[1:]) if b > a]
    return torch.cat(parts, dim=1), None  # (batch, tokens, heads, head dim), as sdpa_attention_forward returns


_last: tuple[Any, list[int]] = (None, [])


def _cuts(bounds: Any) -> list[int]:
    """The sequence boundaries as ints, read once per forward: every layer gets the same tensor, and reading a GPU
    tensor waits for the GPU."""
    global _last
    if _last[0] is not bounds:
        _last = (bounds, bounds.tolist())
    return _last[1]


def supported(config: Any) -> bool:
    """Per-sequence causal attention is exact for plain causal self-attention; not for sliding windows (whose mask
    limits attention within a sequence too) or logit soft-capping."""
    text = config.get_text_config()
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    layer_types = getattr(text, "layer_types", None) or []
    return (not sliding and not any("sliding" in str(t) or "chunked" in str(t) for t in layer_types)
            and getattr(text, "attn_logit_softcapping", None) is None)


def use_per_sequence_sdpa(model: Any) -> bool:
    """Switch a model that uses sdpa to per-sequence sdpa, for padding-free training. False when it does not apply."""
    from transformers import AttentionInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa" or not supported(base.config):
        return False
    AttentionInterface.register(NAME, sdpa_per_sequence)
    try:
        base.set_attn_implementation(NAME)
    except (ValueError, ImportError) as exc:  # a model that cannot switch keeps sdpa with its block-diagonal mask
        log.debug("per-sequence sdpa not used: %s", exc)
        return False
    return base.config._attn_implementation == NAME


def use_plain_sdpa(model: Any) -> None:
    """Back to transformers' sdpa, which honours attention masks (padded batches, generation)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == NAME:
        base.set_attn_implementation("sdpa")
