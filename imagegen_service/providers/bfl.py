"""Adapter for Black Forest Labs' FLUX API (``https://api.bfl.ai``): submit, poll, download.

The wire format, as documented at docs.bfl.ai (API reference and "Integration guidelines") and
in https://api.bfl.ai/openapi.json:

* ``POST {base_url}/v1/{model}`` with the header ``x-key: <key>`` and a JSON body answers
  ``{"id", "polling_url", "cost", "input_mp", "output_mp"}``: the task is queued, not done.
  ``cost`` is in credits (1 credit = 0.01 USD); it is logged, while billing stays with the
  catalog. An unknown model is FastAPI's 404 on that route: UpstreamModelUnavailable.
* ``GET polling_url`` (same ``x-key``) answers ``{"id", "status", "result", "progress", ...}``.
  ``status`` is ``Pending`` (or another in-progress word) until it is ``Ready``, when
  ``result.sample`` is a signed URL that expires after about ten minutes. Refusals arrive here
  as ``Request Moderated`` (the prompt) or ``Content Moderated`` (the output); failures as
  ``Error``, ``Failed`` or ``Task not found``.
* BFL's guidelines say to poll the returned ``polling_url`` as is: the global host hands out
  regional ones (``api.eu1.bfl.ai``, ``api.eu2.bfl.ai``, ...). It is polled only on a host of
  BFL's own (``bfl.ai`` or ``*.bfl.ai``) or the configured base host; any other host would
  receive the key, so the task is given up instead (UpstreamError). Without a ``polling_url``
  the configured host's ``/v1/get_result?id=`` is polled. Redirects are never followed with
  the key.
* The sample is downloaded at once, without the key: it lives on a delivery host.

Request shapes, chosen by the model family (``ProviderRequest.family``, else the upstream id):

* FLUX.2 (family ``flux-2``: ``flux-2-pro``, ``-max``, ``-flex``, ``-klein-4b``, ``-klein-9b``)
  takes ``width``/``height`` as asked: ``check`` refuses a size breaking the family's rule
  (multiples of 16, at least 64, at most 4 MP) and ``webp`` (FLUX.2 makes jpeg or png only).
  Edits send the images as ``input_image``, ``input_image_2`` .. ``input_image_8`` (klein:
  up to ``_4``) plus the size; FLUX.2 takes no mask. ``safety_tolerance`` is 0..5 there.
* width/height FLUX.1 models (``flux-pro-1.1``, ``flux-dev`` and anything not listed below)
  take ``width``/``height`` in multiples of 32 within 256..1440. The requested size keeps its
  aspect ratio, is scaled into that range and snapped to multiples of 32 (``pixel_size_for``).
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
when seeded) under the one deadline of the call. BFL limits the tasks an account has active
(24; 6 for ``flux-kontext-max``, answered with 429), so the adapter gates every task, submit to
result, with its own semaphore of ``max_concurrency`` slots (``limits_own_concurrency``): an
``n=4`` request takes four slots, and the router does not count calls for this provider.

BFL never paid twice, in the manner of BFL's own Python SDK (black-forest-labs/blackforest:
polls are retried, submissions never):

* A poll that fails (5xx, 429, a dropped or refused connection, a poll that hangs) is retried
  with backoff, honouring Retry-After, within the call's deadline: 429 means keep polling.
* A submission is never repeated inside the adapter. When its outcome is unknown (5xx, a
  timeout or a dropped connection once the connection was made, an unreadable 200) and so is
  the outcome of a task that was accepted (the deadline passed, polling broke down, the sample
  could not be fetched), the error raised has ``ambiguous = True`` and the router will not
  repeat the call on this deployment. Refused connections and 4xx answers are not ambiguous.
* Tasks that deliver are returned even when others fail; moderated tasks count as
  ``filtered`` (delivered nor charged); a failed task is logged and never resubmitted. Only
  when no task delivered does the call raise: ContentPolicy when every task was refused, else
  the first task's error (ambiguous if any task's failure was).
"""

from __future__ import annotations

import asyncio
import io
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import aiohttp
import orjson
import pybase64
import structlog
from PIL import Image

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import (
    ContentPolicy,
    ImagegenError,
    InvalidParameter,
    UpstreamError,
)
from imagegen_service.families import FAMILIES, family_of
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
    retry_after_seconds,
)
from imagegen_service.providers.sizes import MAX_DISTORTION, aspect_ratio_for

__all__ = ["BFL_BASE_URL", "BflProvider", "from_config", "pixel_size_for"]

log = structlog.get_logger("imagegen.providers.bfl")

BFL_BASE_URL = "https://api.bfl.ai"
# Hosts that may receive the key when a submit answer names them as its polling_url.
BFL_DOMAIN = "bfl.ai"

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

# FLUX.2 (docs.bfl.ai, "Generate or edit an image with FLUX.2 [pro]" / [max] / [flex] /
# [klein 4B] / [klein 9B]): Flux2Inputs takes input_image .. input_image_8 (klein: "like Pro
# but max 4 images"), output_format "jpeg" | "png", safety_tolerance 0..5.
FLUX2_FAMILY = "flux-2"
FLUX2_IMAGE_FIELDS = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))
FLUX2_KLEIN_PREFIX = "flux-2-klein"
FLUX2_KLEIN_MAX_IMAGES = 4
FLUX2_OUTPUT_FORMATS = ("jpeg", "png")
FLUX2_MAX_SAFETY_TOLERANCE = 5

# BFL's limit on the tasks one account has active at a time (429 beyond it).
DEFAULT_MAX_CONCURRENCY = 24

DEFAULT_POLL_INTERVAL_SECONDS = 0.5
MAX_POLL_INTERVAL_SECONDS = 2.0
# Long generations poll less often; short ones still get their first answers quickly.
POLL_INTERVAL_GROWTH = 1.25
# A failed poll waits twice as long as the one before (or the Retry-After), up to this.
MAX_POLL_BACKOFF_SECONDS = 8.0
# One poll that hangs longer than this is abandoned and retried (the deadline still rules).
POLL_REQUEST_TIMEOUT_SECONDS = 15.0

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
    **dict.fromkeys(FLUX2_IMAGE_FIELDS, "image"),
    "image": "image",
    "mask": "mask",
}
_MAX_UPSTREAM_MESSAGE = 300

# Where a task stands; what a failure there means for the money (see ``_Task.ambiguous``).
_Stage = Literal["queued", "submitting", "submitted", "downloading", "done"]


def uses_aspect_ratio(upstream_model: str) -> bool:
    return upstream_model.startswith(ASPECT_RATIO_MODEL_PREFIXES)


def edits_images(upstream_model: str) -> bool:
    return upstream_model.startswith(EDIT_MODEL_PREFIX)


def fills(upstream_model: str) -> bool:
    return upstream_model.startswith(FILL_MODEL_PREFIX)


def is_flux2(request: ProviderRequest) -> bool:
    """Whether the request is shaped by FLUX.2's rules (its family, named or recognised)."""
    if request.family:
        return request.family == FLUX2_FAMILY
    family = family_of(request.upstream_model)
    return family is not None and family.name == FLUX2_FAMILY


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
    return pybase64.b64encode(data).decode("ascii")


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


@dataclass(frozen=True, slots=True)
class _Submitted:
    """A task BFL accepted, as its submit answer describes it."""

    task_id: str
    polling_url: Any
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


@dataclass(slots=True)
class _Task:
    """One image's task: where it got to and how it ended."""

    index: int
    stage: _Stage = "queued"
    submitted: _Submitted | None = None
    image: ProviderImage | None = None
    refused: bool = False
    error: ImagegenError | None = None
    # The failure may have cost money at BFL (see the module docstring).
    ambiguous: bool = False

    @property
    def finished(self) -> bool:
        return self.image is not None or self.refused or self.error is not None


@dataclass(slots=True)
class _Slots:
    """The adapter's task semaphore, made for the loop that uses it."""

    size: int
    semaphore: asyncio.Semaphore | None = None
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self.semaphore is None or self.loop is not loop:
            self.semaphore, self.loop = asyncio.Semaphore(self.size), loop
        return self.semaphore


class BflProvider(HttpUpstream):
    """Black Forest Labs' asynchronous FLUX API; see the module docstring."""

    # BFL limits active tasks, and a call of n images is n tasks: this adapter gates each task
    # itself (``max_concurrency`` slots), and the router does not wrap its calls in a
    # semaphore of its own.
    limits_own_concurrency = True

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
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self._safety_tolerance = safety_tolerance
        self._poll_interval = poll_interval_seconds
        self._max_poll_interval = max(MAX_POLL_INTERVAL_SECONDS, poll_interval_seconds)
        self.max_concurrency = max_concurrency
        self._slots = _Slots(max_concurrency)

    # -- what can be served ---------------------------------------------------------------

    def check(self, request: ProviderRequest) -> None:
        """FLUX.2: the family's size rule, jpeg or png, no mask, at most 8 images (klein 4).
        FLUX.1: sizes whose aspect ratio FLUX cannot come close to are refused before any money
        moves; everything else is mapped (see ``pixel_size_for`` and ``ASPECT_RATIOS``). An
        edit (``request.images``) is checked by ``_edit_fields`` instead; the fill model makes
        edits only."""
        if is_flux2(request):
            self._check_flux2(request)
        elif request.images:
            self._check_edit(request)
        else:
            self._size_fields(request)

    def _check_flux2(self, request: ProviderRequest) -> None:
        if request.output_format not in FLUX2_OUTPUT_FORMATS:
            raise InvalidParameter(
                f"output_format {request.output_format!r} is not available for this model: "
                f"FLUX.2 makes {' or '.join(FLUX2_OUTPUT_FORMATS)} images only.",
                param="output_format",
            )
        rule = FAMILIES[FLUX2_FAMILY].size_rule
        problem = rule.problem(request.width, request.height) if rule is not None else None
        if rule is not None and problem is not None:
            raise InvalidParameter(
                f"The size {request.size} is not available for this model: {problem} "
                f"({rule.describe()}).",
                param="size",
            )
        if request.mask is not None:
            raise InvalidParameter(
                "this model edits by instruction and takes no mask", param="mask"
            )
        limit = (
            FLUX2_KLEIN_MAX_IMAGES
            if request.upstream_model.startswith(FLUX2_KLEIN_PREFIX)
            else len(FLUX2_IMAGE_FIELDS)
        )
        if len(request.images) > limit:
            raise InvalidParameter(
                f"This model takes at most {limit} images; got {len(request.images)}.",
                param="image",
            )

    def _flux2_fields(self, request: ProviderRequest) -> dict[str, Any]:
        """FLUX.2: the size as asked and, for an edit, the images (base64) in order."""
        self._check_flux2(request)
        fields: dict[str, Any] = {"width": request.width, "height": request.height}
        for key, image in zip(FLUX2_IMAGE_FIELDS, request.images, strict=False):
            fields[key] = _b64(image.data)
        return fields

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
                "This model does not edit images (flux-2-*, flux-kontext-* and "
                "flux-pro-1.0-fill do).",
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
        """FLUX.2: see ``_flux2_fields``; Kontext: the images in ``input_image`` ..
        ``input_image_4``; fill: ``image`` and ``mask`` (BFL's convention); all base64."""
        if is_flux2(request):
            if not request.images:
                raise InvalidParameter("You must provide an image.", param="image")
            return self._flux2_fields(request)
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
        fields = self._flux2_fields(request) if is_flux2(request) else self._size_fields(request)
        return await self._run(request, fields)

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        """A FLUX.2, Kontext or fill edit: the submit/poll/download flow of ``generate`` with
        the images in the payload."""
        return await self._run(request, self._edit_fields(request))

    async def _run(self, request: ProviderRequest, fields: Mapping[str, Any]) -> ProviderResult:
        """``request.n`` tasks, each submitting ``fields`` with the common ones, under one
        deadline; what each task ended as decides the answer (see the module docstring)."""
        if request.n < 1:
            raise InvalidParameter("n must be at least 1.", param="n")
        session = self.session()
        tasks = [_Task(index) for index in range(request.n)]
        runners = [
            asyncio.ensure_future(self._one_task(session, request, fields, task)) for task in tasks
        ]
        try:
            await asyncio.wait(runners, timeout=self.timeout_seconds)
        finally:
            # Past the deadline (or when our caller gives up) no task keeps polling or holds a
            # connection; a cancelled task keeps the stage it reached.
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
        for runner in runners:
            if not runner.cancelled() and (unexpected := runner.exception()) is not None:
                raise unexpected
        for task in tasks:
            if not task.finished:
                task.error = self._deadline_error()
                task.ambiguous = task.stage != "queued"
        return self._outcome(request, tasks)

    def _outcome(self, request: ProviderRequest, tasks: list[_Task]) -> ProviderResult:
        images = [task.image for task in tasks if task.image is not None]
        filtered = sum(1 for task in tasks if task.refused)
        failed = [task for task in tasks if task.error is not None]
        ambiguous = sum(1 for task in failed if task.ambiguous)
        accepted = [task.submitted for task in tasks if task.submitted is not None]
        facts: dict[str, Any] = {
            "provider": self.name,
            "request_id": request.request_id,
            "upstream_model": request.upstream_model,
            "tasks": len(tasks),
            "delivered": len(images),
            "filtered": filtered,
            "failed": len(failed),
            "failed_ambiguous": ambiguous,
            # What BFL's submit answers reported: credits (1 credit = 0.01 USD) and megapixels.
            "cost_credits": _total(s.cost for s in accepted),
            "input_mp": _total(s.input_mp for s in accepted),
            "output_mp": _total(s.output_mp for s in accepted),
        }
        if failed:
            log.warning(
                "bfl.tasks_failed",
                **facts,
                errors=[task.error.message for task in failed if task.error is not None],
            )
        else:
            log.info("bfl.tasks", **facts)
        if images:
            # The failed tasks are neither resubmitted nor charged: the caller gets fewer
            # images than asked, each one paid for once.
            return ProviderResult(images=images, filtered=filtered)
        if not failed:
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        error = failed[0].error
        assert error is not None
        if isinstance(error, UpstreamError) and ambiguous:
            error.ambiguous = True
        raise error

    async def _one_task(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        fields: Mapping[str, Any],
        task: _Task,
    ) -> None:
        """One task from submit to downloaded bytes; records how it ended in ``task``."""
        payload = self._payload(request, fields, task.index)
        try:
            # A slot is an active task at BFL: held from submit until its final status.
            async with self._slots.get():
                task.stage = "submitting"
                submitted = await self._submit(session, request, payload)
                if submitted is None:
                    task.refused = True
                    return
                task.stage, task.submitted = "submitted", submitted
                polling_url = self._polling_url(submitted.polling_url)
                answer = await self._poll(session, submitted.task_id, polling_url, task.index)
            status = answer["status"]
            if status in _REFUSED_STATUSES:
                task.refused = True
                return
            failure = _FAILED_STATUSES.get(status)
            if failure is not None:
                # BFL's own verdict: the task ended without an image (not ambiguous).
                task.error = UpstreamError(
                    f"upstream {self.name!r}: task {task.index} failed ({failure})"
                )
                return
            result = answer.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise self.unreadable(f"task {task.index} is ready but has no sample")
            task.stage = "downloading"
            # The signed link expires within minutes: fetch it now, and without our key.
            data = await self.download(session, sample, task.index)
            task.image = self.inspect(data, task.index)
            task.stage = "done"
        except ImagegenError as exc:
            task.error = exc
            task.ambiguous = _paid(task.stage) or getattr(exc, "ambiguous", False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = self._transport_error(exc)
            error.__cause__ = exc
            task.error = error
            task.ambiguous = _paid(task.stage)

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
            tolerance = self._safety_tolerance
            if is_flux2(request):
                # FLUX.2 takes 0..5 where FLUX.1 takes 0..6: the most permissive it has.
                tolerance = min(tolerance, FLUX2_MAX_SAFETY_TOLERANCE)
            payload["safety_tolerance"] = tolerance
        return payload

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key is not None:
            headers["x-key"] = self._api_key
        return headers

    # -- submit -----------------------------------------------------------------------------

    async def _submit(
        self, session: aiohttp.ClientSession, request: ProviderRequest, payload: dict[str, Any]
    ) -> _Submitted | None:
        """The accepted task, or None when the prompt was refused. Never repeated: an error
        raised after the request may have reached BFL is ``ambiguous``."""
        # The model is a path segment: quoting keeps an odd catalog id from changing the route.
        route = urllib.parse.quote(request.upstream_model, safe="")
        try:
            async with session.post(
                f"{self._base_url}/v1/{route}",
                data=orjson.dumps(payload),
                headers={
                    **self._headers(),
                    **self.trace_headers(request),
                    "Content-Type": "application/json",
                },
                # A redirect would carry the x-key header to wherever it points.
                allow_redirects=False,
            ) as resp:
                if not 200 <= resp.status < 300:
                    body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                    if self._is_refusal(resp.status, body):
                        return None
                    self._raise_for_status(request, resp.status, resp.headers, body)
                answer = await self._accepted(resp)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # No connection was made, so nothing was sent: not ambiguous.
            raise self._transport_error(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = self._transport_error(exc)
            error.ambiguous = True
            raise error from exc
        task_id = answer.get("id")
        if not isinstance(task_id, str) or not task_id:
            error = self.unreadable("the submitted task has no id")
            error.ambiguous = True
            raise error
        return _Submitted(
            task_id=task_id,
            polling_url=answer.get("polling_url"),
            cost=_number(answer.get("cost")),
            input_mp=_number(answer.get("input_mp")),
            output_mp=_number(answer.get("output_mp")),
        )

    async def _accepted(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        """A 2xx submit answer: BFL has the task even when we cannot read the answer."""
        try:
            return await self.read_json(resp)
        except UpstreamError as exc:
            exc.ambiguous = True
            raise

    def _is_refusal(self, status: int, body: bytes | None) -> bool:
        if status != 400:
            return False
        text = _detail_text(json_object(body)).lower()
        return any(word in text for word in _REFUSAL_WORDS)

    def _raise_for_status(
        self,
        request: ProviderRequest,
        status: int,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> NoReturn:
        if status in (400, 422):
            detail = json_object(body).get("detail")
            message, field = _validation_summary(detail)
            text = self._scrub(message.strip())[:_MAX_UPSTREAM_MESSAGE]
            raise InvalidParameter(
                text or f"upstream {self.name!r} rejected the request (HTTP {status})",
                param=_PARAM_NAMES.get(field or ""),
            )
        if status == 404:
            # FastAPI's answer for a route it does not have: BFL does not (or no longer)
            # serve this model. Another deployment may.
            raise self.model_unavailable(request.upstream_model, status)
        # BFL's 401/403 bodies describe our key; 402/429/5xx texts help nobody downstream.
        error = self.status_error(status, headers, _STATUS_CODES.get(status, ""))
        # A 5xx says nothing about whether the task was queued (and will be billed).
        error.ambiguous = status >= 500
        raise error

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _polling_url(self, value: Any) -> str | None:
        """``polling_url`` as returned, if it may be sent our key; None when the answer has
        none (``/v1/get_result`` on the configured host is polled instead).

        BFL's hosts (``bfl.ai`` and ``*.bfl.ai``: the global endpoint hands out regional
        polling hosts such as api.eu1.bfl.ai) and the configured base host may get the key.
        Any other host, or plain http where the base is https, would leak it: the task is
        given up with an UpstreamError and nothing is sent there.
        """
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.unreadable("the polling_url is not a string")
        url = urllib.parse.urlsplit(value)
        base = urllib.parse.urlsplit(self._base_url)
        host = (url.hostname or "").lower()
        trusted = host == (base.hostname or "").lower() or (
            host == BFL_DOMAIN or host.endswith("." + BFL_DOMAIN)
        )
        secure = url.scheme == "https" or (url.scheme == "http" and base.scheme == "http")
        if host and trusted and secure:
            return value
        raise UpstreamError(
            f"upstream {self.name!r} named a polling URL outside Black Forest Labs' hosts; "
            "it was not polled, so the task's result is unknown"
        )

    # -- poll -------------------------------------------------------------------------------

    async def _poll(
        self,
        session: aiohttp.ClientSession,
        task_id: str,
        polling_url: str | None,
        index: int,
    ) -> dict[str, Any]:
        """The task's final answer (``Ready``, refused or failed). A poll that fails for a
        reason that may pass (429, 5xx, a connection that breaks or hangs) is retried with
        backoff; only the call's deadline, which ``_run`` enforces, ends the polling."""
        url = polling_url or f"{self._base_url}/v1/get_result"
        params = None if polling_url else {"id": task_id}
        interval = self._poll_interval
        delay = interval
        failures = 0
        poll_timeout = aiohttp.ClientTimeout(
            total=min(POLL_REQUEST_TIMEOUT_SECONDS, self.timeout_seconds)
        )
        while True:
            await asyncio.sleep(delay)
            try:
                async with session.get(
                    url,
                    params=params,
                    headers=self._headers(),
                    allow_redirects=False,
                    timeout=poll_timeout,
                ) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        failures += 1
                        delay = self._poll_backoff(failures, retry_after_seconds(resp.headers))
                        log.debug(
                            "bfl.poll_retry",
                            provider=self.name,
                            task=index,
                            status=resp.status,
                            delay_seconds=round(delay, 3),
                        )
                        continue
                    if resp.status != 200:
                        raise self.status_error(
                            resp.status, resp.headers, _STATUS_CODES.get(resp.status, "")
                        )
                    answer = await self.read_json(resp)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The deadline arrives as a cancellation, never here: this is one poll's
                # connection or its own timeout, and the next poll may well work.
                failures += 1
                delay = self._poll_backoff(failures, None)
                log.debug(
                    "bfl.poll_retry",
                    provider=self.name,
                    task=index,
                    error=type(exc).__name__,
                    delay_seconds=round(delay, 3),
                )
                continue
            status = answer.get("status")
            if not isinstance(status, str):
                raise self.unreadable(f"task {index} has no status")
            if status == "Ready" or status in _REFUSED_STATUSES or status in _FAILED_STATUSES:
                return answer
            # "Pending", "Queued", "Processing", "Reasoning", "Generating", and any word added
            # later: a new failure word costs at worst the deadline, while treating a new
            # progress word as a failure would break every call.
            failures = 0
            delay = interval
            interval = min(interval * POLL_INTERVAL_GROWTH, self._max_poll_interval)

    def _poll_backoff(self, failures: int, retry_after: float | None) -> float:
        backoff = self._poll_interval * float(1 << min(failures, 16))
        return min(max(backoff, retry_after or 0.0), MAX_POLL_BACKOFF_SECONDS)

    # -- errors -----------------------------------------------------------------------------

    def _deadline_error(self) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.name!r} did not answer within {self.timeout_seconds:g} s"
        )

    def _transport_error(self, exc: BaseException) -> UpstreamError:
        """As ``HttpUpstream.within_deadline`` words it: only the exception's class, since its
        text may name hosts the caller should not see."""
        if isinstance(exc, TimeoutError):
            return self._deadline_error()
        return UpstreamError(
            f"upstream {self.name!r} could not be reached or dropped the connection "
            f"({type(exc).__name__})"
        )


def _paid(stage: _Stage) -> bool:
    """Whether a task that failed at ``stage`` had been accepted by BFL (and so may be
    billed): from its submit answer on, its result is lost rather than never made."""
    return stage in ("submitted", "downloading", "done")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _total(values: Any) -> float | None:
    numbers = [value for value in values if value is not None]
    return round(sum(numbers), 4) if numbers else None


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
    """Options: ``safety_tolerance`` (0..6, unset: BFL's default of 2; FLUX.2 is sent at most
    5) and ``poll_interval_seconds`` (first wait between polls, default 0.5, growing to 2 s).
    ``max_concurrency`` is the number of BFL tasks (images) this provider keeps active at once
    across all calls; BFL's own account limit is 24 (6 for flux-kontext-max)."""
    options = config.options
    if config.max_concurrency < 1:
        raise ConfigError(
            f"providers.{config.name}.max_concurrency must be at least 1; "
            f"got {config.max_concurrency}"
        )
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
        max_concurrency=config.max_concurrency,
    )
