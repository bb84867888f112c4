"""lora-export: convert a merged model to a GGUF file (llama.cpp, Ollama, LM Studio) and check it loads back."""

from __future__ import annotations

import sys


def _body(argv: list[str]) -> None:
    from ..config import parse_args
    from ..export import ExportConfig

    cfg = parse_args(argv, cls=ExportConfig)
    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()
    from ..export import export  # torch, transformers and gguf load only once the arguments are known to be good

    export(cfg)


def main(argv: list[str] | None = None) -> None:
    from .common import run_cli

    sys.exit(run_cli("lora-export", argv, _body))


if __name__ == "__main__":
    main()
