"""The aiohttp application factory. The gRPC channel lives in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from http_gateway import log_redaction, openapi, uploads, views
from http_gateway.config import GatewayConfig
from http_gateway.metrics import METRICS, GatewayMetrics, scrape
from http_gateway.middlewares import MAX_BODY, request_id_middleware
from imagegen_service.gen import images_pb2_grpc

# Set when the process starts to stop: /readyz fails from then on.
STOPPING = web.AppKey("stopping", asyncio.Event)
# Beyond a request's gRPC deadline: writing its answer out.
RESPONSE_MARGIN_SECONDS = 5.0


def drain_seconds(config: GatewayConfig) -> float:
    """How long a stopping gateway lets its requests in flight finish: none outlives its
    gRPC deadline (``request_timeout_seconds``), which is longer than the service's own
    drain (tests/test_k8s_manifests.py checks the cluster configuration)."""
    return config.request_timeout_seconds + RESPONSE_MARGIN_SECONDS


async def readyz(request: web.Request) -> web.Response:
    """Not ready once stopping, whatever the service says; else as the service says."""
    if request.app[STOPPING].is_set():
        return web.json_response({"status": "stopping"}, status=503)
    return await views.readyz(request)


def channel_options(config: GatewayConfig) -> list[tuple[str, object]]:
    return [
        # Edits send up to 16 images in one message; answers come one image per message.
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # With dns:/// and a headless Service this spreads calls over every service pod.
        ("grpc.lb_policy_name", "round_robin"),
    ]


def bare_app(config: GatewayConfig) -> web.Application:
    """The gateway's application without routes or gRPC channel: its middleware, body
    limit, configuration and metrics."""
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[request_id_middleware]
    )
    app[views.CONFIG] = config
    app[MAX_BODY] = config.max_body_bytes
    app[METRICS] = GatewayMetrics()
    app[views.UPLOAD_SLOTS] = uploads.UploadSlots(config.max_uploads_in_flight)
    # aiohttp's own loggers run in this process: keep the callers' bytes out of them.
    log_redaction.install()
    return app


def create_app(config: GatewayConfig) -> web.Application:
    app = bare_app(config)
    app[STOPPING] = asyncio.Event()

    async def grpc_channel(app: web.Application) -> AsyncIterator[None]:
        channel = grpc.aio.insecure_channel(config.service_address, options=channel_options(config))
        app[views.CHANNEL] = channel
        app[views.STUB] = images_pb2_grpc.ImageGenerationStub(channel)
        app[views.UPLOAD_RPCS] = views.upload_rpcs(channel)
        yield
        await channel.close(grace=5.0)

    app.cleanup_ctx.append(grpc_channel)
    app.router.add_post("/v1/images/generations", views.create_images)
    # Uploads answer Expect: 100-continue themselves, once the key and a slot are granted.
    app.router.add_post("/v1/images/edits", views.create_edits, expect_handler=views.defer_continue)
    app.router.add_post(
        "/v1/images/variations", views.create_variations, expect_handler=views.defer_continue
    )
    app.router.add_get("/v1/models", views.list_models)
    app.router.add_get("/v1/models/{model}", views.retrieve_model)
    app.router.add_get("/v1/files/images/{token}", views.download_image)
    app.router.add_get("/healthz", views.healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    app.router.add_get(openapi.OPENAPI_PATH, openapi.serve_openapi)
    return app
