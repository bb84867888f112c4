"""Chat templates and assistant-only loss masks that are right by construction, or an error.

Each assistant turn's trained span runs from the end of the generation prompt to its end-of-turn token, located
structurally, never by searching for the answer's text: a template with `{% generation %}` markers gives the spans
itself; for any other, the turn is rendered once more with its whole payload replaced by a unique sentinel, and the
text before the sentinel (history + header) and after it (end of turn + rest of the conversation) must then be an
exact prefix and suffix of the real rendering. What lies between is that turn alone. When the renderings do not line
up so, the conversation cannot be masked with certainty and DataError says where and what to do (--chat_template).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, UsageError

log = logging.getLogger("lora_cli")

IGNORE_INDEX = -100
TEMPLATE_KWARGS = "_lora_cli_chat_template_kwargs"  # tokenizer attribute: --chat_template_kwargs, for every render
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HINT = "pass --chat_template with a template that renders it (see README: tool calls and reasoning)"


def chatml_template(end_of_turn: str) -> str:
    return ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '"
            + end_of_turn + "' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def resolve_chat_template(tokenizer: Any, override: str, template_kwargs: dict[str, Any] | None = None) -> str:
    """Set and return the template to train with: --chat_template, else the model's own, else ChatML (warned).
    `template_kwargs` (--chat_template_kwargs, e.g. enable_thinking) are kept on the tokenizer for every render."""
    set_template_kwargs(tokenizer, template_kwargs)
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


TEMPLATE_KWARGS_HELP = ("Extra variables for the chat template, as a JSON object (YAML: a mapping), e.g. "
                        "'{\"enable_thinking\": false}' for Qwen3. Used wherever the template renders: training, "
                        "lora-data, lora-eval.")
# apply_chat_template's own arguments: not template variables.
_RESERVED = {"messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
             "tokenize", "chat_template", "return_dict", "return_assistant_tokens_mask", "padding", "truncation",
             "max_length", "return_tensors", "tokenizer_kwargs"}


def parse_template_kwargs(text: str) -> dict[str, Any]:
    """--chat_template_kwargs as a mapping (config validation has checked it)."""
    return json.loads(text) if text.strip() else {}


def template_kwargs_problem(text: str) -> str | None:
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"--chat_template_kwargs: not valid JSON ({exc})"
    if not isinstance(value, dict):
        return f"--chat_template_kwargs: expected a JSON object such as '{{\"enable_thinking\": false}}', got {text!r}"
    clash = sorted(_RESERVED & set(value))
    if clash:
        return f"--chat_template_kwargs: {', '.join(clash)} cannot be set here (lora_cli sets it)"
    return None


def set_template_kwargs(tokenizer: Any, template_kwargs: dict[str, Any] | None) -> None:
    setattr(tokenizer, TEMPLATE_KWARGS, dict(template_kwargs or {}))


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
    return getattr(tokenizer, TEMPLATE_KWARGS, None) or {}


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs(tokenizer))


def model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"


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


@dataclass
class Rendered:
    """A conversation as the template renders it, with each assistant turn's trained span."""

    text: str
    spans: list[Span]
    reasoning_turns: int = 0  # assistant turns that carry reasoning (reasoning_content or inline </think>)
    reasoning_rendered: int = 0  # ... of which the template renders the reasoning (so it is trained)


def assistant_spans(tokenizer: Any, messages: list[dict], where: str = "",
                    tools: list[dict] | None = None) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn's trained text."""
    found = locate_turns(tokenizer, messages, where, tools)
    return found.text, found.spans


def locate_turns(tokenizer: Any, messages: list[dict], where: str = "", tools: list[dict] | None = None) -> Rendered:
    text = _render_checked(tokenizer, messages, where, tools)
    _check_tool_support(tokenizer, messages, text, where, tools)
    if _GENERATION.search(tokenizer.chat_template or ""):
        spans = _generation_spans(tokenizer, messages, text, where, tools)
    else:
        spans = _linear_spans(tokenizer, messages, text, tools)
        if spans is None:  # the template does not decompose turn by turn: the per-turn method decides, or errs
            spans = prefix_spans(tokenizer, messages, text, where, tools)
    found = Rendered(text, spans)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and _has_reasoning(m):
            found.reasoning_turns += 1
            without = _render_checked(tokenizer, _without_reasoning(messages, i), where, tools)
            found.reasoning_rendered += without != text
    return found


def _render_checked(tokenizer: Any, messages: list[dict], where: str, tools: list[dict] | None,
                    add_generation_prompt: bool = False) -> str:
    try:
        return render(tokenizer, messages, add_generation_prompt, tools)
    except Exception as exc:  # jinja and templates' raise_exception raise several types
        what = "this conversation" if not tools and not any(m["role"] == "tool" or m.get("tool_calls")
                                                            for m in messages) else "this tool-calling conversation"
        raise DataError(f"{where}: the chat template of {model_name(tokenizer)} cannot render {what}: "
                        f"{' '.join(str(exc).split())[:200]}; {_HINT}") from None


def _check_tool_support(tokenizer: Any, messages: list[dict], text: str, where: str,
                        tools: list[dict] | None) -> None:
    """A template that silently drops tool definitions or calls would train answers without the calls: refuse."""
    def same(other: list[dict], other_tools: list[dict] | None) -> bool:
        try:
            return render(tokenizer, other, tools=other_tools) == text
        except Exception:  # a template that refuses the conversation without them does read them
            return False

    if tools and same(messages, None):
        raise DataError(f"{where}: the chat template of {model_name(tokenizer)} does not render the row's 'tools' "
                        f"(it has no tool support); {_HINT}")
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            plain = [*messages[:i], {k: v for k, v in m.items() if k != "tool_calls"}, *messages[i + 1:]]
            if same(plain, tools):
                raise DataError(f"{where}: the chat template of {model_name(tokenizer)} does not render the tool "
                                f"calls of message {i + 1} (it has no tool support); {_HINT}")


def _has_reasoning(message: dict) -> bool:
    return bool(message.get("reasoning_content", "").strip()) or "</think>" in message["content"]


def _without_reasoning(messages: list[dict], i: int) -> list[dict]:
    m = {k: v for k, v in messages[i].items() if k != "reasoning_content"}
    if "</think>" in m["content"]:
        m["content"] = m["content"].split("</think>")[-1].lstrip("\n")
    return [*messages[:i], m, *messages[i + 1:]]


def _sentinel(text: str) -> str:
    """A string no rendering contains: private-use characters, lengthened until absent."""
    sentinel = "\ue000lora-cli-turn\ue001"
    while sentinel in text:
        sentinel += "\ue002"
    return sentinel


def prefix_spans(tokenizer: Any, messages: list[dict], text: str, where: str,
                 tools: list[dict] | None) -> list[Span]:
    """Every assistant turn's span by rendering the conversation prefix by prefix (cost: the square of the turns)."""
    return [_turn_span(tokenizer, messages, i, text, where, tools)
            for i, m in enumerate(messages) if m["role"] == "assistant"]


def _linear_spans(tokenizer: Any, messages: list[dict], text: str, tools: list[dict] | None) -> list[Span] | None:
    """The spans _turn_span finds, at a cost linear in the turns; None where this cannot be shown, and then the
    prefix-by-prefix method decides.

    One rendering with every assistant turn replaced by its own sentinel cuts the conversation into the text between
    turns ("glue"); the real rendering must be that glue with each turn's payload between, each glue found exactly
    once where it can be. Where the history before turn i ends and what generation prompt follows it come from
    rendering only the few messages since the previous assistant turn (that turn a sentinel): the end of the
    previous turn there must begin the glue after it in the full rendering.
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    base = _sentinel(text)
    marked_messages = list(messages)
    for k, i in enumerate(turns):
        marked_messages[i] = {"role": "assistant", "content": f"{base}{k}\ue003"}
    try:
        pieces = render(tokenizer, marked_messages, tools=tools).split(base)
    except Exception:  # jinja raises several types (e.g. a tool result must follow a tool call)
        return None
    if len(pieces) != len(turns) + 1 or not all(p.startswith(f"{k}\ue003") for k, p in enumerate(pieces[1:])):
        return None
    glue = [pieces[0], *(p[len(f"{k}\ue003"):] for k, p in enumerate(pieces[1:]))]
    if not (text.startswith(glue[0]) and text.endswith(glue[-1])):
        return None
    # payload k lies between glue k and glue k + 1: find each glue once, leaving room for the glue after it
    bounds, pos, room = [], len(glue[0]), sum(len(g) for g in glue[1:])
    for k in range(len(turns)):
        room -= len(glue[k + 1])
        limit = len(text) - room
        end = len(text) - len(glue[-1]) if k == len(turns) - 1 else text.find(glue[k + 1], pos, limit)
        if end < pos or (k < len(turns) - 1 and text.find(glue[k + 1], end + 1, limit) != -1):
            return None  # absent, or more than once: the split is ambiguous
        bounds.append((pos, end))
        pos = end + len(glue[k + 1])
    spans = []
    for k, i in enumerate(turns):
        found = _history_and_prompt(tokenizer, messages, turns, k, bounds, glue, text, tools, base)
        if found is None:
            return None
        history_end, header = found
        start, payload_end = bounds[k]
        if text.startswith(header, history_end):
            start = history_end + len(header)
        elif start < history_end:
            return None
        if payload_end < start:
            return None
        spans.append(_closed_span(tokenizer, text, start, payload_end))
    return spans


def _history_and_prompt(tokenizer: Any, messages: list[dict], turns: list[int], k: int,
                        bounds: list[tuple[int, int]], glue: list[str], text: str, tools: list[dict] | None,
                        base: str) -> tuple[int, str] | None:
    """Where the history before assistant turn k ends in `text`, and the generation prompt that follows it."""
    i = turns[k]
    if k == 0:  # only the messages before the first answer: rendered as they are
        try:
            history = render(tokenizer, messages[:i], tools=tools) if i else ""
            prompt = render(tokenizer, messages[:i], True, tools) if i else ""
        except Exception:
            return None
        if not (text.startswith(history) and prompt.startswith(history)):
            return None
        return len(history), prompt[len(history):]
    previous = turns[k - 1]
    first = max((j for j in range(previous) if messages[j]["role"] == "user"), default=previous)
    context = [*messages[first:previous], {"role": "assistant", "content": base}, *messages[previous + 1:i]]
    try:
        history = render(tokenizer, context, tools=tools)
        prompt = render(tokenizer, context, True, tools)
    except Exception:
        return None
    if history.count(base) != 1 or not prompt.startswith(history):
        return None
    tail = history.split(base)[1]  # the end of the previous turn and the messages since
    if not glue[k].startswith(tail):
        return None
    return bounds[k - 1][1] + len(tail), prompt[len(history):]


def _closed_span(tokenizer: Any, text: str, start: int, payload_end: int) -> Span:
    """The span from `start` through the payload and the special token that closes the turn, where one does."""
    gap = len(text) - payload_end - len(text[payload_end:].lstrip(" \t\r\n"))
    for special in _special_strings(tokenizer):
        if text.startswith(special, payload_end + gap):
            return Span(start, payload_end + gap + len(special), True)
    return Span(start, payload_end, False)


def _turn_span(tokenizer: Any, messages: list[dict], i: int, text: str, where: str,
               tools: list[dict] | None) -> Span:
    """Assistant message i's span in `text`: from the end of the generation prompt to its end-of-turn token."""
    def uncertain(why: str) -> DataError:
        return DataError(f"{where}: assistant message {i + 1} cannot be masked with certainty under the chat "
                         f"template of {model_name(tokenizer)} ({why}); {_HINT}, or check --chat_template_kwargs")

    history = _render_checked(tokenizer, messages[:i], where, tools) if i else ""
    prompt = _render_checked(tokenizer, messages[:i], where, tools, add_generation_prompt=True) if i else ""
    if not (text.startswith(history) and prompt.startswith(history)):
        raise uncertain("the conversation before it renders differently on its own")
    sentinel = _sentinel(text)
    try:
        marked = render(tokenizer, [*messages[:i], {"role": "assistant", "content": sentinel}, *messages[i + 1:]],
                        tools=tools)
    except Exception as exc:  # e.g. a template that insists a tool result follows a tool call
        raise uncertain(f"it refuses the turn with a plain answer in its place: {' '.join(str(exc).split())[:120]}")
    if marked.count(sentinel) != 1:
        raise uncertain("the template does not render an answer exactly once")
    before, after = marked.split(sentinel)
    if not text.endswith(after) or len(text) - len(after) < len(history):
        raise uncertain("the rest of the conversation renders differently around it")
    header, rest = prompt[len(history):], text[len(history):]
    if rest.startswith(header):  # trained from where generation starts (e.g. Qwen3's empty <think> block included)
        start = len(prompt)
    elif before.startswith(history) and rest.startswith(before[len(history):]):
        start = len(before)  # the template renders this turn's header unlike the generation prompt
    else:
        raise uncertain(f"it does not begin with the generation prompt {header!r}")
    payload_end = len(text) - len(after)
    if payload_end < start:
        raise uncertain("its header overlaps the rest of the conversation")
    return _closed_span(tokenizer, text, start, payload_end)


def _generation_spans(tokenizer: Any, messages: list[dict], text: str, where: str,
                      tools: list[dict] | None) -> list[Span]:
    """The spans a template's own {% generation %} markers give (exact by definition)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True, **{**tokenizer.special_tokens_map, **template_kwargs(tokenizer)})
    if rendered[0] != text:
        raise DataError(f"{where}: the chat template's generation markers render differently from the template; "
                        f"{_HINT}")
    specials = _special_strings(tokenizer)
    spans = []
    for start, end in indices[0]:
        inner = text[start:end].rstrip()
        spans.append(Span(start, end, any(inner.endswith(s) for s in specials)))
    if len(spans) != sum(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the chat template's generation markers do not enclose each assistant turn once; "
                        f"{_HINT}")
    return spans


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
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
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
    "assistant: ", the first answer token " Hello" starts inside the prompt and would otherwise never be learned).
    One pass over tokens and spans, both in text order."""
    ordered = sorted(spans, key=lambda s: s.start)
    result, k = [], 0
    for start, end in offsets:
        if k and start < ordered[k - 1].end:  # an offset before the previous one (never seen): look again
            k = 0
        while k < len(ordered) and ordered[k].end <= start:
            k += 1
        span = ordered[k] if k < len(ordered) else None
        if span is not None and span.end < end:  # one token across a turn's end would train the next turn's text
            raise DataError(f"{where}: a token spans the end of an assistant turn ({text[start:end]!r}), so the "
                            f"mask cannot stop exactly at the turn's end; {_HINT}")
        result.append(span is not None and max(end, start + 1) > span.start)
    return result


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


def _adds_bos(tokenizer: Any) -> bool:
    cached = getattr(tokenizer, "_lora_cli_adds_bos", None)
    if cached is None:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        cached = bool(probe) and probe[0] == tokenizer.bos_token_id
        tokenizer._lora_cli_adds_bos = cached
    return cached
