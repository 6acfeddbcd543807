"""A loopback fake of Google Imagen's ``:predict`` method, as the Gemini API or as Vertex AI.

Typical use::

    async with FakeGoogleImagen.gemini(api_key="AIza-test") as fake:
        provider = from_config(ProviderConfig("imagen", "google-imagen",
                                              base_url=fake.base_url), "AIza-test")
        fake.script(rate_limited(retry_delay="3s"), ok(filtered=1))
        ...

Routes (the real paths; ``base_url`` ends in ``/v1beta`` or ``/v1``):

* Gemini API: ``POST /v1beta/models/{model}:predict``. Auth as Google does it: the key in
  ``x-goog-api-key`` (or ``?key=``); none → 403 PERMISSION_DENIED, a wrong one → 400
  INVALID_ARGUMENT with ErrorInfo reason API_KEY_INVALID (and a DebugInfo that quotes the
  wrong key, as the real one does).
* Vertex AI: ``POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:predict``
  with ``Authorization: Bearer <token>``; none or wrong → 401 UNAUTHENTICATED; another project
  or location → 403 IAM_PERMISSION_DENIED. ``fake.token`` may be changed to model a rotation.

The body is checked the way the upstream would reject it: exactly ``instances`` and
``parameters``; one instance with a non-empty ``prompt``; only known parameter names (the
Gemini API also refuses Vertex-only ones such as ``seed`` and ``addWatermark``); sampleCount
1..4, one of the five aspect ratios, a known personGeneration, ``outputOptions.mimeType``
image/png or image/jpeg, a seed only with ``addWatermark: false``. Such failures answer 400
without using up a scripted behaviour; so do auth failures.

Behaviours (factory functions below): ``ok(filtered=k)`` answers sampleCount images of
Imagen's real pixel size for the aspect ratio, the last ``k`` withheld (replaced by
``raiFilteredReason`` entries when the request asked for reasons, else just missing);
``all_filtered()``; ``prompt_blocked()`` and ``response_blocked()`` (400 refusals);
``rate_limited()``; ``server_error()``; ``unavailable()``; ``slow(s)``; ``garbage()``;
``truncated()``; ``wrong_content_type()``; ``invalid_argument(msg)``; ``google_error(...)``;
``raw(...)``. ``fake.max_in_flight`` says how many requests were ever served at once.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from tests.fakes.loopback import LoopbackServer, RecordedRequest, image_bytes

__all__ = [
    "PIXEL_SIZES",
    "Behaviour",
    "FakeGoogleImagen",
    "all_filtered",
    "garbage",
    "google_error",
    "invalid_argument",
    "ok",
    "prompt_blocked",
    "rate_limited",
    "raw",
    "response_blocked",
    "server_error",
    "slow",
    "truncated",
    "unavailable",
    "wrong_content_type",
]

# Imagen 3's documented output sizes per aspect ratio.
PIXEL_SIZES: Mapping[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
_PERSON_GENERATION = frozenset({"dont_allow", "allow_adult", "allow_all"})
_COMMON_PARAMETERS = frozenset(
    {
        "sampleCount",
        "aspectRatio",
        "personGeneration",
        "includeRaiReason",
        "includeSafetyAttributes",
        "outputOptions",
        "safetySetting",
        "guidanceScale",
        "language",
        "sampleImageSize",
    }
)
_VERTEX_ONLY_PARAMETERS = frozenset(
    {"seed", "addWatermark", "negativePrompt", "enhancePrompt", "storageUri"}
)
_FILTERED_REASON = (
    "Your current safety filter threshold filtered out one or more generated images. "
    "If you think this was an error, send feedback. Support codes: 29578790"
)

Kind = Literal["ok", "error", "raw", "truncated"]


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the fake answers one accepted request.

    ``ok``: 200 with images; ``filtered`` of them withheld (None: all of them).
    ``error``: ``status`` with Google's ``{"error": error}`` body. ``raw``: ``status``,
    ``body`` and ``content_type`` as given. ``truncated``: an ``ok`` body cut in half.
    ``delay``: seconds to wait first (cut short when the server stops).
    """

    kind: Kind = "ok"
    delay: float = 0.0
    filtered: int | None = 0
    status: int = 200
    error: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"


def ok(*, filtered: int = 0, delay: float = 0.0) -> Behaviour:
    return Behaviour(kind="ok", filtered=filtered, delay=delay)


def all_filtered() -> Behaviour:
    """200 in which every image was withheld by the output filter."""
    return Behaviour(kind="ok", filtered=None)


def slow(seconds: float) -> Behaviour:
    return Behaviour(kind="ok", delay=seconds)


def truncated() -> Behaviour:
    return Behaviour(kind="truncated")


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
    return raw(200, b'{"predictions": [{"bytesBase64Encoded": ')


def wrong_content_type() -> Behaviour:
    return raw(
        200,
        b"<!DOCTYPE html><html><body><p>502. That's an error.</p></body></html>",
        content_type="text/html",
    )


def google_error(
    status: int,
    grpc_status: str,
    message: str,
    *,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> Behaviour:
    """``status`` with ``{"error": {"code", "message", "status", "details"?}}``."""
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details:
        error["details"] = [dict(d) for d in details]
    return Behaviour(kind="error", status=status, error=error, headers=headers or {})


def invalid_argument(message: str) -> Behaviour:
    return google_error(400, "INVALID_ARGUMENT", message)


def prompt_blocked() -> Behaviour:
    """Imagen's refusal of the prompt itself."""
    return invalid_argument(
        "Image generation failed with the following error: The prompt could not be submitted. "
        "This prompt contains sensitive words that violate Google's Responsible AI practices. "
        "Try rephrasing the prompt. If you think this was an error, send feedback. "
        "Support codes: 42876398"
    )


def response_blocked() -> Behaviour:
    """Imagen's refusal after generation, as an error rather than filtered predictions."""
    return invalid_argument(
        "Image generation failed with the following error: The response is blocked, as it may "
        "violate our policies. If you believe this is an error, please send feedback to your "
        "account team. Error Code: 58061214"
    )


def rate_limited(*, retry_delay: str | None = "2s", retry_after: int | None = None) -> Behaviour:
    """429 RESOURCE_EXHAUSTED; Google says when to retry in RetryInfo, rarely in a header."""
    details: list[Mapping[str, Any]] = []
    if retry_delay is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
        )
    return google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model "
        "with base model: imagen-3.0-generate. Please submit a quota increase request.",
        details=details,
        headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
    )


def server_error() -> Behaviour:
    return google_error(500, "INTERNAL", "Internal error encountered.")


def unavailable() -> Behaviour:
    return google_error(503, "UNAVAILABLE", "The service is currently unavailable.")


@functools.lru_cache(maxsize=16)
def _encoded_image(width: int, height: int, fmt: str) -> str:
    return base64.b64encode(image_bytes(width, height, fmt)).decode("ascii")


class _Rejected(Exception):
    """A request the upstream refuses before any behaviour applies."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _error_response(
    status: int,
    grpc_status: str,
    message: str,
    *,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details:
        error["details"] = [dict(d) for d in details]
    return web.Response(
        status=status,
        body=orjson.dumps({"error": error}, option=orjson.OPT_INDENT_2),
        headers={"Content-Type": "application/json; charset=UTF-8", **(headers or {})},
    )


def _bad_request(message: str) -> _Rejected:
    return _Rejected(_error_response(400, "INVALID_ARGUMENT", message))


class FakeGoogleImagen(LoopbackServer[Behaviour]):
    """Imagen ``:predict`` on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        *,
        vertex: bool,
        secret: str,
        project: str = "test-project",
        location: str = "us-central1",
        default: Behaviour | None = None,
    ) -> None:
        super().__init__(default or ok())
        self.vertex = vertex
        # The API key (Gemini API) or access token (Vertex) the fake accepts; tests may change
        # it to model a rotation.
        self.token = secret
        self.project = project
        self.location = location
        self.in_flight = 0
        self.max_in_flight = 0

    @classmethod
    def gemini(cls, api_key: str, *, default: Behaviour | None = None) -> FakeGoogleImagen:
        return cls(vertex=False, secret=api_key, default=default)

    @classmethod
    def vertex_ai(
        cls,
        token: str,
        *,
        project: str = "test-project",
        location: str = "us-central1",
        default: Behaviour | None = None,
    ) -> FakeGoogleImagen:
        return cls(vertex=True, secret=token, project=project, location=location, default=default)

    @property
    def base_url(self) -> str:
        return self.origin + ("/v1" if self.vertex else "/v1beta")

    def routes(self, app: web.Application) -> None:
        if self.vertex:
            app.router.add_post(
                "/v1/projects/{project}/locations/{location}/publishers/google/models/{model}",
                self._predict,
            )
        else:
            app.router.add_post("/v1beta/models/{model}", self._predict)

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        recorded = await self.record(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            model = self._model(request)
            self._authenticate(request, model)
            parameters = self._validate(recorded)
            behaviour = self.next_behaviour()
            await self.pause(behaviour.delay)
            return self._answer(behaviour, parameters)
        except _Rejected as rejected:
            return rejected.response
        finally:
            self.in_flight -= 1

    def _model(self, request: web.Request) -> str:
        model, _, method = request.match_info["model"].rpartition(":")
        if method != "predict" or not model:
            raise _Rejected(_error_response(404, "NOT_FOUND", "Method not found."))
        if not model.startswith(("imagen-", "imagegeneration")):
            if self.vertex:
                message = (
                    f"Publisher Model `projects/{self.project}/locations/{self.location}/"
                    f"publishers/google/models/{model}` not found."
                )
            else:
                message = (
                    f"models/{model} is not found for API version v1beta, or is not supported "
                    "for predict. Call ListModels to see the list of available models and their "
                    "supported methods."
                )
            raise _Rejected(_error_response(404, "NOT_FOUND", message))
        return model

    def _authenticate(self, request: web.Request, model: str) -> None:
        if self.vertex:
            self._authenticate_vertex(request, model)
        else:
            self._authenticate_gemini(request)

    def _authenticate_gemini(self, request: web.Request) -> None:
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
            raise _Rejected(
                _error_response(
                    400,
                    "INVALID_ARGUMENT",
                    "API key not valid. Please pass a valid API key.",
                    details=[
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"},
                        },
                        {
                            "@type": "type.googleapis.com/google.rpc.DebugInfo",
                            "detail": f"Invalid API key: {key}",
                        },
                    ],
                )
            )

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
                    "authentication credential. See "
                    "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                    details=[
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": (
                                "CREDENTIALS_MISSING"
                                if missing
                                else "ACCESS_TOKEN_TYPE_UNSUPPORTED"
                            ),
                            "domain": "googleapis.com",
                            "metadata": {
                                "service": "aiplatform.googleapis.com",
                                "method": "google.cloud.aiplatform.v1.PredictionService.Predict",
                            },
                        }
                    ],
                    headers={
                        "WWW-Authenticate": (
                            'Bearer realm="https://accounts.google.com/", error="invalid_token"'
                        )
                    },
                )
            )
        project, location = request.match_info["project"], request.match_info["location"]
        if (project, location) != (self.project, self.location):
            raise _Rejected(
                _error_response(
                    403,
                    "PERMISSION_DENIED",
                    f"Permission 'aiplatform.endpoints.predict' denied on resource "
                    f"'//aiplatform.googleapis.com/projects/{project}/locations/{location}/"
                    f"publishers/google/models/{model}' (or it may not exist).",
                    details=[
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "IAM_PERMISSION_DENIED",
                            "domain": "aiplatform.googleapis.com",
                            "metadata": {"permission": "aiplatform.endpoints.predict"},
                        }
                    ],
                )
            )

    def _validate(self, recorded: RecordedRequest) -> dict[str, Any]:
        body = recorded.body
        if recorded.headers.get("Content-Type", "").split(";")[0] != "application/json" or (
            not isinstance(body, dict)
        ):
            raise _bad_request("Invalid JSON payload received. Expected a JSON object.")
        for name in body:
            if name not in ("instances", "parameters"):
                raise _bad_request(
                    f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
                )
        instances = body.get("instances")
        if not isinstance(instances, list) or len(instances) != 1:
            raise _bad_request("Exactly one instance is required.")
        instance = instances[0]
        if not isinstance(instance, dict) or set(instance) != {"prompt"}:
            raise _bad_request("An instance must have exactly one field: prompt.")
        if not isinstance(instance["prompt"], str) or not instance["prompt"].strip():
            raise _bad_request("The prompt is empty.")
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _bad_request("parameters must be an object.")
        self._validate_parameters(parameters)
        return parameters

    def _validate_parameters(self, parameters: dict[str, Any]) -> None:
        allowed = _COMMON_PARAMETERS | (_VERTEX_ONLY_PARAMETERS if self.vertex else frozenset())
        for name in parameters:
            if name in _VERTEX_ONLY_PARAMETERS and not self.vertex:
                raise _bad_request(f"{name} parameter is not supported in Gemini API.")
            if name not in allowed:
                raise _bad_request(
                    f'Invalid JSON payload received. Unknown name "{name}" at '
                    "'parameters': Cannot find field."
                )
        count = parameters.get("sampleCount", 4 if not self.vertex else 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4:
            raise _bad_request(f"sampleCount must be between 1 and 4, got {count!r}.")
        ratio = parameters.get("aspectRatio", "1:1")
        if ratio not in PIXEL_SIZES:
            raise _bad_request(f"Unsupported aspect ratio: {ratio!r}.")
        person = parameters.get("personGeneration", "allow_adult")
        if not isinstance(person, str) or person.lower() not in _PERSON_GENERATION:
            raise _bad_request(f"Invalid personGeneration value: {person!r}.")
        for flag in ("includeRaiReason", "includeSafetyAttributes", "addWatermark"):
            if flag in parameters and not isinstance(parameters[flag], bool):
                raise _bad_request(f"{flag} must be a boolean.")
        options = parameters.get("outputOptions", {})
        if not isinstance(options, dict) or not set(options) <= {"mimeType", "compressionQuality"}:
            raise _bad_request("outputOptions may only have mimeType and compressionQuality.")
        if options.get("mimeType", "image/png") not in ("image/png", "image/jpeg"):
            raise _bad_request(f"Unsupported output mime type: {options['mimeType']!r}.")
        if "seed" in parameters:
            seed = parameters["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int) or not 1 <= seed <= 2**31 - 1:
                raise _bad_request(f"seed must be between 1 and 2147483647, got {seed!r}.")
            if parameters.get("addWatermark", True):
                raise _bad_request("Seed is not supported when addWatermark is enabled.")

    def _answer(self, behaviour: Behaviour, parameters: dict[str, Any]) -> web.Response:
        if behaviour.kind == "error":
            return web.Response(
                status=behaviour.status,
                body=orjson.dumps({"error": dict(behaviour.error or {})}),
                headers={"Content-Type": "application/json; charset=UTF-8", **behaviour.headers},
            )
        if behaviour.kind == "raw":
            return web.Response(
                status=behaviour.status,
                body=behaviour.body,
                headers={"Content-Type": behaviour.content_type, **behaviour.headers},
            )
        count: int = parameters.get("sampleCount", 4 if not self.vertex else 1)
        withheld = count if behaviour.filtered is None else min(behaviour.filtered, count)
        mime = parameters.get("outputOptions", {}).get("mimeType", "image/png")
        width, height = PIXEL_SIZES[parameters.get("aspectRatio", "1:1")]
        encoded = _encoded_image(width, height, "JPEG" if mime == "image/jpeg" else "PNG")
        predictions: list[dict[str, Any]] = [
            {"bytesBase64Encoded": encoded, "mimeType": mime} for _ in range(count - withheld)
        ]
        if parameters.get("includeRaiReason") is True:
            predictions += [{"raiFilteredReason": _FILTERED_REASON} for _ in range(withheld)]
        # With no image left and no reasons asked for, Imagen answers an empty object.
        payload = orjson.dumps({"predictions": predictions} if predictions else {})
        if behaviour.kind == "truncated":
            payload = payload[: len(payload) // 2]
        return web.Response(
            body=payload, headers={"Content-Type": "application/json; charset=UTF-8"}
        )
