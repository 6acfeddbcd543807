"""The service's configuration: one TOML file plus a few environment overrides.

``IMAGEGEN_CONFIG`` names the file (default: ``default_config.toml`` in this package).
``IMAGEGEN_DATA_DIR``, ``IMAGEGEN_GRPC_PORT``, ``IMAGEGEN_HTTP_PORT``,
``IMAGEGEN_DATABASE_URL``, ``IMAGEGEN_SIGNING_KEY`` and ``IMAGEGEN_ADMIN_TOKEN`` override it.
``IMAGEGEN_METRICS_PORT`` overrides ``[service] metrics_port``; ``IMAGEGEN_LOG_PROMPT_CHARS``
(default 0) is how much of each prompt the generation log line may carry.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen_service.catalog import Catalog, CatalogError, load_catalog
from imagegen_service.money import parse_usd
from imagegen_service.ratelimit import Limits
from imagegen_service.routing import RoutingPolicy

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.toml")
PROVIDER_TYPES = (
    "local",
    "openai",
    "azure-openai",
    "google-imagen",
    "vertex-imagen",
    "gemini",
    "vertex-gemini",
    "stability",
    "bfl",
)
_PROVIDER_KEYS = frozenset(
    {
        "type",
        "base_url",
        "api_key_env",
        "api_key_file",
        "timeout_seconds",
        "max_connections",
        "max_concurrency",
        "max_retries",
        "retry_ambiguous",
        "precomputed",
    }
)


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One ``[providers.NAME]`` table. Keys beyond the common ones land in ``options``
    for the adapter of that type (a Vertex project, an Azure deployment, ...)."""

    name: str
    type: str
    # Empty: the adapter's public default endpoint.
    base_url: str = ""
    # The credential comes from this environment variable, or else from this file
    # (a mounted Kubernetes Secret, for example).
    api_key_env: str = ""
    api_key_file: str = ""
    timeout_seconds: float = 120.0
    max_connections: int = 64
    # At most this many calls in flight to this provider; the rest wait.
    max_concurrency: int = 16
    # Retries of a failed call (5xx, 429, timeout, ...) before failing over.
    max_retries: int = 2
    # Whether a paid submission whose outcome is unknown (a timeout or 5xx after the body
    # was sent) may be repeated on this provider; off, it fails over instead.
    retry_ambiguous: bool = False
    # Local renderer only: serve one precomputed image per size (benchmarks).
    precomputed: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def needs_credential(self) -> bool:
        return self.type != "local" and bool(self.api_key_env or self.api_key_file)

    def credential(self, environ: Mapping[str, str]) -> str | None:
        if self.api_key_env and environ.get(self.api_key_env):
            return environ[self.api_key_env].strip()
        if self.api_key_file:
            try:
                return Path(self.api_key_file).read_text().strip() or None
            except OSError:
                return None
        return None

    def has_credentials(self, environ: Mapping[str, str]) -> bool:
        return not self.needs_credential() or self.credential(environ) is not None


@dataclass(frozen=True, slots=True)
class ImageStoreConfig:
    # "local" (a directory under the data dir) or "s3".
    backend: str = "local"
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = ""
    region: str = "us-east-1"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    config_path: Path
    data_dir: Path
    grpc_host: str
    grpc_port: int
    database_url: str
    url_ttl_seconds: int
    hold_ttl_seconds: int
    dev_account_balance_micros: int
    providers: dict[str, ProviderConfig]
    catalog: Catalog
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    images: ImageStoreConfig = field(default_factory=ImageStoreConfig)
    # Empty: rate-limit counters live in this process.
    redis_url: str = ""
    rate_limits: Limits = field(default_factory=Limits)
    housekeeping_seconds: float = 60.0
    admin_token: str | None = None
    signing_key_env: str | None = None
    max_message_bytes: int = 32 * 1024 * 1024
    # What the service accepts: an edit carries up to 16 images in one message.
    max_receive_message_bytes: int = 128 * 1024 * 1024
    # GET /metrics on this port (0: not served); characters of a prompt logged (0: none).
    metrics_port: int = 0
    log_prompt_chars: int = 0
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    def signing_key(self) -> bytes:
        """The HMAC key for image URLs: from IMAGEGEN_SIGNING_KEY, else a key file kept in the
        data directory so that URLs survive restarts."""
        if self.signing_key_env:
            return self.signing_key_env.encode()
        path = self.data_dir / "signing.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip().encode()


def read_toml(environ: Mapping[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    env = os.environ if environ is None else environ
    path = Path(env.get("IMAGEGEN_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        with path.open("rb") as f:
            return path, tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist (IMAGEGEN_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def env_int(env: Mapping[str, str], name: str, default: Any) -> int:
    raw = env.get(name)
    value = default if raw in (None, "") else raw
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer; got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{name} must not be negative; got {number}")
    return number


def _table(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _provider(name: str, raw: Any) -> ProviderConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"providers.{name} must be a table")
    kind = raw.get("type")
    if kind not in PROVIDER_TYPES:
        raise ConfigError(f"providers.{name}.type must be one of {', '.join(PROVIDER_TYPES)}")
    try:
        return ProviderConfig(
            name=name,
            type=kind,
            base_url=str(raw.get("base_url", "")).rstrip("/"),
            api_key_env=str(raw.get("api_key_env", "")),
            api_key_file=str(raw.get("api_key_file", "")),
            timeout_seconds=float(raw.get("timeout_seconds", 120.0)),
            max_connections=int(raw.get("max_connections", 64)),
            # BFL counts tasks (one per image), and allows 24 active per account.
            max_concurrency=int(raw.get("max_concurrency", 24 if kind == "bfl" else 16)),
            max_retries=int(raw.get("max_retries", 2)),
            retry_ambiguous=_bool(raw.get("retry_ambiguous", False), f"providers.{name}"),
            precomputed=bool(raw.get("precomputed", False)),
            options={k: v for k, v in raw.items() if k not in _PROVIDER_KEYS},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"providers.{name}: {exc}") from None


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: retry_ambiguous must be true or false")
    return value


def _images(raw: Mapping[str, Any], env: Mapping[str, str], path: Path) -> ImageStoreConfig:
    config = ImageStoreConfig(
        backend=env.get("IMAGEGEN_IMAGE_STORE") or str(raw.get("backend", "local")),
        bucket=env.get("IMAGEGEN_S3_BUCKET") or str(raw.get("bucket", "")),
        prefix=str(raw.get("prefix", "")),
        endpoint_url=env.get("IMAGEGEN_S3_ENDPOINT_URL") or str(raw.get("endpoint_url", "")),
        region=env.get("AWS_REGION") or str(raw.get("region", "us-east-1")),
    )
    if config.backend not in ("local", "s3"):
        raise ConfigError(f"{path}: [images].backend must be 'local' or 's3'")
    if config.backend == "s3" and not config.bucket:
        raise ConfigError(f"{path}: [images].bucket (or IMAGEGEN_S3_BUCKET) is required for s3")
    return config


def _routing_policy(raw: Mapping[str, Any], path: Path) -> RoutingPolicy:
    defaults = RoutingPolicy()
    unknown = set(raw) - set(RoutingPolicy.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: [routing] has unknown keys: {', '.join(sorted(unknown))}")
    try:
        return RoutingPolicy(
            backoff_base_seconds=float(
                raw.get("backoff_base_seconds", defaults.backoff_base_seconds)
            ),
            backoff_max_seconds=float(raw.get("backoff_max_seconds", defaults.backoff_max_seconds)),
            max_retry_after_seconds=float(
                raw.get("max_retry_after_seconds", defaults.max_retry_after_seconds)
            ),
            breaker_failures=int(raw.get("breaker_failures", defaults.breaker_failures)),
            breaker_cooldown_seconds=float(
                raw.get("breaker_cooldown_seconds", defaults.breaker_cooldown_seconds)
            ),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: [routing]: {exc}") from None


def load_config(environ: Mapping[str, str] | None = None) -> ServiceConfig:
    env = dict(os.environ if environ is None else environ)
    path, doc = read_toml(env)
    service = _table(doc, "service")
    data_dir = Path(env.get("IMAGEGEN_DATA_DIR") or service.get("data_dir", "./var"))
    database_url = env.get("IMAGEGEN_DATABASE_URL") or service.get("database_url") or ""
    if not database_url:
        database_url = f"sqlite:///{data_dir / 'imagegen.db'}"
    providers = {name: _provider(name, raw) for name, raw in _table(doc, "providers").items()}
    catalog_table = _table(doc, "catalog")
    try:
        catalog = load_catalog(
            _table(doc, "models"),
            non_image_models=catalog_table.get("non_image_models", []),
            retired_models=catalog_table.get("retired_models", {}),
            providers=providers,
            provider_types={name: c.type for name, c in providers.items()},
        )
        dev_balance = parse_usd(service.get("dev_account_balance_usd", "10.00"))
    except (CatalogError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    policy = _routing_policy(_table(doc, "routing"), path)
    images = _images(_table(doc, "images"), env, path)
    limits_table = _table(doc, "rate_limits")
    return ServiceConfig(
        config_path=path,
        routing=policy,
        images=images,
        redis_url=env.get("IMAGEGEN_REDIS_URL") or str(limits_table.get("redis_url", "")),
        rate_limits=Limits(
            requests_per_minute=int(limits_table.get("requests_per_minute", 0)),
            images_per_minute=int(limits_table.get("images_per_minute", 0)),
        ),
        housekeeping_seconds=float(service.get("housekeeping_seconds", 60.0)),
        data_dir=data_dir,
        grpc_host=str(service.get("grpc_host", "127.0.0.1")),
        grpc_port=env_int(env, "IMAGEGEN_GRPC_PORT", service.get("grpc_port", 50051)),
        database_url=database_url,
        url_ttl_seconds=env_int(
            env, "IMAGEGEN_URL_TTL_SECONDS", service.get("url_ttl_seconds", 3600)
        ),
        hold_ttl_seconds=int(service.get("hold_ttl_seconds", 900)),
        dev_account_balance_micros=dev_balance,
        providers=providers,
        catalog=catalog,
        admin_token=env.get("IMAGEGEN_ADMIN_TOKEN") or None,
        signing_key_env=env.get("IMAGEGEN_SIGNING_KEY") or None,
        max_message_bytes=int(service.get("max_message_bytes", 32 * 1024 * 1024)),
        max_receive_message_bytes=int(service.get("max_receive_message_bytes", 128 * 1024 * 1024)),
        metrics_port=env_int(env, "IMAGEGEN_METRICS_PORT", service.get("metrics_port", 9090)),
        log_prompt_chars=env_int(env, "IMAGEGEN_LOG_PROMPT_CHARS", 0),
        environ=env,
    )
