"""lora-merge: merge a LoRA/QLoRA adapter into its base model and check the result against base+adapter."""

from __future__ import annotations

import sys


def _body(argv: list[str]) -> None:
    from ..config import parse_args
    from ..merge import MergeConfig

    cfg = parse_args(argv, cls=MergeConfig)
    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()
    from ..merge import merge  # torch and transformers load only once the arguments are known to be good

    merge(cfg)


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    sys.exit(run_cli("lora-merge", argv, _body))


if __name__ == "__main__":
    main()
