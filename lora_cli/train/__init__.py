"""lora-train as a package: command (the story), dataset, plan, adapter, trainer, run."""

from .adapter import attach_lora, training_only
from .command import train
from .dataset import Prepared, prepare
from .plan import StepPlan, micro_batching, step_plan
from .trainer import build_trainer

__all__ = ["Prepared", "StepPlan", "attach_lora", "build_trainer", "micro_batching", "prepare", "step_plan", "train",
           "training_only"]
