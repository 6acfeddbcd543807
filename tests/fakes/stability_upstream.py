"""A loopback fake of Stability AI's v2beta Stable Image generate and inpaint APIs.

Typical use::

    async with FakeStabilityUpstream(api_key="sk-stability-test") as fake:
        provider = StabilityProvider("stability", base_url=fake.base_url, api_key=...)
        fake.script(rate_limited(retry_after=2), "ok")
        ...
        assert fake.requests[0].body["aspect_ratio"] == "16:9"

Route: ``POST /v2beta/stable-image/generate/{core|ultra|sd3}``, as Stability serves it:

* ``Authorization: Bearer <api_key>`` is checked exactly; a missing or wrong one answers 401
  ``{"id", "name": "unauthorized", "errors": [...]}`` without using up a scripted behaviour.
* The body must be multipart/form-data with only the fields the endpoint documents (an
  unknown or misspelt field is a 400 ``bad_request``, as are out-of-range values). Recorded
  requests carry the parsed form fields as a ``dict`` in ``body``.
* ``Accept: image/*`` (or none) gets the raw image with ``finish-reason`` and ``seed``
  headers; ``Accept: application/json`` gets ``{"image": <base64>, "finish_reason", "seed"}``.
* ``POST /v2beta/stable-image/edit/inpaint`` takes the ``image`` file (png, jpeg or webp, at
  least 64 px a side, at most 9,437,184 px), an optional ``mask`` file (greyscale: white =
  repaint), ``prompt``, ``output_format``, ``seed``, ``negative_prompt``, ``grow_mask``,
  ``style_preset``; a text where a file belongs (or the reverse) is a 400. It answers an
  image of the input's size. Recorded file parts are ``bytes`` in ``body``.
* Images have Stability's real pixel size for the aspect ratio (about 1 megapixel for core
  and sd3; Ultra, about 4 megapixels, is modelled as the same table doubled) in the
  requested ``output_format``.
* ``sd3``'s ``model`` is one of the live SD3.5 models (``sd3.5-large``, ``sd3.5-large-turbo``,
  ``sd3.5-medium``, ``sd3.5-flash``); anything else, the retired SD3.0 ids included, is a
  400 ``bad_request`` blaming ``model``, Stability's answer for a value outside a field's
  enum. An unknown route is 404 ``not_found``.

Behaviours (one per request, then ``default``): ``ok``, ``slow``, ``content_filtered``,
``content_moderation``, ``bad_request``, ``stability_error``, ``rate_limited``,
``server_error``, ``service_unavailable``, ``payment_required``, ``payload_too_large``,
``unknown_finish_reason``, ``garbage``, ``garbage_json``, ``truncated`` (the connection drops
mid-body), ``dropped`` (the request is read, then the connection drops with no answer),
``half_image`` (a well-framed answer holding half an image), ``wrong_content_type``, ``raw``.
``script`` also takes these names as plain strings.
"""

from __future__ import annotations

import base64
import functools
import io
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import orjson
from aiohttp import BodyPartReader, web
from multidict import CIMultiDict
from PIL import Image

from tests.fakes.loopback import LoopbackServer, RecordedRequest, image_bytes

__all__ = [
    "PIXEL_SIZES",
    "RETIRED_SD3_MODELS",
    "SD3_MODELS",
    "Behaviour",
    "FakeStabilityUpstream",
    "bad_request",
    "content_filtered",
    "content_moderation",
    "dropped",
    "garbage",
    "garbage_json",
    "half_image",
    "ok",
    "payload_too_large",
    "payment_required",
    "rate_limited",
    "raw",
    "server_error",
    "service_unavailable",
    "slow",
    "stability_error",
    "truncated",
    "unknown_finish_reason",
    "wrong_content_type",
]

BehaviourKind = Literal["ok", "error", "raw", "truncated", "half_image", "dropped"]

# Stability's output sizes for core and sd3 (about one megapixel).
PIXEL_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "5:4": (1152, 896),
    "4:5": (896, 1152),
    "2:3": (832, 1216),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
_ULTRA_SCALE = 2
_OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The models the sd3 route serves today: the SD3.5 family.
SD3_MODELS = frozenset({"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"})
# SD3.0 ids the route no longer takes.
RETIRED_SD3_MODELS = frozenset({"sd3", "sd3-turbo", "sd3-large", "sd3-large-turbo", "sd3-medium"})
_COMMON_FIELDS = frozenset(
    {"prompt", "aspect_ratio", "negative_prompt", "seed", "style_preset", "output_format"}
)
_FIELDS: Mapping[str, frozenset[str]] = {
    "core": _COMMON_FIELDS,
    "ultra": _COMMON_FIELDS | {"image", "strength"},
    "sd3": _COMMON_FIELDS | {"model", "mode", "image", "strength", "cfg_scale"},
}
_MAX_SEED = 4_294_967_294
_INPAINT_FIELDS = frozenset(
    {"prompt", "negative_prompt", "seed", "output_format", "grow_mask", "style_preset"}
)
_INPAINT_FILES = frozenset({"image", "mask"})
_MIN_SIDE = 64
_MAX_PIXELS = 9_437_184


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake answers one request.

    kind:
        ``ok``: 200 with an image; ``finish_reason`` says SUCCESS or CONTENT_FILTERED (a
        filtered answer still carries a blurred image, as Stability's does). ``as_json``
        forces (True) or forbids (False) a JSON answer whatever the Accept header; None
        follows it. ``error``: ``status`` with Stability's ``{"id", "name", "errors"}``.
        ``raw``: ``status``, ``body`` and ``content_type`` as given. ``truncated``: an ok
        answer whose connection drops halfway through the body. ``half_image``: an ok
        answer whose body is half an image, with a matching Content-Length. ``dropped``:
        the request is read in full, then the connection is closed without an answer.
    delay: seconds to wait before answering; ``stop()`` cuts it short.
    """

    kind: BehaviourKind = "ok"
    delay: float = 0.0
    finish_reason: str = "SUCCESS"
    as_json: bool | None = None
    status: int = 200
    name: str = ""
    errors: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"


def ok(*, as_json: bool | None = None, delay: float = 0.0) -> Behaviour:
    return Behaviour(kind="ok", as_json=as_json, delay=delay)


def slow(seconds: float) -> Behaviour:
    return Behaviour(kind="ok", delay=seconds)


def content_filtered(*, as_json: bool | None = None) -> Behaviour:
    """A 200 whose output the safety filter caught: finish-reason CONTENT_FILTERED."""
    return Behaviour(kind="ok", finish_reason="CONTENT_FILTERED", as_json=as_json)


def unknown_finish_reason() -> Behaviour:
    return Behaviour(kind="ok", finish_reason="ERROR")


def stability_error(
    status: int, name: str, *errors: str, headers: Mapping[str, str] | None = None
) -> Behaviour:
    return Behaviour(kind="error", status=status, name=name, errors=errors, headers=headers or {})


def content_moderation() -> Behaviour:
    return stability_error(
        403,
        "content_moderation",
        "Your request was flagged by our content moderation system, as a result your request "
        "was denied and you were not charged.",
    )


def bad_request(message: str = "aspect_ratio: must be one of 16:9, 1:1, 21:9") -> Behaviour:
    return stability_error(400, "bad_request", message)


def payload_too_large() -> Behaviour:
    return stability_error(
        413, "payload_too_large", "body: payloads cannot be larger than 10MiB in size"
    )


def payment_required() -> Behaviour:
    return stability_error(
        402,
        "payment_required",
        "You lack sufficient credits to make this request. Please purchase more credits.",
    )


def rate_limited(retry_after: int | None = 1) -> Behaviour:
    """429; Stability itself sends no Retry-After (pass None for that)."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return stability_error(
        429,
        "rate_limit_exceeded",
        "You have exceeded the rate limit of 150 requests within a 10 second period.",
        headers=headers,
    )


def server_error() -> Behaviour:
    return stability_error(
        500, "internal_error", "An unexpected server error occurred, please try again."
    )


def service_unavailable() -> Behaviour:
    return stability_error(503, "service_unavailable", "The service is temporarily unavailable.")


def raw(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    return Behaviour(
        kind="raw", status=status, body=body, content_type=content_type, headers=headers or {}
    )


def garbage() -> Behaviour:
    """200 claiming a PNG whose bytes are not an image."""
    return raw(200, b"this is not an image", content_type="image/png")


def garbage_json() -> Behaviour:
    return raw(200, b"not json{")


def truncated() -> Behaviour:
    return Behaviour(kind="truncated")


def dropped() -> Behaviour:
    return Behaviour(kind="dropped")


def half_image() -> Behaviour:
    return Behaviour(kind="half_image")


def wrong_content_type() -> Behaviour:
    return raw(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")


_NAMED: dict[str, Callable[[], Behaviour]] = {
    "ok": ok,
    "slow": lambda: slow(2.0),
    "content_filtered": content_filtered,
    "content_moderation": content_moderation,
    "bad_request": bad_request,
    "rate_limited": rate_limited,
    "server_error": server_error,
    "service_unavailable": service_unavailable,
    "payment_required": payment_required,
    "payload_too_large": payload_too_large,
    "unknown_finish_reason": unknown_finish_reason,
    "garbage": garbage,
    "garbage_json": garbage_json,
    "truncated": truncated,
    "dropped": dropped,
    "half_image": half_image,
    "wrong_content_type": wrong_content_type,
}


@functools.lru_cache(maxsize=64)
def _image(width: int, height: int, fmt: str, filtered: bool) -> bytes:
    colour = (128, 128, 128) if filtered else (40, 120, 200)
    return image_bytes(width, height, _OUTPUT_FORMATS[fmt], colour)


def _error(
    status: int, name: str, *errors: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"id": uuid.uuid4().hex, "name": name, "errors": list(errors)}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=dict(headers or {}),
    )


class FakeStabilityUpstream(LoopbackServer[Behaviour]):
    """Stability's generate endpoints on 127.0.0.1; see the module docstring."""

    def __init__(
        self, api_key: str | None = "sk-stability-test", *, default: Behaviour | None = None
    ) -> None:
        super().__init__(default or ok())
        self.api_key = api_key

    @property
    def base_url(self) -> str:
        return self.origin

    def script(self, *behaviours: Behaviour | str) -> None:
        for behaviour in behaviours:
            if isinstance(behaviour, str):
                try:
                    behaviour = _NAMED[behaviour]()
                except KeyError:
                    raise ValueError(
                        f"unknown behaviour {behaviour!r}; known: {sorted(_NAMED)}"
                    ) from None
            super().script(behaviour)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v2beta/stable-image/generate/{endpoint}", self._generate)
        app.router.add_post("/v2beta/stable-image/edit/inpaint", self._inpaint)

    async def _record_form(
        self, request: web.Request
    ) -> tuple[dict[str, str], dict[str, bytes], str]:
        """Records the request; returns its text fields, its file parts and an error text
        ("" if fine)."""
        headers = CIMultiDict(request.headers)
        if request.content_type != "multipart/form-data":
            await self.record(request)
            return {}, {}, "content-type: must be multipart/form-data"
        fields: dict[str, str] = {}
        files: dict[str, bytes] = {}
        problem = ""
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                problem = problem or "body: malformed multipart part"
                continue
            if part.name in fields or part.name in files:
                problem = problem or f"{part.name}: given more than once"
            if part.filename is not None:
                files[part.name] = bytes(await part.read())
            else:
                fields[part.name] = await part.text()
        body: dict[str, str | bytes] = {**fields, **files}
        self.requests.append(
            RecordedRequest(request.method, request.path, headers, dict(request.query), body)
        )
        return fields, files, problem

    def _refuse(self, request: web.Request, problem: str) -> web.Response | None:
        """The auth and Accept checks every endpoint makes, then the form's own problem."""
        if (
            self.api_key is not None
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return _error(401, "unauthorized", "authorization: invalid or missing header value")
        accept = request.headers.get("Accept", "image/*")
        if accept not in ("image/*", "application/json"):
            problem = problem or "accept: must be one of image/*, application/json"
        return _error(400, "bad_request", problem) if problem else None

    async def _scripted(
        self,
        request: web.Request,
        fields: Mapping[str, str],
        size: tuple[int, int],
    ) -> web.StreamResponse:
        behaviour = self.next_behaviour()
        await self.pause(behaviour.delay)
        if behaviour.kind == "dropped":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        if behaviour.kind == "error":
            return _error(
                behaviour.status, behaviour.name, *behaviour.errors, headers=behaviour.headers
            )
        if behaviour.kind == "raw":
            return web.Response(
                status=behaviour.status,
                body=behaviour.body,
                headers={"Content-Type": behaviour.content_type, **behaviour.headers},
            )
        accept = request.headers.get("Accept", "image/*")
        return await self._image_answer(request, size, fields, behaviour, accept)

    async def _inpaint(self, request: web.Request) -> web.StreamResponse:
        fields, files, problem = await self._record_form(request)
        refusal = self._refuse(request, problem or _validate_inpaint(fields, files))
        if refusal is not None:
            return refusal
        with Image.open(io.BytesIO(files["image"])) as image:
            size = image.size
        return await self._scripted(request, fields, size)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        fields, files, problem = await self._record_form(request)
        if endpoint not in _FIELDS:
            return _error(404, "not_found", f"{request.path}: no such endpoint")
        refusal = self._refuse(request, problem or _validate(endpoint, fields, files))
        if refusal is not None:
            return refusal
        width, height = PIXEL_SIZES[fields.get("aspect_ratio", "1:1")]
        if endpoint == "ultra":
            width, height = width * _ULTRA_SCALE, height * _ULTRA_SCALE
        return await self._scripted(request, fields, (width, height))

    async def _image_answer(
        self,
        request: web.Request,
        size: tuple[int, int],
        fields: Mapping[str, str],
        behaviour: Behaviour,
        accept: str,
    ) -> web.StreamResponse:
        width, height = size
        fmt = fields.get("output_format", "png")
        data = _image(width, height, fmt, behaviour.finish_reason == "CONTENT_FILTERED")
        seed = int(fields.get("seed") or 0) or random.randint(1, _MAX_SEED)

        as_json = behaviour.as_json
        if as_json is None:
            as_json = accept == "application/json"
        if as_json:
            answer = {
                "image": base64.b64encode(data).decode("ascii"),
                "finish_reason": behaviour.finish_reason,
                "seed": seed,
            }
            return web.Response(
                body=orjson.dumps(answer),
                headers={"Content-Type": f"application/json; type=image/{fmt}"},
            )

        headers = {
            "Content-Type": f"image/{fmt}",
            "finish-reason": behaviour.finish_reason,
            "seed": str(seed),
        }
        if behaviour.kind == "half_image":
            return web.Response(body=data[: len(data) // 2], headers=headers)
        if behaviour.kind == "truncated":
            resp = web.StreamResponse(headers=headers)
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            if request.transport is not None:
                request.transport.close()
            return resp
        return web.Response(body=data, headers=headers)


def _validate_inpaint(fields: Mapping[str, str], files: Mapping[str, bytes]) -> str:
    """The inpaint endpoint's checks, in Stability's ``"<field>: <problem>"`` style."""
    for name in fields:
        if name in _INPAINT_FILES:
            return f"{name}: must be a file"
        if name not in _INPAINT_FIELDS:
            return f"{name}: unknown field for this endpoint"
    for name in files:
        if name not in _INPAINT_FILES:
            return f"{name}: unknown field for this endpoint"
    if "image" not in files:
        return "image: is required"
    for name, data in files.items():
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
        except Exception:  # Pillow raises many types for bad input.
            return f"{name}: is not a valid image"
        if name == "image":
            if fmt not in ("PNG", "JPEG", "WEBP"):
                return "image: must be one of jpeg, png, webp"
            if min(width, height) < _MIN_SIDE or width * height > _MAX_PIXELS:
                return (
                    f"image: sides must be at least {_MIN_SIDE} pixels and the total at most "
                    f"{_MAX_PIXELS} pixels"
                )
    grow = fields.get("grow_mask")
    if grow is not None and not (grow.isdigit() and int(grow) <= 100):
        return "grow_mask: must be an integer between 0 and 100"
    return _validate_common(fields)


def _validate_common(fields: Mapping[str, str]) -> str:
    prompt = fields.get("prompt")
    if not prompt:
        return "prompt: cannot be empty"
    if len(prompt) > 10_000:
        return "prompt: must be at most 10000 characters"
    if fields.get("output_format", "png") not in _OUTPUT_FORMATS:
        return "output_format: must be one of jpeg, png, webp"
    seed = fields.get("seed")
    if seed is not None and not (seed.isdigit() and 0 <= int(seed) <= _MAX_SEED):
        return f"seed: must be an integer between 0 and {_MAX_SEED}"
    return ""


def _validate(endpoint: str, fields: Mapping[str, str], files: Mapping[str, bytes]) -> str:
    """Stability's request checks, as ``"<field>: <problem>"`` (its own error style)."""
    for name in [*fields, *files]:
        if name not in _FIELDS[endpoint]:
            return f"{name}: unknown field for this endpoint"
    prompt = fields.get("prompt")
    if not prompt:
        return "prompt: cannot be empty"
    if len(prompt) > 10_000:
        return "prompt: must be at most 10000 characters"
    if fields.get("aspect_ratio", "1:1") not in PIXEL_SIZES:
        return f"aspect_ratio: must be one of {', '.join(PIXEL_SIZES)}"
    if fields.get("output_format", "png") not in _OUTPUT_FORMATS:
        return "output_format: must be one of jpeg, png, webp"
    seed = fields.get("seed")
    if seed is not None and not (seed.isdigit() and 0 <= int(seed) <= _MAX_SEED):
        return f"seed: must be an integer between 0 and {_MAX_SEED}"
    if endpoint == "sd3":
        if fields.get("model", "sd3.5-large") not in SD3_MODELS:
            return f"model: must be one of {', '.join(sorted(SD3_MODELS))}"
        if fields.get("mode", "text-to-image") != "text-to-image":
            return "mode: image-to-image needs an image"
    return ""
