"""Route handlers: HTTP in, one gRPC call out, OpenAI JSON back."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from aiohttp import web

from http_gateway import errors
from http_gateway.config import GatewayConfig
from http_gateway.middlewares import REQUEST_ID
from http_gateway.validation import INT32_MAX, INT64_MAX, BodyError, optional_int, optional_str
from imagegen_service.gen import images_pb2

if TYPE_CHECKING:
    from imagegen_service.gen.images_pb2_grpc import ImageGenerationAsyncStub

CONFIG = web.AppKey("config", GatewayConfig)
CHANNEL = web.AppKey("channel", grpc.aio.Channel)
STUB: web.AppKey[ImageGenerationAsyncStub] = web.AppKey("stub")


def _metadata(request: web.Request, *, with_key: bool = True) -> tuple[tuple[str, str], ...]:
    md = [("x-request-id", request[REQUEST_ID])]
    # gRPC metadata must be printable ASCII; anything else cannot be a valid key anyway.
    authorization = request.headers.get("Authorization")
    if with_key and authorization and authorization.isascii() and authorization.isprintable():
        md.append(("authorization", authorization))
    return tuple(md)


def _idempotency_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ()
    if not (key.isascii() and key.isprintable()):
        raise BodyError("The Idempotency-Key header must be printable ASCII.", "Idempotency-Key")
    return (("idempotency-key", key),)


def _passed_headers(metadata: Any) -> dict[str, str]:
    """The service's x-ratelimit-* answer metadata, as response headers."""
    headers: dict[str, str] = {}
    for key, value in metadata or ():
        if key.startswith("x-ratelimit-"):
            headers[key] = value if isinstance(value, str) else value.decode()
    return headers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise BodyError("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BodyError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BodyError("The request body must be a JSON object.")
    return body


def _generation_request(body: dict[str, Any]) -> images_pb2.GenerateImagesRequest:
    message = images_pb2.GenerateImagesRequest(
        model=optional_str(body, "model"),
        prompt=optional_str(body, "prompt"),
        size=optional_str(body, "size"),
        quality=optional_str(body, "quality"),
        response_format=optional_str(body, "response_format"),
        style=optional_str(body, "style"),
        user=optional_str(body, "user"),
    )
    n = optional_int(body, "n", INT32_MAX)
    if n is not None:
        message.n = n
    seed = optional_int(body, "seed", INT64_MAX)
    if seed is not None:
        message.seed = seed
    return message


async def create_images(request: web.Request) -> web.Response:
    try:
        message = _generation_request(await _read_json_object(request))
        metadata = _metadata(request) + _idempotency_metadata(request)
    except BodyError as exc:
        return errors.error_response(errors.BAD_REQUEST, exc.message, param=exc.param)
    config = request.app[CONFIG]
    images: list[images_pb2.GeneratedImage] = []
    summary: images_pb2.GenerationSummary | None = None
    try:
        call = request.app[STUB].GenerateImages(
            message, metadata=metadata, timeout=config.request_timeout_seconds
        )
        async for event in call:
            if event.HasField("image"):
                images.append(event.image)
            elif event.HasField("summary"):
                summary = event.summary
        headers = _passed_headers(await call.initial_metadata())
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    if summary is None:
        return errors.error_response(
            errors.HttpError(502, "api_error", "upstream_error", True),
            "The generation did not complete.",
        )
    base_url = config.public_base_url or str(request.url.origin())
    data = []
    for image in sorted(images, key=lambda i: i.index):
        item: dict[str, str] = {}
        if image.url:
            item["url"] = base_url + image.url if image.url.startswith("/") else image.url
        else:
            item["b64_json"] = base64.b64encode(image.data).decode("ascii")
        item["revised_prompt"] = image.revised_prompt
        data.append(item)
    response = _json(
        {
            "created": summary.created,
            "data": data,
            "usage": {
                "prompt_tokens": summary.usage.input_tokens,
                "completion_tokens": summary.usage.output_tokens,
                "total_tokens": summary.usage.total_tokens,
            },
        }
    )
    response.headers.update(headers)
    return response


async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    try:
        answer = await request.app[STUB].ListModels(
            images_pb2.ListModelsRequest(),
            metadata=_metadata(request),
            timeout=min(config.request_timeout_seconds, 30.0),
        )
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    return _json(
        {
            "object": "list",
            "data": [
                {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
                for m in answer.models
            ],
        }
    )


async def download_image(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    call = request.app[STUB].GetImage(
        images_pb2.GetImageRequest(token=request.match_info["token"]),
        metadata=_metadata(request, with_key=False),
        timeout=min(config.request_timeout_seconds, 60.0),
    )
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    if not isinstance(first, images_pb2.GetImageResponse):
        return errors.error_response(errors.NOT_FOUND, "No such image.")
    response = web.StreamResponse(
        headers={
            "Content-Type": first.mime_type,
            "Content-Length": str(first.total_size),
            "Cache-Control": "private, max-age=3600",
        }
    )
    response.headers["x-request-id"] = request[REQUEST_ID]
    await response.prepare(request)
    await response.write(first.chunk)
    async for part in call:
        await response.write(part.chunk)
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(request.app[CHANNEL])
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
    except grpc.aio.AioRpcError as exc:
        return _json({"status": "unavailable", "service": exc.code().name}, status=503)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return _json({"status": "not_serving"}, status=503)
    return _json({"status": "ok"})
