"""lora-export: a merged Hugging Face model to one GGUF file for llama.cpp, Ollama and LM Studio, checked by loading
it back.

Weights stream from the safetensors into the GGUF one tensor at a time, so memory stays near the largest tensor. The
tokenizer (vocabulary, merges, pre-tokenizer, special tokens, BOS/EOS behaviour) and the chat template go into the
GGUF metadata under llama.cpp's key names. With --ollama the chat template is also translated into a Modelfile
TEMPLATE in Go template syntax: probe conversations with sentinel contents are rendered with the Jinja template, the
text around each sentinel gives the role prefixes and suffixes, and the translation is accepted only if it renders
the same text as the Jinja template.
"""

from __future__ import annotations

from .command import export
from .config import ExportConfig

__all__ = ["ExportConfig", "export"]
