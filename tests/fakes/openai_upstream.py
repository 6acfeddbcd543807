"""A loopback fake of OpenAI's Images API, and of Azure OpenAI's, served by a real aiohttp server.

Its model rules follow the official SDK, openai-python 3.51.0 (``types/image_model.py``,
``types/image_generate_params.py``, ``types/image_edit_params.py``,
``types/images_response.py``), written here independently of the adapter's own tables.

Typical use::

    async with FakeOpenAIUpstream(api_key="sk-upstream-test") as fake:
        provider = OpenAICompatibleProvider(
            "openai", base_url=fake.base_url, api_key="sk-upstream-test"
        )
        fake.script(rate_limited(retry_after=2), "ok")
        ...  # first call gets a 429, the second a normal answer, later ones the default
        assert fake.requests[0].body["model"] == "gpt-image-2"

OpenAI mode (the default) routes:

* ``POST /v1/images/generations`` checks ``Authorization: Bearer <api_key>`` (skipped when
  ``api_key`` is None), records the request in ``fake.requests`` and answers with the next
  scripted behaviour, or with ``default`` (a normal answer) once the script is used up.
* ``GET /v1/models`` answers OpenAI's list shape (``{"object": "list", "data": [{"id",
  "object": "model", "created", "owned_by"}]}``) of ``listed_models`` (default: the live
  image models), each with the ``shutdown_date`` that ``shutdown_dates`` gives it.
* ``GET /files/<id>`` serves images handed out by ``url``-style answers.
* ``POST /v1/images/edits`` and ``POST /v1/images/variations`` take multipart forms and check
  them as OpenAI does (dall-e-2: one square PNG under 4 MB, variations only for dall-e-2;
  GPT image models: up to 16 png/jpeg/webp images as ``image`` or ``image[]``; a ``mask``
  must be a PNG with alpha of the first image's size). The recorded body is then a ``Form``
  (``fields`` by name, ``files`` by name as ``FilePart`` lists).

A model in ``retired_models`` is answered as OpenAI answers a retired one: HTTP 404, code
``model_not_found`` ("The model `...` has been deprecated"), before anything else is
checked; it uses up no scripted behaviour. By default nothing is retired, so the stacks'
``dall-e-2`` and ``gpt-image-1`` fixtures keep working; ``OPENAI_RETIRED_MODELS`` lists what
OpenAI really retired (dall-e-2 and dall-e-3 on 2026-05-12, gpt-image-1 on 2026-10-23).

A GPT image request with ``stream: true`` is answered with server-sent events: per image
``partial_images`` ``*.partial_image`` events, then ``*.completed`` with ``usage``
(``image_generation.*`` or ``image_edit.*``). ``stream_cut(after_events=k)`` drops the
connection after k events; ``stream_error(after_events=k)`` sends an ``error`` event after k.

Azure mode (``azure_deployments={"deployment name": "model id", ...}``; ``base_url`` is then the
resource endpoint) serves both Azure APIs:

* the deployment routes, ``POST /openai/deployments/<deployment>/images/generations`` and
  ``.../images/edits`` (the same multipart form as OpenAI's; no edits for dall-e-3), answered
  as Azure does when the ``api-version`` query is missing (404), the credential is missing or
  wrong (401), the version is not one of ``azure_api_versions`` (400) or the deployment does
  not exist (404 ``DeploymentNotFound``); a ``model`` in the body is ignored;
* the v1 API, ``POST /openai/v1/images/generations`` and ``.../images/edits``, where the
  body's ``model`` names the deployment (an unknown one: 404 ``model_not_found``, OpenAI's
  shape), no api-version is needed, and ``GET /openai/v1/models`` lists the deployments'
  models with Azure's ``lifecycle_status`` and ``deprecation.inference`` (in the past for a
  model in ``retired_models``).

Azure credentials: the ``api-key`` header with ``api_key``, or ``Authorization: Bearer`` with
one of ``azure_tokens`` (Microsoft Entra ID access tokens); on v1 the key is also taken as a
Bearer token (as the OpenAI client sends it). A Bearer key on the deployment routes does not
count. Answers for dall-e deployments carry Azure's ``content_filter_results`` per item.

Both modes enforce the real model rules, by the body's ``model`` (OpenAI, Azure v1) or the
deployment's model (Azure deployment routes), so an adapter that breaks one gets the real 400:
the GPT image models (``gpt-image-*``, ``chatgpt-image-*``) reject ``response_format`` and
``style`` and take quality low|medium|high|auto (gpt-image-2.5-*: also xhigh|max);
gpt-image-2 and gpt-image-2.5 take any ``WIDTHxHEIGHT`` in multiples of 16 with a ratio within
3:1, at most 3840 per edge and 3840x2160 pixels, at least 655,360 pixels; the others sizes
1024x1024, 1536x1024, 1024x1536 and auto. They answer base64 in their ``output_format`` with
token ``usage`` and echo the effective ``safety_identifier`` (else ``user``). dall-e-3 takes
only n=1, its three sizes, quality standard|hd and style vivid|natural, and answers ``url``
items unless asked for ``b64_json``; dall-e-2 rejects ``quality`` and ``style`` and takes its
three square sizes. Other model ids take any WxH.

Behaviours are ``Behaviour`` values, built with the factory functions below (``ok``, ``slow``,
``url``, ``filtered``, ``truncated``, ``garbage``, ``wrong_content_type``, ``http_error``,
``server_error``, ``service_unavailable``, ``rate_limited``, ``content_policy_violation``,
``moderation_blocked``, ``invalid_value``, ``refusal_in_200``, ``azure_content_policy_violation``,
``azure_rate_limited``, ``model_not_found``, ``model_deprecated``, ``raw``, ``stream_cut``,
``stream_error``). ``script`` also takes these names as plain strings, with default arguments
(``"slow"`` waits 2 s). A request refused for its address, version, key or model answers
without using up a scripted behaviour.
"""

from __future__ import annotations

import base64
import dataclasses
import email.parser
import email.policy
import functools
import io
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from tests.fakes.loopback import LoopbackServer, RecordedRequest, image_bytes

__all__ = [
    "AZURE_API_VERSIONS",
    "LIVE_IMAGE_MODELS",
    "OPENAI_RETIRED_MODELS",
    "Behaviour",
    "FakeOpenAIUpstream",
    "FilePart",
    "Form",
    "RecordedRequest",
    "azure_content_policy_violation",
    "azure_rate_limited",
    "content_policy_violation",
    "filtered",
    "garbage",
    "http_error",
    "invalid_value",
    "model_deprecated",
    "model_not_found",
    "moderation_blocked",
    "ok",
    "parse_form",
    "rate_limited",
    "raw",
    "refusal_in_200",
    "server_error",
    "service_unavailable",
    "slow",
    "stream_cut",
    "stream_error",
    "truncated",
    "url",
    "wrong_content_type",
]

BehaviourKind = Literal["ok", "url", "truncated", "error", "raw", "stream_cut", "stream_error"]

# Large enough for every size the real APIs accept, small enough that a typo in a test cannot
# make the fake allocate gigabytes.
_MAX_SIDE = 4096
AZURE_API_VERSIONS = frozenset({"2024-02-01", "2024-10-21", "2025-04-01-preview"})

_DALL_E_2_SIZES = ("256x256", "512x512", "1024x1024")
_DALL_E_3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
_GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")
_GPT_IMAGE_QUALITIES = ("low", "medium", "high", "auto")
# types/image_generate_params.py: the gpt-image-2.5 models "also support `xhigh` and `max`".
_GPT_IMAGE_2_5_QUALITIES = (*_GPT_IMAGE_QUALITIES, "xhigh", "max")
# Output tokens per 1024x1024 image by quality; other sizes in proportion to their pixels.
_GPT_IMAGE_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "xhigh": 8320, "max": 16640}
# The SDK's model list (types/image_model.py) less its deprecated values.
LIVE_IMAGE_MODELS = (
    "gpt-image-1.5",
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-flare-2026-09-08",
    "gpt-image-2.6-sunburst",
    "gpt-image-2.6-flare",
    "gpt-image-1-mini",
    "chatgpt-image-latest",
)
# types/image_model.py: "gpt-image-1" shut down on 2026-10-23, "dall-e-2" and "dall-e-3"
# retired on 2026-05-12.
OPENAI_RETIRED_MODELS = frozenset({"dall-e-2", "dall-e-3", "gpt-image-1"})
# Families as the SDK's parameter docs group the models; the longest matching prefix wins.
_FAMILY_PREFIXES = (
    ("gpt-image-2.5", "gpt-image-2.5"),
    # The SDK names no free sizes for 2.6; it takes the GPT image models' standard sizes.
    ("gpt-image-2.6", "gpt-image"),
    ("gpt-image-2", "gpt-image-2"),
    ("gpt-image", "gpt-image"),
    ("chatgpt-image", "gpt-image"),
    ("dall-e-2", "dall-e-2"),
    ("dall-e-3", "dall-e-3"),
)
_GPT_FAMILIES = frozenset({"gpt-image", "gpt-image-2", "gpt-image-2.5"})
# Azure's v1 API takes no dated version; these values are tolerated, others refused.
_AZURE_V1_VERSIONS = frozenset({"v1", "preview", "latest"})
_FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake answers one generation request.

    kind:
        ``ok``: 200 with base64 images (``url`` items for dall-e unless ``b64_json`` was
        asked). ``url``: 200 whose items carry a ``url`` into this server instead.
        ``truncated``: the ``ok`` JSON cut in half. ``error``: ``status`` with
        ``{"error": error}``. ``raw``: ``status``, ``body`` and ``content_type`` exactly as
        given.
    delay: seconds to wait before answering (any kind); ``stop()`` cuts the wait short.
    usage: an ``ok``/``url`` answer's ``usage`` object; gpt-image answers carry a computed one
        when this is None, other models none.
    filtered: how many of an ``ok`` answer's items Azure's content filter withholds: such an
        item has no image and ``content_filter_results`` with ``filtered: true``.
    """

    kind: BehaviourKind = "ok"
    delay: float = 0.0
    status: int = 200
    error: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"
    usage: Mapping[str, Any] | None = None
    filtered: int = 0
    # stream_cut / stream_error: server-sent events written before the stream breaks.
    after_events: int = 0


def ok(*, usage: Mapping[str, Any] | None = None, delay: float = 0.0) -> Behaviour:
    return Behaviour(kind="ok", usage=usage, delay=delay)


def slow(seconds: float) -> Behaviour:
    """Wait ``seconds``, then answer normally; for client timeouts."""
    return Behaviour(kind="ok", delay=seconds)


def url(*, usage: Mapping[str, Any] | None = None) -> Behaviour:
    """Answer items with ``url`` (as dall-e does by default) instead of ``b64_json``."""
    return Behaviour(kind="url", usage=usage)


def filtered(count: int) -> Behaviour:
    """A 200 whose first ``count`` items Azure's content filter withheld."""
    return Behaviour(kind="ok", filtered=count)


def truncated() -> Behaviour:
    return Behaviour(kind="truncated")


def stream_cut(after_events: int) -> Behaviour:
    """A streamed answer whose connection drops after ``after_events`` events."""
    return Behaviour(kind="stream_cut", after_events=after_events)


def stream_error(after_events: int) -> Behaviour:
    """A streamed answer that sends ``after_events`` events, then an ``error`` event."""
    return Behaviour(kind="stream_error", after_events=after_events)


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


def wrong_content_type() -> Behaviour:
    return raw(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")


def http_error(
    status: int,
    *,
    message: str,
    type: str = "invalid_request_error",  # OpenAI's own field name
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    """``status`` with an OpenAI error body ``{"error": {message, type, param, code}}``."""
    return Behaviour(
        kind="error",
        status=status,
        error={"message": message, "type": type, "param": param, "code": code},
        headers=headers or {},
    )


def server_error() -> Behaviour:
    return http_error(
        500,
        message="The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


def service_unavailable() -> Behaviour:
    return http_error(
        503,
        message="The engine is currently overloaded, please try again later.",
        type="server_error",
    )


def rate_limited(retry_after: int = 1) -> Behaviour:
    return http_error(
        429,
        message="Rate limit reached for images per minute. Please try again later.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def content_policy_violation() -> Behaviour:
    """dall-e's refusal."""
    return http_error(
        400,
        message=(
            "Your request was rejected as a result of our safety system. Your prompt may "
            "contain text that is not allowed by our safety system."
        ),
        code="content_policy_violation",
    )


def moderation_blocked() -> Behaviour:
    """gpt-image's refusal."""
    return http_error(
        400,
        message=(
            "Your request was rejected by the safety system. If you believe this is an error, "
            "contact us at help.openai.com and include the request ID req_fake."
        ),
        type="image_generation_user_error",
        code="moderation_blocked",
    )


def invalid_value(
    param: str = "size",
    message: str = "Invalid value: '999x999'. Supported values are: '1024x1024'.",
) -> Behaviour:
    return http_error(400, message=message, code="invalid_value", param=param)


def model_not_found(model: str) -> Behaviour:
    """OpenAI's 404 for a model that does not exist (or that this key cannot use)."""
    return http_error(
        404,
        message=f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def model_deprecated(model: str, *, status: int = 400) -> Behaviour:
    """A refusal naming the model as deprecated, with no machine code: the 400 variant."""
    return http_error(
        status,
        message=(
            f"The model `{model}` has been deprecated, learn more here: "
            "https://platform.openai.com/docs/deprecations"
        ),
    )


def refusal_in_200() -> Behaviour:
    """Azure's documented refusal shape: a body with ``error`` and no ``data``."""
    body = {
        "created": int(time.time()),
        "error": {
            "code": "contentFilter",
            "message": "Generated image was filtered as a result of our safety system.",
        },
    }
    return raw(200, orjson.dumps(body))


def azure_content_policy_violation() -> Behaviour:
    """Azure's 400 refusal, with the content filter's verdict in ``inner_error``."""
    verdicts: dict[str, Any] = {
        name: {"filtered": name == "violence", "severity": "high" if name == "violence" else "safe"}
        for name in _FILTER_CATEGORIES
    }
    verdicts["jailbreak"] = {"detected": False, "filtered": False}
    return Behaviour(
        kind="error",
        status=400,
        error={
            "code": "content_policy_violation",
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": verdicts,
                "revised_prompt": "a revised prompt",
            },
            "message": (
                "Your request was rejected as a result of our safety system. Your prompt may "
                "contain text that is not allowed by our safety system."
            ),
            "type": "invalid_request_error",
        },
    )


def azure_rate_limited(retry_after_ms: int = 1500) -> Behaviour:
    """Azure's 429: whole seconds in Retry-After, the finer hint in retry-after-ms."""
    seconds = max(1, -(-retry_after_ms // 1000))
    return Behaviour(
        kind="error",
        status=429,
        error={
            "code": "429",
            "message": (
                "Requests to the Images_Generations Operation under Azure OpenAI API version "
                "2024-10-21 have exceeded call rate limit of your current OpenAI S0 pricing "
                f"tier. Please retry after {seconds} second."
            ),
        },
        headers={"Retry-After": str(seconds), "retry-after-ms": str(retry_after_ms)},
    )


_NAMED: dict[str, Callable[[], Behaviour]] = {
    "ok": ok,
    "slow": lambda: slow(2.0),
    "url": url,
    "truncated": truncated,
    "garbage": garbage,
    "wrong_content_type": wrong_content_type,
    "server_error": server_error,
    "service_unavailable": service_unavailable,
    "rate_limited": rate_limited,
    "content_policy_violation": content_policy_violation,
    "moderation_blocked": moderation_blocked,
    "invalid_value": invalid_value,
    "refusal_in_200": refusal_in_200,
    "azure_content_policy_violation": azure_content_policy_violation,
    "azure_rate_limited": azure_rate_limited,
}

_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


@functools.lru_cache(maxsize=32)
def _image(width: int, height: int, output_format: str = "png") -> bytes:
    return image_bytes(width, height, _FORMATS[output_format][0])


def _error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",  # OpenAI's own field name
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=dict(headers or {}), dumps=_dumps)


def _azure_error(status: int, code: str, message: str) -> web.Response:
    """Azure's gateway errors carry only a code and a message."""
    body = {"error": {"code": code, "message": message}}
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _unknown_parameter(name: str) -> web.Response:
    return _error_response(
        400, f"Unknown parameter: '{name}'.", code="unknown_parameter", param=name
    )


def _not_supported(value: Any, param: str, supported: Collection[str]) -> web.Response:
    quoted = [f"'{item}'" for item in supported]
    listed = ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
    return _error_response(
        400,
        f"Invalid value: {value!r}. Supported values are: {listed}.",
        code="invalid_value",
        param=param,
    )


def _family(model: Any) -> str | None:
    """``gpt-image``, ``gpt-image-2``, ``gpt-image-2.5``, ``dall-e-2``, ``dall-e-3`` or None."""
    if not isinstance(model, str):
        return None
    for prefix, family in _FAMILY_PREFIXES:
        if model.startswith(prefix):
            return family
    return None


def _is_gpt(family: str | None) -> bool:
    return family in _GPT_FAMILIES


def _free_size_problem(width: int, height: int) -> str | None:
    """types/image_generate_params.py for gpt-image-2 and 2.5: "Width and height must both be
    divisible by 16 and the requested aspect ratio must be between 1:3 and 3:1 ... the
    maximum supported resolution is 3840x2160"; the lower bound is OpenAI's image guide's."""
    if width % 16 or height % 16:
        return "Width and height must both be divisible by 16."
    if max(width, height) > 3 * min(width, height):
        return "The aspect ratio must be between 1:3 and 3:1."
    if max(width, height) > 3840 or width * height > 3840 * 2160:
        return "The maximum supported resolution is 3840x2160."
    if width * height < 655_360:
        return "The image must have at least 655,360 pixels."
    return None


class FakeOpenAIUpstream(LoopbackServer[Behaviour]):
    """OpenAI's (or Azure OpenAI's) Images API on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        api_key: str | None = "sk-upstream-test",
        *,
        default: Behaviour | None = None,
        azure_deployments: Mapping[str, str] | None = None,
        azure_api_versions: Collection[str] = AZURE_API_VERSIONS,
        azure_tokens: Collection[str] = (),
        retired_models: Collection[str] = (),
        listed_models: Collection[str] | None = None,
        shutdown_dates: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(default or ok())
        self.api_key = api_key
        self.azure_deployments = dict(azure_deployments) if azure_deployments is not None else None
        self.azure_api_versions = frozenset(azure_api_versions)
        # Microsoft Entra ID access tokens this Azure resource accepts as Bearer.
        self.azure_tokens = frozenset(azure_tokens)
        self.retired_models = frozenset(retired_models)
        self.listed_models = tuple(LIVE_IMAGE_MODELS if listed_models is None else listed_models)
        self.shutdown_dates = dict(shutdown_dates or {})
        # Downloads of images handed out by url-style answers.
        self.file_requests: list[RecordedRequest] = []
        self.base_url = ""
        self._files: dict[str, tuple[bytes, str]] = {}

    @property
    def azure(self) -> bool:
        return self.azure_deployments is not None

    @property
    def file_hits(self) -> int:
        """Image downloads received."""
        return len(self.file_requests)

    def script(self, *behaviours: Behaviour | str) -> None:
        """Queue behaviours; each answers one later generation request, in order."""
        for behaviour in behaviours:
            if isinstance(behaviour, str):
                try:
                    behaviour = _NAMED[behaviour]()
                except KeyError:
                    raise ValueError(
                        f"unknown behaviour {behaviour!r}; known: {sorted(_NAMED)}"
                    ) from None
            super().script(behaviour)

    def reset(self) -> None:
        """Forget recorded requests and any behaviours still queued."""
        super().reset()
        self.file_requests.clear()

    async def start(self) -> str:
        """Listen on a free loopback port; return the base URL: ``.../v1`` for OpenAI, the
        resource endpoint (the origin) for Azure."""
        origin = await super().start()
        self.base_url = origin if self.azure else f"{origin}/v1"
        return self.base_url

    def routes(self, app: web.Application) -> None:
        if self.azure:
            app.router.add_post(
                "/openai/deployments/{deployment}/images/generations", self._azure_generations
            )
            app.router.add_post("/openai/deployments/{deployment}/images/edits", self._azure_edits)
            app.router.add_post("/openai/v1/images/generations", self._azure_v1_generations)
            app.router.add_post("/openai/v1/images/edits", self._azure_v1_edits)
            app.router.add_get("/openai/v1/models", self._azure_v1_models)
        else:
            app.router.add_post("/v1/images/generations", self._openai_generations)
            app.router.add_post("/v1/images/edits", self._openai_edits)
            app.router.add_post("/v1/images/variations", self._openai_variations)
            app.router.add_get("/v1/models", self._openai_models)
        app.router.add_get("/files/{name}", self._file)
        # Last, so it catches only what nothing above matched.
        app.router.add_route("*", "/{tail:.*}", self._no_route)

    async def _no_route(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.azure:
            return _azure_error(404, "404", "Resource not found")
        return _error_response(404, f"Invalid URL ({request.method} {request.path})")

    async def _openai_generations(self, request: web.Request) -> web.StreamResponse:
        seen = await self.record(request)
        if self.api_key is not None and seen.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            # OpenAI's real answer names the key in masked form; never the whole key.
            return _error_response(
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return await self._answer(seen.body, model=None, request=request)

    async def _openai_models(self, request: web.Request) -> web.Response:
        seen = await self.record(request)
        if (denied := self._unauthorized(seen)) is not None:
            return denied
        data: list[dict[str, Any]] = []
        for model in self.listed_models:
            item: dict[str, Any] = {
                "id": model,
                "object": "model",
                "created": 1_700_000_000,
                "owned_by": "system",
            }
            if model in self.shutdown_dates:
                item["shutdown_date"] = self.shutdown_dates[model]
            data.append(item)
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    def _unauthorized(self, seen: RecordedRequest) -> web.Response | None:
        if self.api_key is None or seen.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return _error_response(
            401,
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )

    async def _record_form(self, request: web.Request) -> tuple[RecordedRequest, Form | None]:
        """Records the request with its parsed multipart form as the body."""
        seen = await self.record(request)
        form = parse_form(request.headers.get("Content-Type", ""), seen.body)
        if form is not None:
            seen = dataclasses.replace(seen, body=form)
            self.requests[-1] = seen
        return seen, form

    async def _openai_edits(self, request: web.Request) -> web.StreamResponse:
        seen, form = await self._record_form(request)
        if (denied := self._unauthorized(seen)) is not None:
            return denied
        if form is None:
            return _error_response(400, "The request must be multipart/form-data.")
        body, rejection = _edit_body(form)
        if rejection is not None:
            return rejection
        return await self._answer(body, model=None, request=request, prefix="image_edit")

    async def _openai_variations(self, request: web.Request) -> web.StreamResponse:
        seen, form = await self._record_form(request)
        if (denied := self._unauthorized(seen)) is not None:
            return denied
        if form is None:
            return _error_response(400, "The request must be multipart/form-data.")
        body, rejection = _variation_body(form)
        if rejection is not None:
            return rejection
        return await self._answer(body, model=None, request=request)

    async def _azure_generations(self, request: web.Request) -> web.StreamResponse:
        seen = await self.record(request)
        model, rejection = self._azure_deployment(seen, request)
        if rejection is not None:
            return rejection
        return await self._answer(seen.body, model=model, request=request)

    async def _azure_edits(self, request: web.Request) -> web.StreamResponse:
        """Azure's edits: the same multipart form as OpenAI's, the model from the deployment
        (a ``model`` field, if sent, is ignored as Azure does); dall-e-3 deployments have no
        edits."""
        seen, form = await self._record_form(request)
        model, rejection = self._azure_deployment(seen, request)
        if rejection is not None:
            return rejection
        if form is None:
            return _error_response(400, "The request must be multipart/form-data.")
        body, rejection = _edit_body(_without_model(form), model=model)
        if rejection is not None:
            return rejection
        body.pop("model", None)
        return await self._answer(body, model=model, request=request, prefix="image_edit")

    def _azure_deployment(
        self, seen: RecordedRequest, request: web.Request
    ) -> tuple[str, web.Response | None]:
        """The deployment's model, or Azure's answer to a wrong version, key or deployment."""
        version = seen.query.get("api-version")
        if not version:
            return "", _azure_error(404, "404", "Resource not found")
        if (denied := self._azure_unauthorized(seen, v1=False)) is not None:
            return "", denied
        if version not in self.azure_api_versions:
            return "", _azure_error(400, "BadRequest", "API version not supported")
        assert self.azure_deployments is not None
        model = self.azure_deployments.get(request.match_info["deployment"])
        if model is None:
            return "", _azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again.",
            )
        return model, None

    def _azure_unauthorized(self, seen: RecordedRequest, *, v1: bool) -> web.Response | None:
        """Azure's 401, unless the request carries the key (``api-key``; on v1 also as a
        Bearer token) or one of the Entra ID tokens as ``Authorization: Bearer``."""
        if self.api_key is None and not self.azure_tokens:
            return None
        if self.api_key is not None and seen.headers.get("api-key") == self.api_key:
            return None
        accepted = set(self.azure_tokens)
        if v1 and self.api_key is not None:
            accepted.add(self.api_key)
        scheme, _, token = seen.headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer" and token in accepted:
            return None
        return _azure_error(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
            "to provide a valid key for an active subscription and use a correct regional "
            "API endpoint for your resource.",
        )

    def _azure_v1_refusal(self, seen: RecordedRequest) -> web.Response | None:
        """The v1 API's answer to a wrong credential or a dated api-version, else None."""
        if (denied := self._azure_unauthorized(seen, v1=True)) is not None:
            return denied
        version = seen.query.get("api-version")
        if version is not None and version not in _AZURE_V1_VERSIONS:
            return _azure_error(400, "BadRequest", "API version not supported")
        return None

    def _azure_v1_model(self, model: Any) -> tuple[str, web.Response | None]:
        """The model of the deployment the v1 body names, or the v1 API's 404 for it."""
        if not isinstance(model, str) or not model:
            return "", _error_response(400, "Missing required parameter: 'model'.", param="model")
        assert self.azure_deployments is not None
        deployed = self.azure_deployments.get(model)
        if deployed is None:
            return "", _error_response(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return deployed, None

    async def _azure_v1_generations(self, request: web.Request) -> web.StreamResponse:
        seen = await self.record(request)
        if (refusal := self._azure_v1_refusal(seen)) is not None:
            return refusal
        if not isinstance(seen.body, dict):
            return await self._answer(seen.body, model=None, request=request)
        model, rejection = self._azure_v1_model(seen.body.get("model"))
        if rejection is not None:
            return rejection
        return await self._answer(seen.body, model=model, request=request)

    async def _azure_v1_edits(self, request: web.Request) -> web.StreamResponse:
        seen, form = await self._record_form(request)
        if (refusal := self._azure_v1_refusal(seen)) is not None:
            return refusal
        if form is None:
            return _error_response(400, "The request must be multipart/form-data.")
        model, rejection = self._azure_v1_model(form.fields.get("model"))
        if rejection is not None:
            return rejection
        body, rejection = _edit_body(_without_model(form), model=model)
        if rejection is not None:
            return rejection
        body.pop("model", None)
        return await self._answer(body, model=model, request=request, prefix="image_edit")

    async def _azure_v1_models(self, request: web.Request) -> web.Response:
        """The resource's models, as Azure lists them: ``lifecycle_status`` and the time
        after which ``deprecation.inference`` ends (past for retired models)."""
        seen = await self.record(request)
        if (refusal := self._azure_v1_refusal(seen)) is not None:
            return refusal
        assert self.azure_deployments is not None
        now = int(time.time())
        data = [
            {
                "id": model,
                "object": "model",
                "created_at": 1_700_000_000,
                "status": "succeeded",
                "lifecycle_status": "generally-available",
                "capabilities": {"inference": True, "fine_tune": False},
                "deprecation": {
                    "inference": now - 86_400 if model in self.retired_models else now + 86_400
                },
            }
            for model in sorted(set(self.azure_deployments.values()))
        ]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def _answer(
        self,
        body: Any,
        *,
        model: str | None,
        request: web.Request,
        prefix: str = "image_generation",
    ) -> web.StreamResponse:
        if not isinstance(body, dict):
            return _error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
            )
        model = model or body.get("model")
        if model in self.retired_models:
            # OpenAI answers a retired model before looking at anything else.
            return _error_response(
                404,
                f"The model `{model}` has been deprecated, learn more here: "
                "https://platform.openai.com/docs/deprecations",
                code="model_not_found",
            )
        # Validation comes first, as upstream: a body the model cannot take never reaches
        # generation, so it does not use up a scripted behaviour either.
        rejection = self._request_error(_family(model), body)
        if rejection is not None:
            return rejection
        behaviour = self.next_behaviour()
        await self.pause(behaviour.delay)

        if behaviour.kind == "error":
            return web.json_response(
                {"error": dict(behaviour.error or {})},
                status=behaviour.status,
                headers=dict(behaviour.headers),
                dumps=_dumps,
            )
        if behaviour.kind == "raw":
            return web.Response(
                status=behaviour.status,
                body=behaviour.body,
                headers={"Content-Type": behaviour.content_type, **behaviour.headers},
            )
        if body.get("stream") is True:
            return await self._stream_answer(request, body, behaviour, prefix)
        return self._images_answer(body, behaviour, family=_family(model))

    async def _stream_answer(
        self, request: web.Request, body: dict[str, Any], behaviour: Behaviour, prefix: str
    ) -> web.StreamResponse:
        """gpt-image's server-sent events: per image its partials, then its completed event."""
        n: int = body.get("n", 1)
        size = body.get("size", "1024x1024")
        parsed = _parse_size(size)
        assert parsed is not None, "validated by _request_error"
        output_format = body.get("output_format", "png")
        quality = body.get("quality", "auto")
        partials: int = body.get("partial_images", 0)
        settings = {
            "size": size,
            "quality": quality,
            "background": body.get("background", "auto"),
            "output_format": output_format,
        }
        b64 = base64.b64encode(_image(*parsed, output_format)).decode("ascii")
        usage = _gpt_image_usage(
            body.get("prompt"), quality, parsed, 1, body.get("_input_sizes", ())
        )
        events: list[dict[str, Any]] = []
        for _ in range(n):
            for k in range(partials):
                events.append(
                    {
                        "type": f"{prefix}.partial_image",
                        "b64_json": b64,
                        "created_at": int(time.time()),
                        "partial_image_index": k,
                        **settings,
                    }
                )
            events.append(
                {
                    "type": f"{prefix}.completed",
                    "b64_json": b64,
                    "created_at": int(time.time()),
                    "usage": usage,
                    **settings,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        breaks = behaviour.kind in ("stream_cut", "stream_error")
        for i, event in enumerate(events):
            if breaks and i >= behaviour.after_events:
                break
            await response.write(_sse(event))
        if behaviour.kind == "stream_error":
            error = {
                "type": "server_error",
                "code": "server_error",
                "message": "The server had an error while processing your request.",
                "param": None,
            }
            await response.write(_sse({"type": "error", "error": error}))
        elif behaviour.kind == "stream_cut":
            # The connection drops mid-answer: no terminating chunk ever comes.
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    def _request_error(self, family: str | None, body: dict[str, Any]) -> web.Response | None:
        """The real 400 for a body this model does not take, else None."""
        size, quality = body.get("size", "1024x1024"), body.get("quality")
        for name in ("safety_identifier", "user"):
            if body.get(name) is not None and not isinstance(body[name], str):
                return _error_response(
                    400, f"Invalid type for '{name}'.", code="invalid_type", param=name
                )
        if _is_gpt(family):
            for name in ("response_format", "style"):
                if name in body:
                    return _unknown_parameter(name)
            qualities = (
                _GPT_IMAGE_2_5_QUALITIES if family == "gpt-image-2.5" else _GPT_IMAGE_QUALITIES
            )
            if quality is not None and quality not in qualities:
                return _not_supported(quality, "quality", qualities)
            if family == "gpt-image":
                if size not in (*_GPT_IMAGE_SIZES, "auto"):
                    return _not_supported(size, "size", (*_GPT_IMAGE_SIZES, "auto"))
            elif size != "auto":
                parsed = _parse_size(size)
                problem = (
                    "Expected WIDTHxHEIGHT." if parsed is None else _free_size_problem(*parsed)
                )
                if problem is not None:
                    return _error_response(
                        400,
                        f"Invalid value: {size!r}. {problem}",
                        code="invalid_value",
                        param="size",
                    )
            formats = ("png", "jpeg") if self.azure else ("png", "jpeg", "webp")
            output_format = body.get("output_format", "png")
            if output_format not in formats:
                return _not_supported(output_format, "output_format", formats)
            background = body.get("background", "auto")
            if background not in ("transparent", "opaque", "auto"):
                return _not_supported(background, "background", ("transparent", "opaque", "auto"))
            if background == "transparent" and output_format == "jpeg":
                return _error_response(
                    400,
                    "Transparent background is not supported for jpeg output format.",
                    code="invalid_value",
                    param="background",
                )
            compression = body.get("output_compression")
            if compression is not None and not (
                isinstance(compression, int) and 0 <= compression <= 100
            ):
                return _error_response(
                    400,
                    "Invalid output_compression.",
                    code="invalid_value",
                    param="output_compression",
                )
            moderation = body.get("moderation", "auto")
            if moderation not in ("low", "auto"):
                return _not_supported(moderation, "moderation", ("low", "auto"))
            partials = body.get("partial_images", 0)
            if not (isinstance(partials, int) and 0 <= partials <= 3):
                return _error_response(
                    400, "Invalid partial_images.", code="invalid_value", param="partial_images"
                )
        else:
            for name in (
                "stream",
                "partial_images",
                "background",
                "output_compression",
                "moderation",
                "output_format",
            ):
                if name in body:
                    return _unknown_parameter(name)
        if family == "dall-e-3":
            if body.get("n", 1) != 1:
                return _error_response(400, "You must provide n=1 for this model.")
            if size not in _DALL_E_3_SIZES:
                return _error_response(
                    400, "The size is not supported by this model.", code="invalid_size"
                )
            if quality is not None and quality not in ("standard", "hd"):
                return _not_supported(quality, "quality", ("standard", "hd"))
            style = body.get("style")
            if style is not None and style not in ("vivid", "natural"):
                return _not_supported(style, "style", ("vivid", "natural"))
        elif family == "dall-e-2":
            for name in ("quality", "style"):
                if name in body:
                    return _unknown_parameter(name)
            if size not in _DALL_E_2_SIZES:
                return _error_response(
                    400, "The size is not supported by this model.", code="invalid_size"
                )
        response_format = body.get("response_format")
        if response_format is not None and response_format not in ("url", "b64_json"):
            return _not_supported(response_format, "response_format", ("url", "b64_json"))
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            return _error_response(
                400,
                f"Invalid value: {n!r}. n must be between 1 and 10.",
                code="invalid_value",
                param="n",
            )
        if _parse_size(size) is None:
            return _error_response(
                400,
                f"Invalid value: {size!r}. Expected WIDTHxHEIGHT.",
                code="invalid_value",
                param="size",
            )
        return None

    def _images_answer(
        self, body: dict[str, Any], behaviour: Behaviour, *, family: str | None
    ) -> web.Response:
        n: int = body.get("n", 1)
        size = body.get("size", "1024x1024")
        parsed = _parse_size(size)
        assert parsed is not None, "validated by _request_error"
        output_format = body.get("output_format", "png") if _is_gpt(family) else "png"
        data = _image(*parsed, output_format)
        prompt = body.get("prompt")
        revised = f"revised: {prompt}" if isinstance(prompt, str) else ""
        # dall-e answers links unless asked for base64; gpt-image only ever answers base64.
        as_url = behaviour.kind == "url" or (
            family in ("dall-e-2", "dall-e-3") and body.get("response_format", "url") == "url"
        )

        items: list[dict[str, Any]] = []
        for index in range(n):
            item: dict[str, Any] = {}
            if index < behaviour.filtered:
                item["content_filter_results"] = _verdicts(filtered_category="sexual")
            elif as_url:
                name = f"{uuid.uuid4().hex}.{output_format}"
                self._files[name] = (data, _FORMATS[output_format][1])
                item["url"] = f"{self.origin}/files/{name}"
            else:
                item["b64_json"] = base64.b64encode(data).decode("ascii")
            if not _is_gpt(family):
                item["revised_prompt"] = revised
                if self.azure and "content_filter_results" not in item:
                    item["content_filter_results"] = _verdicts()
            if self.azure and not _is_gpt(family):
                item["prompt_filter_results"] = _verdicts()
            items.append(item)
        answer: dict[str, Any] = {"created": int(time.time()), "data": items}
        if _is_gpt(family):
            quality = body.get("quality", "high" if self.azure else "auto")
            answer.update(
                background="opaque", output_format=output_format, quality=quality, size=size
            )
            answer["usage"] = _gpt_image_usage(
                prompt, quality, parsed, n, body.get("_input_sizes", ())
            )
            # types/images_response.py: the non-empty safety_identifier, else `user`.
            identifier = body.get("safety_identifier") or body.get("user")
            if identifier:
                answer["safety_identifier"] = identifier
        if behaviour.usage is not None:
            answer["usage"] = dict(behaviour.usage)

        payload = orjson.dumps(answer)
        if behaviour.kind == "truncated":
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, content_type="application/json")

    async def _file(self, request: web.Request) -> web.Response:
        self.file_requests.append(
            RecordedRequest(
                request.method,
                request.path,
                CIMultiDict(request.headers),
                dict(request.query),
                None,
            )
        )
        stored = self._files.get(request.match_info["name"])
        if stored is None:
            return _error_response(404, "No such file.", code="not_found")
        return web.Response(body=stored[0], content_type=stored[1])


def _verdicts(filtered_category: str = "") -> dict[str, Any]:
    return {
        name: {
            "filtered": name == filtered_category,
            "severity": "high" if name == filtered_category else "safe",
        }
        for name in _FILTER_CATEGORIES
    }


def _gpt_image_usage(
    prompt: Any,
    quality: Any,
    size: tuple[int, int],
    n: int,
    input_sizes: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    text_tokens = len(prompt.split()) if isinstance(prompt, str) else 0
    # An edit's input images, as vision input is counted: 85 plus 170 per 512x512 tile.
    image_tokens = sum(85 + 170 * -(-w // 512) * -(-h // 512) for w, h in input_sizes)
    per_image = _GPT_IMAGE_TOKENS.get(quality, _GPT_IMAGE_TOKENS["high"])
    per_image = per_image * size[0] * size[1] // (1024 * 1024)
    output_tokens = per_image * n
    input_tokens = text_tokens + image_tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def _parse_size(size: Any) -> tuple[int, int] | None:
    if size == "auto":
        return 1024, 1024
    if not isinstance(size, str):
        return None
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        return None
    w, h = int(width), int(height)
    if not (1 <= w <= _MAX_SIDE and 1 <= h <= _MAX_SIDE):
        return None
    return w, h


# -- edits, variations, streams ---------------------------------------------------------

_FOUR_MB = 4 * 1024 * 1024
_FIFTY_MB = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FilePart:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Form:
    """A recorded multipart body: text fields and files, each by name in arrival order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[FilePart]] = field(default_factory=dict)


def parse_form(content_type: str, raw: Any) -> Form | None:
    """A multipart/form-data body as a ``Form``; None when it is not one."""
    if not content_type.startswith("multipart/form-data") or not isinstance(raw, bytes):
        return None
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    if not message.is_multipart():
        return None
    form = Form()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is None:
            form.fields[name] = data.decode("utf-8")
        else:
            form.files.setdefault(name, []).append(
                FilePart(filename, part.get_content_type(), data)
            )
    return form


def _without_model(form: Form) -> Form:
    """The form to check against a deployment's model (the recorded one stays as sent)."""
    return Form({k: v for k, v in form.fields.items() if k != "model"}, form.files)


def _image_info(data: bytes) -> tuple[str, int, int, str] | None:
    """(format, width, height, mode) of an uploaded image, or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format or "", image.width, image.height, image.mode
    except Exception:
        return None


def _invalid_image(message: str, param: str = "image") -> web.Response:
    return _error_response(400, message, code="invalid_image", param=param)


def _edit_body(form: Form, model: str | None = None) -> tuple[dict[str, Any], web.Response | None]:
    """An edit form as the JSON body the shared checks and answers read, or the real 400.
    ``model``: the model an Azure deployment runs (else the form's, default dall-e-2)."""
    fields = form.fields
    model = model or fields.get("model", "dall-e-2")
    family = _family(model)
    images = form.files.get("image", []) + form.files.get("image[]", [])
    if family == "dall-e-3" or family is None:
        return {}, _error_response(400, f"Image edits are not supported by {model}.", param="model")
    if not fields.get("prompt"):
        return {}, _error_response(400, "Missing required parameter: 'prompt'.", param="prompt")
    if not images:
        return {}, _error_response(400, "Missing required parameter: 'image'.", param="image")
    limit = 1 if family == "dall-e-2" else 16
    if len(images) > limit:
        return {}, _invalid_image(f"At most {limit} images are accepted.")
    first: tuple[str, int, int, str] | None = None
    for part in images:
        info = _image_info(part.data)
        if family == "dall-e-2":
            if info is None or info[0] != "PNG" or len(part.data) >= _FOUR_MB:
                return {}, _invalid_image("Invalid input image - must be a PNG less than 4 MB.")
            if info[1] != info[2]:
                return {}, _invalid_image("Invalid input image - image must be square.")
        elif info is None or info[0] not in ("PNG", "JPEG", "WEBP") or len(part.data) >= _FIFTY_MB:
            return {}, _invalid_image("Invalid input image - must be png, jpeg or webp < 50 MB.")
        first = first or info
    masks = form.files.get("mask", [])
    if masks:
        info = _image_info(masks[0].data)
        if info is None or info[0] != "PNG" or "A" not in info[3]:
            return {}, _invalid_image("Invalid mask - must be a PNG with an alpha channel.", "mask")
        assert first is not None
        if info[1:3] != first[1:3]:
            return {}, _invalid_image("Invalid mask - must be the size of the image.", "mask")
    body: dict[str, Any] = {"model": model, "prompt": fields["prompt"]}
    # Not a wire field: the input images' sizes, which GPT image models bill as image tokens.
    body["_input_sizes"] = [info[1:3] for part in images if (info := _image_info(part.data))]
    for name, value in fields.items():
        if name in ("model", "prompt"):
            continue
        if name in ("n", "output_compression", "partial_images"):
            try:
                body[name] = int(value)
            except ValueError:
                return {}, _error_response(
                    400, f"Invalid {name}.", code="invalid_value", param=name
                )
        elif name == "stream":
            body[name] = value == "true"
        else:
            body[name] = value
    return body, None


def _variation_body(form: Form) -> tuple[dict[str, Any], web.Response | None]:
    fields = form.fields
    model = fields.get("model", "dall-e-2")
    if _family(model) != "dall-e-2":
        return {}, _error_response(400, f"Variations are not supported by {model}.", param="model")
    images = form.files.get("image", [])
    if len(images) != 1:
        return {}, _error_response(400, "Missing required parameter: 'image'.", param="image")
    info = _image_info(images[0].data)
    if info is None or info[0] != "PNG" or len(images[0].data) >= _FOUR_MB or info[1] != info[2]:
        return {}, _invalid_image("Invalid input image - must be a square PNG less than 4 MB.")
    for name in ("prompt", "mask", "quality", "style"):
        if name in fields:
            return {}, _unknown_parameter(name)
    body: dict[str, Any] = {"model": model}
    for name, value in fields.items():
        if name == "n":
            try:
                body["n"] = int(value)
            except ValueError:
                return {}, _error_response(400, "Invalid n.", code="invalid_value", param="n")
        elif name != "model":
            body[name] = value
    return body, None


def _sse(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"
