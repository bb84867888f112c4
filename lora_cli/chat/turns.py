"""Where each assistant turn's trained text lies in the rendered conversation.

Each assistant turn's trained span runs from the end of the generation prompt to its end-of-turn token, located
structurally, never by searching for the answer's text: a template with `{% generation %}` markers gives the spans
itself; for any other, the turn is rendered once more with its whole payload replaced by a unique sentinel, and the
text before the sentinel (history + header) and after it (end of turn + rest of the conversation) must then be an
exact prefix and suffix of the real rendering. What lies between is that turn alone. When the renderings do not line
up so, the conversation cannot be masked with certainty and DataError says where and what to do (--chat_template).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .template import render, template_kwargs

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_HINT = "pass --chat_template with a template that renders it (see README: tool calls and reasoning)"


def model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"


def _special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens, longest first (kept on the tokenizer while its vocabulary size is the same)."""
    try:
        size = len(tokenizer)
    except TypeError:  # a wrapper without a size: found each time
        return _find_special_strings(tokenizer)
    cached = tokenizer.__dict__.get("_lora_cli_specials")
    if cached is None or cached[0] != size:
        cached = tokenizer._lora_cli_specials = (size, _find_special_strings(tokenizer))
    return cached[1]


def _find_special_strings(tokenizer: Any) -> list[str]:
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
        if text.startswith(history) and prompt.startswith(history):
            return len(history), prompt[len(history):]
        # A template that closes a conversation without a generation prompt (Phi-3's EOS): the prompt alone, which
        # the conversation must then continue, says where the answer starts.
        return (len(prompt), "") if i and text.startswith(prompt) else None
    previous = turns[k - 1]
    first = max((j for j in range(previous) if messages[j]["role"] == "user"), default=previous)
    context = [*messages[first:previous], {"role": "assistant", "content": base}, *messages[previous + 1:i]]
    try:
        history = render(tokenizer, context, tools=tools)
        prompt = render(tokenizer, context, True, tools)
    except Exception:
        return None
    if history.count(base) != 1 or prompt.count(base) != 1:
        return None
    tail = history.split(base)[1]  # the end of the previous turn and the messages since
    if prompt.startswith(history) and glue[k].startswith(tail):
        return bounds[k - 1][1] + len(tail), prompt[len(history):]
    tail = prompt.split(base)[1]  # as above, for a template that closes a conversation without a prompt
    return (bounds[k - 1][1] + len(tail), "") if glue[k].startswith(tail) else None


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
