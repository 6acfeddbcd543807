"""Adapter for Google's Gemini image models over ``generateContent``, reached two ways:

* ``gemini``: the Gemini API (``generativelanguage.googleapis.com``), an API key in
  ``x-goog-api-key``: ``POST {base}/models/{model}:generateContent``;
* ``vertex-gemini``: Vertex AI, an OAuth access token in ``Authorization: Bearer``:
  ``POST {base}/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent``,
  where ``{base}`` is ``https://{location}-aiplatform.googleapis.com/v1`` (the ``global``
  location has no region prefix, as in google-genai's ``_api_client.py``).

The live models (December 2026) are two families (``families.py``): ``gemini-3.1-flash-image``
(Google's replacement for Imagen 4 and 4 Fast) and ``gemini-3-pro-image`` (for Imagen 4
Ultra). gemini-2.5-flash-image and every Imagen model were shut down; so were the ``-preview``
ids of the two families. A model of no known family is sent the ten standard aspect ratios and
no image size (unless the ``image_size`` option fixes one).

Gemini speaks in aspect ratios and image size tiers, not pixels: the OpenAI ``size`` becomes
``generationConfig.imageConfig`` (google-genai ``types.ImageConfig``: ``aspect_ratio``,
``image_size``) with the family's nearest aspect ratio (``sizes.py``) and the tier nearest in
pixel count on a log scale (512: ~0.26 MP, 1K: ~1 MP, 2K: ~4 MP, 4K: ~16 MP; 512 only where the
family has it). ``responseModalities`` is ``["IMAGE"]`` (``["TEXT", "IMAGE"]`` with
``include_text``), as google-genai's ``GenerateContentConfig.response_modalities`` sends it.
The image comes back at the model's own pixel size for that ratio and tier, which the adapter
reads from the image itself. The flash family also takes ``thinkingConfig.thinkingLevel``
(``types.ThinkingConfig.thinking_level``), sent only when the ``thinking_level`` option is set.

Gemini has no ``n``: one call makes one image. For n > 1 the adapter makes n concurrent calls
under one deadline and merges them (each with its own seed when a seed is given). Each call may
be refused on its own: refused calls count as ``filtered``, and only when every call is refused
does the request fail with ContentPolicy. Any other failure of one call fails the request at
once (the calls still running are cancelled): the caller retries or fails over as a whole.

What an answer means (``types.FinishReason``, ``types.BlockedReason``):

* a refusal (ContentPolicy; never retried, never failed over): any
  ``promptFeedback.blockReason``, or a candidate ending SAFETY, IMAGE_SAFETY,
  PROHIBITED_CONTENT, IMAGE_PROHIBITED_CONTENT, BLOCKLIST, SPII, RECITATION, IMAGE_RECITATION
  or MODEL_ARMOR (Vertex AI's Model Armor: the operator's own safety screen, which failing
  over to another deployment would get around);
* a failure (UpstreamError: retried, failed over, in the end a 502): a candidate without an
  image for any other reason: MAX_TOKENS, OTHER, MALFORMED_RESPONSE, IMAGE_OTHER, NO_IMAGE,
  or a text-only answer ending STOP;
* the model is gone (UpstreamModelUnavailable: failed over at once): HTTP 404 NOT_FOUND about
  the model (``google_imagen.is_model_not_found``).

Edits are the same call with the input images (up to the family's 14, as ``inlineData`` parts:
``mimeType`` + base64 ``data``) before the text part of the prompt. Gemini takes no mask: the
edit is described in words only, so a request with a mask is refused by ``check`` before any
money moves, as is a size whose aspect ratio the family does not have.

``list_models`` reads the upstream's model list (google-genai ``models.list``): on the Gemini
API ``GET {base}/models?pageSize=&pageToken=`` (names ``models/<id>``); on Vertex AI the
publisher models, ``GET {host}/v1beta1/publishers/google/models?pageSize=&pageToken=`` (names
``publishers/google/models/<id>``; google-genai lists them on v1beta1 and without the project,
see ``_api_client._build_request``). Both return the ids without the prefix.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import orjson
import pybase64

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import ContentPolicy, InvalidParameter, UpstreamError
from imagegen_service.families import FAMILIES, family_of
from imagegen_service.providers.base import (
    ProviderImage,
    ProviderRequest,
    ProviderResult,
    TokenUsage,
)
from imagegen_service.providers.google_imagen import (
    RotatingCredential,
    credential_file,
    google_error_object,
    is_model_not_found,
)
from imagegen_service.providers.http import (
    MAX_ERROR_BODY_BYTES,
    MAX_RETRY_AFTER_SECONDS,
    HttpUpstream,
    read_capped,
    short_identifier,
)
from imagegen_service.providers.sizes import aspect_ratio_for

__all__ = [
    "EXTREME_ASPECT_RATIOS",
    "FAMILY_RULES",
    "GEMINI_BASE_URL",
    "IMAGE_SIZE_PIXELS",
    "MAX_INPUT_IMAGES",
    "STANDARD_ASPECT_RATIOS",
    "THINKING_LEVELS",
    "GeminiImageProvider",
    "ImageRules",
    "VertexGeminiImageProvider",
    "from_config",
    "image_size_for",
    "rules_for",
    "vertex_base_url",
    "vertex_from_config",
]

# google-genai 3.3.0 speaks v1 to the Gemini API by default
# (``_api_client.GOOGLE_AI_API_DEFAULT_VERSION``); v1beta still works where configured.
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1"
# The ten ratios both families take (``types.ImageConfig.aspect_ratio`` lists eight of them;
# Google's model pages add 4:5 and 5:4).
STANDARD_ASPECT_RATIOS: tuple[str, ...] = (
    "1:1",
    "2:3",
    "3:2",
    "3:4",
    "4:3",
    "4:5",
    "5:4",
    "9:16",
    "16:9",
    "21:9",
)
# gemini-3.1-flash-image only (its model page).
EXTREME_ASPECT_RATIOS: tuple[str, ...] = ("1:4", "4:1", "1:8", "8:1")
# ``imageConfig.imageSize`` tiers and the pixel count each stands for (a square of the size).
IMAGE_SIZE_PIXELS: Mapping[str, int] = {
    "512": 512 * 512,
    "1K": 1024 * 1024,
    "2K": 2048 * 2048,
    "4K": 4096 * 4096,
}
# ``types.ThinkingLevel`` without its UNSPECIFIED value.
THINKING_LEVELS = ("MINIMAL", "LOW", "MEDIUM", "HIGH", "XHIGH")
# One request fans out into this many upstream calls at most.
MAX_IMAGES = 10
# Input images per edit: the most any Gemini image model takes (both live families: 14).
MAX_INPUT_IMAGES = 14


@dataclass(frozen=True, slots=True)
class ImageRules:
    """What one family's models take in ``generationConfig``."""

    aspect_ratios: tuple[str, ...]
    # ``imageConfig.imageSize`` tiers, smallest first; empty: imageSize is not sent.
    image_sizes: tuple[str, ...]
    # Whether ``thinkingConfig.thinkingLevel`` is sent (when configured).
    thinking_level: bool
    max_input_images: int


FAMILY_RULES: Mapping[str, ImageRules] = {
    "gemini-3.1-flash-image": ImageRules(
        aspect_ratios=STANDARD_ASPECT_RATIOS + EXTREME_ASPECT_RATIOS,
        image_sizes=("512", "1K", "2K", "4K"),
        thinking_level=True,
        max_input_images=FAMILIES["gemini-3.1-flash-image"].max_input_images,
    ),
    "gemini-3-pro-image": ImageRules(
        aspect_ratios=STANDARD_ASPECT_RATIOS,
        image_sizes=("1K", "2K", "4K"),
        thinking_level=False,
        max_input_images=FAMILIES["gemini-3-pro-image"].max_input_images,
    ),
}
# A model of no known family: sent as before families, the standard ratios and no imageSize.
_OTHER_RULES = ImageRules(STANDARD_ASPECT_RATIOS, (), False, MAX_INPUT_IMAGES)

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
# ``types.BlockedReason``'s unspecified value; the Gemini API's REST reference spells it
# BLOCK_REASON_UNSPECIFIED. Any other promptFeedback.blockReason means the prompt was blocked.
_NOT_BLOCKED = frozenset({"", "BLOCKED_REASON_UNSPECIFIED", "BLOCK_REASON_UNSPECIFIED"})
# The ``types.FinishReason`` values that are safety endings. Every other ending without an
# image (MAX_TOKENS, OTHER, MALFORMED_RESPONSE, IMAGE_OTHER, NO_IMAGE, a STOP with text only,
# ...) is a failure of the upstream, not a refusal.
REFUSAL_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
        "RECITATION",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)
# Gemini itself refuses inside 200 answers; Google's other image endpoints refuse with a 400
# whose text cites Responsible AI. Both shapes are accepted so a proxy in front does not turn a
# refusal into a bad request.
_REFUSAL_REASON_WORDS = ("SAFETY", "PROHIBITED", "BLOCKLIST", "RESPONSIBLE_AI")
_REFUSAL_MESSAGE_WORDS = (
    "responsible ai",
    "prohibited content",
    "content policy",
    "safety filter",
    "usage guidelines",
)
_MAX_UPSTREAM_MESSAGE = 300
_MAX_REVISED_PROMPT = 1000
_INT32_SPAN = 2**31
# Model listing: Google's list methods take up to 1000 a page (a larger size is lowered to the
# maximum), and a list that has not ended after this many pages is taken as broken.
_LIST_PAGE_SIZE = 1000
_MAX_LIST_PAGES = 50
# The version segment at the end of a Vertex AI base URL (".../v1", ".../v1beta1").
_API_VERSION = re.compile(r"/v\d+(?:(?:alpha|beta)\d*)?$")
# google-genai's multi-region locations (``_api_client._MULTI_REGIONAL_LOCATIONS``).
_MULTI_REGIONS = frozenset({"us", "eu"})


@dataclass(frozen=True, slots=True)
class _Plan:
    """What every call of one request sends in ``imageConfig`` and ``thinkingConfig``."""

    aspect_ratio: str
    image_size: str | None
    thinking_level: str | None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One upstream call: its image, or None when the upstream withheld it."""

    image: ProviderImage | None
    usage: TokenUsage


def rules_for(request: ProviderRequest) -> ImageRules:
    """The rules of the request's family (``request.family``, else the upstream id's)."""
    name = request.family
    if not name:
        family = family_of(_model_id(request.upstream_model))
        name = family.name if family is not None else ""
    return FAMILY_RULES.get(name, _OTHER_RULES)


def image_size_for(width: int, height: int, sizes: Sequence[str]) -> str:
    """The tier of ``sizes`` nearest to ``width x height`` in pixel count, on a log scale:
    1024x1024 and 1792x1024 are 1K, 2048x2048 is 2K, 512x512 is 512 where the family has it."""
    pixels = width * height
    return min(sizes, key=lambda size: abs(math.log(pixels / IMAGE_SIZE_PIXELS[size])))


class GeminiImageProvider(HttpUpstream):
    """Gemini image models on the Gemini API (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str = GEMINI_BASE_URL,
        api_key: str | None,
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
        image_size: str | None = None,
        include_text: bool = False,
        thinking_level: str | None = None,
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self.base_url = (base_url or GEMINI_BASE_URL).rstrip("/")
        self._api_key = api_key or None
        # For models of no known family only: their image size, as configured.
        self._image_size = image_size
        self._modalities = ["TEXT", "IMAGE"] if include_text else ["IMAGE"]
        self._thinking_level = thinking_level.upper() if thinking_level else None

    # -- what the request becomes ----------------------------------------------------------

    def check(self, request: ProviderRequest) -> None:
        self._plan(request)

    def _plan(self, request: ProviderRequest) -> _Plan:
        """What the request sends; InvalidParameter, with Google's rule, for what the family
        does not take. No I/O: ``check`` runs it before money moves."""
        rules = rules_for(request)
        if not 1 <= request.n <= MAX_IMAGES:
            raise InvalidParameter(
                f"n must be between 1 and {MAX_IMAGES} for this provider.", param="n"
            )
        if request.mask is not None:
            raise InvalidParameter(
                "This model edits from the prompt alone and takes no mask.", param="mask"
            )
        if len(request.images) > rules.max_input_images:
            raise InvalidParameter(
                f"At most {rules.max_input_images} images can be edited together by this model.",
                param="image",
            )
        ratio = aspect_ratio_for(request.width, request.height, rules.aspect_ratios)
        if rules.image_sizes:
            image_size: str | None = image_size_for(
                request.width, request.height, rules.image_sizes
            )
        else:
            image_size = self._image_size
        thinking = self._thinking_level if rules.thinking_level else None
        return _Plan(aspect_ratio=ratio, image_size=image_size, thinking_level=thinking)

    def _payload(self, request: ProviderRequest, plan: _Plan, index: int) -> dict[str, Any]:
        image_config: dict[str, Any] = {"aspectRatio": plan.aspect_ratio}
        if plan.image_size is not None:
            image_config["imageSize"] = plan.image_size
        generation_config: dict[str, Any] = {
            "responseModalities": list(self._modalities),
            "imageConfig": image_config,
            "candidateCount": 1,
        }
        if plan.thinking_level is not None:
            generation_config["thinkingConfig"] = {"thinkingLevel": plan.thinking_level}
        if request.seed is not None:
            # Each of the n calls gets its own seed: the same seed would give n equal images.
            # The API takes an int32.
            generation_config["seed"] = (request.seed + index) % _INT32_SPAN
        # Edits: the images first, then the words that say what to do with them.
        parts: list[dict[str, Any]] = [
            {
                "inlineData": {
                    "mimeType": image.mime_type,
                    "data": pybase64.b64encode(image.data).decode("ascii"),
                }
            }
            for image in request.images
        ]
        parts.append({"text": request.prompt})
        return {
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": generation_config,
        }

    # -- the route --------------------------------------------------------------------------

    def _endpoint(self, upstream_model: str) -> str:
        model = quote(_model_id(upstream_model), safe="-._~")
        return f"{self.base_url}/models/{model}:generateContent"

    def _list_url(self) -> str:
        return f"{self.base_url}/models"

    def _auth_headers(self) -> dict[str, str]:
        # The header rather than ?key=: URLs end up in proxy and access logs.
        return {"x-goog-api-key": self._api_key} if self._api_key is not None else {}

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    # -- calls ------------------------------------------------------------------------------

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        return await self._run(request)

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        """The images go with the prompt in the same generateContent call."""
        if not request.images:
            raise InvalidParameter("An edit needs an image.", param="image")
        return await self._run(request)

    async def _run(self, request: ProviderRequest) -> ProviderResult:
        plan = self._plan(request)
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **self._auth_headers(),
            **self.trace_headers(request),
        }

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            return self._merge(await self._fan_out(session, request, plan, headers))

        return await self.within_deadline(call)

    async def _fan_out(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        plan: _Plan,
        headers: Mapping[str, str],
    ) -> list[_Outcome]:
        error: BaseException | None = None
        try:
            # A TaskGroup cancels the sibling calls as soon as one fails, so a dead upstream
            # does not keep n-1 connections busy until the deadline.
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._one_image(session, request, plan, headers, index))
                    for index in range(request.n)
                ]
        except BaseExceptionGroup as failed:
            error = _first_error(failed)
        if error is not None:
            # Unwrapped, so within_deadline maps transport errors as for a single call; raised
            # outside the handler so the error keeps its own cause rather than the group.
            raise error
        return [task.result() for task in tasks]

    def _merge(self, outcomes: Sequence[_Outcome]) -> ProviderResult:
        delivered = [o for o in outcomes if o.image is not None]
        if not delivered:
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        # Tokens of withheld images are left out: the caller bills only what it delivers.
        return ProviderResult(
            images=[o.image for o in delivered if o.image is not None],
            usage=TokenUsage(
                input_tokens=sum(o.usage.input_tokens for o in delivered),
                output_tokens=sum(o.usage.output_tokens for o in delivered),
            ),
            filtered=len(outcomes) - len(delivered),
        )

    async def _one_image(
        self,
        session: aiohttp.ClientSession,
        request: ProviderRequest,
        plan: _Plan,
        headers: Mapping[str, str],
        index: int,
    ) -> _Outcome:
        async with session.post(
            self._endpoint(request.upstream_model),
            data=orjson.dumps(self._payload(request, plan, index)),
            headers=headers,
        ) as resp:
            if not 200 <= resp.status < 300:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                try:
                    self._raise_for_status(resp.status, resp.headers, body, request.upstream_model)
                except ContentPolicy:
                    # One refused call withholds one image; the others may still deliver.
                    return _Outcome(None, TokenUsage())
            answer = await self.read_json(resp)
        return self._read_answer(answer, index)

    def _read_answer(self, answer: dict[str, Any], index: int) -> _Outcome:
        usage = _usage(answer.get("usageMetadata"))
        refused = _Outcome(None, usage)
        feedback = answer.get("promptFeedback")
        if isinstance(feedback, dict):
            block_reason = feedback.get("blockReason")
            if isinstance(block_reason, str) and block_reason not in _NOT_BLOCKED:
                return refused
        candidates = answer.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            raise self.unreadable(f"call {index} has no candidates")
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            raise self.unreadable(f"call {index} has a candidate that is not an object")
        finish_reason = candidate.get("finishReason")
        if finish_reason in REFUSAL_FINISH_REASONS:
            return refused
        content = candidate.get("content")
        parts = content.get("parts", []) if isinstance(content, dict) else []
        if not isinstance(parts, list):
            raise self.unreadable(f"call {index} has parts that are not a list")

        image_part: dict[str, Any] | None = None
        texts: list[str] = []
        for part in parts:
            # Thinking models return draft images marked as thoughts: never the answer.
            if not isinstance(part, dict) or part.get("thought") is True:
                continue
            inline = part.get("inlineData", part.get("inline_data"))
            if isinstance(inline, dict):
                mime = inline.get("mimeType", inline.get("mime_type"))
                if image_part is None and isinstance(mime, str) and mime.startswith("image/"):
                    image_part = inline
                continue
            text = part.get("text")
            if isinstance(text, str) and text.strip():
                texts.append(text.strip())
        if image_part is None:
            # Not a refusal: no safety ending was given. Retrying (or another deployment)
            # may well make the image.
            ending = short_identifier(finish_reason) or "no finish reason"
            what = "answered in text only" if texts else "made no image"
            raise UpstreamError(f"upstream {self.name!r} {what} (call {index}, {ending})")
        data = self.decode_base64(image_part.get("data"), index)
        revised = "\n".join(texts)[:_MAX_REVISED_PROMPT].strip()
        return _Outcome(self.inspect(data, index, revised), usage)

    def _raise_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes | None, upstream_model: str
    ) -> NoReturn:
        error = google_error_object(body)
        status_name = short_identifier(error.get("status"))
        reason = _error_info_reason(error)
        raw_message = error.get("message")
        message = raw_message if isinstance(raw_message, str) else ""

        if is_model_not_found(status, status_name, message):
            raise self.model_unavailable(upstream_model, status)
        if status == 400 and _is_refusal(reason, message):
            raise ContentPolicy(_CONTENT_POLICY_MESSAGE)
        # Google answers a wrong API key with 400 INVALID_ARGUMENT (reason API_KEY_INVALID):
        # that is our configuration, not the caller's request. FAILED_PRECONDITION (region or
        # billing) is ours too.
        if (
            status == 400
            and status_name in ("", "INVALID_ARGUMENT")
            and not reason.startswith("API_KEY_")
        ):
            text = self._scrub(message.strip())[:_MAX_UPSTREAM_MESSAGE]
            raise InvalidParameter(
                text or f"upstream {self.name!r} rejected the request (HTTP {status})",
                param=_param_for(error, message),
            )
        raise self._status_failure(status, headers, error, reason or status_name)

    def _status_failure(
        self, status: int, headers: Mapping[str, str], error: dict[str, Any], code: str
    ) -> UpstreamError:
        # The upstream's message is dropped: Google's key errors can echo the key, and the
        # caller cannot act on the upstream's internal trouble anyway.
        failure = self.status_error(status, headers, self._scrub(code))
        if failure.retry_after_seconds is None:
            failure.retry_after_seconds = _retry_delay(error)
        return failure

    # -- the model list ---------------------------------------------------------------------

    async def list_models(self) -> frozenset[str] | None:
        """The ids of every model the upstream lists (``models.list`` in google-genai)."""
        headers = {"Accept": "application/json", **self._auth_headers()}
        url = self._list_url()

        async def fetch(session: aiohttp.ClientSession) -> frozenset[str]:
            ids: set[str] = set()
            token = ""
            for _ in range(_MAX_LIST_PAGES):
                # pageSize then pageToken, as google-genai's _ListModelsConfig_to_mldev and
                # _to_vertex put them in the query.
                query = {"pageSize": str(_LIST_PAGE_SIZE)}
                if token:
                    query["pageToken"] = token
                async with session.get(url, params=query, headers=headers) as resp:
                    if not 200 <= resp.status < 300:
                        body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                        error = google_error_object(body)
                        code = _error_info_reason(error) or short_identifier(error.get("status"))
                        raise self._status_failure(resp.status, resp.headers, error, code)
                    answer = await self.read_json(resp)
                ids.update(self._listed_ids(answer))
                next_token = answer.get("nextPageToken")
                if not isinstance(next_token, str) or not next_token:
                    return frozenset(ids)
                if next_token == token:
                    raise self.unreadable("the model list repeats its page token")
                token = next_token
            raise self.unreadable(f"the model list runs past {_MAX_LIST_PAGES} pages")

        return await self.within_deadline(fetch)

    def _listed_ids(self, answer: dict[str, Any]) -> list[str]:
        return self._names(answer, "models", "models/")

    def _names(self, answer: dict[str, Any], key: str, prefix: str) -> list[str]:
        """The ids in ``answer[key][*].name`` that start with ``prefix``, without it."""
        items = answer.get(key, [])
        if not isinstance(items, list):
            raise self.unreadable(f"the model list's {key} is not a list")
        ids = []
        for item in items:
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str) and name.startswith(prefix) and len(name) > len(prefix):
                ids.append(name[len(prefix) :])
        return ids


class VertexGeminiImageProvider(GeminiImageProvider):
    """Gemini image models on Vertex AI: the same ``generateContent`` body and answer, at the
    publisher model's path, with an OAuth access token (re-read from its file whenever the
    file changes, as for ``vertex-imagen``)."""

    def __init__(
        self,
        name: str,
        *,
        project: str,
        location: str,
        base_url: str = "",
        credential: str | None,
        credential_file: str = "",
        timeout_seconds: float = 120.0,
        max_connections: int = 64,
        image_size: str | None = None,
        include_text: bool = False,
        thinking_level: str | None = None,
    ) -> None:
        super().__init__(
            name,
            base_url=base_url or vertex_base_url(location),
            api_key=None,
            timeout_seconds=timeout_seconds,
            max_connections=max_connections,
            image_size=image_size,
            include_text=include_text,
            thinking_level=thinking_level,
        )
        self.project = project
        self.location = location
        self._credential = RotatingCredential(credential, credential_file)
        self._models_prefix = (
            f"{self.base_url}/projects/{quote(project, safe=':.')}/locations/"
            f"{quote(location, safe='')}/publishers/google/models/"
        )

    def _endpoint(self, upstream_model: str) -> str:
        model = quote(_model_id(upstream_model), safe="-._~@")
        return f"{self._models_prefix}{model}:generateContent"

    def _list_url(self) -> str:
        # Publisher models are listed on v1beta1 and outside any project, as google-genai
        # does it (_api_client._build_request: "publishers/" paths get no project prefix).
        root = _API_VERSION.sub("", self.base_url)
        return f"{root}/v1beta1/publishers/google/models"

    def _auth_headers(self) -> dict[str, str]:
        token = self._credential.current()
        if token is None:
            raise UpstreamError(f"upstream {self.name!r} has no credential configured")
        return {"Authorization": f"Bearer {token}"}

    def _scrub(self, text: str) -> str:
        return self._credential.scrub(text)

    def _listed_ids(self, answer: dict[str, Any]) -> list[str]:
        return self._names(answer, "publisherModels", "publishers/google/models/")


def vertex_base_url(location: str) -> str:
    """Vertex AI's v1 endpoint for ``location``, as google-genai's ``_api_client`` builds the
    host: ``global`` has no region prefix, ``us`` and ``eu`` are multi-region hosts."""
    if location == "global":
        return "https://aiplatform.googleapis.com/v1"
    if location in _MULTI_REGIONS:
        return f"https://aiplatform.{location}.rep.googleapis.com/v1"
    return f"https://{location}-aiplatform.googleapis.com/v1"


def _model_id(upstream_model: str) -> str:
    model = upstream_model.strip()
    for prefix in ("publishers/google/models/", "models/"):
        model = model.removeprefix(prefix)
    return model


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _details(error: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The ``details`` entries of one google.rpc type, e.g. ``ErrorInfo``."""
    details = error.get("details")
    if not isinstance(details, list):
        return []
    suffix = f"google.rpc.{kind}"
    return [
        d
        for d in details
        if isinstance(d, dict) and isinstance(d.get("@type"), str) and d["@type"].endswith(suffix)
    ]


def _error_info_reason(error: dict[str, Any]) -> str:
    for info in _details(error, "ErrorInfo"):
        reason = short_identifier(info.get("reason"))
        if reason:
            return reason
    return ""


def _is_refusal(reason: str, message: str) -> bool:
    lowered = message.lower()
    return any(word in reason for word in _REFUSAL_REASON_WORDS) or any(
        word in lowered for word in _REFUSAL_MESSAGE_WORDS
    )


def _param_for(error: dict[str, Any], message: str) -> str | None:
    """The OpenAI parameter a Google INVALID_ARGUMENT is about, when it can be told."""
    fields = [
        violation["field"]
        for bad_request in _details(error, "BadRequest")
        for violation in bad_request.get("fieldViolations", [])
        if isinstance(violation, dict) and isinstance(violation.get("field"), str)
    ]
    text = " ".join([*fields, message]).lower().replace("_", "")
    if (
        "aspectratio" in text
        or "aspect ratio" in text
        or "imageconfig" in text
        or "imagesize" in text
        or "image size" in text
    ):
        return "size"
    if "seed" in text:
        return "seed"
    if "inlinedata" in text or "mimetype" in text:
        return "image"
    if any(field.startswith("contents") for field in fields):
        return "prompt"
    return None


def _retry_delay(error: dict[str, Any]) -> float | None:
    """Seconds from a google.rpc.RetryInfo detail (``"retryDelay": "27s"``), capped."""
    for info in _details(error, "RetryInfo"):
        delay = info.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                continue
            if seconds == seconds:  # not NaN
                return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
    return None


def _usage(raw: Any) -> TokenUsage:
    if not isinstance(raw, dict):
        return TokenUsage()

    def count(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    # Thinking tokens are billed as output but reported apart from candidatesTokenCount.
    return TokenUsage(
        input_tokens=count("promptTokenCount"),
        output_tokens=count("candidatesTokenCount") + count("thoughtsTokenCount"),
    )


def _options(config: ProviderConfig) -> dict[str, Any]:
    """The options both provider types share: ``image_size`` (one of 512, 1K, 2K, 4K; only
    for models of no known family, whose size is otherwise left to the model: the families'
    tier follows the requested size), ``include_text`` (bool, default false: ask for IMAGE
    only) and ``thinking_level`` (one of ``THINKING_LEVELS``, any case; sent to the
    gemini-3.1-flash-image family only; unset: the model's default)."""
    image_size = config.options.get("image_size")
    if image_size is not None and image_size not in IMAGE_SIZE_PIXELS:
        raise ConfigError(
            f"providers.{config.name}.image_size must be one of {', '.join(IMAGE_SIZE_PIXELS)}"
        )
    include_text = config.options.get("include_text", False)
    if not isinstance(include_text, bool):
        raise ConfigError(f"providers.{config.name}.include_text must be true or false")
    thinking_level = config.options.get("thinking_level")
    if thinking_level is not None and (
        not isinstance(thinking_level, str) or thinking_level.upper() not in THINKING_LEVELS
    ):
        raise ConfigError(
            f"providers.{config.name}.thinking_level must be one of {', '.join(THINKING_LEVELS)}"
        )
    return {
        "timeout_seconds": config.timeout_seconds,
        "max_connections": config.max_connections,
        "image_size": image_size,
        "include_text": include_text,
        "thinking_level": thinking_level,
    }


def from_config(config: ProviderConfig, credential: str | None) -> GeminiImageProvider:
    """Type ``gemini``: the Gemini API, with an API key. Options: see ``_options``."""
    return GeminiImageProvider(
        config.name,
        base_url=config.base_url or GEMINI_BASE_URL,
        api_key=credential,
        **_options(config),
    )


def vertex_from_config(config: ProviderConfig, credential: str | None) -> VertexGeminiImageProvider:
    """Type ``vertex-gemini``: Vertex AI, with an OAuth access token (from the environment
    variable, or from ``api_key_file``, re-read whenever it changes). Options: ``project``
    (required), ``location`` (default ``global``, where Google serves the Gemini 3 image
    models), and those of ``_options``."""
    project = config.options.get("project")
    if not isinstance(project, str) or not project.strip():
        raise ConfigError(
            f"providers.{config.name}.project is required for type vertex-gemini "
            "(the Google Cloud project id)"
        )
    location = config.options.get("location", "global")
    if not isinstance(location, str) or not re.fullmatch(r"[a-z0-9-]+", location):
        raise ConfigError(
            f"providers.{config.name}.location must be a location such as global or "
            f"us-central1; got {location!r}"
        )
    return VertexGeminiImageProvider(
        config.name,
        project=project.strip(),
        location=location,
        base_url=config.base_url,
        credential=credential,
        credential_file=credential_file(config, credential),
        **_options(config),
    )
