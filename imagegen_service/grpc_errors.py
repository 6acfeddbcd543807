"""Domain errors become gRPC statuses here, and only here.

Each status carries a ``google.rpc.ErrorInfo`` (domain ``imagegen``) whose ``reason`` the
gateway maps to HTTP; ``metadata`` holds ``param`` or ``retry_after_seconds``. The reasons
are the names of ``imagegen.v1.ErrorReason`` (proto/imagegen/v1/errors.proto). A refusal
worth retrying (``retry_after_seconds`` set: a rate limit, the decode budget, a database
away, an idempotency key in use) also carries a ``google.rpc.RetryInfo`` with that delay,
which gRPC clients and libraries read without knowing our metadata keys.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagegen_service import errors

DOMAIN = "imagegen"
# The status message and ErrorInfo travel in trailing metadata, which a client caps (8 KiB
# by default): whatever an error says, it stays far below that.
MAX_MESSAGE_CHARS = 1000

_CODES: dict[str, grpc.StatusCode] = {
    errors.InvalidParameter.reason: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound.reason: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotSupported.reason: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ContentPolicy.reason: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidApiKey.reason: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied.reason: grpc.StatusCode.PERMISSION_DENIED,
    errors.InsufficientBalance.reason: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RateLimited.reason: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UpstreamError.reason: grpc.StatusCode.UNAVAILABLE,
    errors.ServiceUnavailable.reason: grpc.StatusCode.UNAVAILABLE,
    errors.NotFound.reason: grpc.StatusCode.NOT_FOUND,
    errors.IdempotencyConflict.reason: grpc.StatusCode.ALREADY_EXISTS,
    errors.IdempotencyInProgress.reason: grpc.StatusCode.ABORTED,
}


def to_status(error: errors.ImagegenError) -> grpc.Status:
    code = _CODES.get(error.reason, grpc.StatusCode.INTERNAL)
    metadata = {k: v[:MAX_MESSAGE_CHARS] for k, v in error.metadata().items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    details = [_packed(info)]
    retry_after = metadata.get("retry_after_seconds")
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromSeconds(max(0, int(float(retry_after))))
        details.append(_packed(retry))
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)


def _packed(message: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def internal_status(
    message: str = "The server had an error processing your request.",
) -> grpc.Status:
    return to_status(_Internal(message))


class _Internal(errors.ImagegenError):
    reason = "INTERNAL"
