"""The gRPC server: wiring from configuration, health, reflection, housekeeping, shutdown.

Start-up binds the ports first, so that a port another process holds (a second service on
the same gRPC port, say) stops the start at once with one line naming it; SO_REUSEPORT is
off, so two servers can never split one port's traffic between them. Then the database
opens; an unreachable one is a StartupError naming its URL (without password) and cause.

Running, the service checks its database every ``health_check_seconds``: while it does not
answer, the health service reports NOT_SERVING for the ImageGeneration and Admin services
(readiness; the overall ``""`` status stays SERVING, for liveness: restarting the process
cannot bring a database back) and the calls that need the database are refused at once
with UNAVAILABLE, which the gateway answers with 503. Both come back when it does.

Stopping (SIGTERM or SIGINT): every health status turns NOT_SERVING at once, so readiness
fails first; new calls are refused with UNAVAILABLE (the gateway's 503); the calls in flight
get up to ``drain_seconds`` to finish: the slowest configured provider's ``timeout_seconds``
plus a margin to store the images and settle the ledger, so that a rollout never cuts a
generation the upstream is still working on. Then the process exits 0. A second signal
cancels what is still running and stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from imagegen_service.config import (
    ServiceConfig,
    StartupError,
    database_error,
    redact_url,
)
from imagegen_service.eventloop import freeze_startup_heap
from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from imagegen_service.idempotency import IdempotencyKeys
from imagegen_service.method_metrics import MeasuredServer, measured
from imagegen_service.metrics import MetricsEndpoint, ServiceMetrics
from imagegen_service.pipeline import ImagePipeline
from imagegen_service.providers.registry import build_providers
from imagegen_service.ratelimit import CounterStore, RateLimiter
from imagegen_service.routing import ProviderLimits, Router
from imagegen_service.servicer import AdminServicer, ImageGenerationServicer
from imagegen_service.startup import listen_error
from imagegen_service.stores.base import ImageStore
from imagegen_service.stores.images_local import LocalImageStore
from imagegen_service.stores.images_s3 import S3ImageStore
from imagegen_service.stores.ledger_sql import LedgerStore, open_store
from imagegen_service.stores.ratelimit_memory import MemoryCounters
from imagegen_service.stores.ratelimit_redis import RedisCounters

log = structlog.get_logger("imagegen.server")

IMAGES_SERVICE = images_pb2.DESCRIPTOR.services_by_name["ImageGeneration"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
# The calls that need the database: every one but GetImage, whose images are in the image
# store (health and reflection need nothing).
NEEDS_DATABASE = frozenset(
    f"/{service.full_name}/{method.name}"
    for service in (
        images_pb2.DESCRIPTOR.services_by_name["ImageGeneration"],
        admin_pb2.DESCRIPTOR.services_by_name["Admin"],
    )
    for method in service.methods
    if method.name != "GetImage"
)
DATABASE_UNAVAILABLE = "The service cannot reach its database. Try again shortly."
# A check that takes longer than this counts as failed.
HEALTH_CHECK_TIMEOUT_SECONDS = 5.0
# What a call may still do after its provider answered: store the images, settle the ledger.
DRAIN_MARGIN_SECONDS = 15.0


# Calls accepted by gRPC and not yet by the servicer (see grpc_options).
MAX_PENDING_CALLS = 20_000


def drain_seconds(config: ServiceConfig) -> float:
    """How long a stopping service lets its calls in flight finish: no provider call outlives
    its ``timeout_seconds``, and the slowest configured one sets the bound. The Kubernetes
    manifests' terminationGracePeriodSeconds are derived from it (docs/kubernetes.md)."""
    slowest = max((p.timeout_seconds for p in config.providers.values()), default=0.0)
    return slowest + DRAIN_MARGIN_SECONDS


def grpc_options(config: ServiceConfig) -> list[tuple[str, int]]:
    return [
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would start
        # without a word and take half the connections (each replica with its own state).
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # L4 load balancers only see new connections: recycle them so new replicas get load.
        # A recycled connection's calls get as long to finish as a draining server's.
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", int(drain_seconds(config) * 1000)),
        # Calls the application has not picked up yet: gRPC sheds them at random past 1,000
        # (all past 3,000) with CANCELLED, which no log or metric of ours sees. A busy loop
        # or a reconnecting gateway's backlog is a burst to serve, not to drop; deadlines,
        # rate limits and the providers' queue bounds are what refuse work.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ]


@dataclass
class RunningService:
    server: grpc.aio.Server
    port: int
    ledger: LedgerStore
    pipeline: ImagePipeline
    health: health_aio.HealthServicer
    _housekeeping: asyncio.Task[None]
    # GET /metrics; metrics_port is 0 when it is not served.
    metrics_port: int = 0
    _metrics_endpoint: MetricsEndpoint | None = None
    _health_checks: asyncio.Task[None] | None = field(default=None, repr=False)

    async def stop(self, grace: float = 10.0) -> None:
        """Turns not-serving, lets in-flight calls finish within ``grace``, then closes."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self._close()

    async def stop_now(self) -> None:
        """Cancels the calls still in flight (a ``stop`` under way then returns at once)."""
        await self.server.stop(0)

    async def _close(self) -> None:
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.stop()
        for task in (self._housekeeping, self._health_checks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for provider in self.pipeline.providers.values():
            await provider.aclose()
        if self.pipeline.rate_limiter is not None:
            await self.pipeline.rate_limiter.counters.close()
        await self.pipeline.images.close()
        await self.ledger.close()


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class DatabaseGate(_Interceptor):
    """Refuses the calls that need the database, with UNAVAILABLE, while it is known to be
    down; lets everything through otherwise. The gateway maps UNAVAILABLE to 503."""

    def __init__(self) -> None:
        self.database_up = True
        self._metrics: ServiceMetrics | None = None
        self._refusals: dict[str, Any] = {}

    def measure_with(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        if self.database_up or handler_call_details.method not in NEEDS_DATABASE:
            return await continuation(handler_call_details)
        method = handler_call_details.method
        refusal = self._refusals.get(method)
        if refusal is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            refusal = _refusal(handler.response_streaming)
            if self._metrics is not None:
                refusal = measured(refusal, method, self._metrics)
            self._refusals[method] = refusal
        return refusal


def _refusal(streaming: bool) -> Any:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_UNAVAILABLE)

    # No deserializer: the refused request is never parsed.
    if streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def build_image_store(config: ServiceConfig) -> ImageStore:
    if config.images.backend == "s3":
        return S3ImageStore(
            bucket=config.images.bucket,
            ttl_seconds=config.url_ttl_seconds,
            prefix=config.images.prefix,
            endpoint_url=config.images.endpoint_url or None,
            region=config.images.region,
        )
    return LocalImageStore(config.data_dir / "images", config.signing_key(), config.url_ttl_seconds)


def build_rate_limiter(config: ServiceConfig, metrics: ServiceMetrics | None = None) -> RateLimiter:
    counters: CounterStore = (
        RedisCounters(config.redis_url) if config.redis_url else MemoryCounters()
    )
    return RateLimiter(counters, config.rate_limits, recorder=metrics)


def check_port_free(host: str, port: int, what: str, setting: str) -> None:
    """Raises StartupError, naming the port and the setting that chose it, when nothing
    may listen on ``host:port``: another process holds it, it needs privileges, or the host
    is not this machine's. The port is released again at once."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(
            f"cannot listen on {host}:{port} ({what}): cannot resolve {host!r} "
            f"({exc.strerror}); correct the host"
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As the servers themselves do: a port left in TIME_WAIT is free to take.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(listen_error(host, port, what, setting, exc)) from None


def _bind_grpc(server: grpc.aio.Server, host: str, port: int) -> int:
    setting = "IMAGEGEN_GRPC_PORT (or [service] grpc_port)"
    if port:
        check_port_free(host, port, "gRPC", setting)
    try:
        return server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        # Taken between the check and now, or refused for a reason gRPC logged above.
        raise StartupError(
            f"cannot listen on {host}:{port} (gRPC); is another process listening there? "
            f"Stop it, or choose another port with {setting}"
        ) from None


async def open_ledger(database_url: str) -> LedgerStore:
    try:
        return await open_store(database_url)
    except Exception as exc:
        problem = database_error(database_url, exc)
        if problem is None:
            raise
        raise problem from None


async def start_service(config: ServiceConfig, *, port: int | None = None) -> RunningService:
    """Binds the ports, opens the stores, and starts serving. Whatever fails on the way
    is closed again; a port or a database that cannot be had is a StartupError."""
    metrics = ServiceMetrics(log_prompt_chars=config.log_prompt_chars)
    gate = DatabaseGate()
    server = grpc.aio.server(options=grpc_options(config), interceptors=[gate])
    async with contextlib.AsyncExitStack() as undo:
        bound = _bind_grpc(server, config.grpc_host, config.grpc_port if port is None else port)
        undo.push_async_callback(server.stop, None)
        metrics_endpoint = MetricsEndpoint(metrics.registry)
        metrics_port = 0
        if config.metrics_port:
            setting = "IMAGEGEN_METRICS_PORT (or [service] metrics_port; 0 turns it off)"
            check_port_free(config.grpc_host, config.metrics_port, "metrics", setting)
            try:
                metrics_port = await metrics_endpoint.start(config.grpc_host, config.metrics_port)
            except OSError as exc:
                message = listen_error(
                    config.grpc_host, config.metrics_port, "metrics", setting, exc
                )
                raise StartupError(message) from None
            undo.push_async_callback(metrics_endpoint.stop)
        ledger = await open_ledger(config.database_url)
        undo.push_async_callback(ledger.close)
        metrics.database_checked(True)
        images = build_image_store(config)
        await images.start()
        undo.push_async_callback(images.close)
        rate_limiter = build_rate_limiter(config, metrics)
        undo.push_async_callback(rate_limiter.counters.close)
        idempotency = IdempotencyKeys(ledger, images, stale_after_seconds=config.hold_ttl_seconds)
        providers = build_providers(config.providers, config.catalog, config.environ)
        for provider in providers.values():
            undo.push_async_callback(provider.aclose)
        router = Router(
            providers,
            limits={
                name: ProviderLimits(
                    max_retries=c.max_retries,
                    max_concurrency=c.max_concurrency,
                    retry_ambiguous=c.retry_ambiguous,
                    max_queue_seconds=c.max_queue_seconds,
                )
                for name, c in config.providers.items()
            },
            policy=config.routing,
            metrics=metrics,
        )
        pipeline = ImagePipeline(
            catalog=config.catalog,
            ledger=ledger,
            images=images,
            providers=providers,
            hold_ttl_seconds=config.hold_ttl_seconds,
            router=router,
            rate_limiter=rate_limiter,
        )
        # Every handler registered through it is measured (method_metrics.py).
        measured_server = cast(grpc.aio.Server, MeasuredServer(server, metrics))
        gate.measure_with(metrics)
        images_pb2_grpc.add_ImageGenerationServicer_to_server(
            ImageGenerationServicer(pipeline, idempotency), measured_server
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(ledger, config.admin_token), measured_server
        )
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, measured_server)
        # v1 answers but is not listed: its descriptor is not in this process's pool, and a
        # client that lists services resolves each one (buf curl --list-methods does).
        reflected = (IMAGES_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(reflected, measured_server)
        measured_server.add_generic_rpc_handlers((_reflection_v1(reflected),))
        await server.start()
        for name in ("", IMAGES_SERVICE, ADMIN_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        undo.pop_all()
    health_checks = asyncio.create_task(
        _check_dependencies(config, ledger, rate_limiter, health_servicer, gate, metrics)
    )
    housekeeping = asyncio.create_task(
        _housekeeping(ledger, images, idempotency, config.housekeeping_seconds, gate, metrics)
    )
    log.info(
        "service.started",
        address=f"{config.grpc_host}:{bound}",
        database=ledger.dialect,
        image_store=config.images.backend,
        rate_limits="redis" if config.redis_url else "in-process",
        models=sorted(config.catalog.models),
        metrics_port=metrics_port,
    )
    return RunningService(
        server,
        bound,
        ledger,
        pipeline,
        health_servicer,
        housekeeping,
        metrics_port,
        metrics_endpoint,
        health_checks,
    )


async def _check_dependencies(
    config: ServiceConfig,
    ledger: LedgerStore,
    rate_limiter: RateLimiter,
    health_servicer: health_aio.HealthServicer,
    gate: DatabaseGate,
    metrics: ServiceMetrics,
) -> None:
    """Every ``health_check_seconds``: the database decides readiness (and the gate); the
    rate-limit counters only their metric, since requests are served without them. Each
    change is logged once."""
    database = redact_url(config.database_url)
    down_since = 0.0
    while True:
        await asyncio.sleep(config.health_check_seconds)
        try:
            await asyncio.wait_for(ledger.current_revision(), HEALTH_CHECK_TIMEOUT_SECONDS)
        except Exception as exc:
            if gate.database_up:
                gate.database_up = False
                down_since = time.monotonic()
                problem = database_error(config.database_url, exc)
                log.error(
                    "database.unavailable",
                    database=database,
                    error=str(problem) if problem else f"{type(exc).__name__}: {exc}"[:300],
                )
                metrics.database_checked(False)
                for name in (IMAGES_SERVICE, ADMIN_SERVICE):
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        else:
            if not gate.database_up:
                gate.database_up = True
                log.info(
                    "database.recovered",
                    database=database,
                    down_seconds=round(time.monotonic() - down_since, 1),
                )
                metrics.database_checked(True)
                for name in (IMAGES_SERVICE, ADMIN_SERVICE):
                    await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await rate_limiter.check_backend()


async def _housekeeping(
    ledger: LedgerStore,
    images: ImageStore,
    idempotency: IdempotencyKeys,
    interval: float,
    gate: DatabaseGate,
    metrics: ServiceMetrics,
) -> None:
    """Releases holds left open by a crashed process; deletes images past their URLs' life
    and idempotency records past theirs. Skipped while the database is down (that is
    logged once, by the health checks)."""
    while True:
        if not gate.database_up:
            await asyncio.sleep(interval)
            continue
        try:
            released = await ledger.release_expired_holds()
            metrics.expired_holds_released(released)
            removed = await images.delete_expired()
            purged = await idempotency.purge_expired()
            if released or removed or purged:
                log.info(
                    "housekeeping",
                    holds_released=released,
                    images_deleted=removed,
                    idempotency_records_deleted=purged,
                )
        except Exception:
            log.exception("housekeeping.failed")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serving(
    config: ServiceConfig, *, port: int | None = None
) -> AsyncIterator[RunningService]:
    running = await start_service(config, port=port)
    try:
        yield running
    finally:
        await running.stop()


async def serve_forever(config: ServiceConfig, grace: float | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then drains: in-flight calls get ``grace`` seconds
    (``drain_seconds(config)`` unless given) to finish. A second signal stops at once."""
    grace = drain_seconds(config) if grace is None else grace
    running = await start_service(config)
    freeze_startup_heap()
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    await signalled.wait()
    signalled.clear()
    started = time.monotonic()
    log.info("service.stopping", grace_seconds=grace)
    draining = asyncio.create_task(running.stop(grace))
    again = asyncio.create_task(signalled.wait())
    await asyncio.wait((draining, again), return_when=asyncio.FIRST_COMPLETED)
    if not draining.done():
        log.warning("service.stopping_now", drained_seconds=round(time.monotonic() - started, 1))
        await running.stop_now()
    again.cancel()
    await draining
    log.info("service.stopped", drained_seconds=round(time.monotonic() - started, 1))


# Reflection v1, which grpcio-reflection does not offer yet (grpc/grpc#38576): its messages
# are v1alpha's field for field under another package, so v1alpha's servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _reflection_v1(service_names: tuple[str, ...]) -> grpc.GenericRpcHandler[Any, Any]:
    servicer = ReflectionServicer(service_names)
    return grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
