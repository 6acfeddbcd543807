"""Per-method gRPC metrics, the call's request id, and a plain refusal of undecodable
messages, for every registered RPC, wrapped around each handler once, when it is registered.

``MeasuredServer`` is the server as the generated ``add_*_to_server`` functions (ours,
health's, reflection's) see it: each method handler they register comes out wrapped. This
does what a server interceptor would, without its cost: grpc.aio runs interceptors as a
chain of coroutines on every call, which was ~10% of a generation's CPU in the service. An
unknown method has no handler (gRPC answers UNIMPLEMENTED), so method labels stay within
what this server registers. Unary-unary and unary-stream handlers written as coroutines or
async generators are measured (every handler of this service); a streaming handler written
as an async generator also has its messages counted (one written with ``context.write``,
like Health.Watch, is timed only). Client-streaming and bidirectional handlers
(reflection) are not measured.

Each measured call has one request id (``request_id_of``): the caller's ``x-request-id``
when it is a sane token, else one made for the call. It is bound to every log line the call
writes (structlog's context variables) and returned in the trailing metadata as
``x-request-id``, refusals included: a status sent with metadata of its own (``abort``,
``set_trailing_metadata``) must add it (``with_request_id``).

A message that does not decode as the method's request type is answered INVALID_ARGUMENT
with one ``rpc.undecodable`` line. Left to gRPC, each would log a full traceback and answer
UNKNOWN: a flood of garbage would flood the logs.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog

from imagegen_service import errors
from imagegen_service.grpc_errors import to_status
from imagegen_service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from typing import TypeAlias

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    GenericHandler: TypeAlias = grpc.GenericRpcHandler[Any, Any]

log = structlog.get_logger("imagegen.grpc")

REQUEST_ID_KEY = "x-request-id"
# What the gateway passes on as it is; anything else is replaced by an id of our own, so
# that a caller's value never reaches log lines or metadata unchecked.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")
# The call (its context) whose request id this task holds. grpc.aio runs each call in a
# task of its own; the context check keeps a stale id from answering for another call.
_CALL_REQUEST_ID: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "imagegen_call_request_id", default=None
)


def request_id_of(context: Context) -> str:
    """The call's request id, the same however often it is asked for."""
    known = _CALL_REQUEST_ID.get()
    if known is not None and known[0] is context:
        return known[1]
    given = next(
        (value for key, value in context.invocation_metadata() or () if key == REQUEST_ID_KEY),
        None,
    )
    if isinstance(given, bytes):
        given = given.decode("ascii", "replace")
    request_id = (
        given if given and _VALID_REQUEST_ID.match(given) else f"req_{secrets.token_hex(12)}"
    )
    _CALL_REQUEST_ID.set((context, request_id))
    return request_id


def with_request_id(
    context: Context, metadata: Sequence[tuple[str, str | bytes]] = ()
) -> tuple[tuple[str, str | bytes], ...]:
    """``metadata`` with the call's request id added: for a status sent with metadata of its
    own, which replaces what ``measured`` set."""
    return (*metadata, (REQUEST_ID_KEY, request_id_of(context)))


def _start_call(context: Context) -> None:
    request_id = request_id_of(context)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    structlog.contextvars.bind_contextvars(request_id=request_id)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What the request deserializer gives for bytes that are not the method's message."""

    size: int
    error: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or whatever a parser raises
            return _Undecodable(len(raw), str(exc))

    return deserialize


def _undecodable_status(request: _Undecodable, method: str, context: Context) -> grpc.Status:
    log.info(
        "rpc.undecodable",
        method=method,
        request_id=request_id_of(context),
        request_bytes=request.size,
        error=request.error[:200],
    )
    return to_status(errors.InvalidParameter(f"The request is not a valid {method} message."))


async def _refuse_undecodable(request: _Undecodable, method: str, context: Context) -> NoReturn:
    status = _undecodable_status(request, method, context)
    await context.abort(
        status.code, status.details, with_request_id(context, status.trailing_metadata)
    )
    raise AssertionError("abort() always raises")


class MeasuredServer:
    """Registers method handlers on ``server`` with the metrics wrapped around them."""

    def __init__(self, server: grpc.aio.Server, metrics: ServiceMetrics) -> None:
        self._server = server
        self._metrics = metrics

    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_MeasuredGenericHandler(h, self._metrics) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, Handler]
    ) -> None:
        # grpc.aio has it since 1.62; the type stubs do not know it yet.
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name,
            {
                name: measured(handler, f"/{service_name}/{name}", self._metrics)
                for name, handler in method_handlers.items()
            },
        )


class _MeasuredGenericHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose method handlers come out measured, each wrapped once."""

    def __init__(self, inner: GenericHandler, metrics: ServiceMetrics) -> None:
        self._inner = inner
        self._metrics = metrics
        # Keyed by method; the handler it wrapped is kept to check that it is the same one.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = measured(handler, method, self._metrics)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def measured(handler: Handler, full_method: str, metrics: ServiceMetrics) -> Handler:
    """``handler`` with its calls counted and timed, labelled by its style and method, each
    with its request id, and its undecodable messages refused."""
    if handler.request_streaming:
        return _guarded_request_stream(handler, full_method)
    service, _, method = full_method.lstrip("/").partition("/")
    # gRPC tells a handler's style apart by the kind of function it is (coroutine,
    # async generator, or plain function run in a thread): each wrapper keeps the kind.
    if handler.response_streaming:
        behaviour, labels = handler.unary_stream, ("server_stream", service, method)
        if inspect.isasyncgenfunction(behaviour):
            wrapped = _stream(behaviour, full_method, labels, metrics)
        elif inspect.iscoroutinefunction(behaviour):
            wrapped = _unary(behaviour, full_method, labels, metrics)
        else:
            return _guarded_in_thread(handler, full_method)
        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if not inspect.iscoroutinefunction(handler.unary_unary):
        return _guarded_in_thread(handler, full_method)
    return grpc.unary_unary_rpc_method_handler(
        _unary(handler.unary_unary, full_method, ("unary", service, method), metrics),
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _guarded_in_thread(handler: Handler, full_method: str) -> Handler:
    """A unary-request handler that gRPC runs in a thread (Health's unimplemented List):
    not measured, but an undecodable message ends it INVALID_ARGUMENT without calling it."""
    if handler.response_streaming:
        streaming: Any = handler.unary_stream

        def stream(request: Any, context: Context) -> Iterator[Any]:
            if isinstance(request, _Undecodable):
                _refuse_in_thread(request, full_method, context)
                return
            yield from streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    unary_behaviour: Any = handler.unary_unary

    def unary(request: Any, context: Context) -> Any:
        if isinstance(request, _Undecodable):
            # gRPC sends no response message with a status other than OK.
            _refuse_in_thread(request, full_method, context)
            return None
        return unary_behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary,
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _guarded_request_stream(handler: Handler, full_method: str) -> Handler:
    """A client-streaming or bidirectional handler (reflection's, run in a thread) whose
    request stream ends at an undecodable message, the call then answering INVALID_ARGUMENT.
    Other kinds pass through untouched."""
    behaviour = handler.stream_stream
    if not inspect.isgeneratorfunction(behaviour):
        return handler

    def guarded(request_iterator: Iterator[Any], context: Context) -> Iterator[Any]:
        def requests() -> Iterator[Any]:
            for request in request_iterator:
                if isinstance(request, _Undecodable):
                    _refuse_in_thread(request, full_method, context)
                    return
                yield request

        yield from behaviour(requests(), context)

    return grpc.stream_stream_rpc_method_handler(
        guarded,
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _refuse_in_thread(request: _Undecodable, method: str, context: Context) -> None:
    """The status for a handler that cannot await ``abort``: set, and sent when it ends."""
    status = _undecodable_status(request, method, context)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(with_request_id(context, status.trailing_metadata))


def _unary(
    behaviour: Any, full_method: str, labels: tuple[str, str, str], metrics: ServiceMetrics
) -> Any:
    """A coroutine handler: unary, or streaming through ``context.write``."""
    instruments = _Instruments(metrics, labels)

    async def unary(request: Any, context: Context) -> Any:
        started = instruments.start()
        _start_call(context)
        try:
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(request, full_method, context)
            response = await behaviour(request, context)
        except BaseException as exc:
            instruments.finish(started, context, exc)
            raise
        instruments.finish(started, context, None)
        return response

    return unary


def _stream(
    behaviour: Any, full_method: str, labels: tuple[str, str, str], metrics: ServiceMetrics
) -> Any:
    """An async-generator handler: its messages are counted as they go."""
    instruments = _Instruments(metrics, labels)
    sent = metrics.grpc_msg_sent.labels(*labels)

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        started = instruments.start()
        _start_call(context)
        try:
            if isinstance(request, _Undecodable):
                await _refuse_undecodable(request, full_method, context)
            async for message in behaviour(request, context):
                yield message
                sent.inc()
        except BaseException as exc:
            instruments.finish(started, context, exc)
            raise
        instruments.finish(started, context, None)

    return stream


class _Instruments:
    """One method's metric children, looked up once."""

    def __init__(self, metrics: ServiceMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._started = metrics.grpc_started.labels(*labels)
        self._seconds = metrics.grpc_handling_seconds.labels(*labels)

    def start(self) -> float:
        self._started.inc()
        return time.perf_counter()

    def finish(self, started: float, context: Context, exc: BaseException | None) -> None:
        self._metrics.grpc_handled.labels(*self._labels, _code(context, exc)).inc()
        self._seconds.observe(time.perf_counter() - started)


def _code(context: Context, exc: BaseException | None) -> str:
    """The status the caller gets: the one set or aborted with, else OK, CANCELLED when the
    call was cancelled, UNKNOWN for an exception gRPC turns into a status itself."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"
