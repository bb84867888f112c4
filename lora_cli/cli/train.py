"""lora-train: fine-tune a LoRA/QLoRA adapter on a chat dataset."""

from __future__ import annotations

import os
import sys


def _body(argv: list[str]) -> None:
    from ..config import parse_args

    cfg = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on long runs
    from ..train import train  # heavy imports only after the arguments are known to be good

    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()

    train(cfg)


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    sys.exit(run_cli("lora-train", argv, _body))


if __name__ == "__main__":
    main()
