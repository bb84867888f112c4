"""The chat template as an Ollama Modelfile: turn prefixes and suffixes found by rendering sentinel
conversations, written as a Go TEMPLATE, accepted only if it renders what the Jinja template renders."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import chat
from ..errors import UsageError, one_line
from ..verification import BUILTIN_PROMPTS
from .config import modelfile_path
from .go_template import render_go_template
from .vocab import Vocab

log = logging.getLogger("lora_cli")

SENTINELS = {"system": "LCXSYSTEM0", "user1": "LCXUSER1", "assistant1": "LCXASSISTANT1", "user2": "LCXUSER2",
             "assistant2": "LCXASSISTANT2"}


@dataclass
class ChatShape:
    """A chat template reduced to text around each turn: the shape of ChatML, Llama-3 and [INST] templates."""

    pre: str  # once at the start (e.g. <|begin_of_text|> when the runtime does not add BOS itself)
    system: tuple[str, str] | None  # (prefix, suffix) around the system prompt; None: the template drops it
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # after the last user turn, where the model's answer starts
    default_system: str = ""  # the system prompt the template inserts when the conversation has none
    system_always: bool = False  # the system turn is written even when empty (Llama 3.1: a header with dates)
    dropped_bos: str = ""  # template text left to the runtime, which adds BOS itself
    trims_content: bool = False  # the template strips whitespace around message contents; Go templates cannot


class Untranslatable(UsageError):
    def __init__(self, why: str):
        super().__init__(f"--ollama: cannot translate the chat template into an Ollama TEMPLATE: {why}; export "
                         "without --ollama (the GGUF keeps the Jinja template for llama.cpp and LM Studio)")


def chat_shape(tokenizer: Any, adds_bos: bool) -> ChatShape:
    """Derive the turn prefixes and suffixes by rendering probe conversations whose contents are sentinels."""
    s = SENTINELS

    def render(roles_contents: list[tuple[str, str]], generation: bool = False) -> str:
        messages = [{"role": r, "content": c} for r, c in roles_contents]
        try:
            return chat.render(tokenizer, messages, add_generation_prompt=generation)
        except Exception as exc:  # noqa: BLE001 - jinja raises many types, raise_exception() included
            raise Untranslatable(f"rendering a probe conversation failed ({one_line(exc)})") from None

    u1, a1, u2 = ("user", s["user1"]), ("assistant", s["assistant1"]), ("user", s["user2"])
    before_user, user_suffix = _split(render([u1]), [s["user1"]])
    generation = _after(render([u1], True), before_user + s["user1"] + user_suffix, "the generation prompt")
    mid = _split(render([u1, a1, u2]), [s["user1"], s["assistant1"], s["user2"]])
    if mid[0] != before_user or mid[3] != user_suffix:
        raise Untranslatable("the first user turn renders differently once more turns follow")
    assistant_prefix = _after(mid[1], user_suffix, "the assistant prefix")
    closed = _split(render([u1, a1]), [s["user1"], s["assistant1"]])
    assistant_suffix = closed[2]
    user_prefix = _after(mid[2], assistant_suffix, "the user prefix")
    if not before_user.endswith(user_prefix):
        raise Untranslatable("the first user turn is introduced differently from later ones")
    head = before_user[:len(before_user) - len(user_prefix)]
    shape = ChatShape(head, None, (user_prefix, user_suffix), (assistant_prefix, assistant_suffix), generation)
    bos = (tokenizer.bos_token or "") if adds_bos else ""
    _add_system(shape, render, head, bos)
    if bos and shape.pre.startswith(bos):  # llama.cpp adds BOS itself: keep one, not two
        shape.pre, shape.dropped_bos = shape.pre[len(bos):], bos
    padded = " \n" + s["user1"] + " \n"
    shape.trims_content = padded not in render([("user", padded)])
    return shape


def _add_system(shape: ChatShape, render, head: str, bos: str) -> None:
    """Find the system prompt's prefix and suffix, and a default system prompt the template adds on its own. `bos`:
    the BOS text the runtime adds itself (empty when it does not)."""
    s = SENTINELS
    try:
        text = render([("system", s["system"]), ("user", s["user1"])])
    except Untranslatable:  # e.g. Mistral's templates raise on a system message: no system prompt in Ollama either
        text = None
    if text is None or s["system"] not in text:
        if text is not None and text != render([("user", s["user1"])]):
            raise Untranslatable("the template folds the system prompt into another turn")
        return
    before_system, between, after = _split(text, [s["system"], s["user1"]])
    if after != shape.user[1] or not between.endswith(shape.user[0]):
        raise Untranslatable("the system prompt changes how the user turn renders")
    system_suffix = between[:len(between) - len(shape.user[0])]
    if before_system.startswith(head):  # no default system prompt: what precedes the first user turn is the preamble
        shape.system = (before_system[len(head):], system_suffix)
        return
    if not (head.startswith(before_system) and head.endswith(system_suffix) and
            len(head) >= len(before_system) + len(system_suffix)):
        raise Untranslatable("a conversation without a system message renders neither plainly nor with a default "
                             "system prompt")
    # The system turn is always there (with the Modelfile's SYSTEM, or empty): only a leading BOS stays outside it.
    shape.pre = bos if bos and before_system.startswith(bos) else ""
    shape.system = (before_system[len(shape.pre):], system_suffix)
    shape.default_system = head[len(before_system):len(head) - len(system_suffix)]
    shape.system_always = not shape.default_system


def _split(text: str, sentinels: list[str]) -> list[str]:
    """text around the sentinels, which must each appear exactly once and in order."""
    pieces, rest = [], text
    for sentinel in sentinels:
        if text.count(sentinel) != 1:
            raise Untranslatable(f"a message content is rendered {text.count(sentinel)} times instead of once")
        before, _, rest = rest.partition(sentinel)
        pieces.append(before)
    return pieces + [rest]


def _after(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise Untranslatable(f"cannot isolate {what}: turns do not render the same way in every position")
    return text[len(prefix):]


def go_template(shape: ChatShape) -> str:
    """The Ollama TEMPLATE. Ollama passes the turns as .Messages and the system prompt (the request's, else the
    Modelfile's SYSTEM) as .System; the last assistant turn is left open, as Ollama continues it."""
    head = _go_text(shape.pre, line_end=shape.system is None)
    if shape.system:
        turn = _go_text(shape.system[0]) + "{{ .System }}" + _go_text(shape.system[1], line_end=shape.system_always)
        head += turn if shape.system_always else "{{ if .System }}" + turn + "{{ end }}"
    user = '{{- if eq .Role "user" }}' + _go_text(shape.user[0]) + "{{ .Content }}" + \
        _go_text(shape.user[1], line_end=not shape.generation)
    if shape.generation:
        user += "{{ if $last }}" + _go_text(shape.generation) + "{{ end }}"
    assistant = '{{- else if eq .Role "assistant" }}' + _go_text(shape.assistant[0]) + "{{ .Content }}"
    if shape.assistant[1]:
        assistant += "{{ if not $last }}" + _go_text(shape.assistant[1]) + "{{ end }}"
    lines = [head, "{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}", user,
             assistant, "{{- end }}", "{{- end }}"]
    return "\n".join(line for line in lines if line)


def _go_text(text: str, line_end: bool = False) -> str:
    """Template text as a Go literal; as a quoted string where it holds braces, or where it ends a line in trailing
    whitespace that the next line's {{- would otherwise trim."""
    if "{" in text or "}" in text or (line_end and text != text.rstrip()):
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def stop_tokens(tokenizer: Any, shape: ChatShape) -> list[str]:
    """The special tokens that end an assistant turn (in the order the template writes them), else EOS."""
    suffix = shape.assistant[1]
    found = sorted((suffix.find(s), s) for s in chat._special_strings(tokenizer) if s in suffix)
    stops = [s for _, s in found]
    if not stops and tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return list(dict.fromkeys(stops))


def ollama_data(messages: list[dict], default_system: str = "") -> dict:
    """What Ollama hands the template: the messages, consecutive ones of the same role joined, and the system
    prompts joined (else the Modelfile's SYSTEM, which Ollama puts first)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if not system and default_system:
        system, messages = default_system, [{"role": "system", "content": default_system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": system, "Messages": collated}


def check_translation(tokenizer: Any, shape: ChatShape, template: str) -> int:
    """Render probe and real conversations with both templates; any difference refuses the translation. Returns the
    number of renderings compared."""
    s = SENTINELS
    system = [{"role": "system", "content": s["system"]}]
    turns = [{"role": r, "content": s[k]} for r, k in
             (("user", "user1"), ("assistant", "assistant1"), ("user", "user2"), ("assistant", "assistant2"))]
    conversations = [turns[:1], turns[:3], turns, system + turns[:3], system + turns]
    for real in BUILTIN_PROMPTS:
        conversations += [real[:-1], real]
    for messages in conversations:
        ends_open = messages[-1]["role"] == "assistant"
        expected = chat.render(tokenizer, messages, add_generation_prompt=not ends_open)
        if not expected.startswith(shape.dropped_bos):
            raise Untranslatable("the template does not always start with BOS")
        expected = expected[len(shape.dropped_bos):]
        got = render_go_template(template, ollama_data(messages, shape.default_system))
        if ends_open:  # Ollama continues the last assistant turn; the Jinja rendering closes it
            got += shape.assistant[1]
        if got != expected:
            at = len(os.path.commonprefix([got, expected]))
            raise Untranslatable(f"the translation renders {got[at:at + 40]!r} where the Jinja template renders "
                                 f"{expected[at:at + 40]!r} (after {expected[max(0, at - 40):at]!r})")
    return len(conversations)


@dataclass
class Modelfile:
    text: str
    shape: ChatShape
    stops: list[str]
    name: str  # suggested Ollama model name


def ollama_modelfile(tokenizer: Any, vocab: Vocab, out: Path, model_dir: Path) -> Modelfile:
    """The Modelfile for OUT, or Untranslatable (exit 2) before anything is written."""
    if not vocab.chat_template:
        raise Untranslatable("the tokenizer has no chat template (lora-merge copies the one used in training)")
    shape = chat_shape(tokenizer, vocab.add_bos)
    template = go_template(shape)
    check_translation(tokenizer, shape, template)
    if '"""' in template or '"""' in shape.default_system:
        raise Untranslatable('the template contains """, which a Modelfile cannot quote')
    if shape.trims_content:
        log.warning("the chat template strips whitespace around message contents and Ollama's TEMPLATE cannot; "
                    "prompts differ only for messages that start or end with whitespace")
    if shape.system is None:
        log.warning("the chat template has no system turn: system prompts are dropped, in Ollama as in the template")
    stops = stop_tokens(tokenizer, shape)
    name = re.sub(r"[^a-z0-9._-]+", "-", out.stem.lower()).strip("-") or "model"
    lines = [f"# Ollama Modelfile written by lora-export from {model_dir}.",
             f"# Create and run:  ollama create {name} -f {modelfile_path(out).name}  &&  ollama run {name}",
             f"FROM ./{out.name}", "", f'TEMPLATE """{template}"""', ""]
    if shape.default_system:
        lines += [f'SYSTEM """{shape.default_system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return Modelfile("\n".join(lines) + "\n", shape, stops, name)
