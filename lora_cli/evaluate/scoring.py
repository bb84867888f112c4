"""Scoring one model on the prepared rows: the assistant-token loss lora-train minimises and generated answers."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from .. import chat, models
from ..adapters import Adapter
from ..errors import UsageError, one_line
from .config import EvalConfig
from .inputs import Prepared, spec_name
from .metrics import contains_match, exact_match, perplexity, rouge_l

log = logging.getLogger("lora_cli")

BASE = "base"


@dataclass
class ModelScore:
    name: str  # "base", or the adapter folder as given
    adapter: str | None
    loss: float
    perplexity: float | None
    trained_tokens: int
    exact_match: float  # fractions of the rows
    contains: float
    rouge_l: float
    generated_tokens: int
    generation_seconds: float
    tokens_per_second: float
    answers: list[str] = field(repr=False)
    row_scores: list[dict[str, Any]] = field(repr=False)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("answers", "row_scores")}


def load_models(cfg: EvalConfig, prepared: Prepared, precision: str) -> Any:
    """The base model, once, with every adapter loaded on top under its own name (peft's multi-adapter model)."""
    q = prepared.quantization
    log.info("loading %s (%s%s)", prepared.base.display, precision,
             ", 4-bit NF4" if q == "4bit" else ", 8-bit" if q == "8bit" else "")
    model = models.load_model(prepared.base, precision=precision, quantization=q,
                              trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    if q is None:  # quantised weights were placed at load time
        model.to(_device())
    for index, adapter in enumerate(prepared.adapters):
        model = _load_adapter(model, adapter, index, prepared.base)
    model.eval()
    return model


def _load_adapter(model: Any, adapter: Adapter, index: int, base: models.BaseModel) -> Any:
    from peft import PeftModel

    name = _adapter_name(index)
    try:
        if index == 0:
            return PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name, is_trainable=False)
        model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
        return model
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches and missing modules
        detail = one_line(exc)
        raise UsageError(f"--adapter {adapter.path}: does not fit {base.display} ({detail}); pass the --base_model "
                         f"it was trained on ({spec_name(adapter.base_spec)})") from None


def _adapter_name(index: int) -> str:
    return f"adapter_{index}"  # peft names must be valid module names; folders are not


def active(model: Any, adapter_index: int | None) -> contextlib.AbstractContextManager:
    """A context in which `model` is the plain base (None) or the base with one adapter."""
    if not hasattr(model, "peft_config"):  # no adapter was given: a plain transformers model
        return contextlib.nullcontext()
    if adapter_index is None:
        return model.disable_adapter()
    model.set_adapter(_adapter_name(adapter_index))
    return contextlib.nullcontext()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def score_model(model: Any, prepared: Prepared, cfg: EvalConfig, name: str, stop_ids: list[int]) -> ModelScore:
    tokenizer = prepared.tokenizer
    nll, count = assistant_nll(model, prepared.loss, tokenizer.pad_token_id, cfg.batch_size)
    loss = nll / count
    answers, new_tokens, seconds = generate(model, tokenizer, prepared.prompts, cfg, stop_ids, label=name)
    row_scores = [{"exact_match": exact_match(a, r), "contains": contains_match(a, r), "rouge_l": rouge_l(a, r)}
                  for a, r in zip(answers, prepared.references)]
    n = len(row_scores)
    score = ModelScore(
        name=name, adapter=None if name == BASE else name, loss=loss, perplexity=perplexity(loss),
        trained_tokens=count, exact_match=sum(s["exact_match"] for s in row_scores) / n,
        contains=sum(s["contains"] for s in row_scores) / n, rouge_l=sum(s["rouge_l"] for s in row_scores) / n,
        generated_tokens=new_tokens, generation_seconds=seconds,
        tokens_per_second=new_tokens / seconds if seconds else 0.0, answers=answers, row_scores=row_scores)
    log.info("%s: loss %.4f, exact match %.1f%%, contains %.1f%%, ROUGE-L %.3f, %.1f tokens/s", name, loss,
             100 * score.exact_match, 100 * score.contains, score.rouge_l, score.tokens_per_second)
    return score


def batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length (less padding), longest first (out of memory shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def pad(rows: list[list[int]], value: int, left: bool = False):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def assistant_nll(model: Any, columns: dict[str, list], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of every labelled token, and how many there are: the loss lora-train
    minimises, over the same labels, token-weighted across the whole set rather than averaged per batch."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches([len(ids) for ids in columns["input_ids"]], batch_size):
        ids, mask = pad([columns["input_ids"][i] for i in batch], pad_id)
        labels, _ = pad([columns["labels"][i] for i in batch], chat.IGNORE_INDEX)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(logits.device)  # the logits at position t predict token t + 1
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                 ignore_index=chat.IGNORE_INDEX, reduction="sum").item()
        count += int((targets != chat.IGNORE_INDEX).sum())
    return total, count


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], cfg: EvalConfig, stop_ids: list[int],
             label: str = "") -> tuple[list[str], int, float]:
    """Each prompt's answer (left-padded batches, stopping at end-of-turn), the tokens generated and the seconds."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    sampling = ({"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0
                else {"do_sample": False})
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    device = next(model.parameters()).device
    answers, new_tokens, seconds = [""] * len(prompts), 0, 0.0
    torch.manual_seed(cfg.seed)  # the same samples for every model when sampling
    # The slow part on CPU: a bar on terminals only (disable=None), gone when done.
    bar = tqdm(total=len(prompts), desc=f"{label}: answering", unit="row", leave=False, disable=None)
    for batch in batches([len(p) for p in prompts], cfg.batch_size):
        ids, mask = pad([prompts[i] for i in batch], tokenizer.pad_token_id, left=True)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        seconds += time.perf_counter() - start
        for i, tokens in zip(batch, out[:, ids.shape[1]:].tolist()):
            tokens = _until_stop(tokens, stop_ids)
            new_tokens += len(tokens)
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()
    return answers, new_tokens, seconds


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The generated tokens up to and including the first stop token (what follows is padding)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens
