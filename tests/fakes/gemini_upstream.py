"""A loopback fake of the Gemini API's ``generateContent`` for image models.

Typical use::

    async with FakeGeminiUpstream(api_key=API_KEY) as fake:
        provider = GeminiImageProvider("gemini", base_url=fake.base_url, api_key=API_KEY)
        fake.script(ok(), prompt_blocked(), rate_limited(retry_delay="7s"))
        ...  # one behaviour per call, in arrival order; then the default (a normal answer)

Route: ``POST /v1beta/models/{model}:generateContent``. Like Google it

* takes the key from ``x-goog-api-key`` (or ``?key=``): none answers 403 PERMISSION_DENIED,
  a wrong one 400 INVALID_ARGUMENT with ErrorInfo reason ``API_KEY_INVALID`` and a DebugInfo
  that echoes the key (as Google's does);
* answers 404 NOT_FOUND for a model it does not know or another method;
* rejects a body with unknown or misspelt fields with 400 INVALID_ARGUMENT ("Invalid JSON
  payload received. Unknown name ..."). Stricter than Google on one point: only the camelCase
  field names are accepted (Google also takes snake_case), so that the adapter's spelling is
  pinned down;
* answers one image per call, PNG by default, at the model's real pixel size for the
  requested ``imageConfig.aspectRatio`` (and ``imageSize`` for models that have it);
* takes input images for edits as ``inlineData`` parts (``mimeType`` + base64 ``data``, both
  required, nothing else) beside one text part: a MIME type Gemini does not read, data that
  is not base64 of an image of that type, or more input images than the model takes (3 for
  gemini-2.5-flash-image, 14 for gemini-3-pro-image-preview) answer 400 INVALID_ARGUMENT.
  Each input image adds ``INPUT_IMAGE_TOKENS`` to ``promptTokenCount``.

Auth, routing and body-shape failures answer without using up a scripted behaviour. Every
request, refused or not, is recorded in ``fake.requests``; ``max_in_flight`` says how many
calls were ever being answered at the same time.
"""

from __future__ import annotations

import base64
import functools
import io
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from PIL import Image

from tests.fakes.loopback import LoopbackServer, image_bytes

__all__ = [
    "FLASH_IMAGE_SIZES",
    "INPUT_IMAGE_TOKENS",
    "PRO_IMAGE_SIZES",
    "Behaviour",
    "FakeGeminiUpstream",
    "finish_refusal",
    "garbage",
    "google_error",
    "input_images",
    "invalid_argument",
    "ok",
    "prompt_blocked",
    "rate_limited",
    "raw",
    "refused_with_400",
    "server_error",
    "service_unavailable",
    "slow",
    "text_instead_of_image",
    "truncated",
    "wrong_content_type",
]

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# gemini-2.5-flash-image: one resolution only.
FLASH_IMAGE_SIZES: Mapping[str, tuple[int, int]] = {
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
# gemini-3-pro-image-preview at imageSize "1K" (its default); "2K" doubles and "4K" quadruples
# each side. Public sources agree on 1:1, 3:4, 4:3, 9:16, 16:9 and 21:9; the other four are
# close approximations (the adapter reads the real size from the image, never from a table).
PRO_IMAGE_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (848, 1264),
    "3:2": (1264, 848),
    "3:4": (896, 1200),
    "4:3": (1200, 896),
    "4:5": (928, 1152),
    "5:4": (1152, 928),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "21:9": (1584, 672),
}
_SCALE = {"1K": 1, "2K": 2, "4K": 4}
# Model id -> (sizes at 1K, whether imageConfig.imageSize is accepted).
MODELS: Mapping[str, tuple[Mapping[str, tuple[int, int]], bool]] = {
    "gemini-2.5-flash-image": (FLASH_IMAGE_SIZES, False),
    "gemini-2.5-flash-image-preview": (FLASH_IMAGE_SIZES, False),
    "gemini-3-pro-image-preview": (PRO_IMAGE_SIZES, True),
}
# Input images per prompt.
MAX_INPUT_IMAGES: Mapping[str, int] = {
    "gemini-2.5-flash-image": 3,
    "gemini-2.5-flash-image-preview": 3,
    "gemini-3-pro-image-preview": 14,
}
INPUT_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
# What an input image adds to promptTokenCount.
INPUT_IMAGE_TOKENS = 258
_TOP_LEVEL_FIELDS = frozenset(
    {
        "contents",
        "generationConfig",
        "safetySettings",
        "systemInstruction",
        "tools",
        "toolConfig",
        "cachedContent",
    }
)
_GENERATION_CONFIG_FIELDS = frozenset(
    {
        "responseModalities",
        "imageConfig",
        "candidateCount",
        "seed",
        "temperature",
        "topP",
        "topK",
        "maxOutputTokens",
        "stopSequences",
    }
)
_IMAGE_CONFIG_FIELDS = frozenset({"aspectRatio", "imageSize"})
_IMAGE_TOKENS = 1290

Kind = Literal["ok", "prompt_blocked", "finish_refusal", "text_only", "error", "raw", "truncated"]


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake answers one generateContent call.

    kind:
        ``ok``: 200 with one image (``image_format``), preceded by a text part when ``text``
        is set or TEXT was asked for. ``prompt_blocked``: 200 with
        ``promptFeedback.blockReason = reason`` and no candidates. ``finish_refusal``: 200
        with one candidate whose ``finishReason = reason`` and no content. ``text_only``: 200
        with one candidate that answers ``text`` (finishReason ``reason``) and no image.
        ``error``: ``status`` with ``{"error": error}``. ``raw``: exactly ``status``, ``body``,
        ``content_type``. ``truncated``: the ``ok`` JSON cut in half.
    delay: seconds to wait first; ``stop()`` cuts the wait short.
    """

    kind: Kind = "ok"
    delay: float = 0.0
    reason: str = ""
    text: str | None = None
    image_format: str = "PNG"
    status: int = 200
    error: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"


def ok(*, text: str | None = None, image_format: str = "PNG", delay: float = 0.0) -> Behaviour:
    return Behaviour(kind="ok", text=text, image_format=image_format, delay=delay)


def slow(seconds: float) -> Behaviour:
    """Wait ``seconds``, then answer normally; for client timeouts."""
    return Behaviour(kind="ok", delay=seconds)


def prompt_blocked(reason: str = "PROHIBITED_CONTENT") -> Behaviour:
    """The prompt itself is blocked: SAFETY, OTHER, BLOCKLIST, PROHIBITED_CONTENT, IMAGE_SAFETY."""
    return Behaviour(kind="prompt_blocked", reason=reason)


def finish_refusal(reason: str = "IMAGE_SAFETY") -> Behaviour:
    """The generated image is withheld: IMAGE_SAFETY, IMAGE_PROHIBITED_CONTENT, SAFETY, ..."""
    return Behaviour(kind="finish_refusal", reason=reason)


def text_instead_of_image(
    text: str = "I can't create that image. Can I help with something else?",
    reason: str = "STOP",
) -> Behaviour:
    """The model declines in words (finishReason STOP or NO_IMAGE) and sends no image."""
    return Behaviour(kind="text_only", text=text, reason=reason)


def raw(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    return Behaviour(
        kind="raw", status=status, body=body, content_type=content_type, headers=headers or {}
    )


def garbage() -> Behaviour:
    return raw(200, b"not json{")


def truncated() -> Behaviour:
    return Behaviour(kind="truncated")


def wrong_content_type() -> Behaviour:
    return raw(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")


def google_error(
    status: int,
    status_name: str,
    message: str,
    *,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    """``status`` with Google's error body ``{"error": {code, message, status, details}}``."""
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = [dict(d) for d in details]
    return Behaviour(kind="error", status=status, error=error, headers=headers or {})


def server_error() -> Behaviour:
    return google_error(
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    )


def service_unavailable() -> Behaviour:
    return google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def rate_limited(retry_delay: str | None = "7s", retry_after: int | None = None) -> Behaviour:
    """429 RESOURCE_EXHAUSTED. Google says when to retry in a RetryInfo detail; a proxy in
    front may add a Retry-After header (``retry_after``)."""
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                    "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash-image"},
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    if retry_delay is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
        )
    return google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
        details=details,
        headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
    )


def invalid_argument(message: str, *, field_path: str | None = None) -> Behaviour:
    """400 INVALID_ARGUMENT, with a BadRequest field violation when ``field_path`` is set."""
    details: list[dict[str, Any]] = []
    if field_path is not None:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field_path, "description": message}],
            }
        )
    return google_error(400, "INVALID_ARGUMENT", message, details=details)


def refused_with_400() -> Behaviour:
    """The refusal shape of Google's other image endpoints, as a proxy may pass it on."""
    return invalid_argument(
        "The prompt could not be submitted. This prompt contains sensitive words that violate "
        "Google's Responsible AI practices. Try rephrasing the prompt."
    )


@functools.lru_cache(maxsize=64)
def _encoded_image(width: int, height: int, fmt: str) -> str:
    return base64.b64encode(image_bytes(width, height, fmt)).decode("ascii")


def _json_response(
    status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> web.Response:
    # Google labels its JSON with a charset.
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        charset="UTF-8",
        headers=dict(headers or {}),
    )


def _error_response(
    status: int, status_name: str, message: str, details: Sequence[Mapping[str, Any]] = ()
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = [dict(d) for d in details]
    return _json_response(status, {"error": error})


def _unknown_field(name: str, where: str = "") -> tuple[str, str]:
    at = f" at '{where}'" if where else ""
    return (
        f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.',
        f"{where}.{name}" if where else name,
    )


class FakeGeminiUpstream(LoopbackServer[Behaviour]):
    """The Gemini API on 127.0.0.1; see the module docstring."""

    def __init__(self, api_key: str = "AIza-test-key", *, default: Behaviour | None = None):
        super().__init__(default or ok())
        self.api_key = api_key
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1beta"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{target}", self._generate)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)

        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return _error_response(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key:
            return self._invalid_key(key)

        model, _, method = request.match_info["target"].rpartition(":")
        if method != "generateContent" or model not in MODELS:
            return _error_response(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version v1beta, or is not supported "
                "for generateContent. Call ListModels to see the list of available models and "
                "their supported methods.",
            )
        sizes, has_image_size = MODELS[model]
        body = recorded.body
        problem = _validate(body, model, has_image_size)
        if problem is not None:
            message, field_path = problem
            return _error_response(
                400,
                "INVALID_ARGUMENT",
                message,
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": field_path, "description": message}],
                    }
                ],
            )

        behaviour = self.next_behaviour()
        await self.pause(behaviour.delay)
        if behaviour.kind == "error":
            return _json_response(
                behaviour.status, {"error": dict(behaviour.error or {})}, behaviour.headers
            )
        if behaviour.kind == "raw":
            return web.Response(
                status=behaviour.status,
                body=behaviour.body,
                headers={"Content-Type": behaviour.content_type, **behaviour.headers},
            )
        payload = self._answer_body(body, model, sizes, behaviour)
        if behaviour.kind == "truncated":
            raw_payload = orjson.dumps(payload)
            return web.Response(
                body=raw_payload[: len(raw_payload) // 2], content_type="application/json"
            )
        return _json_response(200, payload)

    def _invalid_key(self, key: str) -> web.Response:
        message = "API key not valid. Please pass a valid API key."
        return _error_response(
            400,
            "INVALID_ARGUMENT",
            message,
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {
                    "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                    "locale": "en-US",
                    "message": message,
                },
                {
                    "@type": "type.googleapis.com/google.rpc.DebugInfo",
                    "detail": f"Invalid API key: {key}",
                },
            ],
        )

    def _answer_body(
        self,
        body: dict[str, Any],
        model: str,
        sizes: Mapping[str, tuple[int, int]],
        behaviour: Behaviour,
    ) -> dict[str, Any]:
        parts_in = body["contents"][-1]["parts"]
        prompt = next(p["text"] for p in parts_in if "text" in p)
        images_in = sum(1 for p in parts_in if "inlineData" in p)
        prompt_tokens = max(1, len(prompt) // 4) + images_in * INPUT_IMAGE_TOKENS
        common: dict[str, Any] = {
            "modelVersion": model,
            "responseId": uuid.uuid4().hex[:22],
        }
        prompt_only_usage = {
            "promptTokenCount": prompt_tokens,
            "totalTokenCount": prompt_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        }
        if behaviour.kind == "prompt_blocked":
            return {
                "promptFeedback": {"blockReason": behaviour.reason},
                "usageMetadata": prompt_only_usage,
                **common,
            }
        if behaviour.kind == "finish_refusal":
            return {
                "candidates": [{"finishReason": behaviour.reason, "index": 0}],
                "usageMetadata": prompt_only_usage,
                **common,
            }
        if behaviour.kind == "text_only":
            text_tokens = max(1, len(behaviour.text or "") // 4)
            return {
                "candidates": [
                    {
                        "content": {"parts": [{"text": behaviour.text}], "role": "model"},
                        "finishReason": behaviour.reason,
                        "index": 0,
                    }
                ],
                "usageMetadata": {
                    **prompt_only_usage,
                    "candidatesTokenCount": text_tokens,
                    "totalTokenCount": prompt_tokens + text_tokens,
                },
                **common,
            }

        config = body["generationConfig"]
        image_config = config.get("imageConfig", {})
        width, height = sizes[image_config.get("aspectRatio", "1:1")]
        scale = _SCALE[image_config.get("imageSize", "1K")]
        fmt = behaviour.image_format.upper()
        parts: list[dict[str, Any]] = []
        text = behaviour.text
        if text is None and "TEXT" in config.get("responseModalities", []):
            text = "Here is the image you asked for."
        if text is not None:
            parts.append({"text": text})
        parts.append(
            {
                "inlineData": {
                    "mimeType": f"image/{fmt.lower()}",
                    "data": _encoded_image(width * scale, height * scale, fmt),
                }
            }
        )
        return {
            "candidates": [
                {
                    "content": {"parts": parts, "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": _IMAGE_TOKENS,
                "totalTokenCount": prompt_tokens + _IMAGE_TOKENS,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": _IMAGE_TOKENS}],
            },
            **common,
        }


def _validate(body: Any, model: str, has_image_size: bool) -> tuple[str, str] | None:
    """Google's complaint (message, field path) about a request body, or None if it is fine."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received. Expected an object.", ""
    for name in body:
        if name not in _TOP_LEVEL_FIELDS:
            return _unknown_field(name)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified", "contents"
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(content, dict):
            return f"Invalid value at '{where}': expected an object.", where
        for name in content:
            if name not in ("role", "parts"):
                return _unknown_field(name, where)
        if content.get("role", "user") != "user":
            return f"Please use a valid role: user, model. ({where}.role)", f"{where}.role"
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return (
                f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.",
                f"{where}.parts",
            )
        for j, part in enumerate(parts):
            part_where = f"{where}.parts[{j}]"
            if not isinstance(part, dict):
                return f"Invalid value at '{part_where}': expected an object.", part_where
            for name in part:
                if name not in ("text", "inlineData"):
                    return _unknown_field(name, part_where)
            if "inlineData" in part:
                problem = _inline_data_problem(part["inlineData"], f"{part_where}.inline_data")
                if problem is not None:
                    return problem
    last_parts = contents[-1]["parts"]
    texts = [p for p in last_parts if "text" in p]
    if len(texts) != 1 or not isinstance(texts[0]["text"], str) or not texts[0]["text"].strip():
        return (
            "Unable to submit request because it has an empty text parameter. Add a value to "
            "the parameter and try again.",
            "contents[0].parts[0].text",
        )
    images = sum(1 for p in last_parts if "inlineData" in p)
    if images > MAX_INPUT_IMAGES[model]:
        return (
            f"Too many images in the request: {images}; models/{model} accepts at most "
            f"{MAX_INPUT_IMAGES[model]}.",
            "contents[0].parts",
        )

    config = body.get("generationConfig")
    if not isinstance(config, dict):
        return (
            "This model only supports image generation with generationConfig."
            "responseModalities including IMAGE.",
            "generationConfig",
        )
    for name in config:
        if name not in _GENERATION_CONFIG_FIELDS:
            return _unknown_field(name, "generation_config")
    modalities = config.get("responseModalities")
    if (
        not isinstance(modalities, list)
        or "IMAGE" not in modalities
        or any(m not in ("TEXT", "IMAGE") for m in modalities)
    ):
        return (
            f"The requested combination of response modalities ({modalities!r}) is not "
            "supported by the model.",
            "generation_config.response_modalities",
        )
    count = config.get("candidateCount", 1)
    if count != 1:
        return (
            f"Multiple candidates is not enabled for models/{model}",
            "generation_config.candidate_count",
        )
    seed = config.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not -(2**31) <= seed < 2**31
    ):
        return (
            f"Invalid value at 'generation_config.seed' (TYPE_INT32), {seed!r}",
            "generation_config.seed",
        )
    image_config = config.get("imageConfig", {})
    if not isinstance(image_config, dict):
        return "Invalid value at 'generation_config.image_config'", "generation_config.image_config"
    for name in image_config:
        if name not in _IMAGE_CONFIG_FIELDS:
            return _unknown_field(name, "generation_config.image_config")
    ratio = image_config.get("aspectRatio", "1:1")
    if ratio not in ASPECT_RATIOS:
        return (
            f"Unsupported aspect ratio: {ratio!r}. Supported values are "
            f"{', '.join(ASPECT_RATIOS)}.",
            "generation_config.image_config.aspect_ratio",
        )
    if "imageSize" in image_config:
        if not has_image_size:
            return (
                f"Image size is not supported for models/{model}.",
                "generation_config.image_config.image_size",
            )
        if image_config["imageSize"] not in _SCALE:
            return (
                f"Unsupported image size: {image_config['imageSize']!r}.",
                "generation_config.image_config.image_size",
            )
    return None


def _inline_data_problem(inline: Any, where: str) -> tuple[str, str] | None:
    """Google's complaint about one ``inlineData`` part, or None if it is a readable image."""
    if not isinstance(inline, dict):
        return f"Invalid value at '{where}': expected an object.", where
    for name in inline:
        if name not in ("mimeType", "data"):
            return _unknown_field(name, where)
    mime = inline.get("mimeType")
    if mime not in INPUT_MIME_TYPES:
        return f"Unsupported MIME type: {mime}", f"{where}.mime_type"
    data = inline.get("data")
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else b""
    except ValueError:
        raw = b""
    if not raw:
        return (
            f"Invalid value at '{where}.data' (TYPE_BYTES), Base64 decoding failed",
            f"{where}.data",
        )
    try:
        with Image.open(io.BytesIO(raw)) as image:
            fmt = (image.format or "").lower()
    except Exception:
        fmt = ""
    if not fmt or f"image/{fmt}" != mime:
        return "Unable to process input image. Please retry or report in ...", f"{where}.data"
    return None


def input_images(body: Any) -> list[tuple[str, bytes]]:
    """The (mimeType, bytes) of every ``inlineData`` part of a recorded request body, in order."""
    parts = body["contents"][-1]["parts"]
    return [
        (p["inlineData"]["mimeType"], base64.b64decode(p["inlineData"]["data"]))
        for p in parts
        if "inlineData" in p
    ]
