"""Tokenizer files that load everywhere, not only in the transformers that wrote them.

transformers 5 writes "tokenizer_class": "TokenizersBackend", a class transformers 4.x does not have (vLLM up to
0.19, llama.cpp's converter environment and older mlx-lm run on 4.x and refuse the folder), and keeps the chat
template only in chat_template.jinja, which TGI does not read. Every tokenizer lora_cli saves (adapters,
checkpoints, merged models, converted GGUF models) goes through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fsutil import atomic_write

CONFIG = "tokenizer_config.json"
PORTABLE_CLASS = "PreTrainedTokenizerFast"  # reads tokenizer.json as it is, in transformers 4.x and 5.x alike
UNPORTABLE_CLASSES = ("TokenizersBackend",)


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    make_portable(Path(folder))


def make_portable(folder: Path) -> None:
    """Rewrite a saved tokenizer_config.json: a class every transformers has, and the chat template in it too."""
    path = folder / CONFIG
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    if config.get("tokenizer_class") in UNPORTABLE_CLASSES:
        config["tokenizer_class"] = PORTABLE_CLASS
        changed = True
    template = folder / "chat_template.jinja"
    if "chat_template" not in config and template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
        changed = True
    if changed:
        atomic_write(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
