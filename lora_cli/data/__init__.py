"""Read chat datasets and normalise every supported row format to OpenAI-style `messages`.

Supported rows: {"messages": [...]}, ShareGPT {"conversations": [{"from", "value"}]}, Alpaca
{"instruction", "input", "output"}, and {"prompt", "completion"} (strings or message lists). Tool calling: OpenAI
`tool_calls` on assistant messages, `role: "tool"` results and a row-level `tools` list; ShareGPT `function_call` and
`observation` turns. Reasoning: an assistant message's `reasoning_content` is kept (inline <think> stays in the
content); the chat template decides what of it is rendered.
Files: .jsonl and .csv (read here, so errors name the line), .json, and .parquet (via `datasets`).
Every problem raises DataError naming the file and the line (or row) and what is wrong.

    files.py          a file's raw rows by suffix, each with where it is (scan_rows)
    formats.py        which format a row is in (row_format) and its messages (normalise_row)
    tools.py          tool calls and a row's tool definitions (row_tools)
    values.py         a JSON value's type as errors name it; strings checked
    conversations.py  a file as Conversations (load_conversations); the evaluation split (split_validation)
"""

from .conversations import Conversation, held_out, load_conversations, split_validation
from .files import DATASETS_SUFFIXES, JSONL_SUFFIXES, scan_rows
from .formats import ROLES, SHAREGPT_ROLES, normalise_row, row_format
from .tools import row_tools, tool_calls
from .values import _type_name

__all__ = ["DATASETS_SUFFIXES", "JSONL_SUFFIXES", "ROLES", "SHAREGPT_ROLES", "Conversation", "_type_name",
           "held_out", "load_conversations", "normalise_row", "row_format", "row_tools", "scan_rows",
           "split_validation", "tool_calls"]
