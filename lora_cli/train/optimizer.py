"""Which optimizer a run uses on the machine at hand, and whether the process needs bitsandbytes at all."""

from __future__ import annotations

import sys

# bitsandbytes' paged 32-bit AdamW (train_lora.py's default, kept as ours): paging moves optimizer state between GPU
# and CPU memory; without CUDA bitsandbytes falls back to its plain 32-bit AdamW, the same updates as torch's.
PAGED_ADAMW_32BIT = ("paged_adamw_32bit", "paged_adamw")
# transformers optimizers that need no bitsandbytes (OptimizerNames); any other may.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def optimizer_name(requested: str, cuda: bool) -> str:
    """--optim as given, except bitsandbytes' paged 32-bit AdamW on a machine without CUDA: torch's AdamW, whose
    updates are the same (tests/test_train.py compares them) and which needs no bitsandbytes."""
    return "adamw_torch" if requested in PAGED_ADAMW_32BIT and not cuda else requested


def hide_unused_bitsandbytes(quantized: bool, optim: str) -> bool:
    """For a lora-train process of its own (not a library caller): when neither the base model nor the optimizer
    uses bitsandbytes, keep it from being imported. transformers and peft import it whenever it is installed, and
    its import compiles kernels with torch.compile: measured here 0.65 s of start-up and 70 MB of memory."""
    import torch  # needed anyway; tells whether the optimizer resolves to a bitsandbytes one

    if quantized or optimizer_name(optim, torch.cuda.is_available()) not in TORCH_OPTIMIZERS:
        return False
    if any(name in sys.modules for name in ("bitsandbytes", "peft", "transformers.trainer")):
        return False  # already imported, or its availability already looked up: too late to hide it
    sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError; find_spec says it is absent
    return True
