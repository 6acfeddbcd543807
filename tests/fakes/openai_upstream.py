"""A loopback fake of an OpenAI-compatible Images API, served by a real aiohttp server.

Typical use::

    async with FakeOpenAIUpstream(api_key="sk-upstream-test") as fake:
        provider = OpenAICompatibleProvider(
            "openai", base_url=fake.base_url, api_key="sk-upstream-test"
        )
        fake.script(rate_limited(retry_after=2), "ok")
        ...  # first call gets a 429, the second a normal answer, later ones the default
        assert fake.requests[0].body["model"] == "dall-e-3"

Routes:

* ``POST /v1/images/generations`` checks ``Authorization: Bearer <api_key>`` (skipped when
  ``api_key`` is None), records the request in ``fake.requests`` and answers with the next
  scripted behaviour, or with ``default`` (a normal answer) once the script is used up.
* ``GET /files/<id>.png`` serves images handed out by ``url``-style answers.

Behaviours are ``Behaviour`` values, built with the factory functions below (``ok``, ``slow``,
``url``, ``truncated``, ``garbage``, ``wrong_content_type``, ``http_error``, ``server_error``,
``service_unavailable``, ``rate_limited``, ``content_policy_violation``,
``moderation_blocked``, ``invalid_value``, ``raw``). ``script`` also takes these names as plain
strings, with default arguments (``"slow"`` waits 2 s). A request refused for its API key
answers 401 without using up a scripted behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

__all__ = [
    "Behaviour",
    "FakeOpenAIUpstream",
    "RecordedRequest",
    "content_policy_violation",
    "garbage",
    "http_error",
    "invalid_value",
    "moderation_blocked",
    "ok",
    "rate_limited",
    "raw",
    "server_error",
    "service_unavailable",
    "slow",
    "truncated",
    "url",
    "wrong_content_type",
]

BehaviourKind = Literal["ok", "url", "truncated", "error", "raw"]

# Large enough for every size the real APIs accept, small enough that a typo in a test cannot
# make the fake allocate gigabytes.
_MAX_SIDE = 4096


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake answers one generation request.

    kind:
        ``ok``: 200 with base64 PNGs of the requested size. ``url``: 200 whose items carry a
        ``url`` into this server instead. ``truncated``: the ``ok`` JSON cut in half.
        ``error``: ``status`` with ``{"error": error}``. ``raw``: ``status``, ``body`` and
        ``content_type`` exactly as given.
    delay: seconds to wait before answering (any kind); ``stop()`` cuts the wait short.
    usage: an ``ok``/``url`` answer's ``usage`` object (gpt-image style), left out when None.
    """

    kind: BehaviourKind = "ok"
    delay: float = 0.0
    status: int = 200
    error: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"
    usage: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One generation request as the fake received it."""

    # The parsed JSON body; None when the body was not JSON.
    body: Any
    # Case-insensitive: ``headers["authorization"]`` and ``headers["Authorization"]`` both work.
    headers: CIMultiDict[str]


def ok(*, usage: Mapping[str, Any] | None = None, delay: float = 0.0) -> Behaviour:
    return Behaviour(kind="ok", usage=usage, delay=delay)


def slow(seconds: float) -> Behaviour:
    """Wait ``seconds``, then answer normally; for client timeouts."""
    return Behaviour(kind="ok", delay=seconds)


def url(*, usage: Mapping[str, Any] | None = None) -> Behaviour:
    """Answer items with ``url`` (as dall-e does by default) instead of ``b64_json``."""
    return Behaviour(kind="url", usage=usage)


def truncated() -> Behaviour:
    return Behaviour(kind="truncated")


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


def http_error(
    status: int,
    *,
    message: str,
    type: str = "invalid_request_error",  # OpenAI's own field name
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    """``status`` with an OpenAI error body ``{"error": {message, type, param, code}}``."""
    return Behaviour(
        kind="error",
        status=status,
        error={"message": message, "type": type, "param": param, "code": code},
        headers=headers or {},
    )


def server_error() -> Behaviour:
    return http_error(
        500,
        message="The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


def service_unavailable() -> Behaviour:
    return http_error(
        503,
        message="The engine is currently overloaded, please try again later.",
        type="server_error",
    )


def rate_limited(retry_after: int = 1) -> Behaviour:
    return http_error(
        429,
        message="Rate limit reached for images per minute. Please try again later.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def content_policy_violation() -> Behaviour:
    """dall-e's refusal."""
    return http_error(
        400,
        message=(
            "Your request was rejected as a result of our safety system. Your prompt may "
            "contain text that is not allowed by our safety system."
        ),
        code="content_policy_violation",
    )


def moderation_blocked() -> Behaviour:
    """gpt-image's refusal."""
    return http_error(
        400,
        message=(
            "Your request was rejected by the safety system. If you believe this is an error, "
            "contact us at help.openai.com and include the request ID req_fake."
        ),
        type="image_generation_user_error",
        code="moderation_blocked",
    )


def invalid_value(
    param: str = "size",
    message: str = "Invalid value: '999x999'. Supported values are: '1024x1024'.",
) -> Behaviour:
    return http_error(400, message=message, code="invalid_value", param=param)


_NAMED: dict[str, Callable[[], Behaviour]] = {
    "ok": ok,
    "slow": lambda: slow(2.0),
    "url": url,
    "truncated": truncated,
    "garbage": garbage,
    "wrong_content_type": wrong_content_type,
    "server_error": server_error,
    "service_unavailable": service_unavailable,
    "rate_limited": rate_limited,
    "content_policy_violation": content_policy_violation,
    "moderation_blocked": moderation_blocked,
    "invalid_value": invalid_value,
}


@functools.lru_cache(maxsize=32)
def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",  # OpenAI's own field name
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=dict(headers or {}),
    )


class FakeOpenAIUpstream:
    """An OpenAI-compatible Images API on 127.0.0.1; see the module docstring."""

    def __init__(
        self, api_key: str | None = "sk-upstream-test", *, default: Behaviour | None = None
    ) -> None:
        self.api_key = api_key
        self.default = default or ok()
        self.requests: list[RecordedRequest] = []
        # Downloads of images handed out by url-style answers.
        self.file_requests: list[RecordedRequest] = []
        self.base_url = ""
        self._origin = ""
        self._queue: deque[Behaviour] = deque()
        self._files: dict[str, bytes] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def hits(self) -> int:
        """Generation requests received, refused ones included."""
        return len(self.requests)

    @property
    def file_hits(self) -> int:
        """Image downloads received."""
        return len(self.file_requests)

    def script(self, *behaviours: Behaviour | str) -> None:
        """Queue behaviours; each answers one later generation request, in order."""
        for behaviour in behaviours:
            if isinstance(behaviour, str):
                try:
                    behaviour = _NAMED[behaviour]()
                except KeyError:
                    raise ValueError(
                        f"unknown behaviour {behaviour!r}; known: {sorted(_NAMED)}"
                    ) from None
            self._queue.append(behaviour)

    def reset(self) -> None:
        """Forget recorded requests and any behaviours still queued."""
        self.requests.clear()
        self._queue.clear()
        self.file_requests.clear()

    async def start(self) -> str:
        """Listen on a free loopback port; return the base URL, ending in ``/v1``."""
        if self._runner is not None:
            raise RuntimeError("FakeOpenAIUpstream is already started")
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._generations)
        app.router.add_get("/files/{name}", self._file)
        # A short shutdown wait: handlers still sleeping are released by `_stopping` anyway.
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._origin = f"http://{host}:{port}"
        self.base_url = f"{self._origin}/v1"
        self._stopping.clear()
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()
        await runner.cleanup()

    async def __aenter__(self) -> FakeOpenAIUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        raw_body = await request.read()
        try:
            body: Any = orjson.loads(raw_body)
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(RecordedRequest(body=body, headers=CIMultiDict(request.headers)))

        if self.api_key is not None and request.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            # OpenAI's real answer names the key in masked form; never the whole key.
            return _error_response(
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        if not isinstance(body, dict):
            return _error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
            )

        behaviour = self._queue.popleft() if self._queue else self.default
        if behaviour.delay > 0:
            # Waiting on the stop event lets stop() finish at once instead of after the delay.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), behaviour.delay)

        if behaviour.kind == "error":
            error = dict(behaviour.error or {})
            return web.Response(
                status=behaviour.status,
                body=orjson.dumps({"error": error}),
                content_type="application/json",
                headers=dict(behaviour.headers),
            )
        if behaviour.kind == "raw":
            return web.Response(
                status=behaviour.status,
                body=behaviour.body,
                headers={"Content-Type": behaviour.content_type, **behaviour.headers},
            )
        return self._images_answer(body, behaviour)

    def _images_answer(self, body: dict[str, Any], behaviour: Behaviour) -> web.Response:
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            return _error_response(
                400,
                f"Invalid value: {n!r}. n must be between 1 and 10.",
                code="invalid_value",
                param="n",
            )
        size = body.get("size", "1024x1024")
        parsed = _parse_size(size)
        if parsed is None:
            return _error_response(
                400,
                f"Invalid value: {size!r}. Expected WIDTHxHEIGHT.",
                code="invalid_value",
                param="size",
            )
        png = _png(*parsed)
        prompt = body.get("prompt")
        revised = f"revised: {prompt}" if isinstance(prompt, str) else ""

        items: list[dict[str, str]] = []
        for _ in range(n):
            if behaviour.kind == "url":
                name = f"{uuid.uuid4().hex}.png"
                self._files[name] = png
                items.append({"url": f"{self._origin}/files/{name}", "revised_prompt": revised})
            else:
                items.append(
                    {"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": revised}
                )
        answer: dict[str, Any] = {"created": int(time.time()), "data": items}
        if behaviour.usage is not None:
            answer["usage"] = dict(behaviour.usage)

        payload = orjson.dumps(answer)
        if behaviour.kind == "truncated":
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, content_type="application/json")

    async def _file(self, request: web.Request) -> web.Response:
        self.file_requests.append(RecordedRequest(body=None, headers=CIMultiDict(request.headers)))
        data = self._files.get(request.match_info["name"])
        if data is None:
            return _error_response(404, "No such file.", code="not_found")
        return web.Response(body=data, content_type="image/png")


def _parse_size(size: Any) -> tuple[int, int] | None:
    if size == "auto":
        return 1024, 1024
    if not isinstance(size, str):
        return None
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        return None
    w, h = int(width), int(height)
    if not (1 <= w <= _MAX_SIDE and 1 <= h <= _MAX_SIDE):
        return None
    return w, h
