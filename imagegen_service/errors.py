"""Domain errors. Each carries a stable ``reason``; the gRPC layer turns it into a status
(``grpc_errors.py``) and the gateway turns that into an HTTP answer (``http_gateway/errors.py``).
"""

from __future__ import annotations


def excerpt(value: str, limit: int = 40) -> str:
    """A caller's value as an error message may echo it: a short, escaped prefix, so a huge
    or strange value never bloats the status the caller gets back."""
    shown = value[:limit].encode("unicode_escape").decode("ascii")
    return shown + "..." if len(value) > limit else shown


class ImagegenError(Exception):
    """An error the caller should see, with a stable machine-readable reason."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # Facts learnt on the way out, e.g. what a failed stream still charged.
        self.details: dict[str, str] = {}

    def metadata(self) -> dict[str, str]:
        """Extra facts for the caller; never secrets."""
        return {**({"param": self.param} if self.param else {}), **self.details}


class InvalidParameter(ImagegenError):
    reason = "INVALID_PARAMETER"


class ModelNotFound(ImagegenError):
    reason = "MODEL_NOT_FOUND"


class ModelNotSupported(ImagegenError):
    reason = "MODEL_NOT_SUPPORTED"


class ContentPolicy(ImagegenError):
    reason = "CONTENT_POLICY"


class InvalidApiKey(ImagegenError):
    reason = "INVALID_API_KEY"


class PermissionDenied(ImagegenError):
    reason = "PERMISSION_DENIED"


class InsufficientBalance(ImagegenError):
    reason = "INSUFFICIENT_BALANCE"


class RateLimited(ImagegenError):
    reason = "RATE_LIMITED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        # x-ratelimit-* values for the caller.
        self.headers = headers or {}

    def metadata(self) -> dict[str, str]:
        return {"retry_after_seconds": str(self.retry_after_seconds), **self.headers}


class UpstreamError(ImagegenError):
    """The provider failed: 5xx, timeout, refused connection, unreadable answer."""

    reason = "UPSTREAM_ERROR"
    # How long the upstream asked us to wait (its Retry-After); for our retries only,
    # never shown to the caller.
    retry_after_seconds: float | None = None
    # The failure came after a paid submission reached the upstream (a 5xx or a timeout
    # once the body was sent): the upstream may have done, and billed, the work. Such a call
    # is repeated on the same deployment only where its provider says that is safe.
    ambiguous: bool = False


class UpstreamModelUnavailable(UpstreamError):
    """The upstream says the model does not exist or was retired. Repeating the call on the
    same deployment cannot help; another deployment may still serve the model."""

    def __init__(self, message: str, *, upstream_model: str, provider: str) -> None:
        super().__init__(message)
        self.upstream_model = upstream_model
        self.provider = provider


class ServiceUnavailable(ImagegenError):
    """The service cannot do its part right now (its database is unreachable); retryable."""

    reason = "SERVICE_UNAVAILABLE"

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "retry_after_seconds": "1"}


class IdempotencyConflict(ImagegenError):
    """The Idempotency-Key was used before with a different request."""

    reason = "IDEMPOTENCY_CONFLICT"


class IdempotencyInProgress(ImagegenError):
    """The first request with this Idempotency-Key is still running."""

    reason = "IDEMPOTENCY_IN_PROGRESS"

    def metadata(self) -> dict[str, str]:
        return {"retry_after_seconds": "1"}


class NotFound(ImagegenError):
    reason = "NOT_FOUND"
