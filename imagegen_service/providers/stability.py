"""Adapter for Stability AI's Stable Image generate API (v2beta): Core, Ultra and SD3.5.

Wire format (platform.stability.ai/docs/api-reference, "Generate"):
``POST {base_url}/v2beta/stable-image/generate/{core|ultra|sd3}`` with a multipart/form-data
body (multipart even though no file is sent: the API rejects other encodings) holding
``prompt``, ``aspect_ratio``, ``output_format``, optionally ``seed``, and for ``sd3`` the
``model``. The live ``sd3`` models are the SD3.5 family (``sd3.5-large``,
``sd3.5-large-turbo``, ``sd3.5-medium``, ``sd3.5-flash``); the SD3.0 ids (``sd3-large``,
``sd3-large-turbo``, ``sd3-medium``) are sent as configured and, where Stability no longer
takes them, come back as a model the upstream does not offer (below).

Stability makes ONE image per call: ``n`` images are ``n`` concurrent calls under one deadline.
With a seed, call ``i`` uses ``seed + i``, so the images differ yet stay reproducible. If any
call fails (other than a refusal) the others are cancelled and the request fails as a whole.

A model the upstream does not offer is UpstreamModelUnavailable (the router fails over rather
than retrying): a 404 on the route, or a 400 that blames the ``model`` field (we send only the
catalog's upstream id there, so the caller cannot have got it wrong). Every call is paid
work: an UpstreamError raised once any call may have been billed (a timeout or a dropped
connection once connected; an image answer that could not be read; or an image that was made
and then discarded because a sibling failed) carries ``ambiguous = True``, and the router does
not repeat it on this deployment. Stability bills only a generation that succeeded, so a
refused connection, 4xx answers (its moderation answer says "you were not charged") and 5xx
answers are not ambiguous.

We send ``Accept: image/*``: the answer is the raw image (with ``finish-reason`` and ``seed``
response headers), a quarter smaller than base64 inside JSON and with no decode pass, which
matters for Ultra's multi-megabyte PNGs. JSON answers (``{"image", "finish_reason", "seed"}``,
what ``Accept: application/json`` gets) are read too, for proxies that always answer JSON.

Refusals come in two shapes: HTTP 403 ``{"name": "content_moderation", ...}`` before
generation, and a 200 whose ``finish-reason`` is ``CONTENT_FILTERED`` (the body is then a
blurred image, never delivered). Each refused call counts as one filtered image; only when all
``n`` are refused is the request a ContentPolicy error.

Edits (platform.stability.ai/docs/api-reference, "Edit" / "Inpaint"): every model above is
edited at ``POST {base_url}/v2beta/stable-image/edit/inpaint``, whatever its generate route:
multipart with the ``image`` file, an optional ``mask`` file, ``prompt``, ``output_format`` and
optionally ``seed``; same headers, answers and refusals as generate. Stability's mask is
black and white (white = repaint, black = keep, grey = partly); OpenAI's marks the area to
edit with TRANSPARENT pixels, so the mask's alpha channel is inverted into a greyscale PNG.
Without a mask Stability repaints the image's transparent pixels, as OpenAI does; an image
with no alpha channel and no mask gets an all-white mask (the whole image is repainted, as
gpt-image does). One image per call (n calls, seed + i). The result has the input's size.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import aiohttp
from PIL import Image, ImageOps

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import ContentPolicy, InvalidParameter, UpstreamError
from imagegen_service.providers.base import (
    InputImage,
    ProviderImage,
    ProviderRequest,
    ProviderResult,
)
from imagegen_service.providers.http import (
    MAX_DOWNLOAD_BYTES,
    MAX_ERROR_BODY_BYTES,
    MAX_RETRY_AFTER_SECONDS,
    HttpUpstream,
    json_object,
    read_capped,
    short_identifier,
)
from imagegen_service.providers.sizes import aspect_ratio_for

__all__ = [
    "ASPECT_RATIOS",
    "MAX_SEED",
    "STABILITY_BASE_URL",
    "Route",
    "StabilityProvider",
    "from_config",
    "route_for",
]

T = TypeVar("T")

STABILITY_BASE_URL = "https://api.stability.ai"
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
# Stability's documented bounds; 0 asks Stability for a random seed.
MAX_SEED = 4_294_967_294
MAX_PROMPT_CHARS = 10_000
OUTPUT_FORMATS = frozenset({"png", "jpeg", "webp"})
# The inpaint endpoint's documented input bounds.
MIN_EDIT_SIDE = 64
MAX_EDIT_PIXELS = 9_437_184

_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})
_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
_MAX_UPSTREAM_MESSAGE = 300
# Stability's client-identification headers take at most 256 characters.
_MAX_CLIENT_HEADER = 256
# Stability's documented penalty for exceeding its rate limit: 60 s during which every call
# gets 429 again. Used when a 429 carries no Retry-After, so the router fails over at once
# instead of retrying into the penalty.
_RATE_LIMIT_PENALTY_SECONDS = 60.0
# Stability's error texts start with the form field they blame ("aspect_ratio: must be one
# of ..."); this maps those fields to the parameter names of our own API.
_FIELD_PARAMS: Mapping[str, str] = {
    "prompt": "prompt",
    "aspect_ratio": "size",
    "output_format": "output_format",
    "seed": "seed",
    "model": "model",
    "image": "image",
    "mask": "mask",
}


@dataclass(frozen=True, slots=True)
class Route:
    """Where an upstream model is served: the generate endpoint and, for sd3, its ``model``."""

    endpoint: str
    model: str | None = None


def route_for(upstream_model: str) -> Route | None:
    """The generate endpoint for an upstream model id, or None if Stability has none."""
    model = upstream_model.strip()
    if model in ("stable-image-core", "core"):
        return Route("core")
    if model in ("stable-image-ultra", "ultra"):
        return Route("ultra")
    if model.startswith("sd3"):
        return Route("sd3", model)
    return None


@dataclass(frozen=True, slots=True)
class _Plan:
    url: str
    model: str | None
    aspect_ratio: str


@dataclass(slots=True)
class _Call:
    """How far one call got: whether Stability may have done (and billed) its work."""

    started: bool = False
    # The connection was never made, so nothing was sent.
    never_connected: bool = False
    # The answer's HTTP status, once it arrived.
    status: int | None = None

    @property
    def maybe_billed(self) -> bool:
        if not self.started or self.never_connected:
            return False
        if self.status is None:
            # Sent, and then a timeout, a dropped connection or a cancellation.
            return True
        # Stability bills a generation that succeeded; a 5xx made nothing and bills nothing.
        return 200 <= self.status < 300


class StabilityProvider(HttpUpstream):
    """Stability AI's v2beta Stable Image generate endpoints (core, ultra, sd3) and its
    inpaint endpoint for edits."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str = STABILITY_BASE_URL,
        api_key: str | None,
        client_id: str = "imagegen",
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self.base_url = (base_url or STABILITY_BASE_URL).rstrip("/")
        self._api_key = api_key or None
        self._client_id = _header_text(client_id)

    def check(self, request: ProviderRequest) -> None:
        """Rejects what Stability cannot make: unknown models, sizes with no close aspect
        ratio, seeds or prompts outside its bounds, other output formats."""
        self._plan(request)
        if request.images:
            self._edit_image(request)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        plan = self._plan(request)
        return await self._run(
            request, plan.url, lambda i: self._form(request, plan, i), too_large_param="prompt"
        )

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        """Inpaints ``request.images[0]`` where the mask is transparent (see the module doc)."""
        self._plan(request)
        image = self._edit_image(request)
        # Pillow work off the event loop: a mask may have tens of megapixels.
        mask = await asyncio.to_thread(_stability_mask, image, request.mask)
        url = f"{self.base_url}/v2beta/stable-image/edit/inpaint"
        return await self._run(
            request,
            url,
            lambda i: self._edit_form(request, image, mask, i),
            too_large_param="image",
        )

    async def _run(
        self,
        request: ProviderRequest,
        url: str,
        form: Callable[[int], aiohttp.FormData],
        *,
        too_large_param: str,
    ) -> ProviderResult:
        """``request.n`` concurrent calls, call ``i`` posting ``form(i)``, all or nothing."""
        calls = [_Call() for _ in range(request.n)]

        async def call(session: aiohttp.ClientSession) -> list[ProviderImage | None]:
            return await _all_or_nothing(
                [
                    self._call_one(session, request, url, form(i), i, too_large_param, calls[i])
                    for i in range(request.n)
                ]
            )

        try:
            outcomes = await self.within_deadline(call)
        except UpstreamError as exc:
            # Never repeat on this deployment what Stability may already have billed.
            exc.ambiguous = exc.ambiguous or any(c.maybe_billed for c in calls)
            raise
        images = [image for image in outcomes if image is not None]
        if not images:
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        return ProviderResult(images=images, filtered=request.n - len(images))

    def _plan(self, request: ProviderRequest) -> _Plan:
        route = route_for(request.upstream_model)
        if route is None:
            raise InvalidParameter(
                f"The model cannot be served by provider {self.name!r}.", param="model"
            )
        if request.n < 1:
            raise InvalidParameter("n must be at least 1.", param="n")
        if request.output_format not in OUTPUT_FORMATS:
            raise InvalidParameter(
                "output_format must be one of png, jpeg, webp.", param="output_format"
            )
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidParameter(f"seed must be between 0 and {MAX_SEED}.", param="seed")
        if not request.prompt or len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidParameter(
                f"The prompt must have 1 to {MAX_PROMPT_CHARS} characters at this provider.",
                param="prompt",
            )
        ratio = aspect_ratio_for(request.width, request.height, ASPECT_RATIOS)
        url = f"{self.base_url}/v2beta/stable-image/generate/{route.endpoint}"
        return _Plan(url=url, model=route.model, aspect_ratio=ratio)

    def _edit_image(self, request: ProviderRequest) -> InputImage:
        """The image to edit, if Stability's inpaint endpoint takes it."""
        if len(request.images) != 1:
            raise InvalidParameter(
                f"Provider {self.name!r} edits exactly one image per request.", param="image"
            )
        image = request.images[0]
        if (
            min(image.width, image.height) < MIN_EDIT_SIDE
            or image.width * image.height > MAX_EDIT_PIXELS
        ):
            raise InvalidParameter(
                f"The image must be at least {MIN_EDIT_SIDE} pixels on each side and at most "
                f"{MAX_EDIT_PIXELS} pixels in all at this provider.",
                param="image",
            )
        return image

    def _edit_form(
        self, request: ProviderRequest, image: InputImage, mask: bytes | None, index: int
    ) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field(
            "image",
            io.BytesIO(image.data),
            filename=f"image.{image.format}",
            content_type=image.mime_type,
        )
        if mask is not None:
            form.add_field("mask", io.BytesIO(mask), filename="mask.png", content_type="image/png")
        form.add_field("prompt", request.prompt)
        form.add_field("output_format", request.output_format)
        if request.seed is not None:
            form.add_field("seed", str(_seed_for(request.seed, index)))
        return form

    def _form(self, request: ProviderRequest, plan: _Plan, index: int) -> aiohttp.FormData:
        # A FormData is consumed by one send, so every call builds its own.
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("prompt", request.prompt)
        form.add_field("aspect_ratio", plan.aspect_ratio)
        form.add_field("output_format", request.output_format)
        if request.seed is not None:
            form.add_field("seed", str(_seed_for(request.seed, index)))
        if plan.model is not None:
            form.add_field("model", plan.model)
        return form

    def _headers(self, request: ProviderRequest) -> dict[str, str]:
        headers = {"Accept": "image/*"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if self._client_id:
            headers["stability-client-id"] = self._client_id
        # Stability uses it to report abuse per end user, as OpenAI's `user` field is meant for.
        user = _header_text(request.user or "")
        if user:
            headers["stability-client-user-id"] = user
        return {**headers, **self.trace_headers(request)}

    async def _call_one(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        url: str,
        form: aiohttp.FormData,
        index: int,
        too_large_param: str,
        state: _Call,
    ) -> ProviderImage | None:
        """One image, or None when Stability refused it on content grounds."""
        state.started = True
        try:
            async with session.post(url, data=form, headers=self._headers(request)) as resp:
                state.status = resp.status
                if not 200 <= resp.status < 300:
                    body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                    self._raise_unless_refusal(
                        request, resp.status, resp.headers, body, too_large_param
                    )
                    return None
                return await self._read_image(resp, index)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            state.never_connected = True
            raise

    async def _read_image(self, resp: aiohttp.ClientResponse, index: int) -> ProviderImage | None:
        content_type = resp.content_type
        if content_type == "application/json":
            # Also matches Stability's "application/json; type=image/png".
            answer = await self.read_json(resp)
            if self._refused(answer.get("finish_reason"), index):
                return None
            data = self.decode_base64(answer.get("image"), index)
        elif content_type in _IMAGE_TYPES:
            # The verdict is in a header: a filtered (blurred) image is not even downloaded.
            if self._refused(resp.headers.get("finish-reason"), index):
                return None
            raw = await read_capped(resp, MAX_DOWNLOAD_BYTES)
            if raw is None:
                raise self.unreadable(f"item {index} is too large")
            data = raw
        else:
            raise self.unreadable(
                f"content type {content_type!r}, expected image/png, image/jpeg, image/webp "
                "or application/json"
            )
        # inspect() also refuses an image cut short in transit.
        return self.inspect(data, index)

    def _refused(self, finish_reason: Any, index: int) -> bool:
        if finish_reason is None:
            return False
        reason = str(finish_reason).strip().upper()
        if reason == "CONTENT_FILTERED":
            return True
        if reason in ("SUCCESS", ""):
            return False
        code = short_identifier(reason) or "unknown"
        raise UpstreamError(f"upstream {self.name!r}: image {index} finished with {code}")

    def _raise_unless_refusal(
        self,
        request: ProviderRequest,
        status: int,
        headers: Mapping[str, str],
        body: bytes | None,
        too_large_param: str = "prompt",
    ) -> None:
        """Returns only for a content-moderation refusal; raises for every other failure."""
        error = json_object(body)
        name = short_identifier(error.get("name"))
        if name == "content_moderation" and status in (400, 403, 422):
            return
        if status == 404:
            # No such route (engine) at Stability any more.
            self._unavailable(request, status)
        if status in (400, 413, 422):
            message = self._first_error(error)
            param = _param_for(message) or (too_large_param if status == 413 else None)
            if param == "model":
                # Only the catalog's upstream id is sent as `model`: Stability no longer
                # offers it (e.g. an SD3.0 id), which is no fault of the caller's request.
                self._unavailable(request, status)
            raise InvalidParameter(
                message or f"upstream {self.name!r} rejected the request (HTTP {status})",
                param=param,
            )
        # Upstream texts are dropped here: the caller cannot act on them and they may quote
        # account details.
        failure = self.status_error(status, headers, self._scrub(name))
        if failure.retry_after_seconds is None:
            if status == 429:
                failure.retry_after_seconds = _RATE_LIMIT_PENALTY_SECONDS
            elif status in (401, 402):
                # A bad key or an empty account does not heal within a request's lifetime:
                # a Retry-After this long makes the router fail over instead of retrying.
                failure.retry_after_seconds = MAX_RETRY_AFTER_SECONDS
        raise failure

    def _unavailable(self, request: ProviderRequest, status: int) -> NoReturn:
        raise self.model_unavailable(request.upstream_model, status)

    def _first_error(self, error: Mapping[str, Any]) -> str:
        errors = error.get("errors")
        candidates: list[Any] = list(errors) if isinstance(errors, list) else []
        # Proxies in front of Stability sometimes answer {"message": "..."} instead.
        candidates.append(error.get("message"))
        for candidate in candidates:
            if isinstance(candidate, str) and candidate.strip():
                return self._scrub(candidate.strip())[:_MAX_UPSTREAM_MESSAGE]
        return ""

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text


async def _all_or_nothing(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Runs the calls concurrently; on the first failure cancels the rest and re-raises, so no
    call outlives the request and no exception goes unretrieved."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _stability_mask(image: InputImage, mask: InputImage | None) -> bytes | None:
    """OpenAI's mask (alpha 0 = edit) as Stability's (white = repaint, black = keep), as PNG
    bytes; None when the image's own alpha channel is the mask (Stability reads it as OpenAI
    does)."""
    if mask is None:
        if image.has_alpha:
            return None
        # No mask and nothing transparent: OpenAI's gpt-image repaints the whole image.
        white = Image.new("L", (image.width, image.height), 255)
        return _png(white)
    try:
        with Image.open(io.BytesIO(mask.data)) as img:
            alpha = img.convert("RGBA").getchannel("A")
    except Exception as exc:  # Pillow raises many types for bad input.
        raise InvalidParameter("The mask is not a readable image.", param="mask") from exc
    return _png(ImageOps.invert(alpha))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _seed_for(seed: int, index: int) -> int:
    value = seed + index
    # Past the maximum, wrap to 1 rather than 0: Stability reads 0 as "pick a random seed".
    return value if value <= MAX_SEED else value - MAX_SEED


def _param_for(message: str) -> str | None:
    field, sep, _ = message.partition(":")
    return _FIELD_PARAMS.get(field.strip()) if sep else None


def _header_text(value: str) -> str:
    # Header values must be printable ASCII; anything else could break or inject headers.
    return "".join(c for c in value if " " <= c <= "~").strip()[:_MAX_CLIENT_HEADER]


def from_config(config: ProviderConfig, credential: str | None) -> StabilityProvider:
    """Options read from ``config.options``: ``client_id`` (default ``"imagegen"``), sent as
    the ``stability-client-id`` header."""
    client_id = config.options.get("client_id", "imagegen")
    if not isinstance(client_id, str):
        raise ConfigError(f"providers.{config.name}.client_id must be a string")
    return StabilityProvider(
        config.name,
        base_url=config.base_url or STABILITY_BASE_URL,
        api_key=credential,
        client_id=client_id,
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
    )
