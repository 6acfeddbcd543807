"""Adapter for any upstream that speaks OpenAI's Images API (``POST /images/generations``).

Works with OpenAI itself (dall-e-2/3, gpt-image-*) and with the many servers that copy its wire
format. Answers may carry images as ``b64_json`` or as a ``url`` to download; both are accepted
because several compatible servers ignore ``response_format``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Any, NoReturn

import aiohttp
import orjson
from PIL import Image

from imagegen_service.errors import ContentPolicy, InvalidParameter, UpstreamError
from imagegen_service.providers.base import (
    ProviderImage,
    ProviderRequest,
    ProviderResult,
    TokenUsage,
)

__all__ = ["OpenAICompatibleProvider"]

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
# dall-e answers `content_policy_violation`; gpt-image answers `moderation_blocked` with the
# type `image_generation_user_error`.
_CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})
_CONTENT_POLICY_TYPES = frozenset({"image_generation_user_error"})
_MAX_UPSTREAM_MESSAGE = 300
# Bounds memory if an upstream misbehaves; a batch of large PNGs in base64 stays far below this.
_MAX_ANSWER_BYTES = 512 * 1024 * 1024
_MAX_DOWNLOAD_BYTES = 128 * 1024 * 1024
_MAX_ERROR_BODY_BYTES = 64 * 1024


class OpenAICompatibleProvider:
    """One upstream reached over HTTP with OpenAI's Images API wire format."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        self.name = name
        self._endpoint = base_url.rstrip("/") + "/images/generations"
        self._api_key = api_key or None
        self._timeout_seconds = timeout_seconds
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        # The default repr would be harmless today, but a future dataclass-style repr must not
        # print the key into a log line.
        return f"OpenAICompatibleProvider(name={self.name!r}, endpoint={self._endpoint!r})"

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        session = self._get_session()
        try:
            # One deadline for the whole call, downloads of url-style answers included, so the
            # caller's budget is not multiplied by the number of images.
            async with asyncio.timeout(self._timeout_seconds):
                answer = await self._post_generation(session, request)
                return await self._read_result(session, answer, request)
        except TimeoutError as exc:
            # aiohttp's own timeouts subclass TimeoutError too, so they land here.
            raise UpstreamError(
                f"upstream {self.name!r} did not answer within {self._timeout_seconds:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            # Only the exception's class: its text may name internal hosts the caller should
            # not see. The chained cause keeps the details for our logs.
            raise UpstreamError(
                f"upstream {self.name!r} could not be reached or dropped the connection "
                f"({type(exc).__name__})"
            ) from exc

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the loop that actually serves requests.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout_seconds),
            )
        return self._session

    def _payload(self, request: ProviderRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": request.upstream_model,
            "prompt": request.prompt,
            "n": request.n,
            "size": request.size,
            "response_format": "b64_json",
        }
        # Optional fields are left out rather than sent empty: several compatible servers reject
        # values they do not know (dall-e-2 has no quality or style at all).
        if request.quality:
            payload["quality"] = request.quality
        if request.style is not None:
            payload["style"] = request.style
        if request.user:
            payload["user"] = request.user
        return payload

    def _headers(self, request: ProviderRequest) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request.request_id:
            headers["X-Request-ID"] = request.request_id
        return headers

    async def _post_generation(
        self, session: aiohttp.ClientSession, request: ProviderRequest
    ) -> dict[str, Any]:
        async with session.post(
            self._endpoint,
            data=orjson.dumps(self._payload(request)),
            headers=self._headers(request),
        ) as resp:
            if not 200 <= resp.status < 300:
                body = await _read_capped(resp, _MAX_ERROR_BODY_BYTES, truncate=True)
                self._raise_for_status(resp.status, body)
            if resp.content_type != "application/json":
                raise UpstreamError(
                    f"unreadable answer from upstream {self.name!r}: "
                    f"content type {resp.content_type!r}, expected application/json"
                )
            raw = await _read_capped(resp, _MAX_ANSWER_BYTES)
            if raw is None:
                raise UpstreamError(f"unreadable answer from upstream {self.name!r}: too large")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"unreadable answer from upstream {self.name!r}: not JSON"
            ) from None
        if not isinstance(answer, dict):
            raise UpstreamError(f"unreadable answer from upstream {self.name!r}: not an object")
        return answer

    def _raise_for_status(self, status: int, body: bytes | None) -> NoReturn:
        error = _error_object(body)
        code = _short_identifier(error.get("code"))
        kind = _short_identifier(error.get("type"))
        raw_message = error.get("message")
        message = raw_message if isinstance(raw_message, str) else ""

        if status in (400, 403, 422) and _is_content_policy(code, kind, message):
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        if status in (400, 422):
            param = error.get("param")
            text = self._scrub(message.strip())[:_MAX_UPSTREAM_MESSAGE]
            raise InvalidParameter(
                text or f"upstream {self.name!r} rejected the request (HTTP {status})",
                param=param if isinstance(param, str) and param else None,
            )
        # The upstream's message is deliberately dropped here: for 401 OpenAI echoes a masked
        # form of our key, and the caller cannot act on an upstream's internal trouble anyway.
        detail = f" ({self._scrub(code or kind)})" if code or kind else ""
        raise UpstreamError(f"upstream {self.name!r} answered HTTP {status}{detail}")

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    async def _read_result(
        self, session: aiohttp.ClientSession, answer: dict[str, Any], request: ProviderRequest
    ) -> ProviderResult:
        items = answer.get("data")
        if not isinstance(items, list) or not items:
            raise UpstreamError(f"unreadable answer from upstream {self.name!r}: no images")
        images: list[ProviderImage] = []
        # Never hand back more than was asked for: callers bill and lay out per requested image.
        for index, item in enumerate(items[: request.n]):
            if not isinstance(item, dict):
                raise UpstreamError(
                    f"unreadable answer from upstream {self.name!r}: item {index} is not an object"
                )
            data = await self._item_bytes(session, item, index)
            revised = item.get("revised_prompt")
            images.append(self._inspect(data, index, revised if isinstance(revised, str) else ""))
        return ProviderResult(images=images, usage=_usage(answer.get("usage")))

    async def _item_bytes(
        self, session: aiohttp.ClientSession, item: dict[str, Any], index: int
    ) -> bytes:
        encoded = item.get("b64_json")
        if isinstance(encoded, str) and encoded:
            try:
                # Strip whitespace first: some encoders wrap lines, which strict mode rejects.
                return base64.b64decode("".join(encoded.split()), validate=True)
            except (binascii.Error, ValueError):
                raise UpstreamError(
                    f"unreadable answer from upstream {self.name!r}: "
                    f"item {index} is not valid base64"
                ) from None
        url = item.get("url")
        if isinstance(url, str) and url:
            return await self._download(session, url, index)
        raise UpstreamError(
            f"unreadable answer from upstream {self.name!r}: item {index} has no image"
        )

    async def _download(self, session: aiohttp.ClientSession, url: str, index: int) -> bytes:
        if not url.startswith(("http://", "https://")):
            raise UpstreamError(
                f"unreadable answer from upstream {self.name!r}: item {index} has no usable url"
            )
        # No Authorization header: these links are pre-signed and may point at another host,
        # which must never receive our key.
        async with session.get(url) as resp:
            if resp.status != 200:
                raise UpstreamError(
                    f"upstream {self.name!r}: downloading image {index} answered HTTP {resp.status}"
                )
            data = await _read_capped(resp, _MAX_DOWNLOAD_BYTES)
        if data is None:
            raise UpstreamError(f"upstream {self.name!r}: image {index} is too large")
        return data

    def _inspect(self, data: bytes, index: int, revised_prompt: str) -> ProviderImage:
        mime_type = _sniff_mime(data)
        if mime_type is None:
            raise UpstreamError(
                f"unreadable answer from upstream {self.name!r}: "
                f"item {index} is not a PNG, JPEG or WEBP image"
            )
        try:
            # Image.open only parses the header, which is all .size needs.
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Exception as exc:  # Pillow raises many types for bad input.
            raise UpstreamError(
                f"unreadable answer from upstream {self.name!r}: item {index} is not an image"
            ) from exc
        return ProviderImage(
            data=data,
            mime_type=mime_type,
            width=width,
            height=height,
            revised_prompt=revised_prompt,
        )


async def _read_capped(
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


def _error_object(body: bytes | None) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-style error body, or ``{}``."""
    if not body:
        return {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    error = parsed.get("error")
    if isinstance(error, dict):
        return error
    # Some compatible servers answer {"error": "text"} or FastAPI's {"detail": "text"}.
    for key in ("error", "detail", "message"):
        if isinstance(parsed.get(key), str):
            return {"message": parsed[key]}
    return {}


def _short_identifier(value: Any) -> str:
    """``value`` if it looks like a machine code (safe to show), else ``""``."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.replace("_", "").isalnum():
        return value
    return ""


def _is_content_policy(code: str, kind: str, message: str) -> bool:
    return (
        code in _CONTENT_POLICY_CODES
        or kind in _CONTENT_POLICY_TYPES
        or "safety system" in message.lower()
    )


def _sniff_mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _usage(raw: Any) -> TokenUsage:
    if not isinstance(raw, dict):
        return TokenUsage()

    def count(*keys: str) -> int:
        # gpt-image reports input/output tokens; other servers reuse the chat names.
        for key in keys:
            value = raw.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0

    return TokenUsage(
        input_tokens=count("input_tokens", "prompt_tokens"),
        output_tokens=count("output_tokens", "completion_tokens"),
    )
