"""Per-method gRPC metrics for every registered RPC, wrapped around each handler once, when
it is registered.

``MeasuredServer`` is the server as the generated ``add_*_to_server`` functions (ours,
health's, reflection's) see it: each method handler they register comes out wrapped. This
does what a server interceptor would, without its cost: grpc.aio runs interceptors as a
chain of coroutines on every call, which was ~10% of a generation's CPU in the service. An
unknown method has no handler (gRPC answers UNIMPLEMENTED), so method labels stay within
what this server registers. Unary-unary and unary-stream handlers written as coroutines or
async generators are measured (every handler of this service); a streaming handler written
as an async generator also has its messages counted (one written with ``context.write``,
like Health.Watch, is timed only). Client-streaming and bidirectional handlers
(reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from imagegen_service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from typing import TypeAlias

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    GenericHandler: TypeAlias = grpc.GenericRpcHandler[Any, Any]


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
    """``handler`` with its calls counted and timed, labelled by its style and method."""
    if handler.request_streaming:
        return handler
    service, _, method = full_method.lstrip("/").partition("/")
    # gRPC tells a handler's style apart by the kind of function it is (coroutine,
    # async generator, or plain function run in a thread): each wrapper keeps the kind.
    if handler.response_streaming:
        behaviour, labels = handler.unary_stream, ("server_stream", service, method)
        if inspect.isasyncgenfunction(behaviour):
            wrapped = _stream(behaviour, labels, metrics)
        elif inspect.iscoroutinefunction(behaviour):
            wrapped = _unary(behaviour, labels, metrics)
        else:
            return handler
        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if not inspect.iscoroutinefunction(handler.unary_unary):
        return handler
    return grpc.unary_unary_rpc_method_handler(
        _unary(handler.unary_unary, ("unary", service, method), metrics),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _unary(behaviour: Any, labels: tuple[str, str, str], metrics: ServiceMetrics) -> Any:
    """A coroutine handler: unary, or streaming through ``context.write``."""
    instruments = _Instruments(metrics, labels)

    async def unary(request: Any, context: Context) -> Any:
        started = instruments.start()
        try:
            response = await behaviour(request, context)
        except BaseException as exc:
            instruments.finish(started, context, exc)
            raise
        instruments.finish(started, context, None)
        return response

    return unary


def _stream(behaviour: Any, labels: tuple[str, str, str], metrics: ServiceMetrics) -> Any:
    """An async-generator handler: its messages are counted as they go."""
    instruments = _Instruments(metrics, labels)
    sent = metrics.grpc_msg_sent.labels(*labels)

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        started = instruments.start()
        try:
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
