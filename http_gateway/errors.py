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
}
_INTERNAL = HttpError(500, "server_error", "server_error", True)
# Transport failures between gateway and service, which carry no ErrorInfo.
_BY_GRPC_CODE: dict[grpc.StatusCode, HttpError] = {
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "server_error", "service_unavailable", True),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "server_error", "timeout", True),
    grpc.StatusCode.CANCELLED: HttpError(503, "server_error", "service_unavailable", True),
}
BAD_REQUEST = _BY_REASON["INVALID_PARAMETER"]
NOT_FOUND = _BY_REASON["NOT_FOUND"]
METHOD_NOT_ALLOWED = HttpError(405, "invalid_request_error", "method_not_allowed", False)
TOO_LARGE = HttpError(413, "invalid_request_error", "request_too_large", False)


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
    """What a failed gRPC call means for the HTTP caller, by the ErrorInfo reason it carries."""
    info = _error_info(exc)
    if info is None:
        error = _BY_GRPC_CODE.get(exc.code(), _INTERNAL)
        message = (
            "The image service is unavailable. Try again shortly."
            if error.status in (503, 504)
            else "The server had an error processing your request."
        )
        return Failure(error, message)
    error = _BY_REASON.get(info.reason, _INTERNAL)
    headers = {k: v for k, v in info.metadata.items() if k.startswith("x-ratelimit-")}
    retry_after = info.metadata.get("retry_after_seconds")
    if retry_after:
        headers["retry-after"] = retry_after
    if error is _INTERNAL:
        message = "The server had an error."
    else:
        message = exc.details() or "The request failed."
    return Failure(error, message, info.metadata.get("param"), headers)


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
