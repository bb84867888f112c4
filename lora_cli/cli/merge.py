"""lora-merge: not built yet (see the project's issues)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    print("lora-merge: not yet available in this version of lora_cli; it is planned (see README, 'Roadmap')",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
