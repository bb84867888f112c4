"""lora-train: fine-tune a LoRA/QLoRA adapter on a chat dataset."""

from __future__ import annotations

import os
import sys


def _body(argv: list[str], own_process: bool = False) -> None:
    from ..config import parse_args

    cfg = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on long runs
    if own_process:  # the lora-train command itself: nothing else in this process will want bitsandbytes
        from ..train.optimizer import hide_unused_bitsandbytes

        hide_unused_bitsandbytes(cfg.quantization != "none", cfg.optim)
    from ..train import train  # heavy imports only after the arguments are known to be good

    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()

    train(cfg)


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    own_process = argv is None  # the command line, not a caller passing arguments
    sys.exit(run_cli("lora-train", argv, lambda args: _body(args, own_process)))


if __name__ == "__main__":
    main()
