"""A conversation as token ids and labels (the assistant-only loss mask), the prompt a model answers from, and the
ids that end its answer."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .template import render
from .turns import _HINT, Span, locate_turns

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turns: int  # assistant turns
    turns_with_end: int  # assistant turns whose end-of-turn token is trained
    reasoning_turns: int = 0  # assistant turns that carry reasoning
    reasoning_trained: int = 0  # ... whose reasoning the template renders, so it is in the loss

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def encode(tokenizer: Any, messages: list[dict], train_on_inputs: bool = False, where: str = "",
           tools: list[dict] | None = None) -> Encoded:
    """Token ids and labels (-100 outside assistant turns, unless train_on_inputs) for one conversation."""
    found = locate_turns(tokenizer, messages, where, tools)
    text, spans = found.text, found.spans
    if tokenizer.is_fast:
        ids, offsets = _ids_and_offsets(tokenizer, text)
    else:  # slow tokenizers have no offsets: encode piece by piece at the span boundaries
        ids, offsets = [], []
        cuts = sorted({0, len(text), *(s.start for s in spans), *(s.end for s in spans)})
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            offsets += [(a, b)] * len(piece)  # pieces are cut at span boundaries: wholly in or out
    in_span = _in_spans(offsets, spans, text, where)
    labels = list(ids) if train_on_inputs else [t if keep else IGNORE_INDEX for t, keep in zip(ids, in_span)]
    if _missing_bos(tokenizer, ids):
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels]
    return Encoded(ids, labels, len(spans), sum(s.has_end_of_turn for s in spans), found.reasoning_turns,
                   found.reasoning_rendered)


def _in_spans(offsets: list[tuple[int, int]], spans: list[Span], text: str, where: str) -> list[bool]:
    """Which tokens are trained: a token overlapping a span is (with a generation prompt ending in a space,
    "assistant: ", the first answer token " Hello" starts inside the prompt and would otherwise never be learned; an
    end-of-turn token that takes the whitespace after it, as Phi-3's do, is the turn's).
    Each span's tokens found by bisection in the tokens' offsets, which a tokenizer gives in text order."""
    starts = [start for start, _ in offsets]
    reach = [max(end, start + 1) for start, end in offsets]  # a zero-width token counts at its position
    if any(a > b for a, b in zip(starts, starts[1:])) or any(a > b for a, b in zip(reach, reach[1:])):
        return _in_spans_each(offsets, spans, text, where)  # not in order (never seen): token by token
    result = [False] * len(offsets)
    for span in spans:
        first = bisect.bisect_right(reach, span.start)  # the first token reaching past the span's start
        stop = bisect.bisect_left(starts, span.end)  # the tokens starting before the span's end
        if stop > first:
            result[first:stop] = [True] * (stop - first)
            start, end = offsets[stop - 1]
            if end > span.end and text[span.end:end].strip():  # it would train the next turn's text
                raise _across_end(text, start, end, where)
    return result


def _in_spans_each(offsets: list[tuple[int, int]], spans: list[Span], text: str, where: str) -> list[bool]:
    result = []
    for start, end in offsets:
        if any(start < s.end < end and text[s.end:end].strip() for s in spans):
            raise _across_end(text, start, end, where)
        result.append(any(start < s.end and max(end, start + 1) > s.start for s in spans))
    return result


def _across_end(text: str, start: int, end: int, where: str) -> DataError:
    return DataError(f"{where}: a token spans the end of an assistant turn ({text[start:end]!r}), so the mask cannot "
                     f"stop exactly at the turn's end; {_HINT}")


def encode_prompt(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation so far plus the generation prompt: the input from which the model answers,
    tokenised as encode() tokenises the same text in training."""
    text = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if _missing_bos(tokenizer, ids) else ids


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Where generation must stop: the token that closes an assistant turn under the current template (e.g.
    <|im_end|>, <|eot_id|>), as encode() finds it for training, then EOS."""
    probe = encode(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    trained = [label for label in probe.labels if label != IGNORE_INDEX]
    ids = [trained[-1]] if probe.turns_with_end and trained else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _missing_bos(tokenizer: Any, ids: list[int]) -> bool:
    """The template left out the BOS the model expects (the tokenizer adds one to plain text)."""
    bos = tokenizer.bos_token_id
    return bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos)


def _ids_and_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    backend = _direct_backend(tokenizer)
    if backend is not None:  # the Rust tokenizer itself: a third of the cost of transformers' wrapper around it
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


_PROBE = "<|im_start|>user\n Héllo  wörld\t1234 — 你好 🙂</s><s>[INST]<|eot_id|>\n\n  end "


def _direct_backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend when encoding with it directly is exactly what transformers gives: no truncation
    or padding set on it, and the same ids and offsets on a probe of the tokenizer's special tokens and odd text."""
    cached = tokenizer.__dict__.get("_lora_cli_backend")
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        ok = backend is not None and backend.truncation is None and backend.padding is None
        if ok:
            probe = _PROBE + "".join(tokenizer.all_special_tokens) + _PROBE
            wrapped = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)
            direct = backend.encode(probe, add_special_tokens=False)
            ok = wrapped["input_ids"] == direct.ids and [tuple(o) for o in wrapped["offset_mapping"]] == direct.offsets
        cached = tokenizer._lora_cli_backend = (backend if ok else False)
    return cached or None


def _adds_bos(tokenizer: Any) -> bool:
    cached = getattr(tokenizer, "_lora_cli_adds_bos", None)
    if cached is None:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bool(probe) and probe[0] == tokenizer.bos_token_id
        tokenizer._lora_cli_adds_bos = cached
    return cached
