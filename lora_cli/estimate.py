"""--dry_run: parameter counts and a GPU memory estimate, from the model's config alone (no weights are loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
RUNTIME_OVERHEAD = int(0.75 * GIB)  # CUDA context, allocator slack, kernels' workspaces


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    weights: int  # bytes of the frozen base weights
    adapter_and_optimizer: int  # trainable weights + gradients + optimizer states
    activations: int
    logits: int
    overhead: int = RUNTIME_OVERHEAD
    reference: int = 0  # dpo/kto: the reference model's no-grad forward, one layer's activations and its logits


    @property
    def total(self) -> int:
        return (self.weights + self.adapter_and_optimizer + self.activations + self.logits + self.reference
                + self.overhead)

    def lines(self) -> list[str]:
        rows = [("base weights", self.weights), ("adapter + gradients + optimizer", self.adapter_and_optimizer),
                ("activations", self.activations), ("logits at trained positions (fp32)", self.logits),
                ("CUDA context and allocator slack", self.overhead)]
        if self.reference:
            rows.insert(4, ("reference forward (no grad)", self.reference))
        return [f"  {name:<34} {size / GIB:7.2f} GiB" for name, size in rows] + [
            f"  {'total (estimate, +-30%)':<34} {self.total / GIB:7.2f} GiB"]


def estimate(model: Any, *, precision: str, quantization: str | None, optim: str, batch_size: int,
             seq_len: int, gradient_checkpointing: bool, trained_fraction: float = 1.0,
             reference_forward: bool = False) -> Estimate:
    """Memory of one training step on one GPU for a (meta) PeftModel with LoRA attached."""
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    vocab = config.vocab_size
    act_bytes = 4 if precision == "fp32" else 2
    total = trainable = weights = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
            continue
        in_layer_linear = param.dim() == 2 and ".layers." in name  # what bitsandbytes quantises
        if quantization == "4bit" and in_layer_linear:
            weights += int(n * 0.53)  # 4 bits + double-quantised block constants
        elif quantization == "8bit" and in_layer_linear:
            weights += int(n * 1.02)
        else:
            weights += n * act_bytes
    state_bytes = 2 if "8bit" in optim else 8  # two Adam moments
    adapter_and_optimizer = trainable * (4 + 4 + state_bytes)  # LoRA weights and gradients are kept in fp32
    tokens = batch_size * seq_len
    # Saved per token and layer: attention inputs/outputs and q/k/v (~8 x hidden), MLP gate/up/act/down (~4 x inter).
    per_layer = tokens * (8 * hidden + 4 * intermediate) * act_bytes
    activations = (tokens * hidden * act_bytes * layers + per_layer if gradient_checkpointing
                   else per_layer * layers)
    # TRL's fused LM head projects only the positions in the loss (in tiles), never the whole batch's logits.
    logits = int(tokens * trained_fraction * vocab * 4 * 2)
    # No graph is kept: one layer's activations at a time, then the logits of the scored positions.
    reference = per_layer + logits // 2 if reference_forward else 0
    return Estimate(total, trainable, weights, adapter_and_optimizer, activations, logits, reference=reference)
