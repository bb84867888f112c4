"""The data cache keys on lora_cli.encode.ENCODING_VERSION instead of on the encoding code's text. This test is what
makes that safe: fixed conversations encoded with real tokenizers must give exactly the recorded ids, labels and
fates. If it fails, the encoding changed: bump ENCODING_VERSION (so no cached rows of the old encoding are reused)
and regenerate the golden file:

    LORA_CLI_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_encoding.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lora_cli.data import Conversation
from lora_cli.encode import ENCODING_VERSION, encode_row

GOLDEN = Path(__file__).parent / "golden" / "encoding.json"
REGENERATE = os.environ.get("LORA_CLI_REGENERATE_GOLDEN") == "1"

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    "system, two turns": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}],
    "tool call and result": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "{\"temp\": -3}"},
        {"role": "assistant", "content": "It is -3 degrees in Oslo."}],
}
# (tokenizer, settings): the real families the masking tests use, plus a cut by --truncation truncate.
CASES = {
    "qwen3": {"max_seq_length": 2048, "truncation": "drop", "train_on_inputs": False},
    "llama3_1": {"max_seq_length": 2048, "truncation": "drop", "train_on_inputs": False},
    "qwen3 truncated at 24": {"max_seq_length": 24, "truncation": "truncate", "train_on_inputs": False},
    "llama3_1 train_on_inputs": {"max_seq_length": 2048, "truncation": "drop", "train_on_inputs": True},
}


def _tokenizer(family: str):
    from .test_templates import real_tokenizer

    return real_tokenizer(family)


def _encode_all() -> dict:
    out = {}
    for case, settings in CASES.items():
        tokenizer = _tokenizer(case.split()[0])
        for name, messages in CONVERSATIONS.items():
            tools = TOOLS if any(m.get("tool_calls") for m in messages) else None
            if tools and not case.startswith("qwen3"):  # the llama3_1 package's template renders no tools
                continue
            enc = encode_row(tokenizer, Conversation(messages, f"golden:{name}", tools), **settings)
            out[f"{case} / {name}"] = {"fate": enc.fate, "input_ids": enc.input_ids, "labels": enc.labels,
                                       "full_input_ids": enc.full.input_ids, "full_labels": enc.full.labels}
    return out


def test_encoding_matches_the_golden_file_for_this_encoding_version():
    got = _encode_all()
    if REGENERATE:
        GOLDEN.write_text(json.dumps({"encoding_version": ENCODING_VERSION, "cases": got}, indent=1) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in got.keys() | golden["cases"].keys() if got.get(k) != golden["cases"].get(k))
    if changed:
        assert golden["encoding_version"] != ENCODING_VERSION, (
            f"encoding changed ({', '.join(changed)}) but ENCODING_VERSION is still {ENCODING_VERSION}: bump it in "
            "lora_cli/encode.py (the data cache would reuse rows of the old encoding) and regenerate with "
            "LORA_CLI_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_encoding.py")
        pytest.fail(f"ENCODING_VERSION was bumped to {ENCODING_VERSION}: regenerate {GOLDEN.name} with "
                    "LORA_CLI_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_encoding.py")
    assert golden["encoding_version"] == ENCODING_VERSION, (
        f"{GOLDEN.name} was recorded for ENCODING_VERSION {golden['encoding_version']}: regenerate it")
