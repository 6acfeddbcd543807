"""The same work without the gRPC hop: the gateway and the service's pipeline in one process.

An experiment for a design question, not a supported way to run the product: how fast
would ``POST /v1/images/generations`` be if the gateway called the generation pipeline in
its own process instead of over gRPC? ``make bench`` measures it when asked
(``BENCH_INPROCESS=1``), next to the floor and the design's ceiling.

One process, on the event loop the real processes use (``imagegen_service/eventloop.py``),
reading the same ``IMAGEGEN_CONFIG`` / ``IMAGEGEN_DATA_DIR`` environment as the real stack.
It starts the real service's components with ``imagegen_service.server.start_service``
(ledger, image store, rate limiter, providers, router, metrics, housekeeping), which also
starts the service's gRPC server on a free port: that server stays idle, nothing calls it
(it costs an idle thread or two, and keeps start-up identical to the service's). Once
ready it freezes the start-up heap like the real processes, and serves:

``POST /v1/images/generations``, doing what the gateway and the service do, in order:
    the real gateway's middleware (request id, its access log line ``http.request``, its
    Prometheus metrics); the body read and parsed by the gateway's own helpers
    (``views._read_json_object``, ``views._generation_request``, which builds the
    ``GenerateImagesRequest`` message), turned into the pipeline's parameters by the
    servicer's ``_generation_params``; the key authenticated as the servicer does
    (``pipeline.authenticate(authorization, cached=True)``); then the servicer's own
    ``ImageGenerationServicer._generate``: the ``generation`` record (metrics and log
    line), ``pipeline.prepare``, ``pipeline.run`` (hold, provider, store, capture),
    ``record.charged``, each event turned into its response message by ``_to_message``;
    and finally the gateway's own ``views._json_answer`` (gather, sort, ``usage`` and the
    other answer fields, the base URL of ``url`` answers) and its writer
    ``views._write_images_response``. The servicer's messages reach the gateway's code
    through an in-memory stand-in for the grpc.aio call, under the gateway's deadline
    (``request_timeout_seconds``).

    What it drops: the gRPC hop (channel, HTTP/2 framing, flow control, the loopback
    socket and its wake-ups), the protobuf serialization of the request and of every
    response message and their parsing on the other side, the gRPC metadata (the
    gateway's ``x-request-id``/``authorization`` metadata and the service's lookups in
    it), the service's per-RPC metrics (``method_metrics.MeasuredServer``), and the
    second process. The servicer's Idempotency-Key handling is skipped as well: the
    benchmark sends no Idempotency-Key, so the real path skips it too.

    A refusal (``ImagegenError``) is answered with the status and OpenAI error fields of
    the gateway's own table (``http_gateway/errors.py``), without the gRPC status in
    between and without its extra headers (``retry-after``, ``x-ratelimit-*``); the
    deadline is a 504; anything else is the middleware's 500. Only the benchmark's valid
    requests are expected.

``GET /healthz``
    answers once the service's components have started and the heap is frozen.

Logs go to stderr in the format ``IMAGEGEN_LOG_FORMAT`` asks (the harness sets ``json``):
the gateway's ``http.request`` lines and the service's ``generation`` lines, in one stream.

    python -m tests.bench.inprocess --http-port 8099
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from aiohttp import web

from http_gateway import errors as gateway_errors
from http_gateway import views
from http_gateway.app import bare_app
from http_gateway.config import GatewayConfig, load_gateway_config
from http_gateway.middlewares import REQUEST_ID
from http_gateway.validation import BodyError
from imagegen_service.config import ConfigError, ServiceConfig, load_config
from imagegen_service.errors import ImagegenError
from imagegen_service.eventloop import freeze_startup_heap, loop_factory
from imagegen_service.gen import images_pb2
from imagegen_service.logging_setup import configure_logging
from imagegen_service.server import start_service
from imagegen_service.servicer import ImageGenerationServicer, _generation_params
from imagegen_service.stores.ledger_sql import SchemaOutOfDate

ROUTE = "/v1/images/generations"
# The real servicer around the running service's pipeline (``RunningService.pipeline``).
SERVICER = web.AppKey("servicer", ImageGenerationServicer)
# What the gateway answers when the gRPC deadline passes (DEADLINE_EXCEEDED).
_TIMEOUT = gateway_errors.HttpError(504, "server_error", "timeout", True)

Metadata = tuple[tuple[str, str], ...]
Messages = AsyncGenerator[images_pb2.GenerateImagesResponse]


class _Context:
    """The part of a gRPC servicer context that ``ImageGenerationServicer._generate`` uses:
    it hands over the rate-limit headers as metadata, kept here for the gateway's code,
    which reads them back from the call."""

    def __init__(self) -> None:
        self.initial: Metadata = ()
        self.trailing: Metadata = ()

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self.trailing = tuple(metadata)

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        self.initial = tuple(metadata)


class _Call:
    """The part of a grpc.aio call that ``views._json_answer`` reads, without gRPC: the
    servicer's response messages as its generator makes them (never serialized), and the
    metadata it set. Each message must come before ``deadline`` (the loop's clock), as the
    gateway's gRPC deadline bounds the whole call."""

    def __init__(self, messages: Messages, context: _Context, deadline: float) -> None:
        self._messages = messages
        self._context = context
        self._deadline = deadline

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> images_pb2.GenerateImagesResponse:
        async with asyncio.timeout_at(self._deadline):
            return await anext(self._messages)

    async def initial_metadata(self) -> Metadata:
        return self._context.initial

    async def trailing_metadata(self) -> Metadata:
        return self._context.trailing


def _refusal(exc: ImagegenError) -> web.Response:
    """The gateway's answer to a refusal with this reason (its own table), minus the
    headers the gRPC status would have carried: the benchmark sends only valid requests."""
    error = gateway_errors._BY_REASON.get(exc.reason, gateway_errors._INTERNAL)
    return gateway_errors.error_response(error, exc.message, param=exc.param)


async def generations(request: web.Request) -> web.StreamResponse:
    """The gateway's ``create_images`` and the service's ``GenerateImages`` joined directly."""
    try:
        message = views._generation_request(await views._read_json_object(request))
    except BodyError as exc:
        return gateway_errors.error_response(
            gateway_errors.BAD_REQUEST, exc.message, param=exc.param
        )
    servicer = request.app[SERVICER]
    deadline = asyncio.get_running_loop().time() + request.app[views.CONFIG].request_timeout_seconds
    try:
        # The servicer's _serve without the metadata and Idempotency-Key (none is sent).
        key = await servicer.pipeline.authenticate(
            request.headers.get("Authorization"), cached=True
        )
        params = _generation_params(message)
        context = _Context()
        # Typed as an AsyncIterator, it is an async generator: aclosing() releases the
        # hold if the answer is not read to its end (a refusal, the deadline, a cancel).
        messages = cast(
            Messages, servicer._generate(key, params, request[REQUEST_ID], cast(Any, context))
        )
        async with contextlib.aclosing(messages):
            call = cast(views.ImagesCall, _Call(messages, context, deadline))
            return await views._json_answer(request, call)
    except ImagegenError as exc:
        return _refusal(exc)
    except TimeoutError:
        return gateway_errors.error_response(
            _TIMEOUT, "The image service is unavailable. Try again shortly."
        )


def create_app(config: ServiceConfig, gateway: GatewayConfig) -> web.Application:
    """The gateway's application (its middleware, app keys and body limit) with the one
    route, and the service's components started and stopped with it."""
    app = bare_app(gateway)

    async def service(app: web.Application) -> AsyncIterator[None]:
        # port=0: the gRPC server it also starts listens on a free port and stays idle.
        running = await start_service(config, port=0)
        app[SERVICER] = ImageGenerationServicer(running.pipeline)
        yield
        await running.stop(grace=1.0)

    async def freeze(_: web.Application) -> None:
        # After the service started (cleanup_ctx runs first), before the port opens.
        freeze_startup_heap()

    app.cleanup_ctx.append(service)
    app.on_startup.append(freeze)
    app.router.add_post(ROUTE, generations)
    app.router.add_get("/healthz", views.healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.inprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    configure_logging()
    try:
        config = load_config()
        gateway = load_gateway_config()
    except (ConfigError, ValueError) as exc:
        sys.exit(f"in-process: {exc}")
    factory = loop_factory()
    try:
        web.run_app(
            create_app(config, gateway),
            loop=factory() if factory else None,
            host=args.host,
            port=args.http_port,
            print=None,
            access_log=None,
            shutdown_timeout=5.0,
        )
    except SchemaOutOfDate as exc:
        sys.exit(f"in-process: {exc}")


if __name__ == "__main__":
    main()
