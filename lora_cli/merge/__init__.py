"""lora-merge: fold a LoRA/QLoRA adapter into its base model, tensor by tensor, and check the result matches.

The streaming path reads the base's safetensors one tensor at a time and writes each output shard as it goes, so peak
memory is about the largest tensor plus the adapter, whatever the model's size. peft's merge_and_unload() (whole model
in memory) is used only where the streaming path cannot map the adapter onto the checkpoint.
"""

from __future__ import annotations

from .command import merge
from .config import MergeConfig

__all__ = ["MergeConfig", "merge"]
