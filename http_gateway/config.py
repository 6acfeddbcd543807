"""The gateway's settings: the ``[gateway]`` table of the shared TOML file, then environment.

The gateway needs no other part of the file: it knows nothing of keys, prices or providers.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = (
    Path(__file__).resolve().parent.parent / "imagegen_service" / "default_config.toml"
)


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


def _int(env: Mapping[str, str], name: str, default: Any) -> int:
    raw = env.get(name) or default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer; got {raw!r}") from None


def load_gateway_config(environ: Mapping[str, str] | None = None) -> GatewayConfig:
    env = os.environ if environ is None else environ
    path = Path(env.get("IMAGEGEN_CONFIG") or DEFAULT_CONFIG_PATH)
    doc: dict[str, Any] = {}
    if path.exists():
        with path.open("rb") as f:
            doc = tomllib.load(f)
    gateway = doc.get("gateway", {})
    service = doc.get("service", {})
    grpc_port = _int(env, "IMAGEGEN_GRPC_PORT", service.get("grpc_port", 50051))
    default_address = f"{service.get('grpc_host', '127.0.0.1')}:{grpc_port}"
    return GatewayConfig(
        http_host=str(gateway.get("http_host", "127.0.0.1")),
        http_port=_int(env, "IMAGEGEN_HTTP_PORT", gateway.get("http_port", 8080)),
        service_address=env.get("IMAGEGEN_SERVICE_ADDRESS")
        or str(gateway.get("service_address", default_address)),
        public_base_url=(
            env.get("IMAGEGEN_PUBLIC_BASE_URL") or str(gateway.get("public_base_url", ""))
        ).rstrip("/"),
        max_body_bytes=int(gateway.get("max_body_bytes", 1024 * 1024)),
        max_upload_bytes=int(gateway.get("max_upload_bytes", 64 * 1024 * 1024)),
        max_uploads_in_flight=int(gateway.get("max_uploads_in_flight", 4)),
        request_timeout_seconds=float(gateway.get("request_timeout_seconds", 300.0)),
        max_message_bytes=int(service.get("max_message_bytes", 32 * 1024 * 1024)),
        max_send_message_bytes=int(service.get("max_receive_message_bytes", 128 * 1024 * 1024)),
    )
