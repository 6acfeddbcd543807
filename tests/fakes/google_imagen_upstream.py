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

Model ids that are not Imagen's, and those in ``retired`` (Google shut every Imagen model down
in August 2026; only projects with private access still reach one), answer 404 NOT_FOUND with
Google's wording for a model that does not exist.

Edits (Vertex only, as on Google): the instance may also carry ``referenceImages``, which only an
editing model (``imagen-3.0-capability-*``) takes: exactly one ``REFERENCE_TYPE_RAW`` and at
most one ``REFERENCE_TYPE_MASK`` (the mask with ``maskImageConfig``: a known ``maskMode``, an
image for ``MASK_MODE_USER_PROVIDED`` of the raw image's size, ``dilation`` in 0..1), each with
a unique integer ``referenceId`` and ``referenceImage.bytesBase64Encoded`` holding a PNG or
JPEG; ``parameters.editMode`` one of Imagen's edit modes, the inpainting and outpainting ones
needing the mask. An edit answers images of the raw image's size. The Gemini API refuses both
fields as unknown names.

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
import binascii
import functools
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from PIL import Image

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
    {
        "seed",
        "addWatermark",
        "negativePrompt",
        "enhancePrompt",
        "storageUri",
        "editMode",
        "baseSteps",
    }
)
EDIT_MODES = frozenset(
    {
        "EDIT_MODE_DEFAULT",
        "EDIT_MODE_INPAINT_INSERTION",
        "EDIT_MODE_INPAINT_REMOVAL",
        "EDIT_MODE_OUTPAINT",
        "EDIT_MODE_BGSWAP",
        "EDIT_MODE_CONTROLLED_EDITING",
        "EDIT_MODE_STYLE",
        "EDIT_MODE_PRODUCT_IMAGE",
    }
)
_MASKED_EDIT_MODES = frozenset(
    {"EDIT_MODE_INPAINT_INSERTION", "EDIT_MODE_INPAINT_REMOVAL", "EDIT_MODE_OUTPAINT"}
)
MASK_MODES = frozenset(
    {
        "MASK_MODE_USER_PROVIDED",
        "MASK_MODE_BACKGROUND",
        "MASK_MODE_FOREGROUND",
        "MASK_MODE_SEMANTIC",
    }
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
        retired: Sequence[str] = (),
        default: Behaviour | None = None,
    ) -> None:
        super().__init__(default or ok())
        self.vertex = vertex
        # Model ids answered with Google's 404 NOT_FOUND, as for every Imagen model since
        # Google shut them down (August 2026) unless a project keeps private access.
        self.retired = set(retired)
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
            parameters, edit_size = self._validate(recorded, model)
            behaviour = self.next_behaviour()
            await self.pause(behaviour.delay)
            return self._answer(behaviour, parameters, edit_size)
        except _Rejected as rejected:
            return rejected.response
        finally:
            self.in_flight -= 1

    def _model(self, request: web.Request) -> str:
        model, _, method = request.match_info["model"].rpartition(":")
        if method != "predict" or not model:
            raise _Rejected(_error_response(404, "NOT_FOUND", "Method not found."))
        if not model.startswith(("imagen-", "imagegeneration")) or model in self.retired:
            if self.vertex:
                message = (
                    f"Publisher Model `projects/{self.project}/locations/{self.location}/"
                    f"publishers/google/models/{model}` was not found or your project does not "
                    "have access to it. Please ensure you are using a valid model version."
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

    def _validate(
        self, recorded: RecordedRequest, model: str
    ) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """The parameters, and for an edit the raw image's size."""
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
        if isinstance(instance, dict) and self.vertex and "referenceImages" in instance:
            edit_fields = {"prompt", "referenceImages"}
            if set(instance) != edit_fields:
                raise _bad_request("An edit instance has exactly prompt and referenceImages.")
        elif not isinstance(instance, dict) or set(instance) != {"prompt"}:
            raise _bad_request("An instance must have exactly one field: prompt.")
        if not isinstance(instance["prompt"], str) or not instance["prompt"].strip():
            raise _bad_request("The prompt is empty.")
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _bad_request("parameters must be an object.")
        self._validate_parameters(parameters)
        edit_size = None
        if "referenceImages" in instance:
            edit_size = self._validate_edit(model, instance["referenceImages"], parameters)
        elif "editMode" in parameters:
            raise _bad_request("editMode needs referenceImages.")
        return parameters, edit_size

    def _validate_edit(
        self, model: str, references: Any, parameters: dict[str, Any]
    ) -> tuple[int, int]:
        if "capability" not in model:
            raise _bad_request(f"Model {model} does not support image editing.")
        if not isinstance(references, list) or not references:
            raise _bad_request("referenceImages must be a non-empty list.")
        ids: set[int] = set()
        raws: list[Image.Image] = []
        masks: list[Image.Image] = []
        for reference in references:
            if not isinstance(reference, dict):
                raise _bad_request("A reference image must be an object.")
            kind = reference.get("referenceType")
            allowed = {"referenceType", "referenceId", "referenceImage"}
            if kind == "REFERENCE_TYPE_MASK":
                allowed.add("maskImageConfig")
            elif kind != "REFERENCE_TYPE_RAW":
                raise _bad_request(f"Unsupported referenceType: {kind!r}.")
            for name in reference:
                if name not in allowed:
                    raise _bad_request(
                        f'Invalid JSON payload received. Unknown name "{name}" at '
                        "'instances[0].reference_images[0]': Cannot find field."
                    )
            ref_id = reference.get("referenceId")
            if isinstance(ref_id, bool) or not isinstance(ref_id, int) or ref_id in ids:
                raise _bad_request("Each reference image needs a unique integer referenceId.")
            ids.add(ref_id)
            if kind == "REFERENCE_TYPE_MASK":
                config = reference.get("maskImageConfig")
                if not isinstance(config, dict) or not set(config) <= {
                    "maskMode",
                    "dilation",
                    "maskClasses",
                }:
                    raise _bad_request("maskImageConfig is missing or has unknown fields.")
                if config.get("maskMode") not in MASK_MODES:
                    raise _bad_request(f"Unsupported maskMode: {config.get('maskMode')!r}.")
                dilation = config.get("dilation", 0.0)
                if (
                    isinstance(dilation, bool)
                    or not isinstance(dilation, int | float)
                    or not (0 <= dilation <= 1)
                ):
                    raise _bad_request(f"dilation must be between 0 and 1, got {dilation!r}.")
                if config["maskMode"] != "MASK_MODE_USER_PROVIDED":
                    if "referenceImage" in reference:
                        raise _bad_request("Only MASK_MODE_USER_PROVIDED takes a mask image.")
                    continue
            masks_or_raws = masks if kind == "REFERENCE_TYPE_MASK" else raws
            masks_or_raws.append(self._reference_image(reference.get("referenceImage")))
        if len(raws) != 1:
            raise _bad_request("Exactly one REFERENCE_TYPE_RAW image is required.")
        mode = parameters.get("editMode", "EDIT_MODE_DEFAULT")
        if mode not in EDIT_MODES:
            raise _bad_request(f"Unsupported editMode: {mode!r}.")
        mask_refs = [r for r in references if r.get("referenceType") == "REFERENCE_TYPE_MASK"]
        if len(mask_refs) > 1 or (mode in _MASKED_EDIT_MODES and not mask_refs):
            raise _bad_request(f"{mode} needs exactly one REFERENCE_TYPE_MASK image.")
        size = raws[0].size
        if masks and masks[0].size != size:
            raise _bad_request("The mask must be the size of the image.")
        return size

    @staticmethod
    def _reference_image(raw: Any) -> Image.Image:
        if not isinstance(raw, dict) or not set(raw) <= {"bytesBase64Encoded", "mimeType"}:
            raise _bad_request("referenceImage must be an object with bytesBase64Encoded.")
        encoded = raw.get("bytesBase64Encoded")
        if not isinstance(encoded, str) or not encoded:
            raise _bad_request("referenceImage.bytesBase64Encoded is required.")
        try:
            data = base64.b64decode(encoded, validate=True)
            image = Image.open(io.BytesIO(data))
            image.load()
        except (binascii.Error, ValueError, OSError):
            raise _bad_request("Unable to decode the reference image.") from None
        if image.format not in ("PNG", "JPEG"):
            raise _bad_request(f"Unsupported image format: {image.format}.")
        return image

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

    def _answer(
        self,
        behaviour: Behaviour,
        parameters: dict[str, Any],
        edit_size: tuple[int, int] | None = None,
    ) -> web.Response:
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
        width, height = edit_size or PIXEL_SIZES[parameters.get("aspectRatio", "1:1")]
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
