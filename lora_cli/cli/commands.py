"""The five commands in one table: each names its config class and the function that runs it; all share one shape
(parse and validate without torch, quiet the libraries unless --debug, then import the command and run it)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    config: str  # "module:Class" of its typed config; importing it must not import torch
    run: str  # "module:function" taking the config; imported only once the arguments are good
    before: Callable[[Any, bool], None] | None = None  # (config, own process): process set-up before the import


def _train_setup(cfg: Any, own_process: bool) -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on long runs
    if own_process:  # the lora-train command itself (lora_cli/process.py says what each setting buys)
        from ..process import lora_train_process

        lora_train_process(cfg.quantization != "none", cfg.optim)  # the collector resumes in train/run.py


COMMANDS = {
    "lora-train": Command("lora_cli.config.train:TrainConfig", "lora_cli.train:train", _train_setup),
    "lora-eval": Command("lora_cli.evaluate.config:EvalConfig", "lora_cli.evaluate:evaluate"),
    "lora-data": Command("lora_cli.datareport.config:DataConfig", "lora_cli.datareport:run"),
    "lora-merge": Command("lora_cli.merge.config:MergeConfig", "lora_cli.merge:merge"),
    "lora-export": Command("lora_cli.export.config:ExportConfig", "lora_cli.export:export"),
}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _body(prog: str, argv: list[str], own_process: bool) -> None:
    from ..config import parse_args

    command = COMMANDS[prog]
    cfg = parse_args(argv, cls=_load(command.config))
    if command.before:
        command.before(cfg, own_process)
    if not cfg.debug:
        from .common import quiet_libraries

        quiet_libraries()
    _load(command.run)(cfg)  # torch and transformers load only now, with arguments known to be good


def entry_point(prog: str) -> Callable[[list[str] | None], None]:
    """The console-script `main` of a command: exits with its status (2 usage/data, 1 runtime, 0 done)."""

    def main(argv: list[str] | None = None) -> None:
        from .common import run_cli

        own_process = argv is None  # the command line, not a caller passing arguments
        sys.exit(run_cli(prog, argv, lambda args: _body(prog, args, own_process)))

    main.__doc__ = f"{prog}: run with sys.argv[1:] (or the given argv) and exit with its status."
    return main
