"""From a command's config dataclass to argparse, and from argv (plus the --config YAML it names) to a validated
config: every problem is collected and raised as one UsageError."""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from ..errors import UsageError
from .fields import cli_only, fields, types
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
        help_text = meta["help"] + (f" (default: {f.default!r})" if not isinstance(f.default, bool) else "")
        if kind is bool:
            default = "" if f.default is None else f" (default: {'on' if f.default else 'off'})"
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=meta["help"] + default)
        else:
            metavar = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else
                                          kind.__name__.upper())
            # Values stay strings here: coerce checks types and validate() checks choices, so that every
            # problem is reported at once instead of argparse stopping at the first.
            group.add_argument(f"--{f.name}", type=str, metavar=metavar, help=help_text,
                               action="append" if meta.get("repeatable") else "store")
    return parser


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_args(argv: list[str] | None = None, cls: type | None = None) -> Any:
    """Parse flags (and the YAML they name), validate everything, and raise one UsageError listing every problem."""
    cls = cls or _default_cls()
    parser = build_parser(cls)
    ns, unknown = parser.parse_known_args(argv)
    given = vars(ns)
    errors: list[str] = []
    known_flags = [f"--{f.name}" for f in fields(cls) if not f.metadata.get("positional")]
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

    kinds = types(cls)
    flags_only = cli_only(cls)
    nullable = {f.name: f.default is None for f in fields(cls)}
    values: dict[str, Any] = {}
    config_path = given.get("config", "")
    if config_path:
        for key, value in read_yaml(config_path, errors).items():
            if key not in kinds or key in flags_only:
                errors.append(f"--config {config_path}: unknown key '{key}'{suggest(str(key), list(kinds))}")
                continue
            coerced, err = coerce(key, value, kinds[key], f"--config {config_path}: {key}", nullable[key])
            if err:
                errors.append(err)
            else:
                values[key] = coerced
    for key, value in given.items():
        if isinstance(value, list):  # a repeatable flag given several times
            value = ",".join(value)
        coerced, err = coerce(key, value, kinds[key], f"--{key}", nullable[key])
        if err:
            errors.append(err)
        else:
            values[key] = coerced

    cfg = cls(**values)
    errors.extend(validate(cfg))
    if errors:
        raise UsageError("\n".join(errors) if len(errors) == 1 else
                         f"{len(errors)} problems with the arguments:\n  " + "\n  ".join(errors))
    return cfg
