"""JSON type checks for request bodies: types only. Values are the service's business."""

from __future__ import annotations

from typing import Any

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


class BodyError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def optional_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BodyError(f"'{name}' must be a string; got {_json_type(value)}.", name)
    return value


def optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BodyError(f"'{name}' must be a boolean; got {_json_type(value)}.", name)
    return value


def form_int(fields: dict[str, str], name: str, maximum: int) -> int | None:
    """A multipart text field holding an integer; empty or absent is None."""
    raw = fields.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BodyError(f"'{name}' must be an integer; got {raw[:40]!r}.", name) from None
    if not -maximum - 1 <= value <= maximum:
        raise BodyError(f"'{name}' is out of range.", name)
    return value


def form_bool(fields: dict[str, str], name: str) -> bool:
    """A multipart text field holding true/false (as the SDKs send booleans)."""
    raw = fields.get(name, "").strip().lower()
    if raw in ("", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise BodyError(f"'{name}' must be true or false; got {raw[:40]!r}.", name)


def optional_int(body: dict[str, Any], name: str, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BodyError(f"'{name}' must be an integer; got {_json_type(value)}.", name)
    if not -maximum - 1 <= value <= maximum:
        raise BodyError(f"'{name}' is out of range.", name)
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"
