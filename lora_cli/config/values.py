"""Turning a YAML value or a flag's text into a field's type, or saying why it cannot be."""

from __future__ import annotations

import json
from typing import Any

# String fields that also take a YAML mapping (given as JSON text on the command line) or a YAML list.
MAPPING_FIELDS = ("chat_template_kwargs", "trainer_args")
LIST_FIELDS = ("target_modules", "modules_to_save")


def coerce(name: str, value: Any, kind: type, where: str, nullable: bool = False) -> tuple[Any, str | None]:
    """Convert a YAML or flag value to the field's type; return (value, error). A nullable (three-state) bool also
    takes null or 'auto'."""
    if kind is bool:
        if nullable and (value is None or (isinstance(value, str) and value.lower() == "auto")):
            return None, None
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1"), None
        return None, f"{where}: expected true or false, got {value!r}"
    if kind is int:
        if isinstance(value, bool):
            return None, f"{where}: expected an integer, got {value!r}"
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value if not isinstance(value, str) else value.strip()), None
        except (TypeError, ValueError):
            return None, f"{where}: expected an integer, got {value!r}"
    if kind is float:
        if isinstance(value, bool):
            return None, f"{where}: expected a number, got {value!r}"
        try:
            return float(value), None
        except (TypeError, ValueError):
            return None, f"{where}: expected a number, got {value!r}"
    if isinstance(value, dict) and name in MAPPING_FIELDS:
        return json.dumps(value), None
    if isinstance(value, (list, tuple)) and name in LIST_FIELDS:
        return ",".join(str(v) for v in value), None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        return None, f"{where}: expected a string, got {value!r}"
    return str(value), None
