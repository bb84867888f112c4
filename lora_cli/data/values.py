"""A row's JSON values as error messages name them, and checked to be strings."""

from __future__ import annotations

from typing import Any

from ..errors import DataError


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be a string, got {_type_name(value)}")
    return value
