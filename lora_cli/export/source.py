"""The model folder to export: its config, architecture and safetensors tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import integrity
from ..errors import UsageError
from ..safetensors_io import SafetensorsFolder, shard_names

log = logging.getLogger("lora_cli")


@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name
    # HF rotates the two halves of each head (NeoX style); llama.cpp's llama graph rotates adjacent pairs, so q/k rows
    # are reordered on the way. Its qwen2 graph uses the NeoX layout itself.
    permute_qk: bool
    display: str


ARCHS = {"llama": Arch("llama", True, "Llama (incl. SmolLM)"), "mistral": Arch("llama", True, "Mistral"),
         "qwen2": Arch("qwen2", False, "Qwen2")}
SUPPORTED = ", ".join(f"{a.display} [{name}]" for name, a in ARCHS.items())



@dataclass
class Source:
    folder: Path
    config: Any  # transformers PretrainedConfig
    arch: Arch
    weights: SafetensorsFolder

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def rope(self) -> tuple[float, str]:
        """(rope theta, rope type), from transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
        c = self.config
        params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        theta = params.get("rope_theta", getattr(c, "rope_theta", None)) or 10000.0
        return float(theta), params.get("rope_type") or params.get("type") or "default"


def open_source(folder: Path) -> Source:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    names = shard_names(folder, "MODEL_DIR")
    if names is None:  # model_dir_problems() checked the files; they went away since
        raise UsageError(f"MODEL_DIR {folder}: no safetensors weights")
    integrity.require_intact(folder, f"MODEL_DIR {folder}", "merge or copy the model again", names=names)
    source = Source(folder, config, ARCHS[config.model_type], SafetensorsFolder.open(folder, "MODEL_DIR"))
    rope_type = source.rope()[1]
    if rope_type != "default":
        raise UsageError(f"MODEL_DIR {folder}: rope scaling {rope_type!r} is not supported by lora-export yet (only "
                         "plain RoPE)")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        log.warning("the model attends over a sliding window of %d tokens, which llama.cpp's %s graph does not: "
                    "outputs match only while the context is shorter", window, source.arch.gguf)
    return source
