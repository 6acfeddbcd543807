"""A loopback fake of Black Forest Labs' FLUX API: submit, poll, download.

Typical use::

    async with FakeBflUpstream(api_key="bfl-test-key") as fake:
        provider = BflProvider("bfl", base_url=fake.origin, api_key="bfl-test-key",
                               poll_interval_seconds=0.01)
        fake.script(ok(pending_polls=2), moderated("Content Moderated"))
        ...  # first task: Pending twice, then Ready; second task: refused after generation

Routes, as the real API has them:

* ``POST /v1/{model}`` for the FLUX.1 models (``flux-pro-1.1``, ``flux-dev``, ``flux-pro``,
  ``flux-pro-1.1-ultra``, ``flux-kontext-pro``, ``flux-kontext-max``) and the FLUX.2 models
  (``flux-2-pro``, ``flux-2-max``, ``flux-2-flex``, ``flux-2-klein-4b``, ``flux-2-klein-9b``);
  an unknown model is FastAPI's 404 ``{"detail": "Not Found"}``. Checks ``x-key``
  (missing or wrong: 403 ``{"detail": "Not authenticated - Invalid Authentication"}``),
  validates the body against that model's schema like FastAPI does (unknown fields, types,
  ranges, multiples of 32, aspect-ratio range: 422 ``{"detail": [{type, loc, msg, input}]}``),
  then answers with the next scripted behaviour: usually ``{"id", "polling_url", ...}``.
  Kontext edits send ``input_image`` (and ``input_image_2`` .. ``_4``): base64 of a PNG, JPEG or
  WEBP (or an http(s) URL); anything else is a 422. Without ``aspect_ratio`` an edit's output
  keeps the input image's aspect ratio at about 1 MP, as the real model does.
  ``flux-pro-1.0-fill`` takes ``image`` (required) and an optional ``mask`` the same size as it
  (base64 images; white = fill) and makes an image of the input's size.
  FLUX.2 (docs.bfl.ai, "Generate or edit an image with FLUX.2 [pro]" and its siblings) takes
  ``width``/``height`` (at least 64; this fake also insists on multiples of 16 and at most
  4 MP, BFL's documented grid and ceiling), ``output_format`` ``jpeg`` or ``png`` only,
  ``safety_tolerance`` 0..5, and ``input_image`` .. ``input_image_8`` (klein: ``_4``); it makes
  an image of exactly ``width`` x ``height``. Its answer carries ``cost`` (credits; the numbers
  here are illustrative, not BFL's price list), ``input_mp`` and ``output_mp``.
  Active tasks (submitted, not yet seen finished by a poll) are counted: past 24 per account
  (6 for ``flux-kontext-max``) a submit is refused with 429, as BFL does; ``max_active`` is the
  high-water mark.
* ``GET /v1/get_result?id=...`` (also the ``polling_url``) checks ``x-key`` and answers
  ``{"id", "status", "result", "progress", "details", "preview"}``: ``Pending`` for the
  task's first ``pending_polls`` polls, then its outcome. A ``Ready`` result's ``sample`` points
  into this server's delivery route. A task's ``poll_errors`` answer its first polls with
  those HTTP statuses (or ``"drop"``: the connection is cut mid-answer) before that. The
  ``polling_url`` may name another host (``polling_host``, e.g. ``api.eu1.bfl.ai``) on this
  server's port: a test resolves that name to 127.0.0.1.
* ``GET /delivery/{id}/sample.{ext}`` serves the image WITHOUT asking for ``x-key`` (the real
  samples live on a signed-URL blob store), or the scripted expiry.

Behaviours answer one submit each (``script``), then ``default``; they are built with the
functions below. Recorded requests: ``requests`` (all), ``submits``, ``polls``, ``downloads``.
``dropped()`` accepts the task and then cuts the connection before the answer is complete: the
caller cannot know the task exists, but it runs (and is paid for).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from PIL import Image

from tests.fakes.loopback import LoopbackServer, RecordedRequest, image_bytes

__all__ = [
    "FLUX2_MODELS",
    "Behaviour",
    "FakeBflUpstream",
    "dropped",
    "failed",
    "garbage",
    "garbage_poll",
    "http_error",
    "insufficient_credits",
    "moderated",
    "moderation_refusal_400",
    "never_ready",
    "ok",
    "rate_limited",
    "raw",
    "server_error",
    "service_unavailable",
    "slow",
    "truncated",
    "validation_error",
    "wrong_content_type",
]

BehaviourKind = Literal["task", "error", "raw", "truncated", "dropped"]
SampleKind = Literal["ok", "expired", "missing", "half"]

AUTH_FAILED = {"detail": "Not authenticated - Invalid Authentication"}
# Seen on real answers; the adapter must not depend on either.
_POLL_RETRY_AFTER = "1"

_COMMON_FIELDS = frozenset(
    {"prompt", "prompt_upsampling", "seed", "safety_tolerance", "output_format"}
    | {"webhook_url", "webhook_secret"}
)
INPUT_IMAGE_FIELDS = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))
# FLUX.2's schemas (docs.bfl.ai API reference, Flux2Inputs): no aspect_ratio, no
# prompt_upsampling except on flex; klein takes four input images, the others eight.
_FLUX2_FIELDS = frozenset(
    {"prompt", "seed", "width", "height", "safety_tolerance", "output_format"}
    | {"webhook_url", "webhook_secret"}
)
FLUX2_MODELS = frozenset(
    {"flux-2-pro", "flux-2-max", "flux-2-flex", "flux-2-klein-4b", "flux-2-klein-9b"}
)
# Fields of each request schema in https://api.bfl.ai/openapi.json.
SCHEMAS: Mapping[str, frozenset[str]] = {
    "flux-pro-1.1": _COMMON_FIELDS | {"width", "height", "image_prompt"},
    "flux-pro": _COMMON_FIELDS | {"width", "height", "image_prompt", "steps", "guidance"},
    "flux-dev": _COMMON_FIELDS | {"width", "height", "image_prompt", "steps", "guidance"},
    "flux-pro-1.1-ultra": _COMMON_FIELDS
    | {"aspect_ratio", "raw", "image_prompt", "image_prompt_strength"},
    "flux-kontext-pro": _COMMON_FIELDS
    | {"aspect_ratio", "input_image", "input_image_2", "input_image_3", "input_image_4"},
    "flux-kontext-max": _COMMON_FIELDS
    | {"aspect_ratio", "input_image", "input_image_2", "input_image_3", "input_image_4"},
    "flux-pro-1.0-fill": _COMMON_FIELDS | {"image", "mask", "steps", "guidance"},
    "flux-2-pro": _FLUX2_FIELDS | set(INPUT_IMAGE_FIELDS),
    "flux-2-max": _FLUX2_FIELDS | set(INPUT_IMAGE_FIELDS),
    "flux-2-flex": _FLUX2_FIELDS
    | set(INPUT_IMAGE_FIELDS)
    | {"prompt_upsampling", "guidance", "steps"},
    "flux-2-klein-4b": _FLUX2_FIELDS | set(INPUT_IMAGE_FIELDS[:4]),
    "flux-2-klein-9b": _FLUX2_FIELDS | set(INPUT_IMAGE_FIELDS[:4]),
}
# BFL's limit on active tasks per account, and flux-kontext-max's own lower one.
ACCOUNT_ACTIVE_TASKS = 24
_MODEL_ACTIVE_TASKS = {"flux-kontext-max": 6}
FLUX2_MAX_PIXELS = 4 * 1024 * 1024
# BFL's megapixel in input_mp / output_mp: 1024 x 1024 pixels (1920x1080 is reported as 1.98).
MEGAPIXEL = 1024 * 1024
# Illustrative credits per output megapixel (1 credit = 0.01 USD), for the answer's `cost`.
_FLUX2_CREDITS_PER_MP = {
    "flux-2-pro": 3.0,
    "flux-2-max": 7.0,
    "flux-2-flex": 6.0,
    "flux-2-klein-4b": 1.4,
    "flux-2-klein-9b": 1.5,
}
# Pixels the aspect-ratio models make: ultra ~4 MP (16:9 -> 2752x1536), Kontext ~1 MP.
_AREA = {
    "flux-pro-1.1-ultra": 2752 * 1536,
    "flux-kontext-pro": 1024 * 1024,
    "flux-kontext-max": 1024 * 1024,
}
_DEFAULT_FORMAT = {"flux-kontext-pro": "png", "flux-kontext-max": "png"}
_PIL_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}
_PIL_FORMATS["webp"] = ("WEBP", "image/webp")


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake treats one submit (and, for ``task``, the polls and download after it).

    kind:
        ``task``: 200 ``{"id", "polling_url"}``; polls answer ``in_progress`` for the first
        ``pending_polls`` polls, then ``outcome`` (``Ready``, ``Content Moderated``,
        ``Request Moderated``, ``Error``, ``Failed``, ``Task not found``; ``never``: in progress
        forever). ``error``: ``status`` with ``{"detail": detail}``. ``raw``: ``status``,
        ``body``, ``content_type`` exactly. ``truncated``: a task answer cut in half.
    delay: seconds before the submit answers; ``stop()`` cuts it short.
    sample: ``ok``, or ``expired`` (403 from the blob store) / ``missing`` (404) on download,
        or ``half``: a 200 with the first half of the image (well framed, cut short).
    polling_url: ``True``: this server's get_result URL; ``None``: left out of the answer; a
        string: sent as is.
    polling_host: with ``polling_url=True``, the host name the URL gives instead of
        127.0.0.1 (same scheme and port), e.g. ``api.eu1.bfl.ai``.
    poll_body: when set, every poll of the task answers 200 with these bytes as JSON.
    poll_errors: how the task's first polls fail, one each: an HTTP status (with
        ``{"detail": ...}``, and ``poll_retry_after`` as Retry-After if set) or ``"drop"``.
    """

    kind: BehaviourKind = "task"
    delay: float = 0.0
    pending_polls: int = 0
    in_progress: str = "Pending"
    outcome: str = "Ready"
    sample: SampleKind = "ok"
    polling_url: bool | str | None = True
    polling_host: str | None = None
    poll_body: bytes | None = None
    poll_errors: tuple[int | Literal["drop"], ...] = ()
    poll_retry_after: str | None = None
    status: int = 200
    detail: Any = None
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def ok(
    *,
    pending_polls: int = 0,
    in_progress: str = "Pending",
    polling_url: bool | str | None = True,
    polling_host: str | None = None,
    sample: SampleKind = "ok",
    poll_errors: tuple[int | Literal["drop"], ...] = (),
    poll_retry_after: str | None = None,
) -> Behaviour:
    return Behaviour(
        pending_polls=pending_polls,
        in_progress=in_progress,
        polling_url=polling_url,
        polling_host=polling_host,
        sample=sample,
        poll_errors=poll_errors,
        poll_retry_after=poll_retry_after,
    )


def dropped() -> Behaviour:
    """The task is accepted (and will run), then the connection is cut mid-answer."""
    return Behaviour(kind="dropped")


def slow(seconds: float) -> Behaviour:
    """Submit answers after ``seconds``; for client timeouts."""
    return Behaviour(delay=seconds)


def never_ready() -> Behaviour:
    return Behaviour(outcome="never")


def moderated(status: str = "Content Moderated", *, pending_polls: int = 0) -> Behaviour:
    """A refusal inside a 200 poll answer (``Request Moderated`` or ``Content Moderated``)."""
    return Behaviour(outcome=status, pending_polls=pending_polls)


def failed(status: str = "Error") -> Behaviour:
    """``Error``, ``Failed`` or ``Task not found`` in a 200 poll answer."""
    return Behaviour(outcome=status)


def garbage_poll() -> Behaviour:
    return Behaviour(poll_body=b"not json{")


def http_error(status: int, detail: Any, *, headers: Mapping[str, str] | None = None) -> Behaviour:
    """``status`` with FastAPI's ``{"detail": detail}`` body."""
    return Behaviour(kind="error", status=status, detail=detail, headers=headers or {})


def validation_error(
    field_name: str = "width", message: str = "Input should be valid"
) -> Behaviour:
    return http_error(
        422,
        [{"type": "value_error", "loc": ["body", field_name], "msg": message, "input": None}],
    )


def moderation_refusal_400() -> Behaviour:
    return http_error(400, "Request blocked: the prompt was flagged by content moderation.")


def insufficient_credits() -> Behaviour:
    return http_error(402, "Insufficient credits. Add credits at https://dashboard.bfl.ai.")


def rate_limited(retry_after: int = 1) -> Behaviour:
    return http_error(
        429,
        "You have reached the maximum number of active tasks. Please wait.",
        headers={"Retry-After": str(retry_after)},
    )


def server_error() -> Behaviour:
    return http_error(500, "Internal Server Error")


def service_unavailable() -> Behaviour:
    return http_error(503, "Service temporarily unavailable")


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
    return raw(200, b"not json{")


def wrong_content_type() -> Behaviour:
    return raw(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")


def truncated() -> Behaviour:
    return Behaviour(kind="truncated")


_NAMED: dict[str, Callable[[], Behaviour]] = {
    "ok": ok,
    "slow": lambda: slow(2.0),
    "never_ready": never_ready,
    "moderated": moderated,
    "failed": failed,
    "garbage": garbage,
    "garbage_poll": garbage_poll,
    "truncated": truncated,
    "dropped": dropped,
    "wrong_content_type": wrong_content_type,
    "server_error": server_error,
    "service_unavailable": service_unavailable,
    "rate_limited": rate_limited,
    "insufficient_credits": insufficient_credits,
    "moderation_refusal_400": moderation_refusal_400,
}


@dataclass(slots=True)
class _Task:
    behaviour: Behaviour
    model: str
    body: dict[str, Any]
    polls: int = 0
    failed_polls: int = 0


def real_size(model: str, body: Mapping[str, Any]) -> tuple[int, int]:
    """The pixel size the real model makes for a validated request body."""
    if model in FLUX2_MODELS:
        if "width" in body and "height" in body:
            return int(body["width"]), int(body["height"])
        return _input_size(body.get("input_image")) or (1024, 1024)
    if model == "flux-pro-1.0-fill":
        return _input_size(body.get("image")) or (1024, 1024)
    if model in _AREA:
        ratio = _ratio(str(body.get("aspect_ratio") or "16:9")) or 16 / 9
        input_size = _input_size(body.get("input_image"))
        if input_size is not None and not body.get("aspect_ratio"):
            ratio = input_size[0] / input_size[1]
        area = _AREA[model]
        return _snap32(math.sqrt(area * ratio)), _snap32(math.sqrt(area / ratio))
    return int(body.get("width", 1024)), int(body.get("height", 768))


@functools.lru_cache(maxsize=32)
def _image(width: int, height: int, fmt: str) -> bytes:
    return image_bytes(width, height, fmt)


def _input_size(value: Any) -> tuple[int, int] | None:
    """The pixel size of a base64 input image; None when it is absent, a URL or unreadable."""
    if not isinstance(value, str) or value.startswith(("http://", "https://")):
        return None
    try:
        data = base64.b64decode(value, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG", "WEBP"):
                return None
            width, height = image.size
    except (binascii.Error, ValueError, OSError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _snap32(value: float) -> int:
    return max(32, math.floor(value / 32 + 0.5) * 32)


def _ratio(value: str) -> float | None:
    width, sep, height = value.partition(":")
    if not (sep and width.isdigit() and height.isdigit() and int(width) and int(height)):
        return None
    return int(width) / int(height)


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=dict(headers or {}),
    )


def _problem(kind: str, loc: str, msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ["body", loc], "msg": msg, "input": value}


def validate(model: str, body: Any) -> list[dict[str, Any]]:
    """FastAPI/Pydantic-style problems with a submit body; empty when it is valid."""
    if not isinstance(body, dict):
        return [
            {
                "type": "model_attributes_type",
                "loc": ["body"],
                "msg": "Input should be a valid dictionary or object to extract fields from",
                "input": body,
            }
        ]
    problems = [
        _problem("extra_forbidden", key, "Extra inputs are not permitted", value)
        for key, value in body.items()
        if key not in SCHEMAS[model]
    ]

    def integer(key: str, low: int, high: int, step: int = 1) -> None:
        if key not in body:
            return
        value = body[key]
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(_problem("int_type", key, "Input should be a valid integer", value))
        elif not low <= value <= high:
            problems.append(
                _problem(
                    "less_than_equal" if value > high else "greater_than_equal",
                    key,
                    f"Input should be between {low} and {high}",
                    value,
                )
            )
        elif value % step:
            problems.append(
                _problem("value_error", key, f"Value error, must be a multiple of {step}", value)
            )

    if "prompt" in body and not isinstance(body["prompt"], str):
        problems.append(
            _problem("string_type", "prompt", "Input should be a valid string", body["prompt"])
        )
    if (
        "seed" in body
        and body["seed"] is not None
        and (not isinstance(body["seed"], int) or isinstance(body["seed"], bool))
    ):
        problems.append(
            _problem("int_type", "seed", "Input should be a valid integer", body["seed"])
        )
    if model == "flux-pro-1.0-fill" and "image" not in body:
        problems.append(
            {"type": "missing", "loc": ["body", "image"], "msg": "Field required", "input": body}
        )
    for key in (*INPUT_IMAGE_FIELDS, "image", "mask"):
        value = body.get(key) if key in SCHEMAS[model] else None
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(_problem("string_type", key, "Input should be a valid string", value))
        elif not value.startswith(("http://", "https://")) and _input_size(value) is None:
            problems.append(
                _problem("value_error", key, "Value error, not a base64 image or URL", value[:40])
            )
    image_size, mask_size = _input_size(body.get("image")), _input_size(body.get("mask"))
    if image_size and mask_size and image_size != mask_size:
        problems.append(
            _problem("value_error", "mask", "Value error, mask and image sizes differ", mask_size)
        )
    if model in FLUX2_MODELS:
        integer("width", 64, 1 << 16, 16)
        integer("height", 64, 1 << 16, 16)
        width, height = body.get("width"), body.get("height")
        if (
            isinstance(width, int)
            and isinstance(height, int)
            and not problems
            and width * height > FLUX2_MAX_PIXELS
        ):
            problems.append(
                _problem("value_error", "width", "Value error, at most 4 megapixels", width)
            )
        integer("safety_tolerance", 0, 5)
        formats: tuple[str, ...] = ("jpeg", "png")
    else:
        integer("width", 256, 1440, 32)
        integer("height", 256, 1440, 32)
        integer("safety_tolerance", 0, 6)
        formats = ("jpeg", "png", "webp")
    if body.get("output_format") not in (None, *formats):
        problems.append(
            _problem(
                "enum",
                "output_format",
                "Input should be " + " or ".join(f"'{f}'" for f in formats),
                body["output_format"],
            )
        )
    if "aspect_ratio" in body:
        ratio = _ratio(body["aspect_ratio"]) if isinstance(body["aspect_ratio"], str) else None
        if ratio is None or not 9 / 21 - 1e-9 <= ratio <= 21 / 9 + 1e-9:
            problems.append(
                _problem(
                    "value_error",
                    "aspect_ratio",
                    "Value error, aspect ratio must be between 21:9 and 9:21",
                    body["aspect_ratio"],
                )
            )
    return problems


class FakeBflUpstream(LoopbackServer[Behaviour]):
    """Black Forest Labs' FLUX API on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        api_key: str = "bfl-test-key",
        *,
        default: Behaviour | None = None,
        active_limit: int = ACCOUNT_ACTIVE_TASKS,
    ) -> None:
        super().__init__(default or ok())
        self.api_key = api_key
        self.tasks: dict[str, _Task] = {}
        # Tasks submitted and not yet seen finished by a poll, and the most there ever were.
        self.active: set[str] = set()
        self.max_active = 0
        self.active_limit = active_limit

    def script(self, *behaviours: Behaviour | str) -> None:
        """Queue behaviours (or their names); each answers one later submit, in order."""
        for behaviour in behaviours:
            if isinstance(behaviour, str):
                try:
                    behaviour = _NAMED[behaviour]()
                except KeyError:
                    raise ValueError(
                        f"unknown behaviour {behaviour!r}; known: {sorted(_NAMED)}"
                    ) from None
            super().script(behaviour)

    def reset(self) -> None:
        super().reset()
        self.tasks.clear()
        self.active.clear()
        self.max_active = 0

    @property
    def submits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST"]

    @property
    def polls(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/get_result"]

    @property
    def port(self) -> int:
        return int(self.origin.rsplit(":", 1)[1])

    def _over_limit(self, model: str) -> bool:
        if len(self.active) >= self.active_limit:
            return True
        own = _MODEL_ACTIVE_TASKS.get(model)
        return own is not None and sum(
            1 for task_id in self.active if self.tasks[task_id].model == model
        ) >= min(own, self.active_limit)

    def _start(self, task_id: str, task: _Task) -> None:
        self.tasks[task_id] = task
        self.active.add(task_id)
        self.max_active = max(self.max_active, len(self.active))

    @property
    def downloads(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith("/delivery/")]

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/get_result", self._get_result)
        app.router.add_post("/v1/{model}", self._submit)
        app.router.add_get("/delivery/{task_id}/{name}", self._delivery)

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("x-key") == self.api_key

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        model = request.match_info["model"]
        if not self._authorised(request):
            return _json(403, AUTH_FAILED)
        if model not in SCHEMAS:
            return _json(404, {"detail": "Not Found"})
        problems = validate(model, recorded.body)
        if problems:
            return _json(422, {"detail": problems})

        if self._over_limit(model):
            return _json(
                429,
                {"detail": "You have reached the maximum number of active tasks. Please wait."},
            )
        behaviour = self.next_behaviour()
        await self.pause(behaviour.delay)
        if behaviour.kind == "error":
            return _json(behaviour.status, {"detail": behaviour.detail}, behaviour.headers)
        if behaviour.kind == "raw":
            return web.Response(
                status=behaviour.status,
                body=behaviour.body,
                content_type=behaviour.content_type,
                headers=dict(behaviour.headers),
            )

        task_id = str(uuid.uuid4())
        self._start(task_id, _Task(behaviour, model, recorded.body))
        answer: dict[str, Any] = {"id": task_id, **_usage(model, recorded.body)}
        if behaviour.polling_url is True:
            origin = self.origin
            if behaviour.polling_host:
                origin = f"http://{behaviour.polling_host}:{self.port}"
            answer["polling_url"] = f"{origin}/v1/get_result?id={task_id}"
        elif isinstance(behaviour.polling_url, str):
            answer["polling_url"] = behaviour.polling_url
        payload = orjson.dumps(answer)
        if behaviour.kind == "dropped":
            return await _cut_short(request, payload)
        if behaviour.kind == "truncated":
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, content_type="application/json")

    async def _get_result(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        if not self._authorised(request):
            return _json(403, AUTH_FAILED)
        task_id = request.query.get("id")
        if task_id is None:
            return _json(
                422,
                {
                    "detail": [
                        {
                            "type": "missing",
                            "loc": ["query", "id"],
                            "msg": "Field required",
                            "input": None,
                        }
                    ]
                },
            )
        task = self.tasks.get(task_id)
        base: dict[str, Any] = {
            "id": task_id,
            "result": None,
            "progress": None,
            "details": None,
            "preview": None,
        }
        if task is None:
            return _json(200, {**base, "status": "Task not found"})
        if task.behaviour.poll_body is not None:
            return web.Response(body=task.behaviour.poll_body, content_type="application/json")
        behaviour = task.behaviour
        if task.failed_polls < len(behaviour.poll_errors):
            failure = behaviour.poll_errors[task.failed_polls]
            task.failed_polls += 1
            if failure == "drop":
                return await _cut_short(request, orjson.dumps({**base, "status": "Pending"}))
            headers = (
                {"Retry-After": behaviour.poll_retry_after} if behaviour.poll_retry_after else {}
            )
            return _json(failure, {"detail": "Internal Server Error"}, headers)
        task.polls += 1
        if behaviour.outcome == "never" or task.polls <= behaviour.pending_polls:
            progress = round(min(task.polls / (behaviour.pending_polls + 1), 0.99), 2)
            return _json(
                200,
                {**base, "status": behaviour.in_progress, "progress": progress},
                {"Retry-After": _POLL_RETRY_AFTER},
            )
        self.active.discard(task_id)
        if behaviour.outcome != "Ready":
            details = (
                {"Moderation Reasons": ["Content"]} if "Moderated" in behaviour.outcome else None
            )
            return _json(200, {**base, "status": behaviour.outcome, "details": details})
        fmt = task.body.get("output_format") or _DEFAULT_FORMAT.get(task.model, "jpeg")
        now = time.time()
        result = {
            "sample": f"{self.origin}/delivery/{task_id}/sample.{fmt}?se=2099-01-01&sig=fake",
            "prompt": task.body.get("prompt", ""),
            "seed": task.body.get("seed", 42),
            "start_time": now - 2.0,
            "end_time": now,
            "duration": 2.0,
        }
        return _json(200, {**base, "status": "Ready", "result": result})

    async def _delivery(self, request: web.Request) -> web.Response:
        await self.record(request)
        task = self.tasks.get(request.match_info["task_id"])
        if task is None or task.behaviour.sample == "missing":
            return web.Response(status=404, text="The specified blob does not exist.")
        if task.behaviour.sample == "expired":
            return web.Response(
                status=403,
                body=b'<?xml version="1.0"?><Error><Code>AuthenticationFailed</Code>'
                b"<Message>Signed expiry time has passed.</Message></Error>",
                content_type="application/xml",
            )
        fmt = task.body.get("output_format") or _DEFAULT_FORMAT.get(task.model, "jpeg")
        pil_format, mime_type = _PIL_FORMATS[fmt]
        width, height = real_size(task.model, task.body)
        data = _image(width, height, pil_format)
        if task.behaviour.sample == "half":
            data = data[: len(data) // 2]
        return web.Response(body=data, content_type=mime_type)


def _usage(model: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The submit answer's ``cost``, ``input_mp`` and ``output_mp`` (null for FLUX.1 here)."""
    if model not in FLUX2_MODELS:
        return {"cost": None, "input_mp": None, "output_mp": None}
    width, height = real_size(model, body)
    output_mp = round(width * height / MEGAPIXEL, 2)
    input_mp = 0.0
    for key in INPUT_IMAGE_FIELDS:
        size = _input_size(body.get(key))
        if size is not None:
            input_mp += size[0] * size[1] / MEGAPIXEL
    credits = _FLUX2_CREDITS_PER_MP[model] * max(1.0, output_mp + input_mp)
    return {"cost": round(credits, 2), "input_mp": round(input_mp, 2), "output_mp": output_mp}


async def _cut_short(request: web.Request, payload: bytes) -> web.StreamResponse:
    """Announces ``payload`` in full, sends half of it, then drops the connection."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(payload)
    await resp.prepare(request)
    await resp.write(payload[: len(payload) // 2])
    if request.transport is not None:
        request.transport.close()
    return resp
