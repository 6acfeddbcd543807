"""Adapter for Google's Gemini native image generation (gemini-2.5-flash-image, alias "Nano
Banana", gemini-3-pro-image-preview and alike) over the Gemini API's ``generateContent``.

Gemini has no ``n``: one call makes one image. For n > 1 the adapter makes n calls
concurrently under one deadline and merges them. Each call may be refused on its own; refused
calls count as ``filtered`` and only when every call is refused does the request fail with
ContentPolicy. Any other failure of one call fails the whole request at once (the calls still
running are cancelled), because the caller retries or fails over the request as a whole.

Gemini speaks in aspect ratios, not pixel sizes: the OpenAI ``size`` becomes the closest
supported ratio, and the image comes back at the model's own pixel size for that ratio.
Gemini refuses mostly inside 200 answers: ``promptFeedback.blockReason``, a safety
``finishReason``, or a candidate that answers with text instead of an image.

Edits are the same ``generateContent`` call with the input images (up to
``MAX_INPUT_IMAGES``, as ``inlineData`` parts: ``mimeType`` + base64 ``data``) placed before
the text part of the prompt; the answer is read as for a generation. Gemini takes no mask:
the edit is described in words only, so a request with a mask is refused by ``check`` before
any money moves.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import orjson

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import ContentPolicy, InvalidParameter
from imagegen_service.providers.base import (
    ProviderImage,
    ProviderRequest,
    ProviderResult,
    TokenUsage,
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
    "GEMINI_BASE_URL",
    "MAX_INPUT_IMAGES",
    "NATIVE_SIZES",
    "SUPPORTED_ASPECT_RATIOS",
    "GeminiImageProvider",
    "from_config",
]

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
SUPPORTED_ASPECT_RATIOS: tuple[str, ...] = (
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
# gemini-2.5-flash-image's pixel size per ratio. A request for exactly one of these sizes gets
# that ratio, even where the generic table in sizes.py would pick a neighbour (1152x896 is
# 5:4 here, not 4:3).
NATIVE_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
_RATIO_OF_NATIVE_SIZE = {size: ratio for ratio, size in NATIVE_SIZES.items()}
IMAGE_SIZES = ("1K", "2K", "4K")
# One request fans out into this many upstream calls at most.
MAX_IMAGES = 10
# Input images per edit: gemini-2.5-flash-image takes at most 3 per prompt.
MAX_INPUT_IMAGES = 3

_CONTENT_POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
# Any promptFeedback.blockReason other than these means the prompt was blocked.
_NOT_BLOCKED = frozenset({"", "BLOCK_REASON_UNSPECIFIED"})
# Candidate finish reasons that mean the image was withheld. A candidate without an image
# part is treated the same whatever its finish reason: the model sometimes declines in words.
_REFUSAL_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
        "NO_IMAGE",
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


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One upstream call: its image, or None when the upstream withheld it."""

    image: ProviderImage | None
    usage: TokenUsage


class GeminiImageProvider(HttpUpstream):
    """Gemini image models reached through ``models/{model}:generateContent``.

    n > 1 is served by n concurrent calls within one deadline (see the module docstring).
    """

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
    ) -> None:
        super().__init__(name, timeout_seconds=timeout_seconds, max_connections=max_connections)
        self.base_url = (base_url or GEMINI_BASE_URL).rstrip("/")
        self._api_key = api_key or None
        # Only models with selectable resolution (gemini-3-pro-image) accept imageSize; others
        # answer 400, so it is sent only when configured.
        self._image_size = image_size
        # Older image models refuse IMAGE alone and need TEXT alongside it.
        self._modalities = ["TEXT", "IMAGE"] if include_text else ["IMAGE"]

    def check(self, request: ProviderRequest) -> None:
        if not 1 <= request.n <= MAX_IMAGES:
            raise InvalidParameter(
                f"n must be between 1 and {MAX_IMAGES} for this provider.", param="n"
            )
        if request.mask is not None:
            raise InvalidParameter(
                "This model edits from the prompt alone and takes no mask.", param="mask"
            )
        if len(request.images) > MAX_INPUT_IMAGES:
            raise InvalidParameter(
                f"At most {MAX_INPUT_IMAGES} images can be edited together by this provider.",
                param="image",
            )
        aspect_ratio(request.width, request.height)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        return await self._run(request)

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        """The images go with the prompt in the same generateContent call."""
        if not request.images:
            raise InvalidParameter("An edit needs an image.", param="image")
        return await self._run(request)

    async def _run(self, request: ProviderRequest) -> ProviderResult:
        self.check(request)
        ratio = aspect_ratio(request.width, request.height)

        async def call(session: aiohttp.ClientSession) -> ProviderResult:
            return self._merge(await self._fan_out(session, request, ratio))

        return await self.within_deadline(call)

    async def _fan_out(
        self, session: aiohttp.ClientSession, request: ProviderRequest, ratio: str
    ) -> list[_Outcome]:
        error: BaseException | None = None
        try:
            # A TaskGroup cancels the sibling calls as soon as one fails, so a dead upstream
            # does not keep n-1 connections busy until the deadline.
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._one_image(session, request, ratio, index))
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
        self, session: aiohttp.ClientSession, request: ProviderRequest, ratio: str, index: int
    ) -> _Outcome:
        async with session.post(
            self._endpoint(request.upstream_model),
            data=orjson.dumps(self._payload(request, ratio, index)),
            headers={**self._headers(), **self.trace_headers(request)},
        ) as resp:
            if not 200 <= resp.status < 300:
                body = await read_capped(resp, MAX_ERROR_BODY_BYTES, truncate=True)
                try:
                    self._raise_for_status(resp.status, resp.headers, body)
                except ContentPolicy:
                    # One refused call withholds one image; the others may still deliver.
                    return _Outcome(None, TokenUsage())
            answer = await self.read_json(resp)
        return self._read_answer(answer, index)

    def _endpoint(self, upstream_model: str) -> str:
        model = upstream_model.removeprefix("models/")
        return f"{self.base_url}/models/{quote(model, safe='-._~')}:generateContent"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        # The header rather than ?key=: URLs end up in proxy and access logs.
        if self._api_key is not None:
            headers["x-goog-api-key"] = self._api_key
        return headers

    def _payload(self, request: ProviderRequest, ratio: str, index: int) -> dict[str, Any]:
        image_config: dict[str, Any] = {"aspectRatio": ratio}
        if self._image_size is not None:
            image_config["imageSize"] = self._image_size
        generation_config: dict[str, Any] = {
            "responseModalities": list(self._modalities),
            "imageConfig": image_config,
            "candidateCount": 1,
        }
        if request.seed is not None:
            # Each of the n calls gets its own seed: the same seed would give n equal images.
            # The API takes an int32.
            generation_config["seed"] = (request.seed + index) % _INT32_SPAN
        # Edits: the images first, then the words that say what to do with them.
        parts: list[dict[str, Any]] = [
            {
                "inlineData": {
                    "mimeType": image.mime_type,
                    "data": base64.b64encode(image.data).decode("ascii"),
                }
            }
            for image in request.images
        ]
        parts.append({"text": request.prompt})
        return {
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": generation_config,
        }

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
        if candidate.get("finishReason") in _REFUSAL_FINISH_REASONS:
            return refused
        content = candidate.get("content")
        parts = content.get("parts", []) if isinstance(content, dict) else []
        if not isinstance(parts, list):
            raise self.unreadable(f"call {index} has parts that are not a list")

        image_part: dict[str, Any] | None = None
        texts: list[str] = []
        for part in parts:
            # Thinking models (gemini-3-pro-image) also return draft images marked as thoughts.
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
            return refused
        data = self.decode_base64(image_part.get("data"), index)
        revised = "\n".join(texts)[:_MAX_REVISED_PROMPT].strip()
        return _Outcome(self.inspect(data, index, revised), usage)

    def _raise_for_status(
        self, status: int, headers: Mapping[str, str], body: bytes | None
    ) -> NoReturn:
        error = _error_object(body)
        status_name = short_identifier(error.get("status"))
        reason = _error_info_reason(error)
        raw_message = error.get("message")
        message = raw_message if isinstance(raw_message, str) else ""

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
        # The upstream's message is dropped: Google's key errors can echo the key, and the
        # caller cannot act on the upstream's internal trouble anyway.
        failure = self.status_error(status, headers, self._scrub(reason or status_name))
        if failure.retry_after_seconds is None:
            failure.retry_after_seconds = _retry_delay(error)
        raise failure

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text


def aspect_ratio(width: int, height: int) -> str:
    """The Gemini aspect ratio for ``width x height``; InvalidParameter if none is close."""
    native = _RATIO_OF_NATIVE_SIZE.get((width, height))
    if native is not None:
        return native
    return aspect_ratio_for(width, height, SUPPORTED_ASPECT_RATIOS)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _error_object(body: bytes | None) -> dict[str, Any]:
    """The ``error`` object of a Google error body ``{"error": {code, message, status}}``."""
    parsed = json_object(body)
    error = parsed.get("error")
    return error if isinstance(error, dict) else {}


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
    if "aspectratio" in text or "aspect ratio" in text or "imageconfig" in text:
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


def from_config(config: ProviderConfig, credential: str | None) -> GeminiImageProvider:
    """Options: ``image_size`` ("1K", "2K" or "4K"; unset = the model's default, the only
    choice gemini-2.5-flash-image accepts) and ``include_text`` (bool, default false: ask for
    IMAGE only)."""
    image_size = config.options.get("image_size")
    if image_size is not None and image_size not in IMAGE_SIZES:
        raise ConfigError(
            f"providers.{config.name}.image_size must be one of {', '.join(IMAGE_SIZES)}"
        )
    include_text = config.options.get("include_text", False)
    if not isinstance(include_text, bool):
        raise ConfigError(f"providers.{config.name}.include_text must be true or false")
    return GeminiImageProvider(
        config.name,
        base_url=config.base_url or GEMINI_BASE_URL,
        api_key=credential,
        timeout_seconds=config.timeout_seconds,
        max_connections=config.max_connections,
        image_size=image_size,
        include_text=include_text,
    )
