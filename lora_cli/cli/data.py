"""lora-data: check a chat dataset and show exactly what lora-train will train on."""

from __future__ import annotations

import sys


def _body(argv: list[str]) -> None:
    from ..config import parse_args
    from ..datareport import DataConfig  # no torch here: --help and argument errors stay instant

    cfg = parse_args(argv, cls=DataConfig)
    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()
    from ..datareport import run

    run(cfg)


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    sys.exit(run_cli("lora-data", argv, _body))


if __name__ == "__main__":
    main()
