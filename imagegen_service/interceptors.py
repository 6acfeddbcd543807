"""gRPC server interceptors: per-method metrics for every registered RPC.

The interceptor wraps each handler's behaviour. An unknown method has no handler and is left
alone (gRPC answers UNIMPLEMENTED), so method labels stay within what this server registers.
Unary-unary and unary-stream handlers written as coroutines or async generators are measured
(every handler of this service); a streaming handler written as an async generator also has
its messages counted (one written with ``context.write``, like Health.Watch, is timed only).
Client-streaming and bidirectional handlers (reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from imagegen_service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from typing import TypeAlias

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        # The wrapped handler of each method, made on its first call: a server's handlers
        # do not change once it has started, and wrapping costs more than the lookup.
        # Keyed by method; the handler it wrapped is kept to check that it is the same one.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, full_method: str) -> Handler:
        service, _, method = full_method.lstrip("/").partition("/")
        # gRPC tells a handler's style apart by the kind of function it is (coroutine,
        # async generator, or plain function run in a thread): each wrapper keeps the kind.
        if handler.response_streaming:
            behaviour, labels = handler.unary_stream, ("server_stream", service, method)
            if inspect.isasyncgenfunction(behaviour):
                wrapped = self._stream(behaviour, labels)
            elif inspect.iscoroutinefunction(behaviour):
                wrapped = self._unary(behaviour, labels)
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
            self._unary(handler.unary_unary, ("unary", service, method)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behaviour: Any, labels: tuple[str, str, str]) -> Any:
        """A coroutine handler: unary, or streaming through ``context.write``."""

        async def unary(request: Any, context: Context) -> Any:
            call = _Call(self._metrics, labels)
            try:
                response = await behaviour(request, context)
            except BaseException as exc:
                call.finished(context, exc)
                raise
            call.finished(context, None)
            return response

        return unary

    def _stream(self, behaviour: Any, labels: tuple[str, str, str]) -> Any:
        """An async-generator handler: its messages are counted as they go."""
        sent = self._metrics.grpc_msg_sent.labels(*labels)

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(self._metrics, labels)
            try:
                async for message in behaviour(request, context):
                    yield message
                    sent.inc()
            except BaseException as exc:
                call.finished(context, exc)
                raise
            call.finished(context, None)

        return stream


class _Call:
    def __init__(self, metrics: ServiceMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics = metrics
        self._labels = labels
        self._started = time.perf_counter()
        metrics.grpc_started.labels(*labels).inc()

    def finished(self, context: Context, exc: BaseException | None) -> None:
        code = _code(context, exc)
        self._metrics.grpc_handled.labels(*self._labels, code).inc()
        self._metrics.grpc_handling_seconds.labels(*self._labels).observe(
            time.perf_counter() - self._started
        )


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
