"""--trainer_args: any other field of TRL's config for --method (SFTConfig, DPOConfig, KTOConfig, ORPOConfig), given as
k=v,... or a JSON object on the command line and as a mapping in YAML, checked against that class's own fields."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from typing import Any

log = logging.getLogger("lora_cli")

# The TRL config class each --method builds (ORPO lives in trl.experimental in TRL 1.x).
TRL_CONFIGS = {"sft": ("trl", "SFTConfig"), "dpo": ("trl", "DPOConfig"), "kto": ("trl", "KTOConfig"),
               "orpo": ("trl.experimental.orpo", "ORPOConfig")}
HELP = ("Any other field of TRL's config for --method (SFTConfig for sft, DPOConfig, KTOConfig, ORPOConfig), as "
        "k=v,... or a JSON object, e.g. neftune_noise_alpha=5 or '{\"neftune_noise_alpha\": 5}' (YAML: a mapping). "
        "Names are checked against that class's fields; lora-train's own flags are given as flags.")


def parse(text: str) -> tuple[dict[str, Any], str | None]:
    """The mapping in --trainer_args text (a JSON object, or k=v pairs)."""
    text = text.strip()
    if not text:
        return {}, None
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            return {}, f"--trainer_args: not a JSON object ({exc})"
        return (value, None) if isinstance(value, dict) else ({}, "--trainer_args: not a JSON object")
    result = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            return {}, f"--trainer_args: {part!r} is not name=value (or give a JSON object)"
        result[key.strip()] = _scalar(raw.strip())
    return result, None


def _scalar(raw: str) -> Any:
    """A k=v value: a JSON number, true/false/null or quoted string, else the text itself (so eval_strategy=no stays
    the string 'no', which YAML would read as false)."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def trl_config_class(method: str) -> type:
    module, name = TRL_CONFIGS[method]
    return getattr(importlib.import_module(module), name)


def problems(cfg: Any) -> list[str]:
    """Bad syntax, a name that is one of lora-train's own flags, or a name TRL's config for --method does not have.
    TRL (and so torch) is imported only when --trainer_args is given."""
    from .fields import names
    from .parser import suggest

    given, error = parse(cfg.trainer_args)
    if error or not given:
        return [error] if error else []
    own = names(type(cfg))
    errors = [f"--trainer_args {key}: lora-train's own --{own[key]}; give it as that flag"
              for key in given if key in own]
    if cfg.method not in TRL_CONFIGS:
        return errors
    config_class = trl_config_class(cfg.method)
    known = [f.name for f in dataclasses.fields(config_class) if f.init]
    errors += [f"--trainer_args {key}: not a field of TRL's {config_class.__name__}{suggest(key, known)}"
               for key in given if key not in own and key not in known]
    return errors


def apply(cfg: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """TRL config arguments with --trainer_args on top; each value that replaces one lora-train chose is logged."""
    given, _ = parse(cfg.trainer_args)
    for key in given:
        if key in arguments and arguments[key] != given[key]:
            log.warning("--trainer_args %s=%r replaces lora-train's %r", key, given[key], arguments[key])
    return {**arguments, **given}
