"""A loopback fake of Gemini image models' ``generateContent`` and of the model list, as the
Gemini API or as Vertex AI.

Typical use::

    async with FakeGeminiUpstream(api_key=API_KEY) as fake:
        provider = GeminiImageProvider("gemini", base_url=fake.base_url, api_key=API_KEY)
        fake.script(ok(), prompt_blocked(), rate_limited(retry_delay="7s"))
        ...  # one behaviour per call, in arrival order; then the default (a normal answer)

    async with FakeGeminiUpstream.vertex_ai(TOKEN, project="p", location="global") as fake:
        ...  # fake.base_url is the Vertex AI base (ending /v1)

Routes (the real paths):

* Gemini API: ``POST /{v1|v1beta}/models/{model}:generateContent`` and
  ``GET /{v1|v1beta}/models?pageSize=&pageToken=``. Like Google it takes the key from
  ``x-goog-api-key`` (or ``?key=``): none answers 403 PERMISSION_DENIED, a wrong one 400
  INVALID_ARGUMENT with ErrorInfo reason ``API_KEY_INVALID`` and a DebugInfo that echoes the
  key (as Google's does).
* Vertex AI: ``POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:
  generateContent`` and ``GET /v1beta1/publishers/google/models?pageSize=&pageToken=``, with
  ``Authorization: Bearer <token>``: none or a wrong one answers 401 UNAUTHENTICATED; another
  project or location 403 IAM_PERMISSION_DENIED. ``fake.token`` may be changed to model a
  rotation.

Models (``MODELS``): ``gemini-3.1-flash-image`` (14 aspect ratios, image sizes 512/1K/2K/4K,
thinking level) and ``gemini-3-pro-image`` (10 ratios, 1K/2K/4K), each taking up to 14 input
images, as Google's model pages describe them. ``gemini-2.5-flash-image`` was shut down by
Google on 2026-10-02; the fake still serves it (10 ratios, one size, 3 input images) only
because the shared routing suite drives it, and leaves it off the model list. Any other id,
and any id in ``retired``, answers Google's 404 NOT_FOUND for a model that does not exist:
``models/x is not found for API version v1, or is not supported for generateContent...`` on
the Gemini API, ``Publisher Model `projects/.../models/x` was not found or your project does
not have access to it...`` on Vertex AI.

The body is checked the way Google rejects it, with 400 INVALID_ARGUMENT ("Invalid JSON payload
received. Unknown name ..."): unknown or misspelt fields; an aspect ratio or image size the
model does not have; ``thinkingConfig`` for a model without a thinking level (an assumption:
the model pages list the thinking level for the flash family only); more input images than the
model takes; ``inlineData`` whose ``mimeType`` Gemini does not read or whose ``data`` is not
base64 of an image of that type. Stricter than Google on one point: only the camelCase field
names are accepted (Google's JSON parser also takes snake_case, which google-genai sends for
``thinking_level`` and ``mime_type``; see tests/test_contract_google.py), so that the adapter's
spelling is pinned down.

Answers: one image per call, PNG by default, at the model's pixel size for the requested ratio
and size (``pixel_size``; the 1K sizes of the ten standard ratios are the ones Google
publishes, the others are close approximations: the adapter reads the real size from the image,
never from a table), with ``candidatesTokenCount`` the model's output tokens for that size
(gemini-3.1-flash-image: 747, 1120, 1680, 2520 for 512, 1K, 2K, 4K). Each input image adds
``INPUT_IMAGE_TOKENS`` to ``promptTokenCount``.

Auth, routing and body-shape failures answer without using up a scripted behaviour. Every
request, refused or not, is recorded in ``fake.requests``; ``max_in_flight`` says how many
calls were ever being answered at the same time.
"""

from __future__ import annotations

import base64
import functools
import io
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from PIL import Image

from tests.fakes.loopback import LoopbackServer, image_bytes

__all__ = [
    "INPUT_IMAGE_TOKENS",
    "MODELS",
    "Behaviour",
    "FakeGeminiUpstream",
    "FakeModel",
    "finish_refusal",
    "finished",
    "garbage",
    "google_error",
    "input_images",
    "invalid_argument",
    "ok",
    "pixel_size",
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

STANDARD_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# The 1K sizes Google publishes for the Gemini 3 image models' standard ratios.
_STANDARD_1K: Mapping[str, tuple[int, int]] = {
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
# gemini-3.1-flash-image's extra ratios at 1K: about a megapixel in multiples of 16 (not
# published sizes).
_EXTREME_1K: Mapping[str, tuple[int, int]] = {
    "1:4": (512, 2048),
    "4:1": (2048, 512),
    "1:8": (368, 2944),
    "8:1": (2944, 368),
}
# gemini-2.5-flash-image's one size per ratio.
_LEGACY_SIZES: Mapping[str, tuple[int, int]] = {
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
# Each side at an image size, relative to 1K.
_SCALE = {"512": 0.5, "1K": 1, "2K": 2, "4K": 4}
THINKING_LEVELS = frozenset({"MINIMAL", "LOW", "MEDIUM", "HIGH", "XHIGH"})


@dataclass(frozen=True, slots=True)
class FakeModel:
    # Pixel size per aspect ratio at imageSize 1K (the default).
    sizes: Mapping[str, tuple[int, int]]
    # imageConfig.imageSize values it takes; empty: it takes no imageSize.
    image_sizes: tuple[str, ...]
    # candidatesTokenCount of one image, per image size.
    output_tokens: Mapping[str, int]
    max_input_images: int
    thinking_level: bool
    # Served, but not on the model list (shut down upstream).
    unlisted: bool = False


MODELS: Mapping[str, FakeModel] = {
    "gemini-3.1-flash-image": FakeModel(
        sizes={**_STANDARD_1K, **_EXTREME_1K},
        image_sizes=("512", "1K", "2K", "4K"),
        output_tokens={"512": 747, "1K": 1120, "2K": 1680, "4K": 2520},
        max_input_images=14,
        thinking_level=True,
    ),
    "gemini-3-pro-image": FakeModel(
        sizes=_STANDARD_1K,
        image_sizes=("1K", "2K", "4K"),
        output_tokens={"1K": 1120, "2K": 1120, "4K": 2000},
        max_input_images=14,
        thinking_level=False,
    ),
    "gemini-2.5-flash-image": FakeModel(
        sizes=_LEGACY_SIZES,
        image_sizes=(),
        output_tokens={"1K": 1290},
        max_input_images=3,
        thinking_level=False,
        unlisted=True,
    ),
}
# Listed beside the image models, so a list is more than what the catalog asks about.
_OTHER_LISTED = ("gemini-3-flash", "gemini-3.1-pro", "gemini-embedding-001")
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
        "thinkingConfig",
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
_THINKING_CONFIG_FIELDS = frozenset({"thinkingLevel", "includeThoughts"})
# Google's list methods: 50 a page unless asked, never more than 1000.
_DEFAULT_PAGE_SIZE = 50
_MAX_PAGE_SIZE = 1000

Kind = Literal["ok", "prompt_blocked", "finished", "error", "raw", "truncated"]


def pixel_size(model: str, aspect_ratio: str, image_size: str = "1K") -> tuple[int, int]:
    """The size of the image ``model`` answers for this ratio and image size."""
    width, height = MODELS[model].sizes[aspect_ratio]
    scale = _SCALE[image_size]
    return int(width * scale), int(height * scale)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake answers one generateContent call.

    kind:
        ``ok``: 200 with one image (``image_format``), preceded by a text part when ``text``
        is set or TEXT was asked for. ``prompt_blocked``: 200 with
        ``promptFeedback.blockReason = reason`` and no candidates. ``finished``: 200 with one
        candidate whose ``finishReason = reason`` and no image: no content, or a text part
        when ``text`` is set. ``error``: ``status`` with ``{"error": error}``. ``raw``:
        exactly ``status``, ``body``, ``content_type``. ``truncated``: the ``ok`` JSON cut in
        half.
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
    """The prompt itself is blocked (``types.BlockedReason``): SAFETY, OTHER, BLOCKLIST,
    PROHIBITED_CONTENT, IMAGE_SAFETY, and on Vertex AI MODEL_ARMOR and JAILBREAK."""
    return Behaviour(kind="prompt_blocked", reason=reason)


def finished(reason: str, *, text: str | None = None) -> Behaviour:
    """A candidate that ends ``reason`` (``types.FinishReason``) without an image."""
    return Behaviour(kind="finished", reason=reason, text=text)


def finish_refusal(reason: str = "IMAGE_SAFETY") -> Behaviour:
    """The generated image is withheld for safety: IMAGE_SAFETY, IMAGE_PROHIBITED_CONTENT,
    SAFETY, PROHIBITED_CONTENT, BLOCKLIST, SPII, RECITATION, IMAGE_RECITATION."""
    return finished(reason)


def text_instead_of_image(
    text: str = "I can't create that image. Can I help with something else?",
    reason: str = "STOP",
) -> Behaviour:
    """The model answers in words (finishReason STOP, or NO_IMAGE) and sends no image."""
    return finished(reason, text=text)


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
                    "quotaDimensions": {"location": "global", "model": "gemini-3.1-flash-image"},
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
    status: int,
    status_name: str,
    message: str,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = [dict(d) for d in details]
    return _json_response(status, {"error": error}, headers)


class _Rejected(Exception):
    """A request the upstream refuses before any behaviour applies."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _unknown_field(name: str, where: str = "") -> tuple[str, str]:
    at = f" at '{where}'" if where else ""
    return (
        f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.',
        f"{where}.{name}" if where else name,
    )


class FakeGeminiUpstream(LoopbackServer[Behaviour]):
    """Gemini image models on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        api_key: str = "AIza-test-key",
        *,
        vertex: bool = False,
        project: str = "test-project",
        location: str = "global",
        retired: Iterable[str] = (),
        default: Behaviour | None = None,
    ) -> None:
        super().__init__(default or ok())
        self.vertex = vertex
        # The API key (Gemini API) or access token (Vertex AI) the fake accepts; tests may
        # change it to model a rotation.
        self.token = api_key
        self.project = project
        self.location = location
        # Model ids that answer 404 NOT_FOUND as Google answers for a shut-down model.
        self.retired = set(retired)
        # The most models one list page holds (Google's is 1000); lower it to force paging.
        self.max_page_size = _MAX_PAGE_SIZE
        self.in_flight = 0
        self.max_in_flight = 0

    @classmethod
    def vertex_ai(
        cls,
        token: str,
        *,
        project: str = "test-project",
        location: str = "global",
        retired: Iterable[str] = (),
        default: Behaviour | None = None,
    ) -> FakeGeminiUpstream:
        return cls(
            token,
            vertex=True,
            project=project,
            location=location,
            retired=retired,
            default=default,
        )

    @property
    def api_key(self) -> str:
        return self.token

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def routes(self, app: web.Application) -> None:
        if self.vertex:
            app.router.add_post(
                "/v1/projects/{project}/locations/{location}/publishers/google/models/{target}",
                self._generate,
            )
            app.router.add_get("/v1beta1/publishers/google/models", self._list)
        else:
            app.router.add_post("/{version:v1|v1beta}/models/{target}", self._generate)
            app.router.add_get("/{version:v1|v1beta}/models", self._list)

    # -- routes -------------------------------------------------------------------------------

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        except _Rejected as rejected:
            return rejected.response
        finally:
            self.in_flight -= 1

    async def _list(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        try:
            self._authenticate(request, "")
            return self._model_page(request)
        except _Rejected as rejected:
            return rejected.response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        model, _, method = request.match_info["target"].rpartition(":")
        self._authenticate(request, model)
        if method != "generateContent" or model not in MODELS or model in self.retired:
            raise _Rejected(self._not_found(request, model))
        spec = MODELS[model]
        body = recorded.body
        problem = _validate(body, model, spec)
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
        payload = self._answer_body(body, model, spec, behaviour)
        if behaviour.kind == "truncated":
            raw_payload = orjson.dumps(payload)
            return web.Response(
                body=raw_payload[: len(raw_payload) // 2], content_type="application/json"
            )
        return _json_response(200, payload)

    # -- auth and routing failures ------------------------------------------------------------

    def _authenticate(self, request: web.Request, model: str) -> None:
        if self.vertex:
            self._authenticate_vertex(request, model)
            return
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            raise _Rejected(
                _error_response(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to "
                    "call this API.",
                )
            )
        if key != self.token:
            raise _Rejected(self._invalid_key(key))

    def _authenticate_vertex(self, request: web.Request, model: str) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or token != self.token:
            missing = not header
            raise _Rejected(
                _error_response(
                    401,
                    "UNAUTHENTICATED",
                    (
                        "Request is missing required authentication credential."
                        if missing
                        else "Request had invalid authentication credentials."
                    )
                    + " Expected OAuth 2 access token, login cookie or other valid "
                    "authentication credential.",
                    [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "CREDENTIALS_MISSING" if missing else "ACCESS_TOKEN_EXPIRED",
                            "domain": "googleapis.com",
                            "metadata": {"service": "aiplatform.googleapis.com"},
                        }
                    ],
                    {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
                )
            )
        project = request.match_info.get("project")
        location = request.match_info.get("location")
        if project is not None and (project, location) != (self.project, self.location):
            raise _Rejected(
                _error_response(
                    403,
                    "PERMISSION_DENIED",
                    f"Permission 'aiplatform.endpoints.predict' denied on resource "
                    f"'//aiplatform.googleapis.com/projects/{project}/locations/{location}/"
                    f"publishers/google/models/{model}' (or it may not exist).",
                    [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "IAM_PERMISSION_DENIED",
                            "domain": "aiplatform.googleapis.com",
                            "metadata": {"permission": "aiplatform.endpoints.predict"},
                        }
                    ],
                )
            )

    def _not_found(self, request: web.Request, model: str) -> web.Response:
        if self.vertex:
            message = (
                f"Publisher Model `projects/{self.project}/locations/{self.location}/publishers/"
                f"google/models/{model}` was not found or your project does not have access to "
                "it. Please ensure you are using a valid model version. For more information, "
                "see: https://cloud.google.com/vertex-ai/generative-ai/docs/learn/model-versions"
            )
        else:
            version = request.match_info.get("version", "v1")
            message = (
                f"models/{model} is not found for API version {version}, or is not supported "
                "for generateContent. Call ListModels to see the list of available models and "
                "their supported methods."
            )
        return _error_response(404, "NOT_FOUND", message)

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

    # -- the model list -----------------------------------------------------------------------

    def listed_ids(self) -> list[str]:
        """What the model list holds, in its order."""
        served = [m for m, spec in MODELS.items() if not spec.unlisted and m not in self.retired]
        return sorted([*served, *_OTHER_LISTED])

    def _model_page(self, request: web.Request) -> web.Response:
        try:
            size = int(request.query.get("pageSize", _DEFAULT_PAGE_SIZE))
            start = int(request.query.get("pageToken") or "0", 16)
        except ValueError:
            raise _Rejected(
                _error_response(400, "INVALID_ARGUMENT", "Invalid page token or size.")
            ) from None
        size = min(size if size > 0 else _DEFAULT_PAGE_SIZE, self.max_page_size)
        ids = self.listed_ids()
        page = ids[start : start + size]
        payload: dict[str, Any]
        if self.vertex:
            payload = {
                "publisherModels": [
                    {
                        "name": f"publishers/google/models/{model}",
                        "versionId": "default",
                        "openSourceCategory": "PROPRIETARY",
                        "launchStage": "GA",
                    }
                    for model in page
                ]
            }
        else:
            payload = {
                "models": [
                    {
                        "name": f"models/{model}",
                        "version": "001",
                        "displayName": model,
                        "supportedGenerationMethods": ["generateContent", "countTokens"],
                    }
                    for model in page
                ]
            }
        if start + size < len(ids):
            payload["nextPageToken"] = f"{start + size:x}"
        return _json_response(200, payload)

    # -- answers ------------------------------------------------------------------------------

    def _answer_body(
        self,
        body: dict[str, Any],
        model: str,
        spec: FakeModel,
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
        if behaviour.kind == "finished":
            candidate: dict[str, Any] = {"finishReason": behaviour.reason, "index": 0}
            usage = dict(prompt_only_usage)
            if behaviour.text is not None:
                text_tokens = max(1, len(behaviour.text) // 4)
                candidate["content"] = {"parts": [{"text": behaviour.text}], "role": "model"}
                usage["candidatesTokenCount"] = text_tokens
                usage["totalTokenCount"] = prompt_tokens + text_tokens
            return {"candidates": [candidate], "usageMetadata": usage, **common}

        config = body["generationConfig"]
        image_config = config.get("imageConfig", {})
        image_size = image_config.get("imageSize", "1K")
        width, height = pixel_size(model, image_config.get("aspectRatio", "1:1"), image_size)
        output_tokens = spec.output_tokens[image_size]
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
                    "data": _encoded_image(width, height, fmt),
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
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": output_tokens}],
            },
            **common,
        }


def _validate(body: Any, model: str, spec: FakeModel) -> tuple[str, str] | None:
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
    if images > spec.max_input_images:
        return (
            f"Too many images in the request: {images}; models/{model} accepts at most "
            f"{spec.max_input_images}.",
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
    problem = _thinking_problem(config.get("thinkingConfig"), model, spec)
    if problem is not None:
        return problem
    image_config = config.get("imageConfig", {})
    if not isinstance(image_config, dict):
        return "Invalid value at 'generation_config.image_config'", "generation_config.image_config"
    for name in image_config:
        if name not in _IMAGE_CONFIG_FIELDS:
            return _unknown_field(name, "generation_config.image_config")
    ratio = image_config.get("aspectRatio", "1:1")
    if ratio not in spec.sizes:
        return (
            f"Unsupported aspect ratio: {ratio!r}. Supported values are {', '.join(spec.sizes)}.",
            "generation_config.image_config.aspect_ratio",
        )
    if "imageSize" in image_config:
        if not spec.image_sizes:
            return (
                f"Image size is not supported for models/{model}.",
                "generation_config.image_config.image_size",
            )
        if image_config["imageSize"] not in spec.image_sizes:
            return (
                f"Unsupported image size: {image_config['imageSize']!r}. Supported values are "
                f"{', '.join(spec.image_sizes)}.",
                "generation_config.image_config.image_size",
            )
    return None


def _thinking_problem(thinking: Any, model: str, spec: FakeModel) -> tuple[str, str] | None:
    if thinking is None:
        return None
    where = "generation_config.thinking_config"
    if not isinstance(thinking, dict):
        return f"Invalid value at '{where}'", where
    for name in thinking:
        if name not in _THINKING_CONFIG_FIELDS:
            return _unknown_field(name, where)
    if "thinkingLevel" in thinking:
        if not spec.thinking_level:
            return (
                f"Thinking level is not supported for models/{model}.",
                f"{where}.thinking_level",
            )
        if thinking["thinkingLevel"] not in THINKING_LEVELS:
            return (
                f"Invalid value at '{where}.thinking_level' (type.googleapis.com/"
                f"google.ai.generativelanguage.v1.ThinkingConfig.ThinkingLevel), "
                f"{thinking['thinkingLevel']!r}",
                f"{where}.thinking_level",
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
        raw_bytes = base64.b64decode(data, validate=True) if isinstance(data, str) else b""
    except ValueError:
        raw_bytes = b""
    if not raw_bytes:
        return (
            f"Invalid value at '{where}.data' (TYPE_BYTES), Base64 decoding failed",
            f"{where}.data",
        )
    try:
        with Image.open(io.BytesIO(raw_bytes)) as image:
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
