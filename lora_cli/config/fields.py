"""How a config field is declared: its default, --help text, help group and the metadata the code reads from it.

Every command's config is a dataclass of such fields; flags, YAML keys, --help and the saved run config all come
from them (lora_cli/config/parser.py, lora_cli/config/runfile.py)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, *, group: str, choices: tuple[str, ...] | None = None, metavar: str | None = None,
        positional: bool = False, repeatable: bool = False, cli_only: bool = False, resumable: bool = False,
        aliases: tuple[str, ...] = (), switches: dict[str, tuple[str, str]] | None = None):
    """A config field: its default, its --help text, its help group, the allowed values (for strings), whether
    it is given by position (lora-merge ADAPTER_DIR OUT_DIR) rather than as --name, and whether a string flag may be
    given several times (the values are joined with commas, as a comma-separated list would be).

    cli_only: the flag steers the command itself (--config, --resume, --debug): never a YAML key nor saved in the
    run config. resumable: the value may change between a run and its --resume without changing what is learned.

    aliases: other names of the same flag and YAML key (the names users bring from TRL and transformers).
    switches: on/off flags that set a choice field, {name: (on, off)}: --name sets `on`, --no-name sets `off`
    (--load_in_4bit is --quantization 4bit, --no-load_in_4bit is --quantization none); also YAML keys.

    A bool field whose default is None is three-state: --name, --no-name, or not given (None: decided later)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "metavar": metavar,
                                            "positional": positional, "repeatable": repeatable,
                                            "cli_only": cli_only, "resumable": resumable, "aliases": aliases,
                                            "switches": switches or {}})


def refine(owner: type, name: str, *, default: Any = dataclasses.MISSING, note: str = "",
           choices: tuple[str, ...] | None = None):
    """A shared option as one command uses it: the declaration of `name` in the option group `owner`, with this
    command's default and a sentence appended to its help (what an empty value means here, say)."""
    base = owner.__dataclass_fields__[name]
    meta = dict(base.metadata)
    if note:
        meta["help"] = f"{meta['help']} {note}"
    if choices is not None:
        meta["choices"] = choices
    return field(default=base.default if default is dataclasses.MISSING else default, metadata=meta)


def fields(cls: type | None = None) -> list[dataclasses.Field]:
    if cls is None:
        from .train import TrainConfig

        cls = TrainConfig
    return list(dataclasses.fields(cls))


def cli_only(cls: type) -> set[str]:
    """Names of the fields that are flags only: never YAML keys nor part of the saved run config."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli_only")}


def resumable(cls: type) -> set[str]:
    """Names of the fields that may change between a run and its --resume."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


def names(cls: type) -> dict[str, str]:
    """Every name a flag or YAML key may have -> its field: the field's own name and its aliases."""
    result = {}
    for f in dataclasses.fields(cls):
        result[f.name] = f.name
        result.update({alias: f.name for alias in f.metadata.get("aliases", ())})
    return result


def switches(cls: type) -> dict[str, tuple[str, str, str]]:
    """Every switch -> (its field, the value it sets, the value its --no- form sets)."""
    return {name: (f.name, on, off) for f in dataclasses.fields(cls)
            for name, (on, off) in f.metadata.get("switches", {}).items()}


def typed(cfg: Any, name: str) -> str:
    """The flag as the user typed it for field `name` (an alias or switch when that is what was given)."""
    return getattr(cfg, "_typed", {}).get(name, f"--{name}")


def types(cls: type) -> dict[str, type]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: _unwrap_optional(v) for k, v in typing.get_type_hints(cls).items() if k in names}


def _unwrap_optional(kind: Any) -> Any:
    """`bool | None` -> bool: None only marks a value the user did not give."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(kind) else kind
