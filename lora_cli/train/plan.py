"""The shape of each optimizer step (micro-batch, accumulation, padding-free, gradient checkpointing), decided once so
that --dry_run estimates exactly the run that training would do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig
from ..encode import EncodeStats


@dataclass(frozen=True)
class StepPlan:
    """How each optimizer step of --batch_size x --gradient_accumulation_steps conversations is run."""

    micro_batch: int  # conversations per forward pass
    accumulation: int  # forward passes per optimizer step
    padding_free: bool  # one row per micro-batch, position ids restarting per conversation
    seq_len: int  # the longest sequence a micro-batch may hold
    gradient_checkpointing: bool
    sequences_per_row: int = 1  # preference pairs: the chosen and the rejected answer each make a sequence
    reference_forward: bool = False  # dpo/kto: a no-grad forward of the reference model per micro-batch

    def describe(self, per_sequence: bool = False) -> str:
        batches = f"{self.accumulation} {'padding-free' if self.padding_free else 'padded'} micro-batch"
        return (f"{self.micro_batch * self.accumulation} conversations in {batches}"
                f"{'es' if self.accumulation > 1 else ''} of {self.micro_batch}"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}"
                f"{', sdpa per conversation' if per_sequence else ''}")


def quantization(cfg: TrainConfig) -> str | None:
    return None if cfg.quantization == "none" else cfg.quantization


def step_plan(cfg: TrainConfig, model: Any, precision: str, stats: EncodeStats) -> StepPlan:
    """The plan of each optimizer step; one function, so that --dry_run estimates exactly the run training does."""
    longest = cfg.max_seq_length if cfg.streaming else stats.longest  # a stream's rows are not known in advance
    micro, accumulation, padding_free = micro_batching(cfg, longest)
    seq_len = cfg.max_seq_length if cfg.packing else min(longest, cfg.max_seq_length)
    checkpointing = decide_gradient_checkpointing(cfg, model, precision, micro, seq_len)
    return StepPlan(micro, accumulation, padding_free, seq_len, checkpointing)


def micro_batching(cfg: TrainConfig, longest: int) -> tuple[int, int, bool]:
    """(micro-batch, accumulation steps, padding-free): the effective batch of --batch_size x
    --gradient_accumulation_steps conversations, regrouped into the fewest padding-free micro-batches whose longest
    possible size fits --tokens_per_batch. Same conversations per optimizer step, far fewer forward passes."""
    if cfg.packing:  # packed rows are already full sequences of --max_seq_length tokens
        return cfg.batch_size, cfg.gradient_accumulation_steps, True
    if cfg.tokens_per_batch == 0:
        return cfg.batch_size, cfg.gradient_accumulation_steps, False
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    fit = max(1, cfg.tokens_per_batch // max(1, min(longest, cfg.max_seq_length)))
    micro = max(d for d in range(1, effective + 1) if effective % d == 0 and d <= fit)
    return micro, effective // micro, True


def decide_gradient_checkpointing(cfg: TrainConfig, model: Any, precision: str, micro: int, seq_len: int) -> bool:
    """--gradient_checkpointing as given; else on only where memory needs it (never on CPU, where it costs time)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if not cuda_available():
        return False
    import torch

    from .. import estimate

    without = estimate.estimate(model, precision=precision, quantization=quantization(cfg), optim=cfg.optim,
                                batch_size=micro, seq_len=seq_len, gradient_checkpointing=False)
    free, _ = torch.cuda.mem_get_info()
    return without.total > 0.8 * (free + torch.cuda.memory_allocated())  # the weights already on the GPU count too


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
