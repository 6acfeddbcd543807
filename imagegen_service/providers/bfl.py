"""Adapter for Black Forest Labs' FLUX API (``https://api.bfl.ai``): submit, poll, download.

The wire format, as documented at docs.bfl.ai and in https://api.bfl.ai/openapi.json:

* ``POST {base_url}/v1/{model}`` with the header ``x-key: <key>`` and a JSON body answers
  ``{"id", "polling_url", ...}``: the task is queued, not done.
* ``GET polling_url`` (same ``x-key``) answers ``{"id", "status", "result", "progress", ...}``.
  ``status`` is ``Pending`` (or another in-progress word) until it is ``Ready``, when
  ``result.sample`` is a signed URL that expires after about ten minutes. Refusals arrive here
  as ``Request Moderated`` (the prompt) or ``Content Moderated`` (the output); failures as
  ``Error``, ``Failed`` or ``Task not found``.
* The sample is downloaded at once, without the key: it lives on a delivery host, not the API.

Two request shapes, chosen by the upstream model id:

* width/height models (``flux-pro-1.1``, ``flux-dev`` and anything not listed below) take
  ``width``/``height`` in multiples of 32 within 256..1440. The requested size keeps its aspect
  ratio, is scaled into that range and snapped to multiples of 32 (see ``pixel_size_for``).
* aspect-ratio models (``flux-pro-1.1-ultra*``, ``flux-kontext-*``) take ``aspect_ratio``; the
  upstream picks the pixels (about 4 MP for ultra, about 1 MP for Kontext).

Kontext edits (``flux-kontext-*``) submit to the same route with the first image as
``input_image`` (base64; further images as ``input_image_2`` .. ``input_image_4``, Kontext's
multi-reference inputs) and no ``aspect_ratio``: the output keeps the input image's aspect ratio
at about 1 MP, so the requested size is not sent. Kontext edits by instruction and takes no
mask: a masked edit is refused by ``check`` before any money moves.

Masked edits go to BFL's fill model (``flux-pro-1.0-fill``, edits only): ``{"image", "mask",
"prompt", ...}`` with the mask turned from OpenAI's convention (alpha 0 = edit here) into BFL's
(a greyscale PNG, white = fill). Without a mask the image's own transparency marks the area, as
both APIs define it; an image with neither is refused by ``check``. The output has the input's
size.

One image per task: for ``n > 1`` the adapter submits ``n`` tasks concurrently (``seed + i``
when seeded) under the one deadline of the call and merges what comes back. Refused tasks are
counted in ``filtered``; when every task is refused the call raises ContentPolicy. Any other
failure of any task fails the whole call, and the other tasks are abandoned.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import math
import urllib.parse
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, NoReturn

import aiohttp
import orjson
from PIL import Image

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import ContentPolicy, InvalidParameter, UpstreamError
from imagegen_service.providers.base import (
    InputImage,
    ProviderImage,
    ProviderRequest,
    ProviderResult,
)
from imagegen_service.providers.http import (
    MAX_ERROR_BODY_BYTES,
    HttpUpstream,
    json_object,
    read_capped,
)
from imagegen_service.providers.sizes import MAX_DISTORTION, aspect_ratio_for

__all__ = ["BFL_BASE_URL", "BflProvider", "from_config", "pixel_size_for"]

BFL_BASE_URL = "https://api.bfl.ai"

# FluxPro11Inputs / FluxDevInputs: "multiple of 32", 256..1440 on each side.
SIDE_STEP = 32
MIN_SIDE = 256
MAX_SIDE = 1440
# Models that size by aspect ratio; the ultra and Kontext schemas accept 21:9 .. 9:21.
ASPECT_RATIO_MODEL_PREFIXES = ("flux-pro-1.1-ultra", "flux-kontext-")
# Models that edit: Kontext takes the image to edit as `input_image`, plus up to three more.
EDIT_MODEL_PREFIX = "flux-kontext-"
# BFL's inpainting model: one image, a black-and-white mask (white = fill); edits only.
FILL_MODEL_PREFIX = "flux-pro-1.0-fill"
EDIT_IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16", "9:21")
# BFL's documented range for FLUX.1 / FLUX1.1 / Kontext.
MIN_SAFETY_TOLERANCE = 0
MAX_SAFETY_TOLERANCE = 6

DEFAULT_POLL_INTERVAL_SECONDS = 0.5
MAX_POLL_INTERVAL_SECONDS = 2.0
# Long generations poll less often; short ones still get their first answers quickly.
POLL_INTERVAL_GROWTH = 1.25

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
_REFUSED_STATUSES = frozenset({"Request Moderated", "Content Moderated"})
_FAILED_STATUSES: Mapping[str, str] = {
    "Error": "error",
    "Failed": "failed",
    "Task not found": "task_not_found",
}
# Words in a 400 body that mean the prompt was refused rather than malformed. "safety" is left
# out on purpose: it also names the `safety_tolerance` field in ordinary validation errors.
_REFUSAL_WORDS = ("moderat", "flagged", "content policy")
# Codes for our own messages (the upstream's texts are never echoed into UpstreamError).
_STATUS_CODES: Mapping[int, str] = {
    401: "authentication",
    402: "insufficient_credits",
    403: "authentication",
    404: "not_found",
    429: "too_many_active_tasks",
}
# The upstream's field names, as the OpenAI request calls them.
_PARAM_NAMES: Mapping[str, str] = {
    "width": "size",
    "height": "size",
    "aspect_ratio": "size",
    "prompt": "prompt",
    "seed": "seed",
    "output_format": "output_format",
    "input_image": "image",
    "input_image_2": "image",
    "input_image_3": "image",
    "input_image_4": "image",
    "image": "image",
    "mask": "mask",
}
_MAX_UPSTREAM_MESSAGE = 300


def uses_aspect_ratio(upstream_model: str) -> bool:
    return upstream_model.startswith(ASPECT_RATIO_MODEL_PREFIXES)


def edits_images(upstream_model: str) -> bool:
    return upstream_model.startswith(EDIT_MODEL_PREFIX)


def fills(upstream_model: str) -> bool:
    return upstream_model.startswith(FILL_MODEL_PREFIX)


def fill_mask(mask: InputImage) -> bytes:
    """OpenAI's mask (alpha 0 = edit here) as BFL's: a greyscale PNG, white where to fill."""
    try:
        with Image.open(io.BytesIO(mask.data)) as image:
            alpha = image.convert("RGBA").getchannel("A")
    except Exception as exc:  # Pillow raises many types for bad input.
        raise InvalidParameter("The mask is not a readable image.", param="mask") from exc
    out = io.BytesIO()
    alpha.point(lambda value: 255 if value == 0 else 0).save(out, "PNG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixel_size_for(width: int, height: int) -> tuple[int, int]:
    """The ``width``/``height`` sent to a width/height model for a requested size.

    Keeps the aspect ratio: the size is scaled down until the longer side fits 1440, or up
    until the shorter side reaches 256, then each side is rounded to the nearest multiple of 32
    and clamped to 256..1440. 1024x1024 stays as is; 1792x1024 becomes 1440x832.
    """
    scale = 1.0
    if max(width, height) > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)

    def snap(side: int) -> int:
        snapped = math.floor(side * scale / SIDE_STEP + 0.5) * SIDE_STEP
        return min(max(snapped, MIN_SIDE), MAX_SIDE)

    return snap(width), snap(height)


class BflProvider(HttpUpstream):
    """Black Forest Labs' asynchronous FLUX API; see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str = BFL_BASE_URL,
        api_key: str | None,
        timeout_seconds: float = 180.0,
        max_connections: int = 64,
        safety_tolerance: int | None = None,
        poll_interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS,
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._safety_tolerance = safety_tolerance
        self._poll_interval = poll_interval_seconds
        self._max_poll_interval = max(MAX_POLL_INTERVAL_SECONDS, poll_interval_seconds)

    # -- what can be served ---------------------------------------------------------------

    def check(self, request: ProviderRequest) -> None:
        """Sizes whose aspect ratio FLUX cannot come close to are refused before any money
        moves; everything else is mapped (see ``pixel_size_for`` and ``ASPECT_RATIOS``).
        An edit (``request.images``) is checked by ``_edit_fields`` instead; the fill model
        makes edits only."""
        if request.images:
            self._check_edit(request)
        else:
            self._size_fields(request)

    def _size_fields(self, request: ProviderRequest) -> dict[str, Any]:
        if fills(request.upstream_model):
            raise InvalidParameter(
                "This model only edits images (POST /v1/images/edits).", param="model"
            )
        width, height = request.width, request.height
        if width <= 0 or height <= 0:
            raise InvalidParameter(f"The size {request.size} is not a valid size.", param="size")
        if uses_aspect_ratio(request.upstream_model):
            return {"aspect_ratio": aspect_ratio_for(width, height, ASPECT_RATIOS)}
        sent_width, sent_height = pixel_size_for(width, height)
        distortion = abs(math.log((width / height) / (sent_width / sent_height)))
        if distortion > math.log(MAX_DISTORTION):
            raise InvalidParameter(
                f"The size {request.size} has no close size at this provider (each side "
                f"{MIN_SIDE}..{MAX_SIDE} pixels).",
                param="size",
            )
        return {"width": sent_width, "height": sent_height}

    def _check_edit(self, request: ProviderRequest) -> None:
        """Everything ``_edit_fields`` refuses, without encoding a byte."""
        if fills(request.upstream_model):
            self._check_fill(request)
            return
        if not edits_images(request.upstream_model):
            raise InvalidParameter(
                "This model does not edit images (flux-kontext-* and flux-pro-1.0-fill do).",
                param="model",
            )
        if request.mask is not None:
            raise InvalidParameter(
                "this model edits by instruction and takes no mask", param="mask"
            )
        if not request.images:
            raise InvalidParameter("You must provide an image.", param="image")
        if len(request.images) > len(EDIT_IMAGE_FIELDS):
            raise InvalidParameter(
                f"This model takes at most {len(EDIT_IMAGE_FIELDS)} images; "
                f"got {len(request.images)}.",
                param="image",
            )

    def _check_fill(self, request: ProviderRequest) -> None:
        if len(request.images) != 1:
            raise InvalidParameter(
                f"This model edits one image; got {len(request.images)}.", param="image"
            )
        if request.mask is None and not request.images[0].has_alpha:
            raise InvalidParameter(
                "This model needs a mask, or an image whose transparent pixels mark the area "
                "to edit.",
                param="mask",
            )

    def _edit_fields(self, request: ProviderRequest) -> dict[str, Any]:
        """Kontext: the images in ``input_image`` .. ``input_image_4``; fill: ``image`` and
        ``mask`` (BFL's convention); all base64."""
        self._check_edit(request)
        if fills(request.upstream_model):
            fields = {"image": _b64(request.images[0].data)}
            if request.mask is not None:
                fields["mask"] = _b64(fill_mask(request.mask))
            return fields
        return {
            key: _b64(image.data)
            for key, image in zip(EDIT_IMAGE_FIELDS, request.images, strict=False)
        }

    # -- one call ---------------------------------------------------------------------------

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        return await self._run(request, self._size_fields(request))

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        """A Kontext or fill edit: the submit/poll/download flow of ``generate`` with the
        images in place of the size (the output follows the first image's shape)."""
        return await self._run(request, self._edit_fields(request))

    async def _run(self, request: ProviderRequest, fields: Mapping[str, Any]) -> ProviderResult:
        """``request.n`` tasks, each submitting ``fields`` with the common ones."""

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            outcomes = await _all_or_nothing(
                [self._one_image(session, request, fields, i) for i in range(request.n)]
            )
            images = [image for image in outcomes if image is not None]
            if not images:
                raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
            return ProviderResult(images=images, filtered=request.n - len(images))

        return await self.within_deadline(call)

    async def _one_image(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        fields: Mapping[str, Any],
        index: int,
    ) -> ProviderImage | None:
        """One task from submit to downloaded bytes; None when the upstream refused it."""
        payload = self._payload(request, fields, index)
        task = await self._submit(session, request, payload)
        if task is None:
            return None
        answer = await self._poll(session, task, index)
        if answer is None:
            return None
        result = answer.get("result")
        sample = result.get("sample") if isinstance(result, dict) else None
        if not isinstance(sample, str) or not sample:
            raise self.unreadable(f"task {index} is ready but has no sample")
        # The signed link expires within minutes: fetch it now, and without our key.
        data = await self.download(session, sample, index)
        return self.inspect(data, index)

    def _payload(
        self, request: ProviderRequest, fields: Mapping[str, Any], index: int
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            **fields,
            "output_format": request.output_format,
        }
        if request.seed is not None:
            # Distinct seeds, or n tasks would return n copies of one image.
            payload["seed"] = request.seed + index
        if self._safety_tolerance is not None:
            payload["safety_tolerance"] = self._safety_tolerance
        return payload

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key is not None:
            headers["x-key"] = self._api_key
        return headers

    # -- submit -----------------------------------------------------------------------------

    async def _submit(
        self, session: aiohttp.ClientSession, request: ProviderRequest, payload: dict[str, Any]
    ) -> tuple[str, str | None] | None:
        """(task id, trusted polling URL or None), or None when the prompt was refused."""
        # The model is a path segment: quoting keeps an odd catalog id from changing the route.
        route = urllib.parse.quote(request.upstream_model, safe="")
        async with session.post(
            f"{self._base_url}/v1/{route}",
            data=orjson.dumps(payload),
            headers={
                **self._headers(),
                **self.trace_headers(request),
                "Content-Type": "application/json",
            },
        ) as resp:
            if not 200 <= resp.status < 300:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                if self._is_refusal(resp.status, body):
                    return None
                self._raise_for_status(resp.status, resp.headers, body)
            answer = await self.read_json(resp)
        task_id = answer.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise self.unreadable("the submitted task has no id")
        return task_id, self._trusted_polling_url(answer.get("polling_url"))

    def _is_refusal(self, status: int, body: bytes | None) -> bool:
        if status != 400:
            return False
        text = _detail_text(json_object(body)).lower()
        return any(word in text for word in _REFUSAL_WORDS)

    def _raise_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes | None
    ) -> NoReturn:
        if status in (400, 422):
            detail = json_object(body).get("detail")
            message, field = _validation_summary(detail)
            text = self._scrub(message.strip())[:_MAX_UPSTREAM_MESSAGE]
            raise InvalidParameter(
                text or f"upstream {self.name!r} rejected the request (HTTP {status})",
                param=_PARAM_NAMES.get(field or ""),
            )
        # BFL's 401/403 bodies describe our key; 402/429/5xx texts help nobody downstream.
        raise self.status_error(status, headers, _STATUS_CODES.get(status, ""))

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _trusted_polling_url(self, value: Any) -> str | None:
        """``polling_url`` if it may be sent our key, else None (poll via ``get_result``).

        The global endpoint hands out regional polling hosts (api.bfl.ai -> api.eu4.bfl.ai), so
        a sibling of the configured host is trusted; any other host would receive the key, so
        the adapter polls through the configured endpoint instead.
        """
        if not isinstance(value, str) or not value:
            return None
        url = urllib.parse.urlsplit(value)
        base = urllib.parse.urlsplit(self._base_url)
        if url.scheme not in ("http", "https") or not url.hostname or not base.hostname:
            return None
        if base.scheme == "https" and url.scheme != "https":
            return None
        host, base_host = url.hostname.lower(), base.hostname.lower()
        if host == base_host:
            return value
        parent = _parent_domain(base_host)
        return value if parent and host.endswith("." + parent) else None

    # -- poll -------------------------------------------------------------------------------

    async def _poll(
        self, session: aiohttp.ClientSession, task: tuple[str, str | None], index: int
    ) -> dict[str, Any] | None:
        """The ``Ready`` answer, or None when moderation refused the task. Bounded only by the
        call's deadline, which ``within_deadline`` enforces."""
        task_id, polling_url = task
        url = polling_url or f"{self._base_url}/v1/get_result"
        params = None if polling_url else {"id": task_id}
        interval = self._poll_interval
        while True:
            await asyncio.sleep(interval)
            interval = min(interval * POLL_INTERVAL_GROWTH, self._max_poll_interval)
            async with session.get(url, params=params, headers=self._headers()) as resp:
                if resp.status != 200:
                    raise self.status_error(
                        resp.status, resp.headers, _STATUS_CODES.get(resp.status, "")
                    )
                answer = await self.read_json(resp)
            status = answer.get("status")
            if not isinstance(status, str):
                raise self.unreadable(f"task {index} has no status")
            if status == "Ready":
                return answer
            if status in _REFUSED_STATUSES:
                return None
            failure = _FAILED_STATUSES.get(status)
            if failure is not None:
                raise UpstreamError(f"upstream {self.name!r}: task {index} failed ({failure})")
            # "Pending", "Queued", "Processing", "Reasoning", "Generating", and any word added
            # later: a new failure word costs at worst the deadline, while treating a new
            # progress word as a failure would break every call.


async def _all_or_nothing(
    coroutines: Sequence[Coroutine[Any, Any, ProviderImage | None]],
) -> list[ProviderImage | None]:
    """Runs the per-image coroutines concurrently. The first failure cancels the others, so
    no task keeps polling (or holding a connection) for a call that has already failed."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _parent_domain(host: str) -> str:
    """``bfl.ai`` for ``api.bfl.ai``; ``""`` for IP addresses and names of two labels or fewer."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return ""
    labels = host.split(".")
    return ".".join(labels[1:]) if len(labels) >= 3 else ""


def _detail_text(body: Mapping[str, Any]) -> str:
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return " ".join(str(item.get("msg", "")) for item in detail if isinstance(item, dict))
    for key in ("message", "error"):
        if isinstance(body.get(key), str):
            return str(body[key])
    return ""


def _validation_summary(detail: Any) -> tuple[str, str | None]:
    """(message, field) from FastAPI's ``detail``: a string, or a list of
    ``{"loc": ["body", "width"], "msg": "...", "type": "..."}``."""
    if isinstance(detail, str):
        return detail, None
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return "", None
    first = detail[0]
    loc = first.get("loc")
    parts = [str(p) for p in loc if p != "body"] if isinstance(loc, list) else []
    field = parts[-1] if parts else None
    msg = first.get("msg")
    message = msg if isinstance(msg, str) else ""
    if parts and message:
        message = f"{'.'.join(parts)}: {message}"
    return message, field


def _option_int(options: Mapping[str, Any], key: str, name: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"providers.{name}.{key} must be an integer; got {value!r}")
    return value


def from_config(config: ProviderConfig, credential: str | None) -> BflProvider:
    """Options: ``safety_tolerance`` (0..6, unset: BFL's default of 2) and
    ``poll_interval_seconds`` (first wait between polls, default 0.5, growing to 2 s)."""
    options = config.options
    safety = _option_int(options, "safety_tolerance", config.name)
    if safety is not None and not MIN_SAFETY_TOLERANCE <= safety <= MAX_SAFETY_TOLERANCE:
        raise ConfigError(
            f"providers.{config.name}.safety_tolerance must be between "
            f"{MIN_SAFETY_TOLERANCE} and {MAX_SAFETY_TOLERANCE}; got {safety}"
        )
    interval = options.get("poll_interval_seconds", DEFAULT_POLL_INTERVAL_SECONDS)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        raise ConfigError(
            f"providers.{config.name}.poll_interval_seconds must be a positive number; "
            f"got {interval!r}"
        )
    return BflProvider(
        config.name,
        base_url=config.base_url or BFL_BASE_URL,
        api_key=credential,
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
        safety_tolerance=safety,
        poll_interval_seconds=float(interval),
    )
