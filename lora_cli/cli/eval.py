"""lora-eval: compare a base model and LoRA adapters on held-out chat data."""

from __future__ import annotations

import sys


def _body(argv: list[str]) -> None:
    from ..config import parse_args
    from ..evaluate import EvalConfig  # no torch here: --help and argument errors stay instant

    cfg = parse_args(argv, cls=EvalConfig)
    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()
    from ..evaluate import evaluate

    evaluate(cfg)


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    sys.exit(run_cli("lora-eval", argv, _body))


if __name__ == "__main__":
    main()
