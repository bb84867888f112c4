"""The merged weights: W + scale * B @ A (DoRA-rescaled), optionally on the NF4-rounded base."""

from __future__ import annotations

from typing import Any

from ..errors import RunFailure
from ..safetensors_io import SafetensorsFolder
from .adapter_tensors import LoraModule
from .plan import Plan


def nf4_round_trip(weight: Any) -> Any:
    """The weight as QLoRA training saw it: NF4, blocksize 64, double-quantised statistics, dequantised to fp32."""
    import bitsandbytes.functional as bnbf
    import torch

    packed, state = bnbf.quantize_4bit(weight.to(torch.float32).contiguous(), blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape).to(torch.float32)


def merged_weight(weight: Any, m: LoraModule) -> Any:
    """W + scale * B @ A in fp32 (transposed for embeddings and Conv1D); DoRA rescales each output row to its
    learnt magnitude, exactly as the adapter computes it."""
    import torch

    merged = (m.B.to(torch.float32) @ m.A.to(torch.float32)).mul_(m.scale)
    if m.kind == "embedding":
        merged = merged.T
    if m.transpose:
        merged = merged.T
    merged += weight  # in place on the delta: one full-size temporary instead of two
    if m.magnitude is not None:
        rows = merged.T if m.transpose else merged  # (out, in)
        rows *= (m.magnitude.to(torch.float32) / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
    return merged


def produce_tensor(name: str, ckpt: SafetensorsFolder, plan: Plan, out_dtype: Any) -> Any:
    """One output tensor: the base tensor (or the adapter's replacement), NF4-rounded if asked, plus its LoRA."""
    import torch

    if name in plan.replacements:
        tensor = plan.replacements[name]
    else:  # an untied output embedding absent from the checkpoint starts from the weight it was tied to
        source = name if name in ckpt.where else plan.untie[name]
        tensor = ckpt.where[source].read(source)
    if name in plan.nf4:
        tensor = nf4_round_trip(tensor)
    if name in plan.weights:
        tensor = merged_weight(tensor, plan.weights[name])
    elif name in plan.biases:
        m = plan.biases[name]
        tensor = tensor.to(torch.float32) + m.scale * m.bias.to(torch.float32)
    narrowed = out_dtype == torch.float16 and tensor.dtype != torch.float16
    result = tensor.to(out_dtype)
    if (narrowed or name in plan.weights or name in plan.biases) and not torch.isfinite(result).all():
        raise RunFailure(f"{name}: the merged weight has values beyond fp16's range; use --dtype bf16 or fp32"
                         if narrowed else f"{name}: the merged weight has NaN or infinite values; the adapter is "
                                          "broken (check its training loss)")
    return result
