"""From a command's config dataclass to argparse, and from argv (plus the --config YAML it names) to a validated
config: every problem is collected and raised as one UsageError."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

from ..errors import UsageError
from .fields import cli_only, fields, names, switches, types
from .runfile import read_yaml
from .validation import validate
from .values import coerce


def _default_cls() -> type:
    from .train import TrainConfig

    return TrainConfig


def build_parser(cls: type | None = None) -> argparse.ArgumentParser:
    cls = cls or _default_cls()
    parser = argparse.ArgumentParser(
        prog=cls.PROG, description=cls.DESCRIPTION, epilog=getattr(cls, "EPILOG", None),
        argument_default=argparse.SUPPRESS,  # only flags the user typed appear in the namespace
        allow_abbrev=False,
    )
    groups = {key: parser.add_argument_group(title) for key, title in cls.GROUPS.items()}
    kinds = types(cls)
    for f in fields(cls):
        meta, kind = f.metadata, kinds[f.name]
        group = groups[meta["group"]]
        if meta.get("positional"):  # optional for argparse: a missing one is reported with every other problem
            group.add_argument(f.name, nargs="?", metavar=meta["metavar"] or f.name.upper(), help=meta["help"])
            continue
        flags = [f"--{name}" for name in (f.name, *meta.get("aliases", ()))]
        help_text = meta["help"] + (f" (default: {f.default!r})" if not isinstance(f.default, bool) else "")
        if kind is bool:
            default = "" if f.default is None else f" (default: {'on' if f.default else 'off'})"
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               help=meta["help"] + default)
        else:
            metavar = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else
                                          kind.__name__.upper())
            # Values stay strings here: coerce checks types and validate() checks choices, so that every
            # problem is reported at once instead of argparse stopping at the first.
            group.add_argument(*flags, dest=f.name, type=str, metavar=metavar, help=help_text,
                               action="append" if meta.get("repeatable") else "store")
        for name, (on, off) in meta.get("switches", {}).items():
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                               help=f"{_setting(f.name, on)} (--no-{name}: {_setting(f.name, off)}).")
    return parser


def _setting(name: str, value: Any) -> str:
    """A field set to a value, as flags: --quantization 4bit, --train_on_inputs, --no-train_on_inputs."""
    return f"--{'' if value else 'no-'}{name}" if isinstance(value, bool) else f"--{name} {value}"


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_args(argv: list[str] | None = None, cls: type | None = None) -> Any:
    """Parse flags (and the YAML they name), validate everything, and raise one UsageError listing every problem."""
    cls = cls or _default_cls()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(cls)
    ns, unknown = parser.parse_known_args(argv)
    given = vars(ns)
    errors = _unknown_tokens(unknown, cls)
    values: dict[str, Any] = {}
    typed: dict[str, str] = {}
    config_path = given.get("config", "")
    if config_path:
        values.update(_layer(read_yaml(config_path, errors), cls, f"--config {config_path}: ", errors, typed))
    flags = {key: ",".join(value) if isinstance(value, list) else value  # a repeatable flag given several times
             for key, value in given.items()}
    typed.update(_typed_flags(argv, cls))
    values.update(_layer(flags, cls, "--", errors, typed))

    cfg = cls(**values)
    cfg._typed = typed  # not a field: which alias or switch named a field, for the messages below
    errors.extend(validate(cfg))
    if errors:
        raise UsageError("\n".join(errors) if len(errors) == 1 else
                         f"{len(errors)} problems with the arguments:\n  " + "\n  ".join(errors))
    return cfg


def _unknown_tokens(unknown: list[str], cls: type) -> list[str]:
    errors = []
    known_flags = [f"--{name}" for name in [*names(cls), *switches(cls)]
                   if not (name in cls.__dataclass_fields__ and cls.__dataclass_fields__[name].metadata["positional"])]
    after_flag = False
    for token in unknown:
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            errors.append(f"unknown flag {flag}{suggest(flag, known_flags)}")
            after_flag = "=" not in token
        elif not after_flag:  # a value right after an unknown flag belongs to it
            errors.append(f"unexpected argument {token!r} (every option is a --flag)")
        else:
            after_flag = False
    return errors


def _typed_flags(argv: list[str], cls: type) -> dict[str, str]:
    """Field -> the alias it was given by on the command line (the last one wins, as in argparse)."""
    by_name = names(cls)
    typed = {}
    for token in argv:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if by_name.get(name, name) != name:
            typed[by_name[name]] = f"--{name}"
    return typed


def _layer(given: dict[str, Any], cls: type, where: str, errors: list[str], typed: dict[str, str]) -> dict[str, Any]:
    """One source of values (the --config YAML, or the flags; `where` prefixes their names in messages) as field
    values: aliases resolved, switches turned into the value they set, every value converted to its field's type."""
    by_name, switch, kinds = names(cls), switches(cls), types(cls)
    yaml = where != "--"
    skip = cli_only(cls) if yaml else set()
    nullable = {f.name: f.default is None for f in fields(cls)}
    values: dict[str, Any] = {}
    set_by: dict[str, list[tuple[str, str]]] = {}  # field -> [(value, flag)] from the field itself and switches on
    off: dict[str, tuple[str, str]] = {}  # field -> (value, flag) of a switch turned off
    for key, value in given.items():
        label = f"{where}{key}"
        if key in switch:
            name, on_value, off_value = switch[key]
            flag, err = coerce(key, value, bool, label)
            if err:
                errors.append(err)
            elif flag:
                set_by.setdefault(name, []).append((on_value, f"--{key}"))
            else:
                off.setdefault(name, (off_value, f"--no-{key}"))
            continue
        name = by_name.get(key)
        if name is None or name in skip:
            if yaml:
                known = [k for k in [*by_name, *switch] if k not in skip]
                errors.append(f"{where}unknown key '{key}'{suggest(str(key), known)}")
            continue
        if yaml and name != key:
            typed[name] = f"--{key}"
        if name in values and yaml:
            errors.append(f"{where}{key}: given twice (as {typed.get(name, name)} and {name})")
        coerced, err = coerce(name, value, kinds[name], label, nullable[name])
        if err:
            errors.append(err)
            continue
        values[name] = coerced
        if cls.__dataclass_fields__[name].metadata.get("switches"):
            set_by.setdefault(name, []).append((coerced, typed.get(name, f"--{name}")))
    for name, choices in set_by.items():
        distinct = dict.fromkeys(value for value, _ in choices)
        if len(distinct) > 1:
            errors.append(f"{' and '.join(flag for _, flag in choices)} both set: choose one")
        else:
            values[name], typed[name] = choices[-1]
    for name, (value, flag) in off.items():
        if name not in set_by:
            values[name], typed[name] = value, flag
    return values
