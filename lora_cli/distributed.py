"""Where this process stands in a torchrun / accelerate launch, read from the environment the launcher sets.

Read before torch.distributed is initialised (output folders are checked before any model loads), so from the
launcher's variables rather than from torch.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's GPU on its machine."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Processes in the launch; 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a single process, and in the first process of a torchrun/accelerate launch."""
    return rank() == 0


def uses_fsdp() -> bool:
    """accelerate launch with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
