"""The interface every image provider implements.

A provider turns one validated request into images. It raises ``errors.UpstreamError`` when
the upstream fails (5xx, timeout, refused connection, unreadable answer),
``errors.ContentPolicy`` when the upstream refuses the prompt, and
``errors.InvalidParameter`` when the upstream rejects the request itself. It never puts
credentials into an error message.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

# What a request asks a provider to do; a model's catalog entry lists the ones it offers.
Operation = Literal["generate", "edit", "variation"]
OPERATIONS: tuple[Operation, ...] = ("generate", "edit", "variation")


@dataclass(frozen=True, slots=True)
class InputImage:
    """An image the caller sent (edits, variations), already sniffed and measured."""

    data: bytes
    # "png", "jpeg" or "webp", from the bytes themselves.
    format: str
    width: int
    height: int
    has_alpha: bool = False

    @property
    def mime_type(self) -> str:
        return f"image/{self.format}"


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    upstream_model: str
    prompt: str
    n: int
    width: int
    height: int
    quality: str
    style: str | None = None
    seed: int | None = None
    user: str | None = None
    request_id: str = ""
    # "png", "jpeg" or "webp".
    output_format: str = "png"
    # The gpt-image parameters: "transparent", "opaque" or "auto"; 0-100 for jpeg/webp
    # (None: the format's default); "low" or "auto" (None: not sent).
    background: str = "auto"
    output_compression: int | None = None
    moderation: str | None = None
    # Streaming only: progressive renders wanted per image (0-3).
    partial_images: int = 0
    # Edits: the images (the first is edited) and the optional mask; variations: one image.
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    # The model family whose rules shape the upstream payload (``families.py``); empty:
    # the adapter recognises the family from ``upstream_model`` or sends the request as is.
    family: str = ""

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, slots=True)
class ProviderImage:
    data: bytes
    mime_type: str
    width: int
    height: int
    revised_prompt: str = ""
    # This image's own token usage, where a streaming upstream reports it per image.
    usage: TokenUsage | None = None


@dataclass(frozen=True, slots=True)
class PartialImage:
    """A progressive render of image ``index`` of a streamed request."""

    index: int
    partial_image_index: int
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    # The input tokens split by kind, where the upstream says (0: not reported).
    input_text_tokens: int = 0
    input_image_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ProviderResult:
    images: list[ProviderImage]
    usage: TokenUsage = field(default_factory=TokenUsage)
    # Images the upstream withheld on safety grounds; they are neither delivered nor charged.
    filtered: int = 0


class Provider(Protocol):
    """One configured upstream (or the built-in renderer)."""

    name: str

    def check(self, request: ProviderRequest) -> None:
        """Raises InvalidParameter if this provider cannot serve the request at all (for
        example a size with no close aspect ratio). Runs before any money moves; no I/O."""
        ...

    async def generate(self, request: ProviderRequest) -> ProviderResult: ...

    async def aclose(self) -> None: ...


# What a streamed call yields: partial renders and finished images in order (image i's
# partials before image i), then optionally the usage of the whole request.
StreamEvent = PartialImage | ProviderImage | TokenUsage


@runtime_checkable
class ModelListing(Protocol):
    """A provider whose upstream lists the models it serves (``imagegen-admin providers
    check``): the upstream model ids, or None where this upstream (or this way of reaching
    it) offers no list. Raises UpstreamError when the list cannot be had."""

    async def list_models(self) -> frozenset[str] | None: ...


@runtime_checkable
class Editing(Protocol):
    """A provider that edits images (``request.images``, ``request.mask``)."""

    async def edit(self, request: ProviderRequest) -> ProviderResult: ...


@runtime_checkable
class Varying(Protocol):
    """A provider that makes variations of ``request.images[0]``."""

    async def vary(self, request: ProviderRequest) -> ProviderResult: ...


@runtime_checkable
class Streaming(Protocol):
    """A provider that streams partial renders; others are streamed by ``stream_events``'s
    default, which yields only the finished images."""

    def generate_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]: ...

    def edit_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]: ...


def supports(provider: Provider, operation: Operation) -> bool:
    """Whether ``provider`` has the method ``operation`` needs."""
    if operation == "edit":
        return isinstance(provider, Editing)
    if operation == "variation":
        return isinstance(provider, Varying)
    return True


async def call(
    provider: Provider, operation: Operation, request: ProviderRequest
) -> ProviderResult:
    """One non-streamed call of ``operation``; the caller checked ``supports`` first."""
    if operation == "edit":
        assert isinstance(provider, Editing)
        return await provider.edit(request)
    if operation == "variation":
        assert isinstance(provider, Varying)
        return await provider.vary(request)
    return await provider.generate(request)


async def stream_events(
    provider: Provider, operation: Operation, request: ProviderRequest
) -> AsyncGenerator[StreamEvent]:
    """``operation`` streamed: the provider's own stream where it has one, else its one
    answer as finished images only (partial images are a wish, never a promise)."""
    if isinstance(provider, Streaming) and operation in ("generate", "edit"):
        events = (
            provider.generate_stream(request)
            if operation == "generate"
            else provider.edit_stream(request)
        )
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
        return
    result = await call(provider, operation, request)
    for image in result.images:
        yield image
    yield result.usage
