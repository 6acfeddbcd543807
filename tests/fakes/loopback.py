"""What every loopback fake of an upstream shares: a real aiohttp server on a free
127.0.0.1 port, a queue of scripted behaviours (one per incoming request, then a default),
a record of what was received, and test images.

A fake subclasses ``LoopbackServer``, adds its routes in ``routes()``, and in each handler
calls ``self.record(request)`` and ``self.next_behaviour()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from imagegen_service.errors import ImagegenError
from imagegen_service.providers.base import ProviderRequest

B = TypeVar("B")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    # Case-insensitive: ``headers["authorization"]`` and ``headers["Authorization"]`` both work.
    headers: CIMultiDict[str]
    query: dict[str, str]
    # Parsed JSON when the body was JSON, else the raw bytes.
    body: Any


class LoopbackServer(Generic[B]):
    def __init__(self, default: B) -> None:
        self.default = default
        self.requests: list[RecordedRequest] = []
        self.origin = ""
        self._queue: deque[B] = deque()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @property
    def hits(self) -> int:
        return len(self.requests)

    def script(self, *behaviours: B) -> None:
        """Queue behaviours; each answers one later request, in order."""
        self._queue.extend(behaviours)

    def next_behaviour(self) -> B:
        return self._queue.popleft() if self._queue else self.default

    def reset(self) -> None:
        self.requests.clear()
        self._queue.clear()

    async def record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        body: Any = raw
        if request.content_type == "application/json":
            with contextlib.suppress(ValueError):
                body = await request.json()
        recorded = RecordedRequest(
            request.method, request.path, CIMultiDict(request.headers), dict(request.query), body
        )
        self.requests.append(recorded)
        return recorded

    async def pause(self, seconds: float) -> None:
        """Sleeps, but wakes at once when the server stops."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    async def start(self) -> str:
        """Listens on a free loopback port; returns the origin, e.g. http://127.0.0.1:PORT."""
        if self._runner is not None:
            raise RuntimeError("already started")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.origin = f"http://{host}:{port}"
        self._stopping.clear()
        return self.origin

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self._stopping.set()
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def image_bytes(
    width: int, height: int, fmt: str = "PNG", colour: tuple[int, int, int] = (40, 120, 200)
) -> bytes:
    """A plain image of exactly ``width x height`` in ``fmt`` (PNG, JPEG, WEBP)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def free_port() -> int:
    """A loopback port nothing listens on now (bound once, then released): a refused
    connection for adapter tests, or a port for a server a test starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def provider_request(**overrides: Any) -> ProviderRequest:
    """A request as the pipeline hands it to an adapter: one 1024x1024 image of a fixed
    prompt unless ``overrides`` say otherwise (``upstream_model`` is required)."""
    fields: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "width": 1024,
        "height": 1024,
        "quality": "",
    }
    fields.update(overrides)
    return ProviderRequest(**fields)


def error_texts(error: BaseException) -> str:
    """Everything about an error and its causes that could reach a log or a caller: what
    the credential-leak tests search for an upstream's key."""
    texts: list[str] = []
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current)]
        if isinstance(current, ImagegenError):
            texts += [current.message, repr(current.metadata())]
        if isinstance(current, BaseExceptionGroup):
            texts += [error_texts(inner) for inner in current.exceptions]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)
