"""The design's ceiling: aiohttp plus one grpc.aio call to a service that does nothing.

The floor (``tests/bench/floor.py``) shows what aiohttp alone can do on this machine. The
design asks for more than that on every request: a gateway process that parses the JSON,
makes one gRPC call to a second process (unary for one image or URLs, else
server-streaming, as the real gateway chooses), gathers the answer and base64-encodes the
images into OpenAI's JSON. This module runs only that, as two processes
like the real stack, so that ``make bench`` can show how much of the gap between the stack
and the floor is the design's own price and how much is ours:

``service``
    a grpc.aio server implementing the real ``imagegen.v1.ImageGeneration`` service (only
    ``GenerateImages`` and ``GenerateImagesUnary`` work; the other RPCs answer
    UNIMPLEMENTED) with the real service's
    server options and no interceptors, no logging, no ledger, no validation. Each call
    is answered with the messages the real service sends: one ``GeneratedImage`` per image
    (the bytes of ``--image`` when ``response_format`` is ``b64_json``, else the path
    ``--url``), with the request's prompt as ``revised_prompt``, then one
    ``GenerationSummary`` (``cost_micros`` 0: nothing is charged), streamed or in one
    message. ``n`` and the format
    come from the request; nothing is drawn, stored or signed per request.
    ``--upstream`` makes each call also do the one thing a provider call cannot do
    without: ``POST {upstream}/images/generations`` (OpenAI's
    Images API, the loopback ``tests/bench/upstream.py``) with the model, prompt, ``n``
    and size, through one aiohttp session, the answer's JSON parsed and its ``b64_json``
    decoded into the images' bytes (and ``revised_prompt``, as the real service passes it
    on); no checks, retries, queue or error mapping.
    ``--ledger`` makes each call also do what exact money cannot do without: the real
    ``LedgerStore`` (SQLite, in the file given) places a hold for the images before the
    images are made (checking the key is active in the same statement, as the real
    service does) and settles it before the answer goes out, with the provider call
    counted as time at the upstream. No authentication, quota or price lookup.

``gateway``
    aiohttp with the access log off and ``POST /v1/images/generations`` doing only what
    the design forces on any gateway: read the body, parse it with orjson (as the real
    gateway does), build a ``GenerateImagesRequest``, call the stub with ``authorization``
    and ``x-request-id`` metadata and a timeout (the real gateway's channel options and
    timeout), read the whole answer, base64-encode the images and answer the real
    gateway's JSON (``created``, ``data`` of ``b64_json`` or absolute ``url`` with
    ``revised_prompt``, ``usage``), byte for byte the same size. No validation, auth,
    logging, metrics or error mapping: a failed call is aiohttp's bare 500.
    ``GET /healthz`` answers once the gateway listens.

Both run on the event loop the real processes use (uvloop unless ``IMAGEGEN_UVLOOP=0``,
``imagegen_service/eventloop.py``), freeze their start-up heap and set the garbage
collector's thresholds as the real processes do, and read the real configuration
(``IMAGEGEN_CONFIG``) only for the gRPC options and the request timeout.

    python -m tests.bench.ceiling service --grpc-port 50099 --image image.png
    python -m tests.bench.ceiling gateway --http-port 8099 --grpc-port 50099
"""

from __future__ import annotations

import argparse
import asyncio
import io
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import orjson
import pybase64
from aiohttp import web

from http_gateway.views import answer_fits_one_message
from imagegen_service.eventloop import freeze_startup_heap, loop_factory
from imagegen_service.gen import images_pb2, images_pb2_grpc

if TYPE_CHECKING:
    from imagegen_service.gen.images_pb2_grpc import ImageGenerationAsyncStub
    from imagegen_service.stores.ledger_sql import LedgerStore

ROUTE = "/v1/images/generations"
# With --ledger: what each image is charged, the account's funds (enough for any run) and
# how long a hold may stay open.
LEDGER_PRICE_MICROS = 1_000
LEDGER_FUNDS_MICROS = 10**15
LEDGER_HOLD_TTL_SECONDS = 900
# A path shaped like the local image store's signed URLs (same length), for --url's default.
DEFAULT_URL = (
    "/v1/files/images/img_00000000000000000000000000000000.png.1700000000."
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
)


# -- the no-op service ------------------------------------------------------------------


def images_asked(request: images_pb2.GenerateImagesRequest) -> int:
    """The request's ``n``; unset, one image, as the real service takes it."""
    return request.n if request.HasField("n") else 1


class NoOpImageGeneration(images_pb2_grpc.ImageGenerationServicer):
    """Answers every GenerateImages call with fixed images; the generated base class
    answers UNIMPLEMENTED for the other RPCs."""

    def __init__(
        self,
        image: bytes,
        url: str,
        upstream: str = "",
        upstream_model: str = "",
        max_connections: int = 64,
    ) -> None:
        from PIL import Image

        self.upstream = upstream.rstrip("/")
        self.upstream_model = upstream_model
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        with Image.open(io.BytesIO(image)) as picture:
            self.mime_type = Image.MIME.get(picture.format or "", "application/octet-stream")
            self.width, self.height = picture.size
        self.image = image
        self.url = url
        self.ledger: LedgerStore | None = None
        self.account_id = self.key_id = ""

    async def open_ledger(self, path: Path) -> None:
        """A new SQLite ledger at ``path`` with one account, funded for any run, and its key."""
        from imagegen_service.stores.ledger_sql import open_store

        self.ledger = await open_store(f"sqlite:///{path}")
        account = await self.ledger.create_account("ceiling", LEDGER_FUNDS_MICROS)
        key = await self.ledger.create_key(account.id, secrets.token_hex(32))
        self.account_id, self.key_id = account.id, key.id

    async def GenerateImages(
        self,
        request: images_pb2.GenerateImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        for message in self._answer(request, await self._generate(request)):
            yield message

    async def GenerateImagesUnary(
        self,
        request: images_pb2.GenerateImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> images_pb2.GenerateImagesUnaryResponse:
        answer = images_pb2.GenerateImagesUnaryResponse()
        for message in self._answer(request, await self._generate(request)):
            if message.HasField("image"):
                answer.images.append(message.image)
            else:
                answer.summary.CopyFrom(message.summary)
        return answer

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.ledger is not None:
            await self.ledger.close()

    async def _generate(
        self, request: images_pb2.GenerateImagesRequest
    ) -> list[tuple[bytes, str]] | None:
        """The images (see ``_fetch``), between a hold and its settlement with ``--ledger``."""
        if self.ledger is None:
            return await self._fetch(request)
        amount = LEDGER_PRICE_MICROS * images_asked(request)
        request_id = f"req_{secrets.token_hex(12)}"
        hold = await self.ledger.place_hold(
            self.account_id,
            amount,
            request_id=request_id,
            ttl_seconds=LEDGER_HOLD_TTL_SECONDS,
            key_id=self.key_id,
        )
        with self.ledger.at_upstream():
            fetched = await self._fetch(request)
        await asyncio.shield(self.ledger.settle_hold(hold, amount, request_id=request_id))
        return fetched

    async def _fetch(
        self, request: images_pb2.GenerateImagesRequest
    ) -> list[tuple[bytes, str]] | None:
        """The images' bytes and revised prompts from the upstream, or None without
        ``--upstream``."""
        if not self.upstream:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections)
            )
        payload = {
            "model": self.upstream_model or request.model,
            "prompt": request.prompt,
            "n": images_asked(request),
            "size": request.size,
            "response_format": "b64_json",
        }
        async with self._session.post(
            f"{self.upstream}/images/generations", data=orjson.dumps(payload)
        ) as resp:
            answer = orjson.loads(await resp.read())
        return [
            (pybase64.b64decode(item["b64_json"]), item.get("revised_prompt", ""))
            for item in answer["data"]
        ]

    def _answer(
        self, request: images_pb2.GenerateImagesRequest, fetched: list[tuple[bytes, str]] | None
    ) -> Iterator[images_pb2.GenerateImagesResponse]:
        n = images_asked(request)
        as_data = request.response_format == "b64_json"
        for index in range(n):
            image = images_pb2.GeneratedImage(
                index=index,
                # As the real service: the upstream's revised prompt when it made the image.
                revised_prompt=request.prompt if fetched is None else fetched[index][1],
                mime_type=self.mime_type,
                width=self.width,
                height=self.height,
            )
            if as_data:
                image.data = self.image if fetched is None else fetched[index][0]
            else:
                image.url = self.url
            yield images_pb2.GenerateImagesResponse(image=image)
        yield images_pb2.GenerateImagesResponse(
            summary=images_pb2.GenerationSummary(
                created=int(time.time()),
                model=request.model,
                provider="local",
                images=n,
                size=request.size,
                quality=request.quality,
                usage=images_pb2.Usage(),
            )
        )


async def serve_service(
    host: str, port: int, servicer: NoOpImageGeneration, ledger: Path | None = None
) -> None:
    """Serves until SIGTERM or SIGINT; with ``ledger``, opens it first."""
    from imagegen_service.config import ConfigError, load_config
    from imagegen_service.server import grpc_options

    try:
        options = grpc_options(load_config())
    except ConfigError as exc:
        sys.exit(f"ceiling service: {exc}")
    if ledger is not None:
        await servicer.open_ledger(ledger)
    server = grpc.aio.server(options=options)
    images_pb2_grpc.add_ImageGenerationServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        sys.exit(f"ceiling service: cannot listen on {host}:{port}")
    await server.start()
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await servicer.aclose()


# -- the minimal gateway ----------------------------------------------------------------

STUB: web.AppKey[ImageGenerationAsyncStub] = web.AppKey("stub")
TIMEOUT = web.AppKey("timeout", float)
BASE_URL = web.AppKey("base_url", str)


async def generations(request: web.Request) -> web.Response:
    body: dict[str, Any] = orjson.loads(await request.read())
    message = images_pb2.GenerateImagesRequest(
        model=body.get("model", ""),
        prompt=body.get("prompt", ""),
        size=body.get("size", ""),
        quality=body.get("quality", ""),
        response_format=body.get("response_format", ""),
        style=body.get("style", ""),
        user=body.get("user", ""),
    )
    if "n" in body:
        message.n = body["n"]
    request_id = request.headers.get("x-request-id") or f"req_{secrets.token_hex(12)}"
    metadata = [("x-request-id", request_id)]
    authorization = request.headers.get("Authorization")
    if authorization:
        metadata.append(("authorization", authorization))
    stub = request.app[STUB]
    images: list[images_pb2.GeneratedImage] = []
    summary = images_pb2.GenerationSummary()
    # The real gateway's choice: one unary message for one image or URLs, else the stream.
    if answer_fits_one_message(message):
        answer = await stub.GenerateImagesUnary(
            message, metadata=tuple(metadata), timeout=request.app[TIMEOUT]
        )
        images, summary = list(answer.images), answer.summary
    else:
        call = stub.GenerateImages(message, metadata=tuple(metadata), timeout=request.app[TIMEOUT])
        async for event in call:
            if event.HasField("image"):
                images.append(event.image)
            elif event.HasField("summary"):
                summary = event.summary
    # The real gateway's answer, assembled from bytes: {"created", "data": [...], "usage"}.
    parts = [b'{"created":', str(summary.created).encode(), b',"data":[']
    for i, image in enumerate(images):
        if i:
            parts.append(b",")
        if image.url:
            url = request.app[BASE_URL] + image.url if image.url.startswith("/") else image.url
            parts += (b'{"url":', orjson.dumps(url))
        else:
            parts += (b'{"b64_json":"', pybase64.b64encode(image.data), b'"')
        parts += (b',"revised_prompt":', orjson.dumps(image.revised_prompt), b"}")
    usage = {
        "prompt_tokens": summary.usage.input_tokens,
        "completion_tokens": summary.usage.output_tokens,
        "total_tokens": summary.usage.total_tokens,
    }
    parts += (b'],"usage":', orjson.dumps(usage), b"}")
    return web.Response(
        body=b"".join(parts),
        content_type="application/json",
        headers={"x-request-id": request_id},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status": "ok"}', content_type="application/json")


def create_gateway(service_address: str, base_url: str) -> web.Application:
    from http_gateway.app import channel_options
    from http_gateway.config import load_gateway_config

    try:
        config = load_gateway_config()
    except ValueError as exc:
        sys.exit(f"ceiling gateway: {exc}")
    app = web.Application()
    app[TIMEOUT] = config.request_timeout_seconds
    app[BASE_URL] = base_url

    async def grpc_channel(app: web.Application) -> AsyncIterator[None]:
        channel = grpc.aio.insecure_channel(service_address, options=channel_options(config))
        app[STUB] = images_pb2_grpc.ImageGenerationStub(channel)
        freeze_startup_heap()
        yield
        await channel.close(grace=1.0)

    app.cleanup_ctx.append(grpc_channel)
    app.router.add_post(ROUTE, generations)
    app.router.add_get("/healthz", healthz)
    return app


# -- entry point ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.ceiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    roles = parser.add_subparsers(dest="role", required=True, metavar="service|gateway")
    service = roles.add_parser("service", help="the no-op gRPC service")
    service.add_argument("--host", default="127.0.0.1")
    service.add_argument("--grpc-port", type=int, required=True)
    service.add_argument(
        "--image", type=Path, required=True, help="image file sent as every image's bytes"
    )
    service.add_argument(
        "--url", default=DEFAULT_URL, help="path (or URL) sent as every image's url"
    )
    service.add_argument(
        "--upstream",
        default="",
        help="base URL of an OpenAI-style Images API (e.g. http://127.0.0.1:8098/v1) that "
        "each call asks for its images",
    )
    service.add_argument("--upstream-model", default="", help="the model asked of --upstream")
    service.add_argument(
        "--max-connections", type=int, default=64, help="connections to --upstream at most"
    )
    service.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="a new SQLite file: hold and settle each generation in it, as the real service",
    )
    gateway = roles.add_parser("gateway", help="the minimal HTTP gateway")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--http-port", type=int, required=True)
    gateway.add_argument("--grpc-host", default="127.0.0.1", help="the service's host")
    gateway.add_argument("--grpc-port", type=int, required=True, help="the service's port")
    gateway.add_argument(
        "--public-base-url",
        default="",
        help="base of relative image URLs (default: http://HOST:HTTP_PORT)",
    )
    args = parser.parse_args()
    factory = loop_factory()
    if args.role == "service":
        # The stubs mark every RPC abstract; at run time the generated base class answers
        # UNIMPLEMENTED for those the ceiling does not serve.
        servicer = NoOpImageGeneration(  # type: ignore[abstract]
            args.image.read_bytes(),
            args.url,
            args.upstream,
            args.upstream_model,
            args.max_connections,
        )
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve_service(args.host, args.grpc_port, servicer, args.ledger))
        return
    base_url = (args.public_base_url or f"http://{args.host}:{args.http_port}").rstrip("/")
    web.run_app(
        create_gateway(f"{args.grpc_host}:{args.grpc_port}", base_url),
        loop=factory() if factory else None,
        host=args.host,
        port=args.http_port,
        print=None,
        access_log=None,
        # The real gateway's listen backlog (http_gateway/__main__.py).
        backlog=4096,
    )


if __name__ == "__main__":
    main()
