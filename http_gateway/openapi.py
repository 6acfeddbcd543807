"""The gateway's REST surface as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand, after OpenAI's published shapes for the Images and Models APIs (``Image``,
``ImagesResponse``, ``ImageGenStreamEvent``, ``Model``, ``Error``) plus our own routes and
extensions. ``tests/test_openapi.py`` validates it and checks real answers of the live stack
against it; ``tests/test_schemathesis.py`` fuzzes the gateway from it.
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any

import orjson
from aiohttp import web

from http_gateway.views import CONFIG

OPENAPI_PATH = "/openapi.json"

Schema = dict[str, Any]


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Schema:
    return _ref("schemas", name)


def _nullable(schema: Schema) -> Schema:
    """``schema`` or JSON ``null`` (which the gateway treats as absent)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _version() -> str:
    try:
        return metadata.version("imagegen")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree not installed
        return "0.0.0"


# -- request fields shared by generations, edits and variations ------------------------------

_MODEL = {
    "type": "string",
    "minLength": 1,
    "description": "A model id from `GET /v1/models`.",
    "examples": ["local-sketch"],
}
_N = {
    "type": "integer",
    "minimum": 1,
    "maximum": 10,
    "default": 1,
    "description": "How many images to make: 1 … the model's `max_images`.",
}
_SIZE = {
    "type": "string",
    "pattern": "^(auto|[1-9][0-9]*x[1-9][0-9]*)$",
    "description": "`WIDTHxHEIGHT`, one of the model's sizes (or `auto` where the model "
    "takes it). Absent: the model's default size.",
    "examples": ["1024x1024", "512x512", "1536x1024", "auto"],
}
_QUALITY = {
    "type": "string",
    "description": "One of the model's qualities: `standard` or `hd` (DALL·E style), "
    "`low`, `medium`, `high` or `auto` (gpt-image style). Absent: the model's default.",
    "examples": ["standard", "hd", "low", "medium", "high", "auto"],
}
_RESPONSE_FORMAT = {
    "type": "string",
    "enum": ["url", "b64_json"],
    "description": "`url`: a signed URL that expires after `url_ttl_seconds`; `b64_json`: the "
    "image inline, base64-encoded. Absent: `b64_json` for models that take the gpt-image "
    "parameters (and for streams), `url` for the others.",
}
_USER = {
    "type": "string",
    "description": "An opaque end-user id: logged, never interpreted.",
}
_BACKGROUND = {
    "type": "string",
    "enum": ["transparent", "opaque", "auto"],
    "description": "gpt-image models: the background of the image. `transparent` needs "
    "`output_format` `png` or `webp`.",
}
_OUTPUT_FORMAT = {
    "type": "string",
    "enum": ["png", "jpeg", "webp"],
    "description": "gpt-image models: the image format (default `png`).",
}
_OUTPUT_COMPRESSION = {
    "type": "integer",
    "minimum": 0,
    "maximum": 100,
    "description": "gpt-image models, `jpeg` and `webp` only: compression level in percent "
    "(default 100).",
}
_STREAM = {
    "type": "boolean",
    "default": False,
    "description": "gpt-image models: answer with Server-Sent Events (`text/event-stream`) "
    "instead of one JSON object.",
}
_PARTIAL_IMAGES = {
    "type": "integer",
    "minimum": 0,
    "maximum": 3,
    "description": "With `stream`: how many partial images to send before the final one "
    "(0: only the final image).",
}
_BINARY = {"type": "string", "format": "binary"}
_SEED = {
    "type": "integer",
    "minimum": 0,
    "maximum": 2**32 - 1,
    "description": "Extension: makes `local-sketch` reproducible; ignored by providers "
    "without seeds.",
}

_GENERATION_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "prompt"],
    "description": "`null` counts as absent; unknown fields are ignored.",
    "properties": {
        "model": _MODEL,
        "prompt": {
            "type": "string",
            "minLength": 1,
            "description": "What to draw; at most the model's `max_prompt_chars` "
            "(4000 for `local-sketch`).",
            "examples": ["a lighthouse at dusk"],
        },
        "n": _nullable(_N),
        "size": _nullable(_SIZE),
        "quality": _nullable(_QUALITY),
        "response_format": _nullable(_RESPONSE_FORMAT),
        "style": _nullable(
            {
                "type": "string",
                "enum": ["vivid", "natural"],
                "description": "DALL·E 3 style models: one of the model's styles.",
            }
        ),
        "user": _nullable(_USER),
        "background": _nullable(_BACKGROUND),
        "output_format": _nullable(_OUTPUT_FORMAT),
        "output_compression": _nullable(_OUTPUT_COMPRESSION),
        "moderation": _nullable(
            {
                "type": "string",
                "enum": ["low", "auto"],
                "description": "gpt-image models: content-moderation level (default `auto`).",
            }
        ),
        "stream": _nullable(_STREAM),
        "partial_images": _nullable(_PARTIAL_IMAGES),
        "seed": _nullable(_SEED),
    },
}

_EDIT_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "image", "prompt"],
    "properties": {
        "image": {
            "anyOf": [_BINARY, {"type": "array", "items": _BINARY, "minItems": 1, "maxItems": 16}],
            "description": "The image(s) to edit: `png`, `webp` or `jpeg`. gpt-image models take "
            "up to 16 (send the field repeatedly, or as `image[]`); DALL·E 2 one square PNG "
            "under 4 MB.",
        },
        "prompt": {
            "type": "string",
            "minLength": 1,
            "description": "What the edited image should show.",
        },
        "mask": {
            **_BINARY,
            "description": "A PNG as large as the (first) image whose fully transparent pixels "
            "mark where to edit.",
        },
        "model": _MODEL,
        "n": _N,
        "size": _SIZE,
        "quality": _QUALITY,
        "response_format": _RESPONSE_FORMAT,
        "user": _USER,
        "background": _BACKGROUND,
        "output_format": _OUTPUT_FORMAT,
        "output_compression": _OUTPUT_COMPRESSION,
        "input_fidelity": {
            "type": "string",
            "enum": ["high", "low"],
            "description": "Accepted for compatibility with OpenAI's API; not passed on.",
        },
        "stream": _STREAM,
        "partial_images": _PARTIAL_IMAGES,
        "seed": _SEED,
    },
}

_VARIATION_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "image"],
    "properties": {
        "image": {**_BINARY, "description": "A square PNG under 4 MB to make variations of."},
        "model": _MODEL,
        "n": _N,
        "size": _SIZE,
        "response_format": _RESPONSE_FORMAT,
        "user": _USER,
        "seed": _SEED,
    },
}

_IMAGE_PARTS = {"contentType": "image/png, image/jpeg, image/webp"}

# -- schemas -------------------------------------------------------------------------------

_SCHEMAS: dict[str, Schema] = {
    "CreateImageRequest": _GENERATION_REQUEST,
    "CreateImageEditRequest": _EDIT_REQUEST,
    "CreateImageVariationRequest": _VARIATION_REQUEST,
    "Image": {
        "type": "object",
        "description": "One generated image: `url` or `b64_json`, as `response_format` asked.",
        "properties": {
            "b64_json": {
                "type": "string",
                "contentEncoding": "base64",
                "description": "The image, base64-encoded.",
            },
            "url": {
                "type": "string",
                "format": "uri",
                "description": "Where to fetch the image; expires after `url_ttl_seconds`.",
            },
            "revised_prompt": {
                "type": "string",
                "description": "The prompt the model actually used.",
            },
        },
    },
    "ImagesUsage": {
        "type": "object",
        "description": "Token usage; zero where the provider bills per image.",
        "properties": {
            "input_tokens": {"type": "integer", "minimum": 0},
            "input_tokens_details": {
                "type": "object",
                "properties": {
                    "text_tokens": {"type": "integer", "minimum": 0},
                    "image_tokens": {"type": "integer", "minimum": 0},
                },
            },
            "output_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
            "prompt_tokens": {
                "type": "integer",
                "minimum": 0,
                "description": "Same as `input_tokens`.",
            },
            "completion_tokens": {
                "type": "integer",
                "minimum": 0,
                "description": "Same as `output_tokens`.",
            },
        },
        "required": ["total_tokens"],
    },
    "ImagesResponse": {
        "type": "object",
        "required": ["created", "data"],
        "properties": {
            "created": {
                "type": "integer",
                "description": "Unix seconds when the images were made.",
            },
            "data": {"type": "array", "items": _schema("Image")},
            "usage": _schema("ImagesUsage"),
            "background": {"type": "string", "enum": ["transparent", "opaque"]},
            "output_format": {"type": "string", "enum": ["png", "webp", "jpeg"]},
            "quality": {"type": "string"},
            "size": {"type": "string"},
        },
    },
    "ImageGenPartialImageEvent": {
        "type": "object",
        "description": "A partial image, while the image is being generated.",
        "required": [
            "type",
            "b64_json",
            "created_at",
            "size",
            "quality",
            "background",
            "output_format",
            "partial_image_index",
        ],
        "properties": {
            "type": {"const": "image_generation.partial_image"},
            "b64_json": {"type": "string", "contentEncoding": "base64"},
            "created_at": {"type": "integer"},
            "size": {"type": "string"},
            "quality": {"type": "string"},
            "background": {"type": "string"},
            "output_format": {"type": "string"},
            "partial_image_index": {"type": "integer", "minimum": 0},
        },
    },
    "ImageGenCompletedEvent": {
        "type": "object",
        "description": "The final image.",
        "required": [
            "type",
            "b64_json",
            "created_at",
            "size",
            "quality",
            "background",
            "output_format",
            "usage",
        ],
        "properties": {
            "type": {"const": "image_generation.completed"},
            "b64_json": {"type": "string", "contentEncoding": "base64"},
            "created_at": {"type": "integer"},
            "size": {"type": "string"},
            "quality": {"type": "string"},
            "background": {"type": "string"},
            "output_format": {"type": "string"},
            "usage": _schema("ImagesUsage"),
        },
    },
    "ImageStreamErrorEvent": {
        "type": "object",
        "description": "The stream failed after it began (a failure before the first event is "
        "an ordinary HTTP error). Images already completed were charged; nothing else was.",
        "required": ["type", "error"],
        "properties": {"type": {"const": "error"}, "error": _schema("Error")},
    },
    "ImageGenStreamEvent": {
        "description": "The JSON in the `data:` line of one Server-Sent Event; the event's "
        "`event:` line repeats its `type`.",
        "oneOf": [
            _schema("ImageGenPartialImageEvent"),
            _schema("ImageGenCompletedEvent"),
            _schema("ImageStreamErrorEvent"),
        ],
        "discriminator": {
            "propertyName": "type",
            "mapping": {
                "image_generation.partial_image": "#/components/schemas/ImageGenPartialImageEvent",
                "image_generation.completed": "#/components/schemas/ImageGenCompletedEvent",
                "error": "#/components/schemas/ImageStreamErrorEvent",
            },
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer", "description": "Unix seconds."},
            "owned_by": {"type": "string"},
        },
    },
    "ListModelsResponse": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _schema("Model")},
        },
    },
    "Error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "additionalProperties": False,
        "properties": {
            "message": {"type": "string", "minLength": 1},
            "type": {
                "type": "string",
                "minLength": 1,
                "description": "`invalid_request_error`, `insufficient_quota`, "
                "`rate_limit_error`, `api_error` or `server_error`.",
            },
            "param": {
                "type": ["string", "null"],
                "description": "The request field at fault, if any.",
            },
            "code": {
                "type": ["string", "null"],
                "description": "The stable reason; see the response's description.",
            },
        },
    },
    "ErrorResponse": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {"error": _schema("Error")},
    },
    "HealthStatus": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable", "not_serving"]},
            "service": {
                "type": "string",
                "description": "The gRPC status of the failed health check.",
            },
        },
    },
}

# -- headers ---------------------------------------------------------------------------------

_HEADERS: dict[str, Schema] = {
    "XRequestId": {
        "description": "The request's id: the caller's `X-Request-ID` when it was a sane "
        "token, else one the gateway made. Every log line about the request carries it.",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    },
    "XShouldRetry": {
        "description": "Whether retrying the same request can help; the OpenAI SDKs obey it.",
        "required": True,
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
    "RetryAfter": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
}
_RATE_LIMIT_HEADERS = {
    f"x-ratelimit-{what}-{kind}": {
        "description": description.format(kind=kind),
        "schema": schema,
    }
    for kind in ("requests", "images")
    for what, description, schema in (
        ("limit", "The key's {kind} per minute.", {"type": "integer", "minimum": 0}),
        (
            "remaining",
            "{kind} left in this minute's window.",
            {"type": "integer", "minimum": 0},
        ),
        (
            "reset",
            "Time until the window starts again, e.g. `12s`.",
            {"type": "string", "pattern": "^[0-9]+s$"},
        ),
    )
}
for _name, _header in _RATE_LIMIT_HEADERS.items():
    _HEADERS[_name] = _header


def _rate_limit_header_refs() -> dict[str, Schema]:
    return {name: _ref("headers", name) for name in _RATE_LIMIT_HEADERS}


# -- responses -------------------------------------------------------------------------------


def _error_response(
    description: str, code: str, message: str, *, error_type: str, param: str | None = None
) -> Schema:
    return {
        "description": description,
        "headers": {
            "x-request-id": _ref("headers", "XRequestId"),
            "x-should-retry": _ref("headers", "XShouldRetry"),
        },
        "content": {
            "application/json": {
                "schema": _schema("ErrorResponse"),
                "example": {
                    "error": {"message": message, "type": error_type, "param": param, "code": code}
                },
            }
        },
    }


_RESPONSES: dict[str, Schema] = {
    "BadRequest": _error_response(
        "Bad request: a body that is not a JSON object (or not valid multipart), a field of the "
        "wrong type or out of range (`invalid_value`, with `param`), an unknown model "
        "(`model_not_found`), a model that makes no images (`model_not_supported`), a prompt "
        "the provider refused (`content_policy_violation`).",
        "invalid_value",
        "Invalid size '999x999'. Supported: 256x256, 512x512, 1024x1024.",
        error_type="invalid_request_error",
        param="size",
    ),
    "Unauthorized": _error_response(
        "No key, a bad key, or a revoked key (`invalid_api_key`).",
        "invalid_api_key",
        "Incorrect API key provided.",
        error_type="invalid_request_error",
    ),
    "PaymentRequired": _error_response(
        "The account's balance is too low for the request (`insufficient_balance`). Nothing "
        "was charged. An edit or a variation from an account with nothing available is "
        "refused before its upload is read.",
        "insufficient_balance",
        "Insufficient balance: this request costs 0.002000 USD.",
        error_type="insufficient_quota",
    ),
    "NotFound": _error_response(
        "Not found (`not_found`): an image URL that was tampered with or has expired.",
        "not_found",
        "No such image.",
        error_type="invalid_request_error",
    ),
    "ModelNotFound": _error_response(
        "No model with this id can serve now (`model_not_found`, `param`: `model`).",
        "model_not_found",
        "The model 'no-such-model' does not exist",
        error_type="invalid_request_error",
        param="model",
    ),
    "Conflict": _error_response(
        "The `Idempotency-Key` was used with another body (`idempotency_key_reused`, "
        "`x-should-retry: false`), or the first request with it is still running "
        "(`idempotency_key_in_progress`, `Retry-After: 1`, `x-should-retry: true`).",
        "idempotency_key_reused",
        "This Idempotency-Key was used with a different request body.",
        error_type="invalid_request_error",
    ),
    "PayloadTooLarge": _error_response(
        "The request body is over the gateway's limit (`request_too_large`; 1 MiB by default, "
        "64 MiB for uploads), or over the image service's message limit.",
        "request_too_large",
        "The request body is larger than the limit of 1048576 bytes.",
        error_type="invalid_request_error",
    ),
    "TooManyRequests": _error_response(
        "The key's rate limit is used up for this minute (`rate_limit_exceeded`); retry after "
        "`Retry-After` seconds. Nothing was charged. Edits and variations also get it, "
        "`too_many_uploads` and without the `x-ratelimit-*` headers, while the gateway is "
        "reading as many uploads as it takes at once (`max_uploads_in_flight`); the body was "
        "not read.",
        "rate_limit_exceeded",
        "Rate limit reached: 60 requests per minute.",
        error_type="rate_limit_error",
    ),
    "RequestHeaderFieldsTooLarge": _error_response(
        "`Authorization` or `Idempotency-Key` is longer than 2048 bytes "
        "(`request_header_too_large`): the gateway passes them on as gRPC metadata, which has "
        "a size limit. Nothing was charged.",
        "request_header_too_large",
        "The Authorization header is longer than 2048 bytes.",
        error_type="invalid_request_error",
    ),
    "InternalServerError": _error_response(
        "A bug of ours (`server_error`). Nothing was charged.",
        "server_error",
        "The server had an error processing your request.",
        error_type="server_error",
    ),
    "BadGateway": _error_response(
        "The upstream provider failed: 5xx, timeout, refused connection or an unreadable "
        "answer (`upstream_error`). Nothing was charged.",
        "upstream_error",
        "The image provider failed. Try again shortly.",
        error_type="api_error",
    ),
    "NotImplemented": _error_response(
        "The image service is older than the gateway and lacks the operation (`not_implemented`).",
        "not_implemented",
        "The image service does not offer this operation.",
        error_type="server_error",
    ),
    "ServiceUnavailable": _error_response(
        "The gateway cannot reach the image service (`service_unavailable`).",
        "service_unavailable",
        "The image service is unavailable. Try again shortly.",
        error_type="server_error",
    ),
    "GatewayTimeout": _error_response(
        "The gateway's deadline passed before the service answered (`timeout`).",
        "timeout",
        "The image service is unavailable. Try again shortly.",
        error_type="server_error",
    ),
}
_RESPONSES["Conflict"]["headers"] = {
    **_RESPONSES["Conflict"]["headers"],
    "retry-after": _ref("headers", "RetryAfter"),
}
_RESPONSES["TooManyRequests"]["headers"] = {
    **_RESPONSES["TooManyRequests"]["headers"],
    "retry-after": _ref("headers", "RetryAfter"),
    **_rate_limit_header_refs(),
}


def _errors(*names: str) -> dict[str, Schema]:
    statuses = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "PaymentRequired": "402",
        "NotFound": "404",
        "ModelNotFound": "404",
        "Conflict": "409",
        "PayloadTooLarge": "413",
        "TooManyRequests": "429",
        "RequestHeaderFieldsTooLarge": "431",
        "InternalServerError": "500",
        "NotImplemented": "501",
        "BadGateway": "502",
        "ServiceUnavailable": "503",
        "GatewayTimeout": "504",
    }
    return {statuses[name]: _ref("responses", name) for name in names}


_GENERATION_ERRORS = _errors(
    "BadRequest",
    "Unauthorized",
    "PaymentRequired",
    "Conflict",
    "PayloadTooLarge",
    "TooManyRequests",
    "RequestHeaderFieldsTooLarge",
    "InternalServerError",
    "NotImplemented",
    "BadGateway",
    "ServiceUnavailable",
    "GatewayTimeout",
)
_SERVER_ERRORS = ("InternalServerError", "NotImplemented", "ServiceUnavailable", "GatewayTimeout")

_REQUEST_ID_HEADER = {"x-request-id": _ref("headers", "XRequestId")}


def _images_ok(*, streaming: bool) -> Schema:
    content: dict[str, Schema] = {
        "application/json": {
            "schema": _schema("ImagesResponse"),
            "example": {
                "created": 1795520000,
                "data": [
                    {
                        "url": "https://images.example.com/v1/files/images/img_abc.1795523600.sig",
                        "revised_prompt": "a lighthouse at dusk",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        }
    }
    description = "The images, charged."
    if streaming:
        # As in OpenAI's own document: the schema is that of each event's `data:` JSON.
        content["text/event-stream"] = {"schema": _schema("ImageGenStreamEvent")}
        description += (
            " With `stream: true`, Server-Sent Events instead: each `data:` line is one "
            "`ImageGenStreamEvent` (`image_generation.partial_image` events, then one "
            "`image_generation.completed` per image)."
        )
    return {
        "description": description,
        "headers": {**_REQUEST_ID_HEADER, **_rate_limit_header_refs()},
        "content": content,
    }


def _image_operation(
    operation_id: str, summary: str, request_schema: str, media_type: str, *, streaming: bool
) -> Schema:
    body: Schema = {"schema": _schema(request_schema)}
    if media_type == "multipart/form-data":
        body["encoding"] = {"image": _IMAGE_PARTS, "mask": {"contentType": "image/png"}}
        if request_schema == "CreateImageVariationRequest":
            body["encoding"] = {"image": {"contentType": "image/png"}}
    return {
        "operationId": operation_id,
        "tags": ["Images"],
        "summary": summary,
        "parameters": [_ref("parameters", "IdempotencyKey"), _ref("parameters", "XRequestId")],
        "requestBody": {"required": True, "content": {media_type: body}},
        "responses": {"200": _images_ok(streaming=streaming), **_GENERATION_ERRORS},
    }


def _json_ok(description: str, schema: str) -> Schema:
    return {
        "description": description,
        "headers": _REQUEST_ID_HEADER,
        "content": {"application/json": {"schema": _schema(schema)}},
    }


_PATHS: dict[str, Schema] = {
    "/v1/images/generations": {
        "post": _image_operation(
            "createImage",
            "Create images from a prompt",
            "CreateImageRequest",
            "application/json",
            streaming=True,
        )
    },
    "/v1/images/edits": {
        "post": _image_operation(
            "createImageEdit",
            "Edit or extend images from a prompt",
            "CreateImageEditRequest",
            "multipart/form-data",
            streaming=True,
        )
    },
    "/v1/images/variations": {
        "post": _image_operation(
            "createImageVariation",
            "Create variations of an image",
            "CreateImageVariationRequest",
            "multipart/form-data",
            streaming=False,
        )
    },
    "/v1/models": {
        "get": {
            "operationId": "listModels",
            "tags": ["Models"],
            "summary": "List the models that can serve now",
            "description": "A model whose provider has no credential configured is left out.",
            "parameters": [_ref("parameters", "XRequestId")],
            "responses": {
                "200": _json_ok("The models.", "ListModelsResponse"),
                **_errors("Unauthorized", "RequestHeaderFieldsTooLarge", *_SERVER_ERRORS),
            },
        }
    },
    "/v1/models/{model}": {
        "get": {
            "operationId": "retrieveModel",
            "tags": ["Models"],
            "summary": "Retrieve one model",
            "parameters": [
                {
                    "name": "model",
                    "in": "path",
                    "required": True,
                    "description": "The model's id.",
                    "schema": {"type": "string", "minLength": 1},
                    "example": "local-sketch",
                },
                _ref("parameters", "XRequestId"),
            ],
            "responses": {
                "200": _json_ok("The model.", "Model"),
                **_errors(
                    "Unauthorized", "ModelNotFound", "RequestHeaderFieldsTooLarge", *_SERVER_ERRORS
                ),
            },
        }
    },
    "/v1/files/images/{token}": {
        "get": {
            "operationId": "downloadImage",
            "tags": ["Images"],
            "summary": "The image behind a `url`",
            "description": "Needs no key: the token carries the image id, its expiry and an "
            "HMAC-SHA256 signature. A tampered or expired token gets 404.",
            "security": [],
            "parameters": [
                {
                    "name": "token",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                },
                _ref("parameters", "XRequestId"),
            ],
            "responses": {
                "200": {
                    "description": "The image.",
                    "headers": _REQUEST_ID_HEADER,
                    "content": {
                        media: {"schema": {"type": "string", "contentMediaType": media}}
                        for media in ("image/png", "image/jpeg", "image/webp")
                    },
                },
                **_errors("NotFound", *_SERVER_ERRORS),
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "tags": ["Operations"],
            "summary": "Liveness: the gateway process answers",
            "security": [],
            "responses": {"200": _json_ok("Alive.", "HealthStatus")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "tags": ["Operations"],
            "summary": "Readiness: the image service reports SERVING",
            "security": [],
            "responses": {
                "200": _json_ok("Ready.", "HealthStatus"),
                "503": _json_ok(
                    "Not ready: the service is unreachable or draining.", "HealthStatus"
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "tags": ["Operations"],
            "summary": "Prometheus metrics of the gateway",
            "description": "Prometheus text format, or OpenMetrics when the scraper asks for it "
            "in `Accept`. Keep this path off the public route.",
            "security": [],
            "responses": {
                "200": {
                    "description": "The gateway's metrics.",
                    "headers": _REQUEST_ID_HEADER,
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                }
            },
        }
    },
    OPENAPI_PATH: {
        "get": {
            "operationId": "openapi",
            "tags": ["Operations"],
            "summary": "This document",
            "security": [],
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.1 document of the gateway.",
                    "headers": _REQUEST_ID_HEADER,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "imagegen",
        "version": _version(),
        "summary": "An OpenAI-compatible image-generation API.",
        "description": "OpenAI's Images and Models REST API: point the official OpenAI SDKs' "
        "`base_url` at `<server>/v1`. Every error is OpenAI's "
        '`{"error": {"message", "type", "param", "code"}}`; every answer carries '
        "`x-request-id`; errors carry `x-should-retry`.",
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "tags": [
        {"name": "Images", "description": "Generate, edit and fetch images."},
        {"name": "Models", "description": "The models that can serve now."},
        {"name": "Operations", "description": "Health, metrics and this document."},
    ],
    "security": [{"ApiKeyAuth": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {
            "ApiKeyAuth": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "sk-ig-…",
                "description": "An API key made with `imagegen-admin keys create`.",
            }
        },
        "parameters": {
            "IdempotencyKey": {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Makes retries safe: a repeat with the same key and body gets "
                "the first answer again, generated and charged once (24 hours).",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[!-~]([ -~]*[!-~])?$",
                },
            },
            "XRequestId": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Your id for the request, echoed in `x-request-id` when it "
                "matches `^[A-Za-z0-9._:/=+-]{1,128}$` (otherwise the gateway makes one).",
                "schema": {"type": "string"},
            },
        },
        "headers": _HEADERS,
        "responses": _RESPONSES,
        "schemas": _SCHEMAS,
    },
}


def document(server_url: str) -> dict[str, Any]:
    """The document, with ``server_url`` (the gateway's public origin) as its server."""
    doc = copy.deepcopy(DOCUMENT)
    doc["servers"] = [{"url": server_url, "description": "This gateway."}]
    return doc


async def serve_openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: needs no key."""
    base_url = request.app[CONFIG].public_base_url or str(request.url.origin())
    return web.Response(body=orjson.dumps(document(base_url)), content_type="application/json")
