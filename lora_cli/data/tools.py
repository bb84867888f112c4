"""Tool calling in rows: assistant messages' tool calls as templates expect them, and a row's tool definitions."""

from __future__ import annotations

import json
from typing import Any

from ..errors import DataError
from .values import _string, _type_name


def tool_calls(calls: Any, where: str, name: str) -> list[dict[str, Any]]:
    """OpenAI tool calls as templates expect them: {"type": "function", "function": {"name", "arguments": object}}.
    Arguments may be given as an object or as a JSON string (the OpenAI API's form); a string that is not a JSON
    object is a malformed call."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: {name} must be a non-empty array of tool calls, got {_type_name(calls)}")
    out = []
    for i, call in enumerate(calls, start=1):
        here = f"{name}[{i}]"
        if not isinstance(call, dict):
            raise DataError(f"{where}: {here} must be an object, got {_type_name(call)}")
        function = call.get("function", call)  # the flat {"name", "arguments"} form too
        if not isinstance(function, dict):
            raise DataError(f"{where}: {here}.function must be an object, got {_type_name(function)}")
        fname = function.get("name")
        if not isinstance(fname, str) or not fname.strip():
            raise DataError(f"{where}: {here} has no function name")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                raise DataError(f"{where}: {here}.arguments is not valid JSON: {arguments[:80]!r}") from None
        if not isinstance(arguments, dict):
            raise DataError(f"{where}: {here}.arguments must be a JSON object, got {_type_name(arguments)}")
        normal: dict[str, Any] = {"type": "function", "function": {"name": fname, "arguments": arguments}}
        if call.get("id") is not None:
            normal["id"] = _string(call["id"], where, f"{here}.id")
        out.append(normal)
    return out


def row_tools(row: Any, where: str) -> list[dict[str, Any]] | None:
    """A row's `tools` (function definitions for the template's tool prompt): an array of objects, or its JSON text
    (ShareGPT datasets store it so); None when the row has none."""
    if not isinstance(row, dict) or row.get("tools") in (None, "", []):
        return None
    tools = row["tools"]
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise DataError(f"{where}: 'tools' is a string but not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: 'tools' must be an array of tool definitions (objects), got {_type_name(tools)}")
    return tools or None
