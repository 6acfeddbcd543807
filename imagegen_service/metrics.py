"""What the service tells its operator: Prometheus metrics, and one log line per generation.

Each service owns a ``ServiceMetrics`` with a registry of its own (never the process-global
one), served at ``GET /metrics`` on ``metrics_port`` by ``MetricsEndpoint``. The gRPC method
wrappers (``method_metrics.py``), the router (provider calls), the pipeline (holds) and the
servicer (a ``GenerationRecord`` per generation) report into it.

Every label value comes from a closed set: registered gRPC methods and status codes, the
catalog's model ids, the configured provider names, error reasons. Never a key, an account,
a request id, a prompt or anything else a caller can make up.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from imagegen_service import errors
from imagegen_service.build_info import register_runtime_metrics
from imagegen_service.stores.ledger_sql import is_database_unreachable

if TYPE_CHECKING:
    from imagegen_service.pipeline import GenerationParams, Summary

log = structlog.get_logger("imagegen.generation")

# From a quick ListModels to a batch of large images behind a slow upstream.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# Logged model names come from the caller when the model is unknown: keep lines short.
_MAX_LOGGED_MODEL_CHARS = 100


class ServiceMetrics:
    """The service's instruments, on one registry.

    ``log_prompt_chars``: how much of a prompt the generation line may carry (0: none).
    """

    def __init__(self, *, log_prompt_chars: int = 0) -> None:
        self.log_prompt_chars = log_prompt_chars
        self.registry = CollectorRegistry()
        register_runtime_metrics(self.registry)
        grpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.grpc_started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            grpc_labels,
            registry=self.registry,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*grpc_labels, "grpc_code"),
            registry=self.registry,
        )
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            grpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent",
            "Messages sent by server-streaming RPCs.",
            grpc_labels,
            registry=self.registry,
        )
        self.generations = Counter(
            "imagegen_generations",
            "Generations by an authenticated key, by outcome: ok or the error reason.",
            ("status",),
            registry=self.registry,
        )
        self.images_generated = Counter(
            "imagegen_images_generated",
            "Images delivered and charged.",
            ("model", "provider"),
            registry=self.registry,
        )
        self.insufficient_balance = Counter(
            "imagegen_insufficient_balance",
            "Generations refused because the balance could not cover the quote (HTTP 402).",
            registry=self.registry,
        )
        self.provider_request_seconds = Histogram(
            "imagegen_provider_request_seconds",
            "One call to a provider (each retry is a call), answered or failed.",
            ("provider",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "imagegen_provider_errors",
            "Failed provider calls, by kind.",
            ("provider", "kind"),
            registry=self.registry,
        )
        self.provider_retries = Counter(
            "imagegen_provider_retries",
            "Failed provider calls that were retried on the same provider.",
            ("provider",),
            registry=self.registry,
        )
        self.provider_failovers = Counter(
            "imagegen_provider_failovers",
            "Times a provider was given up on and the next deployment tried.",
            ("provider",),
            registry=self.registry,
        )
        self.upstream_model_unavailable = Counter(
            "imagegen_upstream_model_unavailable",
            "Calls the upstream answered that the model does not exist or was retired.",
            ("provider", "upstream_model"),
            registry=self.registry,
        )
        self.provider_queue_seconds = Histogram(
            "imagegen_provider_queue_seconds",
            "Time a call waited for one of its provider's max_concurrency slots.",
            ("provider",),
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.provider_queue_full = Counter(
            "imagegen_provider_queue_full",
            "Calls that found every slot of a provider taken for max_queue_seconds (the next "
            "deployment was tried; with none left the caller got 503).",
            ("provider",),
            registry=self.registry,
        )
        self.circuit_breaker_open = Gauge(
            "imagegen_circuit_breaker_open",
            "1 while a deployment's circuit is open and it is skipped, else 0 (per replica).",
            ("provider", "upstream_model"),
            registry=self.registry,
        )
        self.expired_holds = Counter(
            "imagegen_expired_holds_released",
            "Holds older than hold_ttl_seconds that housekeeping released (a replica died "
            "mid-request, or a request outlived the TTL).",
            registry=self.registry,
        )
        self.upstream_ambiguous = Counter(
            "imagegen_upstream_ambiguous",
            "Paid submissions whose outcome was unknown (a timeout or 5xx after the body was "
            "sent), by what followed: retried on the same deployment (it may be paid twice) "
            "or failed_over.",
            ("provider", "action"),
            registry=self.registry,
        )
        self.captured_micros = Counter(
            "imagegen_captured_microdollars",
            "Micro-dollars charged for delivered images.",
            registry=self.registry,
        )
        self.released_micros = Counter(
            "imagegen_released_microdollars",
            "Micro-dollars held and then given back (failures, fewer images than quoted).",
            registry=self.registry,
        )
        self.open_holds = Gauge(
            "imagegen_open_holds",
            "Holds placed by this process and not yet settled (per replica).",
            registry=self.registry,
        )
        self.database_up = Gauge(
            "imagegen_database_up",
            "1 while the last check of the database succeeded, 0 while it fails (the service "
            "then reports NOT_SERVING and refuses calls that need the database).",
            registry=self.registry,
        )
        self.rate_limit_backend_up = Gauge(
            "imagegen_rate_limit_backend_up",
            "1 while the rate-limit counters (Redis) answer, 0 while they do not and requests "
            "are served without limits.",
            registry=self.registry,
        )
        self.failed_open_requests = Counter(
            "imagegen_rate_limit_failed_open",
            "Requests served without a rate-limit check because the counters were unreachable.",
            registry=self.registry,
        )

    # -- providers (routing.py) -------------------------------------------------------------

    def provider_call(self, provider: str) -> ProviderCall:
        """``async with`` around one provider call: its latency and, if it fails, its kind."""
        return ProviderCall(self, provider)

    def retried(self, provider: str) -> None:
        self.provider_retries.labels(provider).inc()

    def failed_over(self, provider: str) -> None:
        self.provider_failovers.labels(provider).inc()

    def model_unavailable(self, provider: str, upstream_model: str) -> None:
        self.upstream_model_unavailable.labels(provider, upstream_model).inc()

    def ambiguous(self, provider: str, action: str) -> None:
        self.upstream_ambiguous.labels(provider, action).inc()

    def queue_wait(self, provider: str, seconds: float) -> None:
        self.provider_queue_seconds.labels(provider).observe(seconds)

    def queue_full(self, provider: str) -> None:
        self.provider_queue_full.labels(provider).inc()

    def circuit(self, provider: str, upstream_model: str, *, open_: bool) -> None:
        self.circuit_breaker_open.labels(provider, upstream_model).set(1 if open_ else 0)

    def expired_holds_released(self, count: int) -> None:
        self.expired_holds.inc(count)

    # -- money (pipeline.py) ----------------------------------------------------------------

    def hold_placed(self) -> None:
        self.open_holds.inc()

    def hold_settled(self, held_micros: int, *, captured_micros: int) -> None:
        """Called once per hold, as its settlement is written."""
        self.open_holds.dec()
        self.captured_micros.inc(captured_micros)
        self.released_micros.inc(held_micros - captured_micros)

    # -- dependencies (server.py, ratelimit.py) ---------------------------------------------

    def database_checked(self, up: bool) -> None:
        self.database_up.set(1 if up else 0)

    def rate_limit_backend(self, up: bool) -> None:
        self.rate_limit_backend_up.set(1 if up else 0)

    def rate_limit_failed_open(self) -> None:
        self.failed_open_requests.inc()

    # -- generations (servicer.py) ----------------------------------------------------------

    def generation(
        self, *, request_id: str, account_id: str, params: GenerationParams
    ) -> GenerationRecord:
        return GenerationRecord(self, request_id=request_id, account_id=account_id, params=params)


def provider_error_kind(exc: BaseException) -> str:
    if isinstance(exc, errors.UpstreamError):
        # The HTTP adapters chain the TimeoutError that ended the call.
        return "timeout" if isinstance(exc.__cause__, TimeoutError) else "upstream_error"
    if isinstance(exc, errors.ContentPolicy):
        return "content_policy"
    if isinstance(exc, errors.InvalidParameter):
        return "invalid_parameter"
    return "internal"


class ProviderCall:
    def __init__(self, metrics: ServiceMetrics, provider: str) -> None:
        self._metrics = metrics
        self._provider = provider
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # The caller went away (or stopped reading a stream): that says nothing about
            # the provider.
            return
        self._metrics.provider_request_seconds.labels(self._provider).observe(
            time.perf_counter() - self._started
        )
        if exc is not None:
            self._metrics.provider_errors.labels(self._provider, provider_error_kind(exc)).inc()


class GenerationRecord:
    """One generation, from the first look at its parameters to its answer.

    Used as ``with`` around the servicer's work (prepare, then run the pipeline), which hands
    it the Summary when the charge is made. On exit it counts the outcome and writes the one
    ``generation`` log line, whether the generation succeeded, failed or was cancelled.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        *,
        request_id: str,
        account_id: str,
        params: GenerationParams,
    ) -> None:
        self._metrics = metrics
        self._request_id = request_id
        self._account_id = account_id
        self._params = params
        self._started = time.perf_counter()
        self._summary: Summary | None = None

    def __enter__(self) -> GenerationRecord:
        return self

    def charged(self, summary: Summary) -> None:
        self._summary = summary
        self._metrics.images_generated.labels(summary.model, summary.provider).inc(summary.images)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        status = self._status(exc)
        self._metrics.generations.labels(status).inc()
        if status == "insufficient_balance":
            self._metrics.insufficient_balance.inc()
        summary = self._summary
        fields: dict[str, object] = {
            "request_id": self._request_id,
            "account_id": self._account_id,
            "model": summary.model if summary else self._params.model[:_MAX_LOGGED_MODEL_CHARS],
            "provider": summary.provider if summary else "",
            "n": summary.images if summary else 0,
            "cost_micros": summary.cost_micros if summary else 0,
            "status": status,
            "latency_ms": round((time.perf_counter() - self._started) * 1000, 1),
        }
        if self._metrics.log_prompt_chars > 0:
            fields["prompt_prefix"] = self._params.prompt[: self._metrics.log_prompt_chars]
        if status == "internal":
            log.warning("generation", **fields)
        else:
            log.info("generation", **fields)

    def _status(self, exc: BaseException | None) -> str:
        if exc is None or self._summary is not None:
            # Charged: a caller that leaves after the summary still got its images.
            return "ok"
        if isinstance(exc, errors.ImagegenError):
            return exc.reason.lower()
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return "cancelled"
        if is_database_unreachable(exc):
            return errors.ServiceUnavailable.reason.lower()
        return "internal"


class MetricsEndpoint:
    """``GET /metrics`` for one registry on its own port, served on the caller's event loop
    so that it starts and stops with the service."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listens on ``host:port`` (0: any free port); returns the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound: int = runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        return exposition(self._registry, request.headers.get("Accept", ""))


def exposition(registry: CollectorRegistry, accept: str) -> web.Response:
    """The registry in the text format the scraper asked for (Prometheus or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept)
    response = web.Response(body=encoder(registry))
    # Set raw: it carries parameters (version, charset) that content_type= would reject.
    response.headers["Content-Type"] = content_type
    return response
