"""The gateway's settings: the ``[gateway]`` table of the shared TOML file, then environment.

The gateway needs no other part of the file: it knows nothing of keys, prices or providers.
It reads the file as strictly as the service does: an unknown table or ``[gateway]`` key (a
typo, most often) or a value of the wrong type stops it at startup with the file, the key and
the nearest known name.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen_service.startup import TABLES

DEFAULT_CONFIG_PATH = (
    Path(__file__).resolve().parent.parent / "imagegen_service" / "default_config.toml"
)
GATEWAY_KEYS = (
    "http_host",
    "http_port",
    "service_address",
    "public_base_url",
    "max_body_bytes",
    "max_upload_bytes",
    "max_uploads_in_flight",
    "request_timeout_seconds",
)


class GatewayConfigError(ValueError):
    """The configuration cannot be used; the message names the file or variable and key."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    service_address: str = "127.0.0.1:50051"
    # Base for relative image URLs; empty means the origin each request arrived at.
    public_base_url: str = ""
    max_body_bytes: int = 1024 * 1024
    # The whole multipart body of an edit or a variation (files included); larger gets 413.
    max_upload_bytes: int = 64 * 1024 * 1024
    # Edits and variations being read and sent to the service at once; past it, 429 before
    # any body is read. Each holds up to about three times its body meanwhile.
    max_uploads_in_flight: int = 4
    request_timeout_seconds: float = 300.0
    max_message_bytes: int = 32 * 1024 * 1024
    # What the gateway may send the service (the service's max_receive_message_bytes).
    max_send_message_bytes: int = 128 * 1024 * 1024


class _Table:
    """One table of the file; a value of the wrong type is an error naming its key."""

    def __init__(self, path: Path, name: str, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise GatewayConfigError(f"{path}: [{name}] must be a table; got {raw!r}")
        self.path, self.name, self.raw = path, name, raw

    def _wrong(self, key: str, what: str) -> GatewayConfigError:
        return GatewayConfigError(
            f"{self.path}: [{self.name}] {key} must be {what}; got {self.raw[key]!r}"
        )

    def text(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int = 2**63) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer")
        if not minimum <= value <= maximum:
            raise self._wrong(key, f"between {minimum} and {maximum}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self._wrong(key, "a number more than 0")
        return float(value)


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        port = int(raw.strip())
    except ValueError:
        raise GatewayConfigError(f"{name} must be an integer; got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise GatewayConfigError(f"{name} must be a port number (0-65535); got {port}")
    return port


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise GatewayConfigError(
            f"configuration file {path} does not exist (IMAGEGEN_CONFIG)"
        ) from None
    except (IsADirectoryError, PermissionError):
        raise GatewayConfigError(
            f"configuration file {path} cannot be read (IMAGEGEN_CONFIG)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise GatewayConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise GatewayConfigError(f"configuration file {path} is not UTF-8 text") from None


def _unknown(path: Path, what: str, name: str, known: tuple[str, ...]) -> GatewayConfigError:
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(known)}"
    return GatewayConfigError(f"{path}: {what} {name!r}; {hint}")


def load_gateway_config(environ: Mapping[str, str] | None = None) -> GatewayConfig:
    env = os.environ if environ is None else environ
    path = Path(env.get("IMAGEGEN_CONFIG") or DEFAULT_CONFIG_PATH)
    doc = _read(path)
    for name, value in doc.items():
        if name not in TABLES:
            if not isinstance(value, dict):
                raise GatewayConfigError(
                    f"{path}: {name!r} stands outside any table; every key belongs in one"
                )
            near = difflib.get_close_matches(name, TABLES, n=1, cutoff=0.6)
            hint = f"did you mean [{near[0]}]?" if near else f"known: {', '.join(TABLES)}"
            raise GatewayConfigError(f"{path}: unknown table [{name}]; {hint}")
    gateway = _Table(path, "gateway", doc.get("gateway", {}))
    for key in gateway.raw:
        if key not in GATEWAY_KEYS:
            raise _unknown(path, "[gateway]: unknown key", key, GATEWAY_KEYS)
    # The service's table is the service's to check; the gateway reads four of its keys.
    service = _Table(path, "service", doc.get("service", {}))
    grpc_port = _env_port(
        env, "IMAGEGEN_GRPC_PORT", service.integer("grpc_port", 50051, maximum=65535)
    )
    default_address = f"{service.text('grpc_host', '127.0.0.1')}:{grpc_port}"
    return GatewayConfig(
        http_host=gateway.text("http_host", "127.0.0.1"),
        http_port=_env_port(
            env, "IMAGEGEN_HTTP_PORT", gateway.integer("http_port", 8080, maximum=65535)
        ),
        service_address=env.get("IMAGEGEN_SERVICE_ADDRESS")
        or gateway.text("service_address", default_address),
        public_base_url=(
            env.get("IMAGEGEN_PUBLIC_BASE_URL") or gateway.text("public_base_url", "")
        ).rstrip("/"),
        max_body_bytes=gateway.integer("max_body_bytes", 1024 * 1024, minimum=1),
        max_upload_bytes=gateway.integer("max_upload_bytes", 64 * 1024 * 1024, minimum=1),
        max_uploads_in_flight=gateway.integer("max_uploads_in_flight", 4, minimum=1),
        request_timeout_seconds=gateway.number("request_timeout_seconds", 300.0),
        max_message_bytes=service.integer("max_message_bytes", 32 * 1024 * 1024, minimum=1),
        max_send_message_bytes=service.integer(
            "max_receive_message_bytes", 128 * 1024 * 1024, minimum=1
        ),
    )
