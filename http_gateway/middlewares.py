"""Request ids on every answer, and OpenAI-shaped errors for everything aiohttp refuses."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from http_gateway import errors
from http_gateway.metrics import METRICS, route_of

log = structlog.get_logger("imagegen.gateway")

REQUEST_ID = web.RequestKey("request_id", str)
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# nginx's status for a request whose client went away before it was answered: counted and
# logged apart from the server's own failures, and never sent (nobody is left to read it).
CLIENT_CLOSED_REQUEST = 499


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("x-request-id", "")
    request_id = given if _VALID_REQUEST_ID.match(given) else f"req_{secrets.token_hex(12)}"
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    response = await _answer(request, handler)
    response.headers["x-request-id"] = request_id
    elapsed, route = time.perf_counter() - started, route_of(request)
    status = response.status
    if not response.prepared and request.transport is None:
        # Whatever the handler made of it (a body cut short can read as a bad one), the
        # client left before its answer: nothing was sent.
        status = CLIENT_CLOSED_REQUEST
    request.app[METRICS].observe(route, request.method, status, elapsed)
    log.info(
        "http.request",
        request_id=request_id,
        method=request.method,
        route=route,
        status=status,
        latency_ms=round(elapsed * 1000, 1),
    )
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConnectionResetError:
        # The client went away mid-body (aiohttp's "Connection lost"): not a failure of ours.
        return web.Response(status=CLIENT_CLOSED_REQUEST)
    except errors.HeaderTooLarge as exc:
        return errors.error_response(errors.HEADERS_TOO_LARGE, exc.message)
    except web.HTTPRequestEntityTooLarge:
        return errors.error_response(
            errors.TOO_LARGE,
            f"The request body is larger than the limit of {request.app[MAX_BODY]} bytes.",
        )
    except web.HTTPNotFound:
        return errors.error_response(
            errors.NOT_FOUND, f"Unknown request URL: {request.method} {request.path}."
        )
    except web.HTTPMethodNotAllowed:
        return errors.error_response(
            errors.METHOD_NOT_ALLOWED, f"Method {request.method} is not allowed on {request.path}."
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return errors.error_response(
            errors.HttpError(exc.status, "invalid_request_error", "http_error", False), exc.reason
        )
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        # A body aiohttp cannot read (an undecodable Content-Encoding, broken chunking, a
        # multipart part with a malformed header): the caller's fault, not a bug of ours.
        reason = str(getattr(exc, "message", "") or getattr(exc.__cause__, "message", "") or exc)
        return errors.error_response(
            errors.BAD_REQUEST, f"The request body could not be read: {reason}."
        )
    except Exception:
        log.exception("http.failed", request_id=request[REQUEST_ID], path=request.path)
        return errors.error_response(
            errors.HttpError(500, "server_error", "server_error", True),
            "The server had an error processing your request.",
        )


MAX_BODY = web.AppKey("max_body_bytes", int)
