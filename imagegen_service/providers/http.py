"""What every adapter that reaches its upstream over HTTP shares: one lazily created
session, one deadline per call, transport failures as UpstreamError, bounded reads,
image sniffing, and Retry-After.

Messages never carry credentials or upstream hostnames' error texts: only the
provider's name, an HTTP status and a short machine code.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import io
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import orjson
import pybase64
from PIL import Image

from imagegen_service.errors import UpstreamError, UpstreamModelUnavailable
from imagegen_service.providers.base import ProviderImage, ProviderRequest

T = TypeVar("T")

# Bounds memory if an upstream misbehaves; a batch of large PNGs in base64 stays far below this.
MAX_ANSWER_BYTES = 512 * 1024 * 1024
MAX_DOWNLOAD_BYTES = 128 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
# A Retry-After longer than this is not waited for: the caller fails over instead.
MAX_RETRY_AFTER_SECONDS = 60.0


class HttpUpstream:
    """Base for HTTP adapters: owns the session and turns transport trouble into errors."""

    def __init__(self, name: str, *, timeout_seconds: float, max_connections: int) -> None:
        self.name = name
        self.timeout_seconds = timeout_seconds
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        # Subclasses hold credentials: a generated repr must never print them into a log.
        return f"{type(self).__name__}(name={self.name!r})"

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def session(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the loop that actually serves requests.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
                # One session serves every account: a cookie an upstream set for one call
                # must not ride along on the next caller's (and no jar is kept per call).
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def within_deadline(self, work: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
        """Runs ``work`` under one deadline for the whole call (polls and downloads included),
        so the caller's budget is not multiplied by the number of round trips."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await work(self.session())
        except TimeoutError as exc:
            # aiohttp's own timeouts subclass TimeoutError too, so they land here.
            error = UpstreamError(
                f"upstream {self.name!r} did not answer within {self.timeout_seconds:g} s"
            )
            # Unless the connection was never made, the request may have reached the
            # upstream, which may be doing (and billing) the work.
            error.ambiguous = not isinstance(exc, aiohttp.ConnectionTimeoutError)
            raise error from exc
        except aiohttp.ClientError as exc:
            # Only the exception's class: its text may name internal hosts the caller should
            # not see. The chained cause keeps the details for our logs.
            error = UpstreamError(
                f"upstream {self.name!r} could not be reached or dropped the connection "
                f"({type(exc).__name__})"
            )
            error.ambiguous = not isinstance(exc, aiohttp.ClientConnectorError)
            raise error from exc

    @staticmethod
    def trace_headers(request: ProviderRequest) -> dict[str, str]:
        """Carries our request id to the upstream, so one id follows a request end to end."""
        return {"X-Request-ID": request.request_id} if request.request_id else {}

    def model_unavailable(self, upstream_model: str, status: int) -> UpstreamModelUnavailable:
        """The upstream answered that ``upstream_model`` does not exist or was retired."""
        return UpstreamModelUnavailable(
            f"upstream {self.name!r} no longer offers the model {upstream_model!r} (HTTP {status})",
            upstream_model=upstream_model,
            provider=self.name,
        )

    def unreadable(self, why: str) -> UpstreamError:
        return UpstreamError(f"unreadable answer from upstream {self.name!r}: {why}")

    def status_error(
        self, status: int, headers: Mapping[str, str], code: str = ""
    ) -> UpstreamError:
        detail = f" ({code})" if code else ""
        error = UpstreamError(f"upstream {self.name!r} answered HTTP {status}{detail}")
        error.retry_after_seconds = retry_after_seconds(headers)
        return error

    async def read_json(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        """A 2xx answer's JSON object, or UpstreamError saying why it cannot be read."""
        if resp.content_type != "application/json":
            raise self.unreadable(f"content type {resp.content_type!r}, expected application/json")
        raw = await read_capped(resp, MAX_ANSWER_BYTES)
        if raw is None:
            raise self.unreadable("too large")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self.unreadable("not JSON") from None
        if not isinstance(answer, dict):
            raise self.unreadable("not an object")
        return answer

    async def download(
        self,
        session: aiohttp.ClientSession,
        url: str,
        index: int,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Fetches an image the upstream handed out by URL. Sends no credentials unless the
        caller passes them: such links are pre-signed and may point at another host."""
        if not url.startswith(("http://", "https://")):
            raise self.unreadable(f"item {index} has no usable url")
        async with session.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise UpstreamError(
                    f"upstream {self.name!r}: downloading image {index} answered HTTP {resp.status}"
                )
            data = await read_capped(resp, MAX_DOWNLOAD_BYTES)
        if data is None:
            raise UpstreamError(f"upstream {self.name!r}: image {index} is too large")
        return data

    def decode_base64(self, encoded: Any, index: int) -> bytes:
        if not isinstance(encoded, str) or not encoded:
            raise self.unreadable(f"item {index} has no image")
        try:
            return pybase64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            pass
        try:
            # Some encoders wrap lines, which the strict decoder rejects: tried second,
            # since splitting a megabyte string costs more than decoding it.
            return pybase64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            raise self.unreadable(f"item {index} is not valid base64") from None

    def inspect(self, data: bytes, index: int, revised_prompt: str = "") -> ProviderImage:
        """Checks the bytes are a whole PNG, JPEG or WEBP image and reads its real pixel
        size. An image cut short in transit is an upstream failure, never a delivery."""
        mime_type = sniff_mime(data)
        if mime_type is None:
            raise self.unreadable(f"item {index} is not a PNG, JPEG or WEBP image")
        if not is_complete(data, mime_type):
            raise self.unreadable(f"item {index} is cut short (an incomplete {mime_type} image)")
        size = header_size(data, mime_type)
        if size is None:
            try:
                # Image.open only parses the header, which is all .size needs.
                with Image.open(io.BytesIO(data)) as img:
                    size = img.size
            except Exception as exc:  # Pillow raises many types for bad input.
                raise self.unreadable(f"item {index} is not an image") from exc
        width, height = size
        return ProviderImage(
            data=data,
            mime_type=mime_type,
            width=width,
            height=height,
            revised_prompt=revised_prompt,
        )


async def read_capped(
    resp: aiohttp.ClientResponse, limit: int, *, truncate: bool = False
) -> bytes | None:
    """Read at most ``limit`` bytes; past it return the prefix (``truncate``) or ``None``."""
    if resp.content_length is not None and resp.content_length > limit and not truncate:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit] if truncate else None
    return b"".join(chunks)


def json_object(body: bytes | None) -> dict[str, Any]:
    """An error body parsed as a JSON object, or ``{}``."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def short_identifier(value: Any) -> str:
    """``value`` if it looks like a machine code (safe to show), else ``""``."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.replace("_", "").isalnum():
        return value
    return ""


def sniff_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# A PNG ends with its IEND chunk: length 0, the type, and the type's fixed CRC.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# What encoders may leave after a JPEG's end-of-image marker.
_JPEG_PADDING = b"\x00\r\n \xff"


def is_complete(data: bytes, mime_type: str) -> bool:
    """Whether an image's bytes run to the end its format declares, without decoding it:
    PNG's IEND chunk, JPEG's end-of-image marker, WEBP's RIFF length. A transfer cut short
    fails this; a whole image of any size costs the same few comparisons."""
    if mime_type == "image/png":
        return data[-64:].rstrip(b"\x00").endswith(_PNG_END)
    if mime_type == "image/jpeg":
        return data[-64:].rstrip(_JPEG_PADDING).endswith(b"\xff\xd9")
    if mime_type == "image/webp":
        declared = int.from_bytes(data[4:8], "little") + 8
        return len(data) >= declared
    return False


def header_size(data: bytes, mime_type: str) -> tuple[int, int] | None:
    """Width and height read straight from a PNG's IHDR chunk or a WEBP's first chunk
    (VP8, VP8L or VP8X), or None for anything else, left to Pillow. Pillow's WEBP open costs
    0.2-1.8 ms (it sets up libwebp's decoder); these few bytes cost microseconds.
    Layouts: the PNG specification, section 11.2.2; RFC 9649 (WebP), sections 2.5-2.7."""
    if mime_type == "image/png":
        # Signature, then the first chunk: length 13, type IHDR, width and height.
        if len(data) >= 24 and data[8:16] == b"\x00\x00\x00\x0dIHDR":
            width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            return (width, height) if width and height else None
        return None
    if mime_type != "image/webp" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        # A key frame's start code, then 14 bits of width and of height (2 bits of scale).
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8L" and data[20] == 0x2F:
        # The signature byte, then 14 bits of width - 1 and 14 bits of height - 1.
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        # Flags (4 bytes), then the canvas's width - 1 and height - 1, 24 bits each.
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; else None."""
    raw = headers.get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
