"""The one table from the service's error reasons to HTTP status and OpenAI error fields,
and the OpenAI-shaped error responses built from it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import orjson
from aiohttp import web
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    type: str
    code: str
    # False where a retry of the same request cannot succeed.
    retryable: bool


_BY_REASON: dict[str, HttpError] = {
    "INVALID_PARAMETER": HttpError(400, "invalid_request_error", "invalid_value", False),
    "MODEL_NOT_FOUND": HttpError(400, "invalid_request_error", "model_not_found", False),
    "MODEL_NOT_SUPPORTED": HttpError(400, "invalid_request_error", "model_not_supported", False),
    "CONTENT_POLICY": HttpError(400, "invalid_request_error", "content_policy_violation", False),
    "INVALID_API_KEY": HttpError(401, "invalid_request_error", "invalid_api_key", False),
    "INSUFFICIENT_BALANCE": HttpError(402, "insufficient_quota", "insufficient_balance", False),
    "PERMISSION_DENIED": HttpError(403, "invalid_request_error", "permission_denied", False),
    "NOT_FOUND": HttpError(404, "invalid_request_error", "not_found", False),
    "IDEMPOTENCY_CONFLICT": HttpError(
        409, "invalid_request_error", "idempotency_key_reused", False
    ),
    # The openai SDK retries 409: by then the first request has usually finished.
    "IDEMPOTENCY_IN_PROGRESS": HttpError(
        409, "invalid_request_error", "idempotency_key_in_progress", True
    ),
    "RATE_LIMITED": HttpError(429, "rate_limit_error", "rate_limit_exceeded", True),
    "UPSTREAM_ERROR": HttpError(502, "api_error", "upstream_error", True),
    "SERVICE_UNAVAILABLE": HttpError(503, "server_error", "service_unavailable", True),
}
_INTERNAL = HttpError(500, "server_error", "server_error", True)
_INTERNAL_MESSAGE = "The server had an error processing your request."
_UNAVAILABLE = HttpError(503, "server_error", "service_unavailable", True)
BAD_REQUEST = _BY_REASON["INVALID_PARAMETER"]
INVALID_API_KEY = _BY_REASON["INVALID_API_KEY"]
INSUFFICIENT_BALANCE = _BY_REASON["INSUFFICIENT_BALANCE"]
NOT_FOUND = _BY_REASON["NOT_FOUND"]
METHOD_NOT_ALLOWED = HttpError(405, "invalid_request_error", "method_not_allowed", False)
TOO_LARGE = HttpError(413, "invalid_request_error", "request_too_large", False)
HEADERS_TOO_LARGE = HttpError(431, "invalid_request_error", "request_header_too_large", False)
# The gateway's own limit on uploads in flight: capacity, not the caller's rate limit.
UPLOADS_BUSY = HttpError(429, "rate_limit_error", "too_many_uploads", True)
NOT_IMPLEMENTED = HttpError(501, "server_error", "not_implemented", False)

# A status without ErrorInfo did not come from the service's domain (whose refusals all
# carry a reason) but from gRPC itself: the connection, a deadline, a size limit, or a
# service older than this gateway. Each code still gets a deliberate answer; none is an
# unexplained 500. RESOURCE_EXHAUSTED is told apart by what overflowed (_resource_limit).
_BY_GRPC_CODE: dict[grpc.StatusCode, tuple[HttpError, str]] = {
    grpc.StatusCode.CANCELLED: (_UNAVAILABLE, "The image service stopped the request. Try again."),
    grpc.StatusCode.UNKNOWN: (_INTERNAL, _INTERNAL_MESSAGE),
    grpc.StatusCode.INVALID_ARGUMENT: (BAD_REQUEST, "The image service refused the request."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (
        HttpError(504, "server_error", "timeout", True),
        "The image service did not answer in time. Try again shortly.",
    ),
    grpc.StatusCode.NOT_FOUND: (NOT_FOUND, "Not found."),
    grpc.StatusCode.ALREADY_EXISTS: (
        HttpError(409, "invalid_request_error", "conflict", False),
        "The request conflicts with one made before.",
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        _BY_REASON["PERMISSION_DENIED"],
        "The API key may not make this request.",
    ),
    grpc.StatusCode.FAILED_PRECONDITION: (
        HttpError(400, "invalid_request_error", "failed_precondition", False),
        "The request cannot be served in the account's present state.",
    ),
    grpc.StatusCode.ABORTED: (
        HttpError(409, "invalid_request_error", "conflict", True),
        "The request conflicted with another one. Try again.",
    ),
    grpc.StatusCode.OUT_OF_RANGE: (BAD_REQUEST, "A value of the request is out of range."),
    # The service predates this gateway: retrying here cannot help.
    grpc.StatusCode.UNIMPLEMENTED: (
        NOT_IMPLEMENTED,
        "The image service does not offer this operation.",
    ),
    grpc.StatusCode.INTERNAL: (_INTERNAL, _INTERNAL_MESSAGE),
    grpc.StatusCode.UNAVAILABLE: (
        _UNAVAILABLE,
        "The image service is unavailable. Try again shortly.",
    ),
    grpc.StatusCode.DATA_LOSS: (_INTERNAL, _INTERNAL_MESSAGE),
    grpc.StatusCode.UNAUTHENTICATED: (INVALID_API_KEY, "Incorrect API key provided."),
}


class HeaderTooLarge(Exception):
    """A header the gateway passes on as gRPC metadata is over its limit (answered 431)."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"The {name} header is longer than {limit} bytes.")
        self.message = str(self)


def error_response(
    error: HttpError,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": error.type, "param": param, "code": error.code}}
    all_headers = {"x-should-retry": "true" if error.retryable else "false", **(headers or {})}
    return web.Response(
        status=error.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=all_headers,
    )


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed gRPC call in OpenAI's terms."""

    error: HttpError
    message: str
    param: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, object]:
        return {
            "message": self.message,
            "type": self.error.type,
            "param": self.param,
            "code": self.error.code,
        }


def describe_grpc_error(exc: grpc.aio.AioRpcError) -> Failure:
    """What a failed gRPC call means for the HTTP caller: by the ErrorInfo reason it carries,
    else (no ErrorInfo, or a reason this gateway does not know) by its status code."""
    info = _error_info(exc)
    error = None if info is None else _BY_REASON.get(info.reason)
    if info is None or error is None:
        if info is None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Failure(*_resource_limit(exc.details() or ""))
        error, message = _BY_GRPC_CODE.get(exc.code(), (_INTERNAL, _INTERNAL_MESSAGE))
        return Failure(error, message)
    headers = {k: v for k, v in info.metadata.items() if k.startswith("x-ratelimit-")}
    retry_after = info.metadata.get("retry_after_seconds")
    if retry_after:
        headers["retry-after"] = retry_after
    return Failure(
        error, exc.details() or "The request failed.", info.metadata.get("param"), headers
    )


def _resource_limit(details: str) -> tuple[HttpError, str]:
    """RESOURCE_EXHAUSTED without ErrorInfo: gRPC refused a message or its metadata for its
    size. The service's own limits (rate limits) always carry ErrorInfo; this is the caller's
    headers or body, and the same request would be refused again."""
    if "metadata" in details.lower():
        return HEADERS_TOO_LARGE, "The request's headers are larger than the image service accepts."
    return TOO_LARGE, "The request is larger than the image service accepts."


def from_grpc_error(exc: grpc.aio.AioRpcError) -> web.Response:
    """The HTTP answer for a failed gRPC call, by the ErrorInfo reason it carries."""
    failure = describe_grpc_error(exc)
    return error_response(
        failure.error, failure.message, param=failure.param, headers=failure.headers
    )


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
