"""Which chat template a run uses (--chat_template, the model's own, or ChatML) and its variables
(--chat_template_kwargs), kept on the tokenizer so that every rendering uses both."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import UsageError

log = logging.getLogger("lora_cli")

TEMPLATE_KWARGS = "_lora_cli_chat_template_kwargs"  # tokenizer attribute: --chat_template_kwargs, for every render


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
    """The conversation as the tokenizer's chat template renders it: apply_chat_template(tokenize=False), or the
    renderer it calls, with its arguments, for plain dict messages (its conversion of message objects costs a fifth
    of each rendering); None values are dropped as it drops them."""
    direct = _renderer()
    if direct is None or not messages or not all(type(m) is dict for m in messages):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs(tokenizer))
    rendered, _ = direct(conversations=[[{k: v for k, v in m.items() if v is not None} for m in messages]],
                         tools=tools, documents=None, chat_template=tokenizer.get_chat_template(None, tools),
                         add_generation_prompt=add_generation_prompt,
                         **{**tokenizer.special_tokens_map, **template_kwargs(tokenizer)})
    return rendered[0]


def _renderer() -> Any:
    if not _RENDERER:
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:  # another transformers version: apply_chat_template, always right
            render_jinja_template = None
        _RENDERER.append(render_jinja_template)
    return _RENDERER[0]


_RENDERER: list[Any] = []
