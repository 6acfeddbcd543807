"""Adapter for Google Imagen (``imagen-3.0-*``, ``imagen-4.0-*``) through its ``:predict``
method: for operators with private access only.

Google shut every Imagen model down on the Gemini API and on Vertex AI in August 2026, and
google-genai deprecates ``generate_images`` (3.3.0 offers it on Vertex AI only, see
``models.py``). Google's replacements are Gemini image models (``gemini-3.1-flash-image`` for
Imagen 4 and 4 Fast, ``gemini-3-pro-image`` for Imagen 4 Ultra), served by the ``gemini`` and
``vertex-gemini`` provider types (``gemini_image.py``). These adapters stay for operators whose
project still has private access to an Imagen model; for everyone else Google answers 404
NOT_FOUND, which is raised as ``UpstreamModelUnavailable`` so that the router fails over at once
and ``imagegen-admin providers check`` names the model to take out of the catalog.

Imagen is reached two ways:

* the Gemini API (``generativelanguage.googleapis.com``), authenticated by an API key in the
  ``x-goog-api-key`` header: ``POST {base}/models/{model}:predict``;
* Vertex AI (``{location}-aiplatform.googleapis.com``), authenticated by an OAuth access
  token: ``POST {base}/projects/{p}/locations/{l}/publishers/google/models/{model}:predict``.

Both take ``{"instances": [{"prompt"}], "parameters": {...}}`` and answer
``{"predictions": [{"bytesBase64Encoded", "mimeType"}, ...]}``. Imagen speaks in aspect
ratios, not pixels: the requested size is mapped to the nearest of five ratios and the images
come back at Imagen's own pixel size for that ratio (16:9 is 1408x768, for example).

Imagen makes at most four images per call. A request for more is split into several calls
made concurrently under the one deadline of the request, and their images are merged.

Edits (Vertex AI only; the Gemini API has no Imagen editing, so its provider offers none):
the same ``:predict`` on an editing model such as ``imagen-3.0-capability-001``, the instance
carrying ``referenceImages``: the image as ``REFERENCE_TYPE_RAW`` and a mask as
``REFERENCE_TYPE_MASK`` (``maskImageConfig.maskMode`` ``MASK_MODE_USER_PROVIDED``), with
``parameters.editMode`` ``EDIT_MODE_INPAINT_INSERTION``. Imagen edits where the mask is
non-zero (white); OpenAI's masks edit where they are transparent, so the mask's alpha is
turned into a black-and-white PNG. With no mask, the image's own transparency is the mask if it
has any, else the whole image is edited. One image per edit; the answer is read as for
generation and comes back at the input image's size.

Safety: images the output filter withholds are missing from ``predictions`` or, because we
send ``includeRaiReason``, replaced by an entry carrying only ``raiFilteredReason``. Some
withheld → a partial result with ``filtered`` set; all withheld, or a 400 saying the prompt
was blocked → ContentPolicy.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import orjson
import pybase64
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
    MAX_RETRY_AFTER_SECONDS,
    HttpUpstream,
    json_object,
    read_capped,
    short_identifier,
)
from imagegen_service.providers.sizes import aspect_ratio_for

__all__ = [
    "GEMINI_API_BASE_URL",
    "IMAGEN_PIXEL_SIZES",
    "IMAGEN_RATIOS",
    "GoogleImagenProvider",
    "RotatingCredential",
    "VertexImagenProvider",
    "credential_file",
    "from_config",
    "google_error_object",
    "is_model_not_found",
    "vertex_base_url",
    "vertex_from_config",
]

GEMINI_API_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"

# What Imagen 3 and Imagen 4 (at their default 1K size) return for each aspect ratio.
IMAGEN_PIXEL_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
IMAGEN_RATIOS: tuple[str, ...] = tuple(IMAGEN_PIXEL_SIZES)
# Imagen's own cap on sampleCount.
MAX_IMAGES_PER_CALL = 4
PERSON_GENERATION_VALUES = frozenset({"dont_allow", "allow_adult", "allow_all"})
# Vertex takes a seed in 1..2^31-1, and only with the watermark off.
_MAX_SEED = 2_147_483_647

# Google's recommended mask dilation for EDIT_MODE_INPAINT_INSERTION (a share of the image).
_MASK_DILATION = 0.01

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
_MAX_UPSTREAM_MESSAGE = 300
# Google's refusals are 400 INVALID_ARGUMENT like any bad field; only the text tells them
# apart ("The prompt could not be submitted. This prompt contains sensitive words that
# violate Google's Responsible AI practices ... Support codes: 42876398", "The response is
# blocked, as it may violate our policies ... Error Code: 58061214").
_REFUSAL = re.compile(
    r"responsible ai|violat|\bsafety\b|sensitive words|could not be submitted|\bblocked\b"
    r"|prohibited|support codes?:|usage guidelines",
    re.IGNORECASE,
)
# 400s the caller cannot fix, because they are about our account: the Gemini API answers a
# bad key with 400 API_KEY_INVALID, and unbilled projects with a 400 as well.
_OPERATOR_PROBLEM = re.compile(
    r"api key|billed users|billing|quota|location is not supported", re.IGNORECASE
)


# One call's JSON body, from its image count and its index in a split request.
_Body = Callable[[int, int], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """What one ``:predict`` call produced."""

    images: list[ProviderImage]
    filtered: int


class RotatingCredential:
    """The secret to send: fixed, or read from a file again whenever the file changes, so
    that a rotated token (a refreshed Kubernetes Secret, a sidecar writing access tokens) is
    picked up without a restart."""

    def __init__(self, value: str | None, path: str = "") -> None:
        self._value = value or None
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        # Every value seen, so that an upstream text quoting an older token is scrubbed too.
        self._seen: list[str] = [value] if value else []
        if path:
            self.current()

    def current(self) -> str | None:
        if not self._path:
            return self._value
        try:
            stat = os.stat(self._path)
        except OSError:
            # Mid-rotation the file may be briefly absent: the last good token still works.
            return self._value
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            try:
                text = Path(self._path).read_text().strip()
            except (OSError, UnicodeDecodeError):
                return self._value
            if text:
                self._value = text
                self._stamp = stamp
                if text not in self._seen:
                    self._seen = [*self._seen[-7:], text]
        return self._value

    def scrub(self, text: str) -> str:
        for secret in self._seen:
            text = text.replace(secret, "***")
        return text


class GoogleImagenProvider(HttpUpstream):
    """Imagen over the Gemini API (API key) or Vertex AI (OAuth access token).

    ``vertex=False``: the key goes in ``x-goog-api-key``; seed and watermark settings are not
    sent, since the Gemini API accepts neither. ``vertex=True``: the token goes in
    ``Authorization: Bearer``; ``add_watermark`` is sent when set, and a request's seed is
    sent only when ``add_watermark`` is False (Vertex rejects a seed with the watermark on).
    """

    def __init__(
        self,
        name: str,
        *,
        endpoint_prefix: str,
        credential: str | None,
        vertex: bool = False,
        credential_file: str = "",
        person_generation: str = "allow_adult",
        add_watermark: bool | None = None,
        max_images_per_call: int = MAX_IMAGES_PER_CALL,
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        # The REST docs spell these in lower case, the SDKs' enums in upper case.
        person_generation = person_generation.lower()
        if person_generation not in PERSON_GENERATION_VALUES:
            raise ConfigError(
                f"providers.{name}.person_generation must be one of "
                f"{', '.join(sorted(PERSON_GENERATION_VALUES))}; got {person_generation!r}"
            )
        if add_watermark is not None and not vertex:
            raise ConfigError(
                f"providers.{name}.add_watermark is a Vertex AI setting; the Gemini API does "
                "not accept it"
            )
        if not 1 <= max_images_per_call <= MAX_IMAGES_PER_CALL:
            raise ConfigError(
                f"providers.{name}.max_images_per_call must be between 1 and "
                f"{MAX_IMAGES_PER_CALL}; got {max_images_per_call}"
            )
        # Everything up to the model id, e.g. ".../v1beta/models/".
        self._prefix = endpoint_prefix
        self._vertex = vertex
        self._credential = RotatingCredential(credential, credential_file)
        self._person_generation = person_generation
        self._add_watermark = add_watermark
        self._per_call = max_images_per_call

    def endpoint(self, upstream_model: str) -> str:
        model = upstream_model.removeprefix("models/")
        return f"{self._prefix}{quote(model, safe='@')}:predict"

    def check(self, request: ProviderRequest) -> None:
        if not self._vertex and self._person_generation == "allow_all":
            # Refused here, before money moves, rather than by a paid round trip: the router
            # skips this deployment and uses another (a vertex-imagen one) where there is one.
            raise InvalidParameter(
                "This deployment is configured with person_generation 'allow_all', which "
                "Imagen on the Gemini API does not take (Vertex AI does); the operator must "
                "set 'allow_adult' or 'dont_allow', or serve the model through vertex-imagen."
            )
        aspect_ratio_for(request.width, request.height, IMAGEN_RATIOS)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        self.check(request)
        aspect_ratio = aspect_ratio_for(request.width, request.height, IMAGEN_RATIOS)

        def body(count: int, index: int) -> dict[str, Any]:
            parameters = self._parameters(request, count, index)
            parameters["aspectRatio"] = aspect_ratio
            return {"instances": [{"prompt": request.prompt}], "parameters": parameters}

        return await self._predict_all(request, body)

    async def _predict_all(self, request: ProviderRequest, body: _Body) -> ProviderResult:
        """``request.n`` images from as many ``:predict`` calls as needed, merged."""
        secret = self._credential.current()
        if secret is None:
            raise UpstreamError(f"upstream {self.name!r} has no credential configured")
        counts = _split(request.n, self._per_call)

        async def call(session: aiohttp.ClientSession) -> list[_Chunk]:
            if len(counts) == 1:
                return [await self._chunk(session, request, body, secret, counts[0], 0)]
            return await self._chunks(session, request, body, secret, counts)

        chunks = await self.within_deadline(call)
        images = [image for chunk in chunks for image in chunk.images]
        if not images:
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        return ProviderResult(images=images, filtered=sum(chunk.filtered for chunk in chunks))

    async def _chunks(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        body: _Body,
        secret: str,
        counts: Sequence[int],
    ) -> list[_Chunk]:
        """All calls at once; the first real failure cancels the others."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._chunk(session, request, body, secret, count, index))
                    for index, count in enumerate(counts)
                ]
        except BaseExceptionGroup as failures:
            # Re-raised bare so that within_deadline maps aiohttp errors as usual; its own
            # cause is kept for our logs, the group around it is not.
            first = _first_leaf(failures)
            raise first from first.__cause__
        return [task.result() for task in tasks]

    async def _chunk(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        body: _Body,
        secret: str,
        count: int,
        index: int,
    ) -> _Chunk:
        try:
            answer = await self._predict(session, request, body(count, index), secret)
        except ContentPolicy:
            if index == 0 and count == request.n:
                raise
            # One call of a split request refused (an output filter can hit one batch and
            # not another): its images count as withheld; the caller decides if none is left.
            return _Chunk(images=[], filtered=count)
        return self._read_predictions(answer, count, index * self._per_call)

    def _parameters(self, request: ProviderRequest, count: int, index: int) -> dict[str, Any]:
        """The ``parameters`` that generation and editing share."""
        parameters: dict[str, Any] = {
            "sampleCount": count,
            "personGeneration": self._person_generation,
            # Without it a filtered image simply vanishes; with it we can tell a filtered
            # image from an upstream that lost one.
            "includeRaiReason": True,
            # Imagen makes PNG or JPEG only; PNG is lossless, so a WEBP request can still be
            # converted later without a second generation loss.
            "outputOptions": {
                "mimeType": "image/jpeg" if request.output_format == "jpeg" else "image/png"
            },
        }
        if self._vertex:
            if self._add_watermark is not None:
                parameters["addWatermark"] = self._add_watermark
            if request.seed is not None and self._add_watermark is False:
                # Each call of a split request gets its own seed, or they would draw the same
                # images.
                parameters["seed"] = (request.seed + index - 1) % _MAX_SEED + 1
        return parameters

    def _headers(self, secret: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._vertex:
            headers["Authorization"] = f"Bearer {secret}"
        else:
            headers["x-goog-api-key"] = secret
        return headers

    async def _predict(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        payload: dict[str, Any],
        secret: str,
    ) -> dict[str, Any]:
        async with session.post(
            self.endpoint(request.upstream_model),
            data=orjson.dumps(payload),
            headers={**self._headers(secret), **self.trace_headers(request)},
        ) as resp:
            if resp.status != 200:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                self._raise_for_status(
                    resp.status, resp.headers, body, upstream_model=request.upstream_model
                )
            return await self.read_json(resp)

    def _raise_for_status(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        upstream_model: str = "",
    ) -> NoReturn:
        error = google_error_object(body)
        raw_message = error.get("message")
        message = raw_message if isinstance(raw_message, str) else ""
        google_status = short_identifier(error.get("status"))
        reason = _error_info_reason(error.get("details"))
        code = self._credential.scrub(reason or google_status)

        if upstream_model and is_model_not_found(status, google_status, message):
            raise self.model_unavailable(upstream_model, status)

        if status == 400 and not reason.startswith("API_KEY"):
            if _REFUSAL.search(message):
                raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
            if google_status in ("", "INVALID_ARGUMENT") and not _OPERATOR_PROBLEM.search(message):
                text = self._credential.scrub(" ".join(message.split()))
                raise InvalidParameter(
                    text[:_MAX_UPSTREAM_MESSAGE]
                    or f"upstream {self.name!r} rejected the request (HTTP 400)",
                    param=_param_for(message),
                )
        # The upstream's text is dropped: Google's error details can quote the key
        # (DebugInfo "Invalid API key: ..."), and the caller cannot act on our account's
        # trouble anyway.
        upstream_error = self.status_error(status, headers, code)
        if upstream_error.retry_after_seconds is None:
            # Google rarely sends Retry-After; it says how long to wait in RetryInfo.
            upstream_error.retry_after_seconds = _retry_delay(error.get("details"))
        raise upstream_error

    def _read_predictions(self, answer: dict[str, Any], count: int, first: int) -> _Chunk:
        predictions = answer.get("predictions", [])
        if not isinstance(predictions, list):
            raise self.unreadable("predictions is not a list")
        images: list[ProviderImage] = []
        for offset, item in enumerate(predictions):
            index = first + offset
            if not isinstance(item, dict):
                raise self.unreadable(f"item {index} is not an object")
            if "bytesBase64Encoded" not in item:
                if isinstance(item.get("raiFilteredReason"), str) or "safetyAttributes" in item:
                    # A withheld image, or the prompt's own safety scores: no image either way.
                    continue
                raise self.unreadable(f"item {index} has no image")
            if len(images) == count:
                # Never more than asked for: callers bill and lay out per requested image.
                continue
            data = self.decode_base64(item.get("bytesBase64Encoded"), index)
            revised = item.get("prompt")
            images.append(self.inspect(data, index, revised if isinstance(revised, str) else ""))
        return _Chunk(images=images, filtered=count - len(images))


class VertexImagenProvider(GoogleImagenProvider):
    """Imagen on Vertex AI, which also edits images (see the module docstring)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, vertex=True, **kwargs)

    def check(self, request: ProviderRequest) -> None:
        super().check(request)
        if len(request.images) > 1:
            raise InvalidParameter(
                "Imagen edits one image at a time; send a single image.", param="image"
            )

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        self.check(request)
        if not request.images:
            raise InvalidParameter("An edit needs an image.", param="image")
        # Pillow work is CPU-bound: kept off the event loop.
        raw, mask = await asyncio.to_thread(_edit_inputs, request.images[0], request.mask)
        references = [
            {
                "referenceType": "REFERENCE_TYPE_RAW",
                "referenceId": 1,
                "referenceImage": {"bytesBase64Encoded": raw},
            },
            {
                "referenceType": "REFERENCE_TYPE_MASK",
                "referenceId": 2,
                "referenceImage": {"bytesBase64Encoded": mask},
                "maskImageConfig": {
                    "maskMode": "MASK_MODE_USER_PROVIDED",
                    "dilation": _MASK_DILATION,
                },
            },
        ]

        def body(count: int, index: int) -> dict[str, Any]:
            parameters = self._parameters(request, count, index)
            parameters["editMode"] = "EDIT_MODE_INPAINT_INSERTION"
            instance = {"prompt": request.prompt, "referenceImages": references}
            return {"instances": [instance], "parameters": parameters}

        return await self._predict_all(request, body)


def _edit_inputs(image: InputImage, mask: InputImage | None) -> tuple[str, str]:
    """The image (as PNG or JPEG, which Imagen takes) and Imagen's mask (white: edit), both
    base64. OpenAI's mask edits where it is fully transparent; with no mask, the image's own
    transparency, or else the whole image."""
    with Image.open(io.BytesIO(image.data)) as opened:
        if image.format in ("png", "jpeg"):
            raw = image.data
        else:
            buffer = io.BytesIO()
            converted = opened.convert("RGBA" if image.has_alpha else "RGB")
            converted.save(buffer, format="PNG")
            raw = buffer.getvalue()
        alpha = opened.convert("RGBA").getchannel("A") if image.has_alpha else None
    if mask is not None:
        with Image.open(io.BytesIO(mask.data)) as opened_mask:
            alpha = opened_mask.convert("RGBA").getchannel("A")
    size = (image.width, image.height)
    if alpha is None:
        black_white = Image.new("L", size, 255)
    else:
        # Alpha 0 (transparent) → 255 (edit); anything else → 0 (keep).
        black_white = alpha.point([255] + [0] * 255)
        if black_white.size != size:
            black_white = black_white.resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    black_white.save(buffer, format="PNG")
    return (
        pybase64.b64encode(raw).decode("ascii"),
        pybase64.b64encode(buffer.getvalue()).decode("ascii"),
    )


def _split(n: int, per_call: int) -> list[int]:
    """``n`` images as the fewest calls of at most ``per_call``, e.g. 6 by 4 → [4, 2]."""
    full, rest = divmod(max(n, 1), per_call)
    return [per_call] * full + ([rest] if rest else [])


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def google_error_object(body: bytes | None) -> dict[str, Any]:
    """The ``error`` object of Google's error body ``{"error": {code, message, status,
    details}}``; Vertex AI may wrap it in a one-item list, which google-genai's
    ``errors.APIError`` unwraps the same way."""
    parsed: Any = json_object(body)
    if not parsed and body:
        try:
            listed = orjson.loads(body)
        except orjson.JSONDecodeError:
            listed = None
        if isinstance(listed, list) and len(listed) == 1 and isinstance(listed[0], dict):
            parsed = listed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def is_model_not_found(status: int, google_status: str, message: str) -> bool:
    """Whether Google's answer says the model does not exist (or no longer does): HTTP 404
    with status NOT_FOUND and a message about a model, as the Gemini API words it ("models/x
    is not found for API version v1beta, or is not supported for predict") and as Vertex AI
    does ("Publisher Model `projects/.../models/x` was not found or your project does not
    have access to it"). A 404 about anything else (a wrong path, a proxy's page) is not."""
    return (
        status == 404
        and google_status in ("", "NOT_FOUND")
        and "model" in message.lower()
        and "not found" in message.lower()
    )


def _details(raw: Any) -> list[dict[str, Any]]:
    return [d for d in raw if isinstance(d, dict)] if isinstance(raw, list) else []


def _error_info_reason(details: Any) -> str:
    """``google.rpc.ErrorInfo.reason`` (API_KEY_INVALID, IAM_PERMISSION_DENIED, ...)."""
    for detail in _details(details):
        if str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo"):
            return short_identifier(detail.get("reason"))
    return ""


def _retry_delay(details: Any) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` ("31s", "0.5s") in seconds, capped."""
    for detail in _details(details):
        if not str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                return None
            if math.isfinite(seconds):
                return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
    return None


def _param_for(message: str) -> str | None:
    lowered = message.lower()
    if "aspect" in lowered:
        return "size"
    if "samplecount" in lowered or "number of images" in lowered:
        return "n"
    if "prompt" in lowered:
        return "prompt"
    return None


def _option_bool(config: ProviderConfig, key: str) -> bool | None:
    value = config.options.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"providers.{config.name}.{key} must be true or false")


def _option_str(config: ProviderConfig, key: str, default: str) -> str:
    value = config.options.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"providers.{config.name}.{key} must be a non-empty string")
    return value


def _option_int(config: ProviderConfig, key: str, default: int) -> int:
    value = config.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"providers.{config.name}.{key} must be an integer")
    return value


def credential_file(config: ProviderConfig, credential: str | None) -> str:
    """The file to follow for rotations, when it (not the environment variable) is where
    the credential came from."""
    path = config.api_key_file
    if not path:
        return ""
    if not config.api_key_env or credential is None:
        return path
    try:
        return path if Path(path).read_text().strip() == credential else ""
    except (OSError, UnicodeDecodeError):
        return ""


def _common(config: ProviderConfig, credential: str | None) -> dict[str, Any]:
    return {
        "credential": credential,
        "credential_file": credential_file(config, credential),
        "person_generation": _option_str(config, "person_generation", "allow_adult"),
        "add_watermark": _option_bool(config, "add_watermark"),
        "max_images_per_call": _option_int(config, "max_images_per_call", MAX_IMAGES_PER_CALL),
        "timeout_seconds": config.timeout_seconds,
        "max_connections": config.max_connections,
    }


def from_config(config: ProviderConfig, credential: str | None) -> GoogleImagenProvider:
    """Type ``google-imagen``: Imagen on the Gemini API, with an API key."""
    base_url = (config.base_url or GEMINI_API_BASE_URL).rstrip("/")
    return GoogleImagenProvider(
        config.name,
        endpoint_prefix=f"{base_url}/models/",
        vertex=False,
        **_common(config, credential),
    )


def vertex_base_url(location: str) -> str:
    # The global endpoint has no region prefix.
    if location == "global":
        return "https://aiplatform.googleapis.com/v1"
    return f"https://{location}-aiplatform.googleapis.com/v1"


def vertex_from_config(config: ProviderConfig, credential: str | None) -> VertexImagenProvider:
    """Type ``vertex-imagen``: Imagen on Vertex AI, with an OAuth access token (from the
    environment variable, or from ``api_key_file``, re-read whenever it changes)."""
    project = config.options.get("project")
    if not isinstance(project, str) or not project.strip():
        raise ConfigError(
            f"providers.{config.name}.project is required for type vertex-imagen "
            "(the Google Cloud project id)"
        )
    location = _option_str(config, "location", "us-central1")
    if not re.fullmatch(r"[a-z0-9-]+", location):
        raise ConfigError(
            f"providers.{config.name}.location must be a region such as us-central1; "
            f"got {location!r}"
        )
    base_url = (config.base_url or vertex_base_url(location)).rstrip("/")
    prefix = (
        f"{base_url}/projects/{quote(project.strip(), safe=':.')}/locations/{location}"
        "/publishers/google/models/"
    )
    return VertexImagenProvider(config.name, endpoint_prefix=prefix, **_common(config, credential))
