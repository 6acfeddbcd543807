"""The service's configuration: one TOML file plus a few environment overrides.

``IMAGEGEN_CONFIG`` names the file (default: ``default_config.toml`` in this package).
``IMAGEGEN_DATA_DIR``, ``IMAGEGEN_GRPC_PORT``, ``IMAGEGEN_HTTP_PORT``,
``IMAGEGEN_DATABASE_URL``, ``IMAGEGEN_SIGNING_KEY`` and ``IMAGEGEN_ADMIN_TOKEN`` override it.
``IMAGEGEN_METRICS_PORT`` overrides ``[service] metrics_port``; ``IMAGEGEN_LOG_PROMPT_CHARS``
(default 0) is how much of each prompt the generation log line may carry.

The file is read strictly: a table or key this version does not know (a typo, most often)
and a value of the wrong type are refused at startup, with the file, the key and the
nearest known name, rather than silently replaced by a default.
"""

from __future__ import annotations

import difflib
import os
import secrets
import socket
import sqlite3
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import sqlalchemy as sa

from imagegen_service.catalog import Catalog, CatalogError, load_catalog
from imagegen_service.money import parse_usd
from imagegen_service.ratelimit import Limits
from imagegen_service.routing import RoutingPolicy
from imagegen_service.startup import TABLES

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
        "max_queue_seconds",
        "precomputed",
    }
)
# The options each provider type's adapter reads (its ``from_config`` in providers/); every
# other key of a [providers.*] table is refused. The adapters check the values.
_IMAGEN_OPTIONS = ("person_generation", "add_watermark", "max_images_per_call")
_GEMINI_OPTIONS = ("image_size", "include_text", "thinking_level")
PROVIDER_OPTIONS: Mapping[str, frozenset[str]] = {
    "local": frozenset(),
    "openai": frozenset(),
    "azure-openai": frozenset(
        {"api", "deployment", "deployment_model", "api_version", "token_file"}
    ),
    "google-imagen": frozenset(_IMAGEN_OPTIONS),
    "vertex-imagen": frozenset({"project", "location", *_IMAGEN_OPTIONS}),
    "gemini": frozenset(_GEMINI_OPTIONS),
    "vertex-gemini": frozenset({"project", "location", *_GEMINI_OPTIONS}),
    "stability": frozenset({"client_id"}),
    "bfl": frozenset({"safety_tolerance", "poll_interval_seconds"}),
}
# The keys catalog.load_catalog reads from a [models.*] table and from each of its
# [[models.*.deployments]]; price tables inside are checked by the catalog itself.
MODEL_KEYS = frozenset(
    {
        "family",
        "provider",
        "upstream_model",
        "deployments",
        "sizes",
        "default_size",
        "qualities",
        "default_quality",
        "styles",
        "max_images",
        "max_prompt_chars",
        "price_usd",
        "megapixel_price_usd",
        "token_price_usd",
        "owned_by",
        "created",
        "parameters",
        "operations",
        "input_formats",
        "max_input_image_bytes",
        "max_input_images",
    }
)
DEPLOYMENT_KEYS = frozenset({"provider", "upstream_model", "price_usd"})
SERVICE_KEYS = frozenset(
    {
        "grpc_host",
        "grpc_port",
        "data_dir",
        "database_url",
        "url_ttl_seconds",
        "hold_ttl_seconds",
        "dev_account_balance_usd",
        "max_message_bytes",
        "max_receive_message_bytes",
        "housekeeping_seconds",
        "health_check_seconds",
        "metrics_port",
    }
)
IMAGES_KEYS = frozenset({"backend", "bucket", "prefix", "endpoint_url", "region"})
RATE_LIMITS_KEYS = frozenset({"requests_per_minute", "images_per_minute", "redis_url"})
CATALOG_KEYS = frozenset({"non_image_models", "retired_models"})
_DATABASE_SCHEMES = (
    "sqlite:///",
    "postgresql://",
    "postgres://",
    "sqlite+aiosqlite://",
    "postgresql+asyncpg://",
)


class StartupError(Exception):
    """The process cannot start; the message, one line, says what, why and what to do."""


class ConfigError(StartupError, ValueError):
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
    # How long a call waits for a max_concurrency slot before the deployment counts as busy.
    max_queue_seconds: float = 10.0
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
    # How often the database (readiness) and the rate-limit counters are checked.
    health_check_seconds: float = 5.0
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
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path} is a directory (IMAGEGEN_CONFIG)") from None
    except PermissionError:
        raise ConfigError(f"configuration file {path} cannot be read (IMAGEGEN_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {path} is not UTF-8 text") from None


def env_int(env: Mapping[str, str], name: str, default: int, *, maximum: int | None = None) -> int:
    """The integer in environment variable ``name``, else ``default`` (already checked)."""
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        number = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer; got {raw!r}") from None
    if number < 0:
        raise ConfigError(f"{name} must not be negative; got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be at most {maximum}; got {number}")
    return number


def nearest(name: str, known: Collection[str]) -> str | None:
    """The known name ``name`` most likely misspells, if any is close."""
    found = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown_name(what: str, name: str, known: Collection[str]) -> str:
    """``unknown key 'url_tl_seconds'; did you mean 'url_ttl_seconds'?`` or, with nothing
    close, the list of known names."""
    near = nearest(name, known)
    if near is not None:
        return f"unknown {what} {name!r}; did you mean {near!r}?"
    if not known:
        return f"unknown {what} {name!r}; this table takes none"
    return f"unknown {what} {name!r}; known: {', '.join(sorted(known))}"


class _Table:
    """One table of the file, read key by key. A key it does not know and a value of the
    wrong type are ConfigErrors naming the file, the table and the key."""

    def __init__(self, path: Path, name: str, raw: Any, known: Collection[str] | None) -> None:
        """``known``: the keys the table may have; None for a table of names the operator
        chooses ([providers], [models]) or another process's ([gateway])."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [{name}] must be a table; got {raw!r}")
        self.path, self.name, self.raw = path, name, raw
        for key in raw:
            if known is not None and key not in known:
                raise ConfigError(f"{path}: [{name}]: {unknown_name('key', key, known)}")

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.name}] {key} {message}")

    def _wrong(self, key: str, what: str) -> ConfigError:
        return self.error(key, f"must be {what}; got {self.raw[key]!r}")

    def text(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer")
        if value < minimum:
            raise self._wrong(key, f"at least {minimum}")
        if maximum is not None and value > maximum:
            raise self._wrong(key, f"at most {maximum}")
        return value

    def number(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(key, "a number")
        if value < 0 or (positive and value == 0):
            raise self._wrong(key, "more than 0" if positive else "0 or more")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false")
        return value

    def texts(self, key: str) -> list[str]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._wrong(key, "a list of strings")
        return value


def _check_tables(path: Path, doc: Mapping[str, Any]) -> None:
    """Every top-level name is a known table; a key outside any table says where it goes."""
    homes = {
        "service": SERVICE_KEYS,
        "images": IMAGES_KEYS,
        "rate_limits": RATE_LIMITS_KEYS,
        "catalog": CATALOG_KEYS,
        "routing": frozenset(RoutingPolicy.__dataclass_fields__),
    }
    for name, value in doc.items():
        if name in TABLES:
            continue
        if not isinstance(value, dict):
            home = next((table for table, keys in homes.items() if name in keys), None)
            where = f"it belongs in [{home}]" if home else "every key belongs in a table"
            raise ConfigError(f"{path}: {name!r} stands outside any table; {where}")
        near = nearest(name, TABLES)
        hint = f"did you mean [{near}]?" if near else f"known: {', '.join(TABLES)}"
        raise ConfigError(f"{path}: unknown table [{name}]; {hint}")


def _provider(path: Path, name: str, raw: Any) -> ProviderConfig:
    where = f"providers.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{where}] must be a table; got {raw!r}")
    kind = raw.get("type")
    if kind not in PROVIDER_TYPES:
        hint = ""
        if isinstance(kind, str) and (near := nearest(kind, PROVIDER_TYPES)):
            hint = f"; did you mean {near!r}?"
        raise ConfigError(
            f"{path}: [{where}] type must be one of {', '.join(PROVIDER_TYPES)}; got {kind!r}{hint}"
        )
    options = PROVIDER_OPTIONS[kind]
    known = _PROVIDER_KEYS | options
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{path}: [{where}] (type {kind!r}): {unknown_name('key', key, known)}"
            )
    table = _Table(path, where, raw, known)
    return ProviderConfig(
        name=name,
        type=kind,
        base_url=table.text("base_url", "").rstrip("/"),
        api_key_env=table.text("api_key_env", ""),
        api_key_file=table.text("api_key_file", ""),
        timeout_seconds=table.number("timeout_seconds", 120.0, positive=True),
        max_connections=table.integer("max_connections", 64, minimum=1),
        # BFL counts tasks (one per image), and allows 24 active per account.
        max_concurrency=table.integer("max_concurrency", 24 if kind == "bfl" else 16),
        max_retries=table.integer("max_retries", 2),
        retry_ambiguous=table.flag("retry_ambiguous", False),
        max_queue_seconds=table.number("max_queue_seconds", 10.0, positive=True),
        precomputed=table.flag("precomputed", False),
        options={k: v for k, v in raw.items() if k in options},
    )


def _check_models(path: Path, models: _Table) -> None:
    """The keys of each [models.*] table and of its deployments; their values are the
    catalog's to check."""
    for model_id, raw in models.raw.items():
        where = f"models.{model_id}"
        _Table(path, where, raw, MODEL_KEYS)
        entries = raw.get("deployments")
        if isinstance(entries, list):
            for i, entry in enumerate(entries):
                if isinstance(entry, dict):
                    _Table(path, f"{where}.deployments[{i}]", entry, DEPLOYMENT_KEYS)


def _images(table: _Table, env: Mapping[str, str]) -> ImageStoreConfig:
    config = ImageStoreConfig(
        backend=env.get("IMAGEGEN_IMAGE_STORE") or table.text("backend", "local"),
        bucket=env.get("IMAGEGEN_S3_BUCKET") or table.text("bucket", ""),
        prefix=table.text("prefix", ""),
        endpoint_url=env.get("IMAGEGEN_S3_ENDPOINT_URL") or table.text("endpoint_url", ""),
        region=env.get("AWS_REGION") or table.text("region", "us-east-1"),
    )
    if config.backend not in ("local", "s3"):
        raise ConfigError(
            f"{table.path}: [images] backend (or IMAGEGEN_IMAGE_STORE) must be 'local' or "
            f"'s3'; got {config.backend!r}"
        )
    if config.backend == "s3" and not config.bucket:
        raise ConfigError(
            f"{table.path}: [images] bucket (or IMAGEGEN_S3_BUCKET) is required for s3"
        )
    return config


def _routing_policy(table: _Table) -> RoutingPolicy:
    defaults = RoutingPolicy()
    return RoutingPolicy(
        backoff_base_seconds=table.number("backoff_base_seconds", defaults.backoff_base_seconds),
        backoff_max_seconds=table.number("backoff_max_seconds", defaults.backoff_max_seconds),
        max_retry_after_seconds=table.number(
            "max_retry_after_seconds", defaults.max_retry_after_seconds
        ),
        breaker_failures=table.integer("breaker_failures", defaults.breaker_failures, minimum=1),
        breaker_cooldown_seconds=table.number(
            "breaker_cooldown_seconds", defaults.breaker_cooldown_seconds
        ),
    )


def _database_url(env: Mapping[str, str], service: _Table, data_dir: Path) -> str:
    from_env = env.get("IMAGEGEN_DATABASE_URL", "")
    url = from_env or service.text("database_url", "")
    if not url:
        return f"sqlite:///{data_dir / 'imagegen.db'}"
    if not url.startswith(_DATABASE_SCHEMES):
        source = "IMAGEGEN_DATABASE_URL" if from_env else f"{service.path}: [service] database_url"
        raise ConfigError(
            f"{source} must start with sqlite:/// or postgresql://; got {redact_url(url)!r}"
        )
    return url


def load_config(environ: Mapping[str, str] | None = None) -> ServiceConfig:
    env = dict(os.environ if environ is None else environ)
    path, doc = read_toml(env)
    _check_tables(path, doc)
    service = _Table(path, "service", doc.get("service", {}), SERVICE_KEYS)
    data_dir = Path(env.get("IMAGEGEN_DATA_DIR") or service.text("data_dir", "./var"))
    database_url = _database_url(env, service, data_dir)
    provider_tables = _Table(path, "providers", doc.get("providers", {}), None)
    providers = {name: _provider(path, name, raw) for name, raw in provider_tables.raw.items()}
    catalog_table = _Table(path, "catalog", doc.get("catalog", {}), CATALOG_KEYS)
    models = _Table(path, "models", doc.get("models", {}), None)
    _check_models(path, models)
    try:
        catalog = load_catalog(
            models.raw,
            non_image_models=catalog_table.texts("non_image_models"),
            retired_models=catalog_table.raw.get("retired_models", {}),
            providers=providers,
            provider_types={name: c.type for name, c in providers.items()},
        )
    except (CatalogError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        dev_balance = parse_usd(service.raw.get("dev_account_balance_usd", "10.00"))
    except ValueError as exc:
        raise service.error("dev_account_balance_usd", f"must be a USD amount: {exc}") from None
    policy = _routing_policy(
        _Table(
            path, "routing", doc.get("routing", {}), frozenset(RoutingPolicy.__dataclass_fields__)
        )
    )
    images = _images(_Table(path, "images", doc.get("images", {}), IMAGES_KEYS), env)
    limits = _Table(path, "rate_limits", doc.get("rate_limits", {}), RATE_LIMITS_KEYS)
    redis_url = env.get("IMAGEGEN_REDIS_URL") or limits.text("redis_url", "")
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            "the Redis URL (IMAGEGEN_REDIS_URL or [rate_limits] redis_url) must start with "
            f"redis://, rediss:// or unix://; got {redact_url(redis_url)!r}"
        )
    _Table(path, "gateway", doc.get("gateway", {}), None)
    return ServiceConfig(
        config_path=path,
        routing=policy,
        images=images,
        redis_url=redis_url,
        rate_limits=Limits(
            requests_per_minute=limits.integer("requests_per_minute", 0),
            images_per_minute=limits.integer("images_per_minute", 0),
        ),
        housekeeping_seconds=service.number("housekeeping_seconds", 60.0, positive=True),
        health_check_seconds=service.number("health_check_seconds", 5.0, positive=True),
        data_dir=data_dir,
        grpc_host=service.text("grpc_host", "127.0.0.1"),
        grpc_port=env_int(
            env,
            "IMAGEGEN_GRPC_PORT",
            service.integer("grpc_port", 50051, maximum=65535),
            maximum=65535,
        ),
        database_url=database_url,
        url_ttl_seconds=env_int(
            env, "IMAGEGEN_URL_TTL_SECONDS", service.integer("url_ttl_seconds", 3600, minimum=1)
        ),
        hold_ttl_seconds=service.integer("hold_ttl_seconds", 900, minimum=1),
        dev_account_balance_micros=dev_balance,
        providers=providers,
        catalog=catalog,
        admin_token=env.get("IMAGEGEN_ADMIN_TOKEN") or None,
        signing_key_env=env.get("IMAGEGEN_SIGNING_KEY") or None,
        max_message_bytes=service.integer("max_message_bytes", 32 * 1024 * 1024, minimum=1),
        max_receive_message_bytes=service.integer(
            "max_receive_message_bytes", 128 * 1024 * 1024, minimum=1
        ),
        metrics_port=env_int(
            env,
            "IMAGEGEN_METRICS_PORT",
            service.integer("metrics_port", 9090, maximum=65535),
            maximum=65535,
        ),
        log_prompt_chars=env_int(env, "IMAGEGEN_LOG_PROMPT_CHARS", 0),
        environ=env,
    )


# -- what a startup error says -------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: fit for logs and errors."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url.split("@", 1)[-1] if "@" in url else url
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


_DATABASE_SETTING = "IMAGEGEN_DATABASE_URL (or [service] database_url)"


def database_error(url: str, exc: BaseException) -> StartupError | None:
    """What an operator needs to know when the database at ``url`` cannot be used: one line
    naming the URL (without its password), the cause and the fix. None when ``exc`` is not
    a failure to reach or open the database (a bug, then, to be reported as such)."""
    cause = _root_cause(exc)
    if not isinstance(
        cause, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | sqlite3.Error
    ) and not isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return None
    host = urlsplit(url).hostname or ""
    if isinstance(cause, ConnectionRefusedError):
        why = "connection refused"
        fix = f"start the database server, or point {_DATABASE_SETTING} at the right host and port"
    elif isinstance(cause, socket.gaierror):
        why = f"cannot resolve the host name {host!r}"
        fix = f"correct the host in {_DATABASE_SETTING}"
    elif isinstance(cause, TimeoutError):
        why = "timed out connecting"
        fix = (
            f"check that the database server is up and reachable from here, and {_DATABASE_SETTING}"
        )
    elif isinstance(cause, asyncpg.InvalidCatalogNameError):
        why = str(cause)
        fix = f"create the database, or name an existing one in {_DATABASE_SETTING}"
    elif isinstance(
        cause, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        why = str(cause)
        fix = f"correct the user and password in {_DATABASE_SETTING}"
    elif isinstance(cause, sqlite3.Error) or url.startswith("sqlite"):
        why = str(cause) or type(cause).__name__
        fix = (
            "check that the file's directory exists and this user may write there "
            "(IMAGEGEN_DATA_DIR, or IMAGEGEN_DATABASE_URL)"
        )
    else:
        why = str(cause).strip() or type(cause).__name__
        if isinstance(cause, OSError) and cause.strerror:
            why = cause.strerror.lower()
        fix = f"check the database server and {_DATABASE_SETTING}"
    password = _password(url)
    why = " ".join(why.split())
    if password:
        why = why.replace(password, "***")
    return StartupError(f"cannot use the database {redact_url(url)}: {why}; {fix}")


def _password(url: str) -> str:
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def _root_cause(exc: BaseException) -> BaseException:
    """The first error in the chain, the driver's or the socket's, under the wrappers."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or getattr(exc, "orig", None) or exc.__context__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner
