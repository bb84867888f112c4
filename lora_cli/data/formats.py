"""Which format a row is in, and every supported format normalised to validated OpenAI-style `messages`:
{"messages": [...]}, ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction", "input", "output"} and
{"prompt", "completion"} (strings or message lists)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import DataError
from .tools import tool_calls
from .values import _string, _type_name

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names, normalised to OpenAI roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}


def row_format(row: Any) -> str | None:
    """The format a row is read as ("messages", "sharegpt", "alpaca", "prompt/completion"), or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt/completion"
    return None


def normalise_row(row: Any, where: str) -> list[dict[str, Any]]:
    """One row of any supported format as a validated list of {role, content} messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
    kind = row_format(row)
    if kind == "messages":
        messages = _from_messages(row["messages"], where, "messages")
    elif kind == "sharegpt":
        messages = _from_sharegpt(row["conversations"], where)
    elif kind == "alpaca":
        messages = _from_alpaca(row, where)
    elif kind == "prompt/completion":
        messages = _from_prompt_completion(row, where)
    else:
        names = sorted(json.dumps(str(k), ensure_ascii=False)[1:-1] for k in row)  # a key may hold a newline
        keys = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "") or "none"
        raise DataError(f"{where}: no usable fields (found: {keys}); expected 'messages', 'conversations', "
                        "'instruction'+'output' or 'prompt'+'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to train on")
    return messages


def _from_messages(messages: Any, where: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{field}' must be an array of messages, got {_type_name(messages)}")
    if not messages:
        raise DataError(f"{where}: '{field}' is empty")
    out = []
    for i, message in enumerate(messages, start=1):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name} must be an object with 'role' and 'content', got {_type_name(message)}")
        if "role" not in message:
            raise DataError(f"{where}: {name} has no 'role'")
        role = message["role"]
        if not isinstance(role, str):
            raise DataError(f"{where}: {name}.role must be a string, got {_type_name(role)}")
        if role not in ROLES:
            raise DataError(f"{where}: {name} has unknown role {role!r} (expected system, user, assistant or tool)")
        calls = message.get("tool_calls") if role == "assistant" else None
        if "content" not in message or (message["content"] is None and not calls):
            raise DataError(f"{where}: {name} has no 'content'")
        content = message["content"]
        if role == "tool" and not isinstance(content, (str, list)):
            content = json.dumps(content, ensure_ascii=False)  # a structured tool result, passed on as its JSON
        out.append({"role": role, "content": "" if content is None else _content(content, where, name),
                    **_extras(message, where, name)})
    return _check_turns(out, where)


def _extras(message: dict, where: str, name: str) -> dict[str, Any]:
    """The tool-call and reasoning fields of a message, validated; only those present (templates test `in`)."""
    extras: dict[str, Any] = {}
    role = message["role"]
    if role == "assistant" and message.get("tool_calls") is not None:
        extras["tool_calls"] = tool_calls(message["tool_calls"], where, f"{name}.tool_calls")
    if role == "assistant" and message.get("reasoning_content") is not None:
        extras["reasoning_content"] = _string(message["reasoning_content"], where, f"{name}.reasoning_content")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                extras[key] = _string(message[key], where, f"{name}.{key}")
    return extras


def _content(content: Any, where: str, name: str) -> str:
    # OpenAI's list-of-parts content: keep the text parts; anything else is not text we can train on.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise DataError(f"{where}: {name}.content must be a string, got {_type_name(content)}")
    return content


def _check_turns(messages: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    for i, m in enumerate(messages, start=1):
        if m["role"] == "system" and i != 1:
            raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise DataError(f"{where}: message {i} (assistant) has empty content")
        previous = messages[i - 2] if i > 1 else {}
        if m["role"] == "tool" and not (previous.get("tool_calls") or previous.get("role") == "tool"):
            raise DataError(f"{where}: message {i} (tool) does not follow an assistant turn with tool_calls")
        for key in ("content", "reasoning_content"):
            try:
                m.get(key, "").encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON can escape half a surrogate pair, which no tokenizer accepts
                raise DataError(f"{where}: message {i} ({m['role']}) has an unpaired surrogate "
                                f"\\u{ord(m[key][exc.start]):04x}, which is not valid Unicode text") from None
    return messages


def _from_sharegpt(turns: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty array, got {_type_name(turns)}")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{where}: conversations[{i}] has unknown speaker {speaker!r} "
                            "(expected system, human, gpt, function_call or observation)")
        if role == "function_call":  # the call as JSON text: {"name", "arguments"} or an array of them
            try:
                calls = json.loads(turn["value"]) if isinstance(turn["value"], str) else turn["value"]
            except (ValueError, RecursionError):
                raise DataError(f"{where}: conversations[{i}] (function_call) is not valid JSON") from None
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": tool_calls(calls, where, f"conversations[{i}]")})
            continue
        value = turn["value"]
        if role == "tool" and not isinstance(value, (str, list)):
            value = json.dumps(value, ensure_ascii=False)
        messages.append({"role": role, "content": _content(value, where, f"conversations[{i}]")})
    return _check_turns(messages, where)


def _from_alpaca(row: dict, where: str) -> list[dict[str, Any]]:
    for key in ("instruction", "input", "output", "system"):
        if key in row and not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {_type_name(row[key])}")
    prompt = row["instruction"]
    if row.get("input", "").strip():
        prompt = f"{prompt}\n\n{row['input']}"
    messages = [{"role": "system", "content": row["system"]}] if row.get("system", "").strip() else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return _check_turns(messages, where)


def _from_prompt_completion(row: dict, where: str) -> list[dict[str, Any]]:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
        return _check_turns(_from_messages(prompt, where, "prompt") + _from_messages(completion, where, "completion"),
                            where)
    for key, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {_type_name(value)}")
    return _check_turns([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], where)
