"""Which base tensor each adapter tensor changes, and whether the streaming merge can apply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..adapters import Adapter
from ..errors import UsageError
from ..safetensors_io import SafetensorsFolder
from .adapter_tensors import AdapterTensors, LoraModule

# peft features whose merge the streaming path does not reimplement: peft's own merge handles them.
PEFT_ONLY_FEATURES = ("layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                      "use_bdlora", "arrow_config")


@dataclass
class Plan:
    streaming: bool
    reason: str = ""  # why peft's merge is used instead of streaming
    weights: dict[str, LoraModule] = field(default_factory=dict)  # base weight name -> its LoRA
    biases: dict[str, LoraModule] = field(default_factory=dict)  # base bias name -> its LoRA (lora_bias)
    replacements: dict[str, Any] = field(default_factory=dict)
    untie: dict[str, str] = field(default_factory=dict)  # tied name -> source, when the adapter splits the pair
    nf4: set[str] = field(default_factory=set)  # base weights rounded through NF4 (--simulate_nf4)


def plan_merge(adapter: Adapter, parsed: AdapterTensors, ckpt: SafetensorsFolder | None, skeleton: Any,
               simulate_nf4: bool) -> Plan:
    """Map every adapter tensor onto a base tensor, check shapes, and decide between streaming and peft's merge.

    Adapter modules that the base model does not have, and shapes that differ, are errors (exit 2)."""
    modules = dict(skeleton.named_modules())
    unknown = [m for m in parsed.modules if m not in modules]
    unknown += [n for n in parsed.replacements if n.rsplit(".", 1)[0] not in modules]
    if unknown:
        raise UsageError(f"ADAPTER_DIR {adapter.path}: {len(unknown)} adapter module(s) match nothing in the base "
                         f"model (e.g. {unknown[0]}): it was trained on another model; pass that one as --base_model")
    _set_layer_kinds(parsed, modules)
    _check_shapes(adapter, parsed, skeleton)
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    touched = parsed.touched
    untie = {t: s for t, s in tied.items() if t in touched or s in touched}
    nf4 = {f"{name}.weight" for name in nf4_module_names(skeleton)} if simulate_nf4 else set()
    plan = Plan(streaming=True, untie=untie, nf4=nf4, replacements=parsed.replacements)
    for m in parsed.modules.values():
        plan.weights[f"{m.name}.weight"] = m
        if m.bias is not None:
            plan.biases[f"{m.name}.bias"] = m
    plan.reason = _streaming_obstacle(adapter, parsed, ckpt, plan, tied)
    plan.streaming = not plan.reason
    return plan


def _check_shapes(adapter: Adapter, parsed: AdapterTensors, skeleton: Any) -> None:
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    wrong = []
    for m in parsed.modules.values():
        weight = params.get(f"{m.name}.weight")
        if weight is None:
            continue
        expected = tuple(weight.shape)
        got = m.delta_shape()[::-1] if m.transpose else m.delta_shape()
        if expected != got or m.A.shape[0] != m.B.shape[1]:
            wrong.append(f"{m.name}: base weight {list(expected)}, adapter "
                         f"A {list(m.A.shape)} B {list(m.B.shape)}")
        elif m.bias is not None and params.get(f"{m.name}.bias") is None:
            raise UsageError(f"ADAPTER_DIR {adapter.path}: {m.name} has a LoRA bias (lora_bias) but the base layer "
                             "has no bias to merge it into")
    for name, tensor in parsed.replacements.items():
        if name in params and tuple(params[name].shape) != tuple(tensor.shape):
            wrong.append(f"{name}: base {list(params[name].shape)}, adapter {list(tensor.shape)}")
    if wrong:
        raise UsageError(f"ADAPTER_DIR {adapter.path}: shapes differ from the base model in {len(wrong)} place(s), "
                         f"e.g. {wrong[0]}: the adapter was trained on another model; pass that one as --base_model")


def _set_layer_kinds(parsed: AdapterTensors, modules: dict[str, Any]) -> None:
    """Note Conv1D layers (weights stored transposed); LoRA on other layer types is left to peft's merge."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for m in list(parsed.modules.values()):
        layer = modules[m.name]
        if isinstance(layer, Conv1D):
            m.transpose = True  # peft sets fan_in_fan_out for these whatever the config says
        elif isinstance(layer, torch.nn.Embedding) != (m.kind == "embedding") or \
                not isinstance(layer, (torch.nn.Linear, torch.nn.Embedding)):
            parsed.unsupported.append(f"{m.name} (LoRA on a {type(layer).__name__} layer)")
            del parsed.modules[m.name]


def _streaming_obstacle(adapter: Adapter, parsed: AdapterTensors, ckpt: SafetensorsFolder | None, plan: Plan,
                        tied: dict[str, str]) -> str:
    """Why the streaming merge cannot apply (empty when it can)."""
    if ckpt is None:
        return "the base has no safetensors weights"
    if adapter.base_modifying_init:
        return f"the adapter is saved on the base its initialisation ({adapter.base_modifying_init}) modified"
    features = [f for f in PEFT_ONLY_FEATURES if adapter.peft_config.get(f)]
    if features:
        return f"the adapter uses {', '.join(features)}"
    if parsed.unsupported:
        return f"the adapter has parts only peft can merge ({parsed.unsupported[0]})"
    if any(m.magnitude is not None and m.kind == "embedding" for m in parsed.modules.values()):
        return "the adapter uses DoRA on an embedding"
    needed = set(plan.weights) | set(plan.biases) | set(plan.replacements) | set(plan.nf4)
    absent = sorted(n for n in needed if n not in ckpt.where and not (n in tied and tied[n] in ckpt.where))
    if absent:
        return f"the checkpoint's tensor names differ from the model's (no {absent[0]})"
    return ""


def nf4_module_names(skeleton: Any) -> set[str]:
    """The modules transformers loads as 4-bit layers for QLoRA: plain Linear (and Conv1D) layers outside its skip
    list (output embeddings, tied weights, modules the model keeps in fp32)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    except (ImportError, AttributeError):  # older/newer transformers: the output embeddings are the known skip
        output = skeleton.get_output_embeddings()
        skip = [name for name, module in skeleton.named_modules() if module is output]

        def should_convert_module(name: str, patterns: list[str]) -> bool:
            return not any(name == p or name.endswith("." + p) for p in patterns)
    return {name for name, module in skeleton.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)}
