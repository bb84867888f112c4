"""LoRA dropout on CPU: peft's nn.Dropout drawn with fewer random bits and kept smaller.

peft computes lora_B(lora_A(dropout(x))) per LoRA module; on CPU that dropout costs about a fifth of a default
training step, nearly all of it random numbers and full-size elementwise passes. Here a keep-mask element is 16
random bits compared with p (p rounded to a multiple of 1/65536: 0.05 becomes 0.0500031), four per 64-bit draw
(0.45 ms of CPU for a [400, 576] mask against 1.28 ms for fp32 uniforms and 3.0 ms for torch's dropout, measured),
and `use_cheaper_lora_dropout` runs dropout and lora_A as one autograd function: it keeps x itself (the base layer
keeps it already: no copy) and the bool mask instead of the dropped copy of x, and applies the 1 / (1 - p) scale on the
rank-r side, where it is cheap. UniformMaskDropout replaces nn.Dropout where that fusion does not apply (bf16/fp16
autocast, DoRA and other LoRA variants). On CUDA torch's fused dropout is fast and nothing changes.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from torch import nn

from .gated_mlp import product, sources_of


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """True where an element is kept, with probability 1 - p (to 1/65536), from torch's generator: runs repeat
    under the seed."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)  # all 64 bits
    return words.view(torch.int16)[:n].view(x.shape) >= -32768 + round(p * 65536)


class UniformMaskDropout(nn.Module):
    """nn.Dropout(p): each element kept with probability 1 - p and scaled by 1 / (1 - p), else zeroed; the
    identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x, self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DroppedLinear(torch.autograd.Function):
    """linear(dropout(x), weight) keeping x and a bool mask for the backward instead of the dropped copy of x; where
    x is a gated MLP's silu(gate) * up (train/gated_mlp.py), keeping gate and up instead of x (the product's own
    function keeps them already) and recomputing x in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float, gate: torch.Tensor | None = None,
                up: torch.Tensor | None = None) -> torch.Tensor:
        keep = keep_mask(x, p)
        ctx.save_for_backward(x if gate is None else None, weight, keep, gate, up)
        ctx.scale = 1.0 / (1.0 - p)
        return nn.functional.linear(x * keep, weight) * ctx.scale  # linear: the scale moves to the rank-r output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, keep, gate, up = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * keep
        if ctx.needs_input_grad[1]:
            dropped = (x if gate is None else product(gate, up)) * keep
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
        return grad_x, grad_weight, None, None, None


def _dropped_forward(p: float) -> Callable:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.linear(x, self.weight)
        return DroppedLinear.apply(x, self.weight, p, *(sources_of(x) or ()))

    return forward


def use_cheaper_lora_dropout(model: Any, fuse: bool) -> list[Callable[[], None]]:
    """Swap every LoRA module's nn.Dropout for the cheaper one (fused into lora_A where `fuse` and the adapter is
    vanilla LoRA); returns the steps that undo it. Parameters stay the same objects."""
    undo: list[Callable[[], None]] = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is not nn.Dropout or dropout.p == 0:
                continue
            lora_a = module.lora_A[name] if name in getattr(module, "lora_A", {}) else None
            vanilla = name not in getattr(module, "lora_variant", {}) and type(lora_a) is nn.Linear \
                and lora_a.bias is None
            if fuse and vanilla:
                dropouts[name] = nn.Identity()
                lora_a.forward = MethodType(_dropped_forward(dropout.p), lora_a)
                undo.append(lambda d=dropouts, n=name, o=dropout, a=lora_a: (d.__setitem__(n, o),
                                                                             a.__dict__.pop("forward", None)))
            else:
                dropouts[name] = UniformMaskDropout(dropout.p)
                undo.append(lambda d=dropouts, n=name, o=dropout: d.__setitem__(n, o))
    return undo
