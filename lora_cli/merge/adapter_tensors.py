"""The adapter's saved tensors grouped by module, each with its scale: what the merge adds to the base."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..adapters import Adapter

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    A: Any = None  # (r, in) for Linear; (r, num_embeddings) for Embedding
    B: Any = None  # (out, r); (embedding_dim, r)
    scale: float = 1.0
    kind: str = "linear"  # linear | embedding
    bias: Any = None  # lora_B bias (lora_bias=True), added to the base bias
    magnitude: Any = None  # DoRA magnitude vector, one value per output row
    transpose: bool = False  # Conv1D (GPT-2 style) stores its weight as (in, out)

    def delta_shape(self) -> tuple[int, int]:
        """The shape of the base weight this module's delta has (before any Conv1D transpose)."""
        if self.kind == "embedding":
            return self.A.shape[1], self.B.shape[0]
        return self.B.shape[0], self.A.shape[1]


@dataclass
class AdapterTensors:
    modules: dict[str, LoraModule]  # by module name
    replacements: dict[str, Any]  # base tensor name -> tensor saved whole with the adapter (modules_to_save)
    unsupported: list[str]  # adapter keys the streaming merge does not apply

    @property
    def touched(self) -> set[str]:
        """Base tensor names the adapter changes."""
        names = set(self.replacements)
        for m in self.modules.values():
            names.add(f"{m.name}.weight")
            if m.bias is not None:
                names.add(f"{m.name}.bias")
        return names


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


def parse_adapter(adapter: Adapter, weights: dict[str, Any]) -> AdapterTensors:
    """Group peft's saved tensors by module and work out each module's scale (alpha / r, or / sqrt(r) for rsLoRA)."""
    cfg = adapter.peft_config
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, Any] = {}
    unsupported: list[str] = []
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        lora, base_layer = _LORA_KEY.match(name), _BASE_LAYER_KEY.match(name)
        if lora:
            m = modules.setdefault(lora["module"], LoraModule(lora["module"]))
            part = lora["part"]
            if part.startswith("lora_magnitude_vector"):
                m.magnitude = tensor
            elif part == "lora_B.bias":
                m.bias = tensor
            else:
                setattr(m, "A" if part in ("lora_A.weight", "lora_embedding_A") else "B", tensor)
                if part.startswith("lora_embedding"):
                    m.kind = "embedding"
        elif base_layer:
            # peft saves an embedding's base weight next to its LoRA; loading the adapter puts it in the base.
            replacements[f"{base_layer['module']}.{base_layer['param']}"] = tensor
        elif "lora_" in name or "token_adapter" in name or "trainable_tokens" in name:
            unsupported.append(key)
        else:  # modules_to_save: the trained copy of a whole module
            replacements[name] = tensor
    for m in list(modules.values()):
        if m.A is None or m.B is None or m.A.dim() != 2:
            unsupported.append(f"{m.name} (LoRA on a layer that is not Linear or Embedding)")
            del modules[m.name]
            continue
        r = m.A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, m.name, cfg.get("lora_alpha", 8))
        m.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return AdapterTensors(modules, replacements, unsupported)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank/alpha patterns: a key matches a module name at a dot boundary, as a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
