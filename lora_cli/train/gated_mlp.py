"""The gated MLP's activations kept smaller on CPU: silu(gate) * up as one autograd function.

Llama-family MLPs compute down(silu(gate(x)) * up(x)). Autograd keeps gate(x), up(x) and silu(gate(x)) for the
product's backward, and down_proj's LoRA keeps the product: four [tokens x intermediate] tensors per layer, about half
of a training step's activations (measured on the demo model: 29 of 47 KiB per token and layer). SiluProduct keeps
only gate(x) and up(x) and recomputes silu in its backward; where down_proj's LoRA dropout is fused with lora_A
(train/dropout.py), that function keeps the same two tensors instead of the product and recomputes it too. Two of the
four are gone for one or two elementwise passes per layer in the backward; outputs and gradients are unchanged up to
float rounding. Each MLP class is checked against its own forward before it is swapped.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from torch import nn

# The product being passed to down_proj right now, and the two tensors it was made from (DroppedLinear reads it).
_current: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []


def product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate).mul_(up)


class SiluProduct(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for the backward but not silu(gate)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return product(gate, up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def sources_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate, up) when x is the product down_proj is being called with, else None."""
    if _current and _current[-1][0] is x:
        return _current[-1][1], _current[-1][2]
    return None


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = SiluProduct.apply(gate, up)
    _current.append((h, gate, up))
    try:
        return self.down_proj(h)
    finally:
        _current.pop()


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _same_as_own_forward(mlp: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the swapped forward gives this module's own output (eval mode, no dropout) on a random input."""
    was_training = mlp.training
    mlp.eval()
    try:
        with torch.no_grad():
            param = next(mlp.parameters())
            x = torch.randn(1, 3, mlp.gate_proj.in_features, dtype=dtype, device=param.device)
            return torch.allclose(type(mlp).forward(mlp, x), _forward(mlp, x), rtol=1e-3, atol=1e-5)
    except Exception:  # anything unexpected about this module: leave it as it is
        return False
    finally:
        mlp.train(was_training)


def use_silu_product(model: Any) -> list[Callable[[], None]]:
    """Swap the forward of every gated SiLU MLP (gate_proj, up_proj, down_proj, SiLU act_fn) whose class passes the
    check against its own forward; returns the steps that undo it."""
    dtype = model.get_input_embeddings().weight.dtype
    undo: list[Callable[[], None]] = []
    checked: dict[type, bool] = {}
    for module in model.modules():
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) \
                or not _is_silu(getattr(module, "act_fn", None)):
            continue
        if type(module) not in checked:
            checked[type(module)] = _same_as_own_forward(module, dtype)
        if checked[type(module)]:
            module.forward = MethodType(_forward, module)
            undo.append(lambda m=module: m.__dict__.pop("forward", None))
    return undo
