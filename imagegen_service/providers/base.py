"""The interface every image provider implements.

A provider turns one validated request into images. It raises ``errors.UpstreamError`` when
the upstream fails (5xx, timeout, refused connection, unreadable answer),
``errors.ContentPolicy`` when the upstream refuses the prompt, and
``errors.InvalidParameter`` when the upstream rejects the request itself. It never puts
credentials into an error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0

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
