"""Chat templates and assistant-only loss masks that work for any template.

Few templates carry `{% generation %}` markers, so assistant spans are found by rendering the conversation prefix by
prefix: the text an assistant turn adds after the generation prompt is what the model must learn to produce, cut
right after its end-of-turn token (so the model learns to stop, but not the newline a template puts after it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, UsageError

log = logging.getLogger("lora_cli")

IGNORE_INDEX = -100


def chatml_template(end_of_turn: str) -> str:
    return ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '"
            + end_of_turn + "' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def resolve_chat_template(tokenizer: Any, override: str) -> str:
    """Set and return the template to train with: --chat_template, else the model's own, else ChatML (warned)."""
    if override and override != "chatml":
        template = Path(override).read_text(encoding="utf-8")
        source = override
    elif override == "chatml" or not getattr(tokenizer, "chat_template", None):
        # End turns with <|im_end|> where the vocabulary has it as one token, else with the model's own EOS, so that
        # generation stops where training taught it to.
        vocab = tokenizer.get_vocab()
        end = "<|im_end|>" if "<|im_end|>" in vocab else (tokenizer.eos_token or "<|im_end|>")
        template = chatml_template(end)
        source = "chatml"
        if not override:
            log.warning("the tokenizer has no chat template: using ChatML with end-of-turn %r "
                        "(pass --chat_template to choose another)", end)
    else:
        return tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    except Exception as exc:  # jinja raises several types
        raise UsageError(f"--chat_template {source}: the template does not render: {exc}") from None
    return template


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _special_strings(tokenizer: Any) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return sorted((s for s in specials if s), key=len, reverse=True)


@dataclass
class Span:
    start: int  # character offsets into the rendered text
    end: int
    has_end_of_turn: bool  # a special token closes the turn inside the span


def assistant_spans(tokenizer: Any, messages: list[dict], where: str = "") -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn's trained text."""
    text = render(tokenizer, messages)
    specials = _special_strings(tokenizer)
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"].strip()
        start = end = None
        try:
            before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            after = render(tokenizer, messages[: i + 1])
            if text.startswith(after) and after.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(after)
        except Exception:  # some templates refuse partial conversations; fall back to locating the content
            pass
        if start is None or text.find(content, start, end) < 0:
            # The template renders earlier turns differently from the last one: find the content itself.
            start = text.find(content, cursor)
            if start < 0:
                raise DataError(f"{where}: the chat template does not render assistant message {i + 1} verbatim, "
                                "so its tokens cannot be located; use --chat_template")
            end = len(text)
            next_start = [text.find(m["content"].strip(), start + len(content))
                          for m in messages[i + 1:] if m["content"].strip()]
            if next_start and next_start[0] >= 0:
                end = next_start[0]
        content_end = text.find(content, start, end) + len(content)
        tail = text[content_end:end]
        hits = [(tail.find(s), s) for s in specials if s in tail]
        if hits:
            pos, token = min(hits)
            end, closed = content_end + pos + len(token), True
        else:
            end, closed = content_end + len(tail.rstrip()), False
        spans.append(Span(start, end, closed))
        cursor = end
    return text, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turns: int  # assistant turns
    turns_with_end: int  # assistant turns whose end-of-turn token is trained

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def encode(tokenizer: Any, messages: list[dict], train_on_inputs: bool = False, where: str = "") -> Encoded:
    """Token ids and labels (-100 outside assistant turns, unless train_on_inputs) for one conversation."""
    text, spans = assistant_spans(tokenizer, messages, where)
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    else:  # slow tokenizers have no offsets: encode piece by piece at the span boundaries
        ids, offsets = [], []
        cuts = sorted({0, len(text), *(s.start for s in spans), *(s.end for s in spans)})
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            offsets += [(a, b)] * len(piece)  # pieces are cut at span boundaries: wholly in or out
    # A token overlapping a span is trained: with a generation prompt ending in a space ("assistant: "), the first
    # answer token (" Hello") starts inside the prompt and would otherwise never be learned.
    in_span = [any(start < s.end and max(end, start + 1) > s.start for s in spans) for start, end in offsets]
    labels = list(ids) if train_on_inputs else [t if keep else IGNORE_INDEX for t, keep in zip(ids, in_span)]
    if _missing_bos(tokenizer, ids):
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels]
    return Encoded(ids, labels, len(spans), sum(s.has_end_of_turn for s in spans))


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a conversation so far plus the generation prompt: the input from which the model answers,
    tokenised as encode() tokenises the same text in training."""
    ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
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


def _adds_bos(tokenizer: Any) -> bool:
    cached = getattr(tokenizer, "_lora_cli_adds_bos", None)
    if cached is None:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bool(probe) and probe[0] == tokenizer.bos_token_id
        tokenizer._lora_cli_adds_bos = cached
    return cached
