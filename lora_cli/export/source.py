"""The model folder to export: its config, architecture and safetensors tensors."""

from __future__ import annotations

import logging
import math
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
    norm_shift: float = 0.0  # Gemma's RMSNorm scales by (1 + weight); llama.cpp's by the weight, written shifted


ARCHS = {"llama": Arch("llama", True, "Llama 2/3.x (incl. SmolLM)"), "mistral": Arch("llama", True, "Mistral"),
         "qwen2": Arch("qwen2", False, "Qwen2/2.5"), "qwen3": Arch("qwen3", False, "Qwen3"),
         # fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they are (gate half first)
         "phi3": Arch("phi3", False, "Phi-3"),
         "gemma2": Arch("gemma2", False, "Gemma 2", norm_shift=1.0),
         "gemma3_text": Arch("gemma3", False, "Gemma 3 (text-only, e.g. 270M/1B)", norm_shift=1.0)}
GEMMA = ("gemma2", "gemma3")
# RoPE variants llama.cpp reproduces from what lora-export writes: plain, and Llama 3.1's frequency-dependent
# scaling (written as a rope_freqs tensor of per-frequency divisors, as llama.cpp's converter does).
ROPE_TYPES = ("default", "llama3")
# ... and, for the phi3 graph, Phi-3's LongRoPE (128k models): per-frequency divisors for short and long contexts
# (rope_factors_short/long tensors, as llama.cpp's converter writes them) and a factor on cos/sin
ARCH_ROPE_TYPES = {"phi3": ("longrope",)}
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

    def rope_parameters(self, layer_type: str = "full_attention") -> dict:
        """transformers 5's rope_parameters, or the older rope_scaling (rope_theta beside it); for models whose
        sliding-window and full-attention layers rotate differently (Gemma 3), those of `layer_type`."""
        c = self.config
        params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        return params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params

    def rope(self, layer_type: str = "full_attention") -> tuple[float, str]:
        """(rope theta, rope type) of the full-attention layers, or of those of `layer_type`."""
        params = self.rope_parameters(layer_type)
        theta = params.get("rope_theta", getattr(self.config, "rope_theta", None)) or 10000.0
        return float(theta), params.get("rope_type") or params.get("type") or "default"

    def longrope(self) -> tuple[Any, Any, float, int]:
        """Phi-3's LongRoPE as transformers computes it: the per-frequency divisors for sequences up to the original
        context (short) and beyond it (long), the factor on cos/sin, and the original context length."""
        import numpy as np

        p = self.rope_parameters()
        original = p.get("original_max_position_embeddings") or self.config.original_max_position_embeddings
        factor = p.get("factor") or self.config.max_position_embeddings / original
        attention = p.get("attention_factor") or \
            (math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0)
        return (np.asarray(p["short_factor"], dtype=np.float32), np.asarray(p["long_factor"], dtype=np.float32),
                float(attention), int(original))

    def rope_freq_divisors(self) -> Any:
        """Llama 3.1's RoPE scaling as llama.cpp applies it: each rotary frequency is divided by its factor, 1 for
        wavelengths shorter than the original context / high_freq_factor, `factor` for those longer than it /
        low_freq_factor, and a smooth blend between (Meta's published formula, as transformers computes it)."""
        import numpy as np

        p, (theta, _) = self.rope_parameters(), self.rope()
        factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
        original = p.get("original_max_position_embeddings", 8192)
        freqs = 1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        wavelen = 2 * math.pi / freqs
        smooth = (original / wavelen - low) / (high - low)
        divisors = 1.0 / ((1 - smooth) / factor + smooth)
        divisors = np.where(wavelen < original / high, 1.0, divisors)
        divisors = np.where(wavelen > original / low, factor, divisors)
        return divisors.astype(np.float32)


def open_source(folder: Path) -> Source:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    names = shard_names(folder, "MODEL_DIR")
    if names is None:  # model_dir_problems() checked the files; they went away since
        raise UsageError(f"MODEL_DIR {folder}: no safetensors weights")
    integrity.require_intact(folder, f"MODEL_DIR {folder}", "merge or copy the model again", names=names)
    source = Source(folder, config, ARCHS[config.model_type], SafetensorsFolder.open(folder, "MODEL_DIR"))
    rope_type = source.rope()[1]
    if rope_type not in ROPE_TYPES + ARCH_ROPE_TYPES.get(source.arch.gguf, ()):
        raise UsageError(f"MODEL_DIR {folder}: rope scaling {rope_type!r} is not supported by lora-export yet (plain "
                         "RoPE, Llama 3.1's 'llama3' scaling and Phi-3's 'longrope' are)")
    if source.arch.gguf in GEMMA:
        check_gemma(source)
    partial = source.rope_parameters().get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if (partial or 1.0) != 1.0:  # transformers 5 keeps it in rope_parameters, older configs beside them
        raise UsageError(f"MODEL_DIR {folder}: rotary embeddings on part of each head (partial_rotary_factor "
                         f"{partial}, e.g. Phi-4-mini) are not supported by lora-export yet")
    window = getattr(config, "sliding_window", None)
    if window and source.arch.gguf not in GEMMA and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        log.warning("the model attends over a sliding window of %d tokens, which llama.cpp's %s graph does not: "
                    "outputs match only while the context is shorter", window, source.arch.gguf)
    return source


def check_gemma(source: Source) -> None:
    """What llama.cpp's Gemma graphs fix that a config could set otherwise: the attention scale (1/sqrt(head_dim),
    or 1/sqrt(hidden/heads) for the 62-layer 27B), and Gemma 3 without attention-logit soft-capping."""
    c = source.config
    expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else source.head_dim
    scalar = getattr(c, "query_pre_attn_scalar", expected)
    if scalar != expected:
        raise UsageError(f"MODEL_DIR {source.folder}: query_pre_attn_scalar {scalar} differs from the {expected} "
                         f"llama.cpp's {source.arch.gguf} graph scales attention by; lora-export cannot write it")
    if source.arch.gguf == "gemma3" and getattr(c, "attn_logit_softcapping", None):
        raise UsageError(f"MODEL_DIR {source.folder}: attention-logit soft-capping, which llama.cpp's gemma3 graph "
                         "does not apply")
