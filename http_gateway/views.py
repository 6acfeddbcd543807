"""Route handlers: HTTP in, one gRPC call out, OpenAI JSON back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson
import pybase64
import structlog
from aiohttp import HttpVersion11, web
from google.protobuf.message import Message

from http_gateway import errors, uploads
from http_gateway.config import GatewayConfig
from http_gateway.metrics import METRICS
from http_gateway.middlewares import REQUEST_ID
from http_gateway.validation import (
    INT32_MAX,
    INT64_MAX,
    BodyError,
    form_bool,
    form_int,
    optional_bool,
    optional_int,
    optional_str,
)
from imagegen_service.gen import images_pb2

if TYPE_CHECKING:
    from imagegen_service.gen.images_pb2_grpc import ImageGenerationAsyncStub

log = structlog.get_logger("imagegen.gateway")
CONFIG = web.AppKey("config", GatewayConfig)
CHANNEL = web.AppKey("channel", grpc.aio.Channel)
STUB: web.AppKey[ImageGenerationAsyncStub] = web.AppKey("stub")
UPLOAD_SLOTS = web.AppKey("upload_slots", uploads.UploadSlots)


def _metadata(request: web.Request, *, with_key: bool = True) -> tuple[tuple[str, str], ...]:
    md = [("x-request-id", request[REQUEST_ID])]
    # gRPC metadata must be printable ASCII; anything else cannot be a valid key anyway.
    authorization = request.headers.get("Authorization")
    if with_key and authorization and authorization.isascii() and authorization.isprintable():
        md.append(("authorization", _forwardable("Authorization", authorization)))
    return tuple(md)


# What one header may bring to the gRPC metadata: the service's side refuses metadata over
# 8 KiB (gRPC's default), at random between 8 and 16 KiB. Real keys and Idempotency-Keys
# are far shorter.
MAX_FORWARDED_HEADER_BYTES = 2048


def _forwardable(name: str, value: str) -> str:
    if len(value) > MAX_FORWARDED_HEADER_BYTES:
        raise errors.HeaderTooLarge(name, MAX_FORWARDED_HEADER_BYTES)
    return value


def _idempotency_metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ()
    if not (key.isascii() and key.isprintable()):
        raise BodyError("The Idempotency-Key header must be printable ASCII.", "Idempotency-Key")
    return (("idempotency-key", _forwardable("Idempotency-Key", key)),)


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
        background=optional_str(body, "background"),
        output_format=optional_str(body, "output_format"),
        moderation=optional_str(body, "moderation"),
        stream=optional_bool(body, "stream"),
    )
    n = optional_int(body, "n", INT32_MAX)
    if n is not None:
        message.n = n
    seed = optional_int(body, "seed", INT64_MAX)
    if seed is not None:
        message.seed = seed
    compression = optional_int(body, "output_compression", INT32_MAX)
    if compression is not None:
        message.output_compression = compression
    partial_images = optional_int(body, "partial_images", INT32_MAX)
    if partial_images is not None:
        message.partial_images = partial_images
    return message


async def create_images(request: web.Request) -> web.StreamResponse:
    try:
        message = _generation_request(await _read_json_object(request))
        metadata = _metadata(request) + _idempotency_metadata(request)
    except BodyError as exc:
        return errors.error_response(errors.BAD_REQUEST, exc.message, param=exc.param)
    config = request.app[CONFIG]
    stub = request.app[STUB]
    if answer_fits_one_message(message):
        unary = stub.GenerateImagesUnary(
            message, metadata=metadata, timeout=config.request_timeout_seconds
        )
        try:
            answer = await unary
            headers = _passed_headers(
                (*await unary.initial_metadata(), *await unary.trailing_metadata())
            )
        except grpc.aio.AioRpcError as exc:
            # A service older than this gateway (during a rollout) has only the stream.
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return errors.from_grpc_error(exc)
        else:
            return await _images_answer(request, list(answer.images), answer.summary, headers)
    call = stub.GenerateImages(message, metadata=metadata, timeout=config.request_timeout_seconds)
    if message.stream:
        return await _stream_answer(request, call, "image_generation")
    return await _json_answer(request, call)


def answer_fits_one_message(message: images_pb2.GenerateImagesRequest) -> bool:
    """Whether the answer comes in one unary message (cheaper than a stream: one message
    and no stream bookkeeping on either side): one image, or URLs only. A batch of images
    as bytes keeps one message per image, far below the message size limit."""
    if message.stream:
        return False
    one_image = not message.HasField("n") or message.n <= 1
    return one_image or message.response_format == "url"


async def create_edits(request: web.Request) -> web.StreamResponse:
    """``POST /v1/images/edits``: multipart with ``image`` or repeated ``image[]``, ``mask``."""
    return await _multipart_images(
        request, _EDIT_FILES, _edit_request, request.app[UPLOAD_RPCS].edit, "image_edit"
    )


async def create_variations(request: web.Request) -> web.StreamResponse:
    """``POST /v1/images/variations``: multipart with one ``image``."""
    return await _multipart_images(
        request,
        _VARIATION_FILES,
        _variation_request,
        request.app[UPLOAD_RPCS].vary,
        None,
    )


async def _multipart_images(
    request: web.Request,
    file_fields: frozenset[str],
    build: Callable[[uploads.Form], Any],
    rpc: Callable[..., ImagesCall],
    stream_prefix: str | None,
) -> web.StreamResponse:
    """A multipart image request: refuse it before its body is read if the key or the
    account cannot pay, or if too many uploads are in flight; else read the form within the
    upload limit, send it to ``rpc``, and answer JSON, or SSE events named
    ``{stream_prefix}.*`` when streaming was asked."""
    refusal = await _check_access(request)
    if refusal is not None:
        return _unread(request, refusal)
    slots = request.app[UPLOAD_SLOTS]
    if not slots.take():
        return _unread(
            request,
            errors.error_response(
                errors.UPLOADS_BUSY,
                "The server is busy with other uploads. Try again shortly.",
                headers={"Retry-After": str(_BUSY_RETRY_AFTER_SECONDS)},
            ),
        )
    metrics = request.app[METRICS]
    metrics.uploads_in_flight.inc()
    try:
        sent = await _read_and_send(request, file_fields, build, rpc, stream_prefix)
    finally:
        slots.give_back()
        metrics.uploads_in_flight.dec()
    if isinstance(sent, web.Response):
        return sent
    call, streaming = sent
    if stream_prefix is not None and streaming:
        return await _stream_answer(request, call, stream_prefix)
    return await _json_answer(request, call)


async def _read_and_send(
    request: web.Request,
    file_fields: frozenset[str],
    build: Callable[[uploads.Form], Any],
    rpc: Callable[..., ImagesCall],
    stream_prefix: str | None,
) -> tuple[ImagesCall, bool] | web.Response:
    """What an upload slot covers: reading the form and sending it to the service. Once
    gRPC has sent the message, the gateway holds none of the upload's bytes. Returns the
    call and whether it streams, or the refusal."""
    config = request.app[CONFIG]
    await _continue(request)
    try:
        form = await uploads.read_form(
            request, limit=config.max_upload_bytes, file_fields=file_fields
        )
        message = build(form)
        metadata = _metadata(request) + _idempotency_metadata(request)
    except uploads.UploadTooLarge as exc:
        return errors.error_response(errors.TOO_LARGE, exc.message)
    except BodyError as exc:
        return errors.error_response(errors.BAD_REQUEST, exc.message, param=exc.param)
    # The message holds the files now; the form's copy goes.
    del form
    streaming = stream_prefix is not None and bool(message.stream)
    call = rpc(Handover(message), metadata=metadata, timeout=config.request_timeout_seconds)
    del message
    try:
        await call.wait_for_connection()
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    return call, streaming


class Handover:
    """An upload's request message, handed to gRPC: the serialiser takes it out, so the
    call keeps no reference to it and its bytes go once they are sent, not when the
    generation ends."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message: Message | None = message


def _serialize_handover(request: Handover) -> bytes:
    message, request.message = request.message, None
    if message is None:
        raise ValueError("an upload's message is sent once")
    return message.SerializeToString()


@dataclass(frozen=True, slots=True)
class UploadRpcs:
    """EditImages and CreateImageVariations, taking their request as a Handover."""

    edit: Callable[..., ImagesCall]
    vary: Callable[..., ImagesCall]


def upload_rpcs(channel: grpc.aio.Channel) -> UploadRpcs:
    service = images_pb2.DESCRIPTOR.services_by_name["ImageGeneration"]

    def rpc(name: str) -> Callable[..., ImagesCall]:
        return channel.unary_stream(
            f"/{service.full_name}/{name}",
            request_serializer=_serialize_handover,
            response_deserializer=images_pb2.GenerateImagesResponse.FromString,
        )

    return UploadRpcs(edit=rpc("EditImages"), vary=rpc("CreateImageVariations"))


UPLOAD_RPCS = web.AppKey("upload_rpcs", UploadRpcs)


# Seconds a caller refused for busy upload slots is asked to wait: about one edit's upload.
_BUSY_RETRY_AFTER_SECONDS = 2


async def _check_access(request: web.Request) -> web.Response | None:
    """Asks the service, before the body is read, whether the key is good and its account
    has money: the refusal to send, or None to go on. A service that predates CheckAccess
    is not asked (the upload is then judged whole, as before)."""
    config = request.app[CONFIG]
    try:
        answer = await request.app[STUB].CheckAccess(
            images_pb2.CheckAccessRequest(),
            metadata=_metadata(request),
            timeout=min(config.request_timeout_seconds, 30.0),
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        return errors.from_grpc_error(exc)
    if not answer.has_balance:
        return errors.error_response(
            errors.INSUFFICIENT_BALANCE,
            "Your balance is too low for this request. Top up the account and retry.",
        )
    return None


def _expects_continue(request: web.Request) -> bool:
    return (
        request.version == HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
    )


async def defer_continue(request: web.Request) -> None:
    """The upload routes' ``Expect`` handler. For ``100-continue`` it says nothing yet: the
    view sends ``100 Continue`` once the key and a slot are granted, so a refused client
    never sends its body at all. Any other expectation is refused, as aiohttp does."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="Unknown Expect header.")


async def _continue(request: web.Request) -> None:
    if _expects_continue(request):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # Not part of the answer: the answer's own bytes start after it.
        request.writer.output_size = 0


def _unread(request: web.Request, response: web.Response) -> web.Response:
    """A refusal sent while the body is still unread. A client waiting for ``100 Continue``
    sends nothing more: the connection is closed after the answer. Any other client may be
    sending its body: aiohttp reads and discards it (for at most its lingering time, never
    holding it) so the client can read the answer instead of a reset connection."""
    if _expects_continue(request):
        response.force_close()
    return response


_EDIT_FILES = frozenset({"image", "image[]", "mask"})
_VARIATION_FILES = frozenset({"image"})


def _edit_request(form: uploads.Form) -> images_pb2.EditImagesRequest:
    fields = form.fields
    masks = form.file_list("mask")
    if len(masks) > 1:
        raise BodyError("Send at most one mask.", "mask")
    message = images_pb2.EditImagesRequest(
        model=fields.get("model", ""),
        prompt=fields.get("prompt", ""),
        images=form.file_list("image", "image[]"),
        size=fields.get("size", ""),
        quality=fields.get("quality", ""),
        response_format=fields.get("response_format", ""),
        user=fields.get("user", ""),
        background=fields.get("background", ""),
        output_format=fields.get("output_format", ""),
        stream=form_bool(fields, "stream"),
    )
    if masks:
        message.mask = masks[0]
    for name in ("n", "output_compression", "partial_images"):
        value = form_int(fields, name, INT32_MAX)
        if value is not None:
            setattr(message, name, value)
    seed = form_int(fields, "seed", INT64_MAX)
    if seed is not None:
        message.seed = seed
    return message


def _variation_request(form: uploads.Form) -> images_pb2.CreateImageVariationsRequest:
    fields = form.fields
    images = form.file_list("image")
    if len(images) > 1:
        raise BodyError("A variation takes exactly one image.", "image")
    message = images_pb2.CreateImageVariationsRequest(
        model=fields.get("model", ""),
        image=images[0] if images else b"",
        size=fields.get("size", ""),
        response_format=fields.get("response_format", ""),
        user=fields.get("user", ""),
    )
    n = form_int(fields, "n", INT32_MAX)
    if n is not None:
        message.n = n
    seed = form_int(fields, "seed", INT64_MAX)
    if seed is not None:
        message.seed = seed
    return message


ImagesCall = grpc.aio.UnaryStreamCall[Any, images_pb2.GenerateImagesResponse]
_INCOMPLETE = errors.HttpError(502, "api_error", "upstream_error", True)


async def _json_answer(request: web.Request, call: ImagesCall) -> web.StreamResponse:
    """The whole stream gathered into OpenAI's ImagesResponse."""
    images: list[images_pb2.GeneratedImage] = []
    summary: images_pb2.GenerationSummary | None = None
    try:
        async for event in call:
            if event.HasField("image"):
                images.append(event.image)
            elif event.HasField("summary"):
                summary = event.summary
        # A finished call's metadata is already here: nothing is waited for.
        headers = _passed_headers((*await call.initial_metadata(), *await call.trailing_metadata()))
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    if summary is None:
        return errors.error_response(_INCOMPLETE, "The generation did not complete.")
    return await _images_answer(request, images, summary, headers)


async def _images_answer(
    request: web.Request,
    images: list[images_pb2.GeneratedImage],
    summary: images_pb2.GenerationSummary,
    headers: dict[str, str],
) -> web.StreamResponse:
    """OpenAI's ImagesResponse for the images and summary of a finished generation."""
    config = request.app[CONFIG]
    images.sort(key=lambda i: i.index)
    base_url = config.public_base_url or str(request.url.origin())
    rest: dict[str, Any] = {}
    if summary.output_format:
        # gpt-image models echo the settings the images were made with.
        rest.update(
            background=summary.background,
            output_format=summary.output_format,
            quality=summary.quality,
            size=summary.size,
        )
    usage: dict[str, Any] = {
        "prompt_tokens": summary.usage.input_tokens,
        "completion_tokens": summary.usage.output_tokens,
        "total_tokens": summary.usage.total_tokens,
    }
    if summary.output_format or summary.usage.total_tokens:
        usage.update(_openai_usage(summary.usage))
    rest["usage"] = usage
    return await _write_images_response(request, summary.created, images, base_url, rest, headers)


# Base64 is written in pieces of this many raw bytes (a multiple of 3, so pieces join up).
_B64_PIECE = 3 * 64 * 1024
# Answers up to this size are built whole and sent in one write; larger ones piece by piece.
_WHOLE_ANSWER_BYTES = 256 * 1024


def _b64_length(size: int) -> int:
    return 4 * -(-size // 3)


async def _write_images_response(
    request: web.Request,
    created: int,
    images: list[images_pb2.GeneratedImage],
    base_url: str,
    rest: dict[str, Any],
    headers: dict[str, str],
) -> web.StreamResponse:
    """Writes ``{"created", "data": [...], **rest}``. A large answer is never held whole:
    each image is base64-encoded piece by piece straight into the socket and dropped once
    written, so a request holds about one copy of its images instead of four. A small one
    goes out in one write, headers included."""
    head = b'{"created":' + str(created).encode() + b',"data":['
    tail = b"]," + orjson.dumps(rest)[1:] if rest else b"]}"
    # Each part keeps its image's message, not its bytes: reading ``image.data`` copies
    # them out of the message, so they are read just before they are written (and, for a
    # large answer's length, once before that, each copy dropped as soon as measured).
    parts: list[tuple[bytes, images_pb2.GeneratedImage | None, bytes]] = []
    for i, image in enumerate(images):
        revised = b',"revised_prompt":' + orjson.dumps(image.revised_prompt) + b"}"
        sep = b"," if i else b""
        if image.url:
            url = base_url + image.url if image.url.startswith("/") else image.url
            parts.append((sep + b'{"url":' + orjson.dumps(url) + revised, None, b""))
        else:
            parts.append((sep + b'{"b64_json":"', image, b'"' + revised))
    frame = len(head) + len(tail) + sum(len(before) + len(after) for before, _, after in parts)
    headers = {**headers, "Content-Type": "application/json", "x-request-id": request[REQUEST_ID]}
    # A message's serialized size bounds its image's: enough to choose without a copy.
    bound = frame + sum(_b64_length(m.ByteSize()) for _, m, _ in parts if m is not None)
    if bound <= _WHOLE_ANSWER_BYTES:
        # Small: one buffer, which aiohttp sends with the headers in a single write.
        body = bytearray(head)
        for before, message, after in parts:
            body += before
            if message is not None:
                body += pybase64.b64encode(message.data)
            body += after
        body += tail
        return web.Response(body=body, headers=headers)
    response = web.StreamResponse(headers=headers)
    # The exact length: each image's bytes are read once more here, and dropped at once.
    response.content_length = frame + sum(
        _b64_length(len(m.data)) for _, m, _ in parts if m is not None
    )
    # The parts now hold the only references to the images' messages: each goes once
    # written, so a request holds its messages plus one image's bytes at most.
    images.clear()
    try:
        await response.prepare(request)
        await response.write(head)
        for i, (before, message, after) in enumerate(parts):
            await response.write(before)
            if message is not None:
                data = memoryview(message.data)
                parts[i] = (b"", None, b"")
                del message
                for start in range(0, len(data), _B64_PIECE):
                    await response.write(pybase64.b64encode(data[start : start + _B64_PIECE]))
                del data
            await response.write(after)
        await response.write(tail)
        await response.write_eof()
    except ConnectionResetError:
        # The client left while its (already charged) images were on their way: the 200
        # stands as sent; there is nobody left to answer.
        log.info("http.client_gone", request_id=request[REQUEST_ID])
    return response


def _openai_usage(usage: images_pb2.Usage) -> dict[str, Any]:
    """OpenAI's gpt-image usage object."""
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "text_tokens": usage.input_text_tokens,
            "image_tokens": usage.input_image_tokens,
        },
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
    }


async def _stream_answer(request: web.Request, call: ImagesCall, prefix: str) -> web.StreamResponse:
    """Server-sent events as OpenAI streams images: ``{prefix}.partial_image`` per partial
    render, ``{prefix}.completed`` per image, ``error`` if the stream fails midway. A
    refusal before the first image is an ordinary HTTP error."""
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    if not isinstance(first, images_pb2.GenerateImagesResponse):
        return errors.error_response(_INCOMPLETE, "The generation did not complete.")
    headers = _passed_headers(await call.initial_metadata())
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-request-id": request[REQUEST_ID],
            **headers,
        }
    )
    await response.prepare(request)
    try:
        failure = await _relay(call, first, response, prefix)
        if failure is not None:
            await response.write(_sse({"type": "error", "error": failure.body()}))
        await response.write_eof()
    except ConnectionResetError:
        # The caller left: stop the generation; images it already took stay charged.
        call.cancel()
    return response


async def _relay(
    call: ImagesCall,
    first: images_pb2.GenerateImagesResponse,
    response: web.StreamResponse,
    prefix: str,
) -> errors.Failure | None:
    """Writes each image and partial as an event; returns why the stream did not finish."""
    message: object = first
    finished = False
    try:
        while isinstance(message, images_pb2.GenerateImagesResponse):
            if message.HasField("summary"):
                finished = True
            else:
                await response.write(_sse(_stream_event(message, prefix)))
            message = await call.read()
    except grpc.aio.AioRpcError as exc:
        return errors.describe_grpc_error(exc)
    return None if finished else errors.Failure(_INCOMPLETE, "The generation did not complete.")


def _stream_event(message: images_pb2.GenerateImagesResponse, prefix: str) -> dict[str, Any]:
    image = message.partial if message.HasField("partial") else message.image
    event: dict[str, Any] = {
        "type": f"{prefix}.partial_image" if message.HasField("partial") else f"{prefix}.completed",
        "b64_json": pybase64.b64encode(image.data).decode("ascii"),
        "created_at": int(time.time()),
        "size": f"{image.width}x{image.height}",
        "quality": image.quality,
        "background": image.background,
        "output_format": image.output_format,
    }
    if message.HasField("partial"):
        event["partial_image_index"] = message.partial.partial_image_index
    else:
        event["usage"] = _openai_usage(message.image.usage)
    return event


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


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


MODEL_NOT_FOUND = errors.HttpError(404, "invalid_request_error", "model_not_found", False)


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one entry of ListModels, so only models that can serve now;
    any other id is 404 as OpenAI answers it."""
    model_id = request.match_info["model"]
    config = request.app[CONFIG]
    try:
        answer = await request.app[STUB].ListModels(
            images_pb2.ListModelsRequest(),
            metadata=_metadata(request),
            timeout=min(config.request_timeout_seconds, 30.0),
        )
    except grpc.aio.AioRpcError as exc:
        return errors.from_grpc_error(exc)
    for m in answer.models:
        if m.id == model_id:
            return _json(
                {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
            )
    return errors.error_response(
        MODEL_NOT_FOUND, f"The model '{model_id}' does not exist", param="model"
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
    # read() until EOF: grpc.aio refuses `async for` on a call that read() was used on.
    while isinstance(part := await call.read(), images_pb2.GetImageResponse):
        await response.write(part.chunk)
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


# Readiness asks for the image service itself, not the server as a whole: the service
# reports it NOT_SERVING while its database is unreachable, and this pod should then leave
# the load balancer (liveness asks for "" and stays up: a restart cannot bring a database back).
IMAGES_SERVICE = "imagegen.v1.ImageGeneration"


async def readyz(request: web.Request) -> web.Response:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(request.app[CHANNEL])
    try:
        answer = await stub.Check(
            health_pb2.HealthCheckRequest(service=IMAGES_SERVICE), timeout=2.0
        )
    except grpc.aio.AioRpcError as exc:
        return _json({"status": "unavailable", "service": exc.code().name}, status=503)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return _json({"status": "not_serving"}, status=503)
    return _json({"status": "ok"})
