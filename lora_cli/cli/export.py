"""lora-export: not built yet."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    print("lora-export: not yet available in this version of lora_cli", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
