"""The gRPC server: wiring from configuration, health, reflection, housekeeping, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from imagegen_service.config import ServiceConfig
from imagegen_service.eventloop import freeze_startup_heap
from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from imagegen_service.idempotency import IdempotencyKeys
from imagegen_service.method_metrics import MeasuredServer
from imagegen_service.metrics import MetricsEndpoint, ServiceMetrics
from imagegen_service.pipeline import ImagePipeline
from imagegen_service.providers.registry import build_providers
from imagegen_service.ratelimit import CounterStore, RateLimiter
from imagegen_service.routing import ProviderLimits, Router
from imagegen_service.servicer import AdminServicer, ImageGenerationServicer
from imagegen_service.stores.base import ImageStore
from imagegen_service.stores.images_local import LocalImageStore
from imagegen_service.stores.images_s3 import S3ImageStore
from imagegen_service.stores.ledger_sql import LedgerStore, open_store
from imagegen_service.stores.ratelimit_memory import MemoryCounters
from imagegen_service.stores.ratelimit_redis import RedisCounters

log = structlog.get_logger("imagegen.server")

IMAGES_SERVICE = images_pb2.DESCRIPTOR.services_by_name["ImageGeneration"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def grpc_options(config: ServiceConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # L4 load balancers only see new connections: recycle them so new replicas get load.
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 60_000),
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

    async def stop(self, grace: float = 10.0) -> None:
        """Turns not-serving, lets in-flight calls finish within ``grace``, then closes."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.stop()
        self._housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._housekeeping
        for provider in self.pipeline.providers.values():
            await provider.aclose()
        if self.pipeline.rate_limiter is not None:
            await self.pipeline.rate_limiter.counters.close()
        await self.pipeline.images.close()
        await self.ledger.close()


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


def build_rate_limiter(config: ServiceConfig) -> RateLimiter:
    counters: CounterStore = (
        RedisCounters(config.redis_url) if config.redis_url else MemoryCounters()
    )
    return RateLimiter(counters, config.rate_limits)


async def start_service(config: ServiceConfig, *, port: int | None = None) -> RunningService:
    ledger = await open_store(config.database_url)
    images = build_image_store(config)
    await images.start()
    rate_limiter = build_rate_limiter(config)
    idempotency = IdempotencyKeys(ledger, images, stale_after_seconds=config.hold_ttl_seconds)
    providers = build_providers(config.providers, config.catalog, config.environ)
    metrics = ServiceMetrics(log_prompt_chars=config.log_prompt_chars)
    router = Router(
        providers,
        limits={
            name: ProviderLimits(
                max_retries=c.max_retries,
                max_concurrency=c.max_concurrency,
                retry_ambiguous=c.retry_ambiguous,
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
    server = grpc.aio.server(options=grpc_options(config))
    # Every handler registered through it is measured (method_metrics.py).
    measured = cast(grpc.aio.Server, MeasuredServer(server, metrics))
    images_pb2_grpc.add_ImageGenerationServicer_to_server(
        ImageGenerationServicer(pipeline, idempotency), measured
    )
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(ledger, config.admin_token), measured)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, measured)
    reflection.enable_server_reflection(
        (IMAGES_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), measured
    )
    bound = server.add_insecure_port(
        f"{config.grpc_host}:{config.grpc_port if port is None else port}"
    )
    metrics_endpoint = MetricsEndpoint(metrics.registry)
    metrics_port = (
        await metrics_endpoint.start(config.grpc_host, config.metrics_port)
        if config.metrics_port
        else 0
    )
    await server.start()
    for name in ("", IMAGES_SERVICE, ADMIN_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    housekeeping = asyncio.create_task(
        _housekeeping(ledger, images, idempotency, config.housekeeping_seconds)
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
    )


async def _housekeeping(
    ledger: LedgerStore, images: ImageStore, idempotency: IdempotencyKeys, interval: float
) -> None:
    """Releases holds left open by a crashed process; deletes images past their URLs' life
    and idempotency records past theirs."""
    while True:
        try:
            released = await ledger.release_expired_holds()
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


async def serve_forever(config: ServiceConfig, grace: float = 10.0) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    running = await start_service(config)
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("service.stopping", grace_seconds=grace)
    await running.stop(grace)
    log.info("service.stopped")
