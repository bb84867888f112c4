"""Read chat datasets and normalise every supported row format to OpenAI-style `messages`.

Supported rows: {"messages": [...]}, ShareGPT {"conversations": [{"from", "value"}]}, Alpaca
{"instruction", "input", "output"}, and {"prompt", "completion"} (strings or message lists). Tool calling: OpenAI
`tool_calls` on assistant messages, `role: "tool"` results and a row-level `tools` list; ShareGPT `function_call` and
`observation` turns. Reasoning: an assistant message's `reasoning_content` is kept (inline <think> stays in the
content); the chat template decides what of it is rendered.
Files: .jsonl and .csv (read here, so errors name the line), .json, and .parquet (via `datasets`).
Every problem raises DataError naming the file and the line (or row) and what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, one_line

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names, normalised to OpenAI roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "function_call": "function_call", "observation": "tool", "tool": "tool"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATASETS_SUFFIXES = {".parquet": "parquet"}


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    where: str  # "path:line" or "path:row N", for messages that point back at the source
    tools: list[dict[str, Any]] | None = field(default=None)  # the row's tool definitions, passed to the template


def load_conversations(path: str) -> list[Conversation]:
    """Every row of a data file as a normalised conversation; DataError on the first unusable row."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    rows = _read_rows(p, p.suffix.lower())
    conversations = [Conversation(normalise_row(row, where), where, row_tools(row, where)) for where, row in rows]
    if not conversations:
        raise DataError(f"{path}: no rows (the file is empty)")
    return conversations


def scan_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Every raw row of a data file with where it is, for checks that report all bad rows (lora-data): a JSON Lines
    line that does not parse is yielded as its DataError instead of ending the scan. A file that cannot be read
    at all (missing, wrong type, not UTF-8, broken CSV or JSON array) still raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES or (suffix == ".json" and not _decode(p).lstrip().startswith("[")):
        return _scan_jsonl(p)
    return iter(_read_rows(p, suffix))


def _read_rows(p: Path, suffix: str) -> Any:
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".csv":
        return _read_csv(p)
    if suffix in DATASETS_SUFFIXES:
        return _read_with_datasets(p, DATASETS_SUFFIXES[suffix])
    raise DataError(f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .parquet or .csv")


def split_validation(rows: list[Conversation], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the rows (at least one) for evaluation, reproducibly for a seed."""
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(f"--val_split {fraction} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _decode(p: Path) -> str:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerates a UTF-8 byte-order mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        "re-encode the file as UTF-8") from None
    return text


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    for where, row in _scan_jsonl(p):
        if isinstance(row, DataError):
            raise row
        yield where, row


def _scan_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    """Each line's row, or the DataError that line raises: a line that is not JSON does not end the scan."""
    text = _decode(p)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()  # CRLF line ends and surrounding blanks
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = DataError(f"{p}:{number}: invalid JSON: {exc.msg} (column {exc.colno})")
        except (ValueError, RecursionError) as exc:
            row = DataError(f"{p}:{number}: invalid JSON: {_json_limit(exc)}")
        yield f"{p}:{number}", row


def _read_json(p: Path) -> list[tuple[str, Any]]:
    text = _decode(p)
    stripped = text.lstrip()
    if not stripped:
        return []
    if not stripped.startswith("["):  # many ".json" files are really JSON Lines
        return list(_read_jsonl(p))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{p}: invalid JSON: {_json_limit(exc)}") from None
    return [(f"{p}:row {i}", row) for i, row in enumerate(data, start=1)]


def _json_limit(exc: Exception) -> str:
    # json.loads raises these, not JSONDecodeError, for input it parses but cannot hold.
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return " ".join(str(exc).split(";")[0].split())  # e.g. an integer with more than 4300 digits


def _read_csv(p: Path) -> list[tuple[str, Any]]:
    # Read here, not with pandas: every cell stays text ("4", "NA" and "True" are answers, not a number, a missing
    # value and a boolean), and each row is named by the line it starts on, even after cells that span lines.
    text = _decode(p)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # one cell may hold a long conversation
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{p}:{start}: not valid CSV: {exc}") from None
        if not any(cell.strip() for cell in record):
            continue  # a blank line
        if header is None:
            header = record
            continue
        if len(record) > len(header):
            raise DataError(f"{p}:{start}: {len(record)} cells, but the header has {len(header)} columns")
        row: dict[str, Any] = dict(zip(header, record))  # an empty cell is "", as in the same row in JSON
        for key in ("messages", "conversations"):  # CSV cells hold message lists as JSON text
            if row.get(key) == "":
                del row[key]  # this row uses another format's columns
            elif key in row:
                try:
                    row[key] = json.loads(row[key])
                except (ValueError, RecursionError):
                    pass  # reported by normalise_row as a wrong type
        rows.append((f"{p}:{start}", row))
    return rows


def _read_with_datasets(p: Path, builder: str) -> list[tuple[str, Any]]:
    if p.stat().st_size == 0:
        return []
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # pyarrow/pandas raise many types for a corrupt file
        raise DataError(f"{p}: cannot read as {builder}: {one_line(exc, 300)}") from None
    return [(f"{p}:row {i}", {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(ds, start=1)]


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


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


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


def _string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {_type_name(value)}")
    return value


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
