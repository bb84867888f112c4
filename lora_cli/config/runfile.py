"""YAML in and out: the --config file a user writes, and the run config lora-train saves next to the adapter
(itself a valid --config file)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .fields import cli_only


def read_yaml(path: str, errors: list[str]) -> dict[str, Any]:
    """The mapping in a --config file; problems are appended to `errors` (an empty mapping is returned then)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        errors.append(f"--config: file not found: {path}")
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        errors.append(f"--config {path}: not valid YAML: {' '.join(str(exc).split())}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
        return {}
    return data


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A run config saved by an older lora-train, in today's keys: load_in_4bit/load_in_8bit became quantization."""
    if "quantization" in saved or not {"load_in_4bit", "load_in_8bit"} & set(saved):
        return saved
    rest = {k: v for k, v in saved.items() if k not in ("load_in_4bit", "load_in_8bit")}
    quantization = "4bit" if saved.get("load_in_4bit") else "8bit" if saved.get("load_in_8bit") else "none"
    return {**rest, "quantization": quantization}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The run config as saved next to the adapter; it is itself a valid --config file."""
    skip = cli_only(type(cfg))
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def save(cfg: Any, path: Path) -> None:
    import yaml

    header = f"# {cfg.PROG} run config: reuse with  {cfg.PROG} --config THIS_FILE\n"
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
