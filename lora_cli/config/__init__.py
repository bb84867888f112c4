"""The typed configs of the five commands: flags, YAML keys, --help text and the saved run config all come from them.

    fields.py        how a field is declared (opt, refine) and the metadata read from it (cli_only, resumable,
                     aliases, switches)
    options.py       option groups shared by several commands, declared once
    train.py         lora-train's config (TrainConfig)
    validation.py    checks on a parsed config, every problem at once, naming the flag as typed
    values.py        a YAML value or a flag's text to the field's type
    parser.py        argparse from a config class; argv (+ --config YAML) to a validated config
    runfile.py       reading --config YAML, writing the saved run config, upgrading an older one
    trainer_args.py  --trainer_args: other fields of TRL's config for --method, checked against its fields

lora-eval, lora-data, lora-merge and lora-export keep their configs beside their code (lora_cli/<command>/config.py),
composed from the same option groups."""

from __future__ import annotations

from . import trainer_args
from .fields import cli_only, fields, opt, refine, resumable, typed
from .parser import build_parser, parse_args
from .runfile import save, to_dict
from .train import LOSS_TYPES, METHODS, TrainConfig
from .validation import data_file_problem, split_list, template_problems, validate

__all__ = ["LOSS_TYPES", "METHODS", "TrainConfig", "build_parser", "cli_only", "data_file_problem", "fields", "opt",
           "parse_args", "refine", "resumable", "save", "split_list", "template_problems", "to_dict", "trainer_args",
           "typed", "validate"]
