"""Which deployment serves a request, and what happens when it fails.

A public model maps to an ordered list of deployments (provider + upstream model). For each
deployment in order: skip it while its circuit breaker is open; otherwise call it, retrying
a failure (5xx, 429, timeout, refused connection, unreadable answer) up to the provider's
``max_retries`` times with exponential backoff that honours ``Retry-After``; then fail over
to the next deployment. Two failures are never repeated on the same deployment: the
upstream saying the model does not exist (it will not exist a second later), and a paid
submission whose outcome is unknown (it may already be billed) unless the provider's
``retry_ambiguous`` allows it. Refusals and request errors are the caller's answer and are
never retried or failed over. When every deployment has failed, the caller gets
UpstreamError.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from imagegen_service import errors
from imagegen_service.catalog import Deployment, ImageModel
from imagegen_service.metrics import ServiceMetrics
from imagegen_service.providers.base import (
    Operation,
    Provider,
    ProviderRequest,
    ProviderResult,
    StreamEvent,
    call,
    stream_events,
    supports,
)

log = structlog.get_logger("imagegen.routing")


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    # The first retry waits about this long; each later one twice as long.
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 8.0
    # A Retry-After longer than this is not waited out: the next deployment is tried instead.
    max_retry_after_seconds: float = 10.0
    # Consecutive failures that open a deployment's circuit, and how long it stays open.
    breaker_failures: int = 5
    breaker_cooldown_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    max_retries: int = 2
    max_concurrency: int = 16
    retry_ambiguous: bool = False
    # How long a call may wait for one of max_concurrency slots before the deployment is
    # given up as busy (the next one is tried; with none left, 503 + Retry-After).
    max_queue_seconds: float = 10.0


class ProviderBusy(Exception):
    """Every slot of a provider stayed taken for its max_queue_seconds."""

    def __init__(self, provider: str, waited: float) -> None:
        super().__init__(provider)
        self.provider = provider
        self.waited = waited


@dataclass(slots=True)
class _Slot:
    """One of a provider's max_concurrency slots, waited for at most max_queue_seconds; the
    wait is measured either way."""

    semaphore: asyncio.Semaphore
    provider: str
    max_wait: float
    metrics: ServiceMetrics

    async def __aenter__(self) -> None:
        if not self.semaphore.locked():
            await self.semaphore.acquire()
            self.metrics.queue_wait(self.provider, 0.0)
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.max_wait):
                await self.semaphore.acquire()
        except TimeoutError:
            waited = time.monotonic() - started
            self.metrics.queue_wait(self.provider, waited)
            self.metrics.queue_full(self.provider)
            raise ProviderBusy(self.provider, waited) from None
        self.metrics.queue_wait(self.provider, time.monotonic() - started)

    async def __aexit__(self, *exc: object) -> None:
        self.semaphore.release()


@dataclass(slots=True)
class _Breaker:
    failures: int = 0
    open_until: float = 0.0
    # While half-open, one trial call is in flight and the others skip the deployment.
    trial_in_flight: bool = False


@dataclass(frozen=True, slots=True)
class Routed:
    result: ProviderResult
    deployment: Deployment
    provider: str
    # How many deployments were given up on before this one answered.
    failovers: int


@dataclass
class Router:
    providers: Mapping[str, Provider]
    limits: Mapping[str, ProviderLimits] = field(default_factory=dict)
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _breakers: dict[tuple[str, str], _Breaker] = field(default_factory=dict)
    _semaphores: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    def check(
        self, model: ImageModel, request: ProviderRequest, operation: Operation = "generate"
    ) -> list[Deployment]:
        """The deployments that can serve ``request`` at all; raises the first one's
        InvalidParameter when none can, ModelNotSupported when no deployment's provider can
        do ``operation``. No I/O: runs before money moves."""
        usable: list[Deployment] = []
        first_error: errors.InvalidParameter | None = None
        capable = [d for d in model.deployments if supports(self.providers[d.provider], operation)]
        if not capable:
            raise errors.ModelNotSupported(
                f"The model '{model.id}' cannot serve the '{operation}' operation here.",
                param="model",
            )
        for deployment in capable:
            try:
                self.providers[deployment.provider].check(_for(request, deployment))
            except errors.InvalidParameter as exc:
                first_error = first_error or exc
                continue
            usable.append(deployment)
        if not usable:
            assert first_error is not None
            raise first_error
        return usable

    async def generate(
        self,
        deployments: list[Deployment],
        request: ProviderRequest,
        operation: Operation = "generate",
    ) -> Routed:
        last_error: errors.UpstreamError | None = None
        busy: ProviderBusy | None = None
        tried = 0
        for deployment in deployments:
            key = (deployment.provider, deployment.upstream_model)
            if not self._admit(key):
                log.info("routing.skipped_open_circuit", provider=key[0], upstream_model=key[1])
                continue
            try:
                result = await self._with_retries(
                    deployment,
                    _for(request, deployment),
                    key,
                    operation,
                )
            except errors.UpstreamError as exc:
                last_error = exc
                tried += 1
                self._gave_up(deployment, request, exc)
                continue
            except ProviderBusy as exc:
                busy = exc
                _log_busy(request, exc)
                continue
            return Routed(result, deployment, deployment.provider, tried)
        raise _exhausted(last_error, busy)

    async def stream(
        self,
        deployments: list[Deployment],
        request: ProviderRequest,
        operation: Operation = "generate",
    ) -> AsyncGenerator[tuple[Deployment, StreamEvent]]:
        """``operation`` streamed, each event with the deployment serving it. Retries and
        failover work as for ``generate`` until the first event; after that the stream is
        committed to its deployment and a failure ends it (the caller has partial output)."""
        last_error: errors.UpstreamError | None = None
        busy: ProviderBusy | None = None
        for deployment in deployments:
            key = (deployment.provider, deployment.upstream_model)
            if not self._admit(key):
                log.info("routing.skipped_open_circuit", provider=key[0], upstream_model=key[1])
                continue
            provider = self.providers[deployment.provider]
            routed = _for(request, deployment)
            attempt = 0
            while True:
                started = False
                try:
                    async with (
                        self._slot(deployment.provider),
                        self.metrics.provider_call(deployment.provider),
                        contextlib.aclosing(stream_events(provider, operation, routed)) as events,
                    ):
                        async for event in events:
                            started = True
                            yield deployment, event
                except ProviderBusy as exc:
                    self._release_trial(key)
                    busy = exc
                    _log_busy(request, exc)
                    break
                except errors.UpstreamError as exc:
                    self._failed(key)
                    if started:
                        raise
                    delay = self._retry(deployment, routed, attempt, exc, key)
                    if delay is not None:
                        attempt += 1
                        await self.sleep(delay)
                        continue
                    last_error = exc
                    self._gave_up(deployment, request, exc)
                    break
                except BaseException:
                    self._release_trial(key)
                    raise
                self._succeeded(key)
                return
        raise _exhausted(last_error, busy)

    async def _with_retries(
        self,
        deployment: Deployment,
        request: ProviderRequest,
        key: tuple[str, str],
        operation: Operation = "generate",
    ) -> ProviderResult:
        provider = self.providers[deployment.provider]
        attempt = 0
        while True:
            try:
                async with (
                    self._slot(deployment.provider),
                    self.metrics.provider_call(deployment.provider),
                ):
                    result = await call(provider, operation, request)
            except errors.UpstreamError as exc:
                self._failed(key)
                delay = self._retry(deployment, request, attempt, exc, key)
                if delay is None:
                    raise
                attempt += 1
                await self.sleep(delay)
                continue
            except BaseException:
                # A refusal or request error says nothing about the deployment's health.
                self._release_trial(key)
                raise
            self._succeeded(key)
            return result

    def _slot(self, provider: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """The provider's concurrency slot. An adapter that counts its upstream tasks itself
        (one request may start several: BFL) is not also counted here."""
        if getattr(self.providers[provider], "limits_own_concurrency", False):
            return contextlib.nullcontext()
        limits = self.limits.get(provider, ProviderLimits())
        semaphore = self._semaphores.setdefault(provider, asyncio.Semaphore(limits.max_concurrency))
        return _Slot(semaphore, provider, limits.max_queue_seconds, self.metrics)

    def _retry(
        self,
        deployment: Deployment,
        request: ProviderRequest,
        attempt: int,
        exc: errors.UpstreamError,
        key: tuple[str, str],
    ) -> float | None:
        """How long to wait before repeating the failed call on the same deployment, or
        None to give the deployment up."""
        if isinstance(exc, errors.UpstreamModelUnavailable):
            return None
        limits = self.limits.get(deployment.provider, ProviderLimits())
        delay = self._retry_delay(attempt, exc)
        if attempt >= limits.max_retries or delay is None or not self._admit(key):
            if exc.ambiguous:
                self.metrics.ambiguous(deployment.provider, "failed_over")
            return None
        if exc.ambiguous:
            if not limits.retry_ambiguous:
                self.metrics.ambiguous(deployment.provider, "failed_over")
                log.warning(
                    "routing.ambiguous_not_repeated",
                    request_id=request.request_id,
                    provider=deployment.provider,
                    upstream_model=deployment.upstream_model,
                    error=exc.message,
                )
                return None
            self.metrics.ambiguous(deployment.provider, "retried")
        self.metrics.retried(deployment.provider)
        log.info(
            "routing.retry",
            request_id=request.request_id,
            provider=deployment.provider,
            attempt=attempt + 1,
            delay_seconds=round(delay, 3),
            ambiguous=exc.ambiguous,
        )
        return delay

    def _gave_up(
        self, deployment: Deployment, request: ProviderRequest, exc: errors.UpstreamError
    ) -> None:
        self.metrics.failed_over(deployment.provider)
        if isinstance(exc, errors.UpstreamModelUnavailable):
            # The operator's one clear signal that the catalog names a retired model.
            self.metrics.model_unavailable(deployment.provider, deployment.upstream_model)
            log.error(
                "upstream.model_unavailable",
                request_id=request.request_id,
                provider=deployment.provider,
                upstream_model=deployment.upstream_model,
                hint="the upstream no longer offers this model: update the catalog "
                "(imagegen-admin providers check lists every such model)",
            )
            return
        log.warning(
            "routing.failover",
            request_id=request.request_id,
            provider=deployment.provider,
            upstream_model=deployment.upstream_model,
            error=exc.message,
        )

    def _retry_delay(self, attempt: int, exc: errors.UpstreamError) -> float | None:
        backoff = min(
            self.policy.backoff_base_seconds * (1 << attempt), self.policy.backoff_max_seconds
        )
        # Jitter spreads the retries of many concurrent requests.
        backoff *= random.uniform(0.8, 1.2)
        if exc.retry_after_seconds is None:
            return backoff
        if exc.retry_after_seconds > self.policy.max_retry_after_seconds:
            return None
        return max(backoff, exc.retry_after_seconds)

    # -- circuit breaker ------------------------------------------------------------------

    def _admit(self, key: tuple[str, str]) -> bool:
        breaker = self._breakers.get(key)
        if breaker is None or breaker.failures < self.policy.breaker_failures:
            return True
        if self.clock() < breaker.open_until or breaker.trial_in_flight:
            return False
        breaker.trial_in_flight = True
        return True

    def _failed(self, key: tuple[str, str]) -> None:
        breaker = self._breakers.setdefault(key, _Breaker())
        breaker.failures += 1
        breaker.trial_in_flight = False
        if breaker.failures >= self.policy.breaker_failures:
            breaker.open_until = self.clock() + self.policy.breaker_cooldown_seconds
            if breaker.failures == self.policy.breaker_failures:
                self.metrics.circuit(key[0], key[1], open_=True)
                log.warning(
                    "routing.circuit_opened",
                    provider=key[0],
                    upstream_model=key[1],
                    cooldown_seconds=self.policy.breaker_cooldown_seconds,
                )

    def _succeeded(self, key: tuple[str, str]) -> None:
        breaker = self._breakers.pop(key, None)
        if breaker is not None and breaker.failures >= self.policy.breaker_failures:
            self.metrics.circuit(key[0], key[1], open_=False)

    def _release_trial(self, key: tuple[str, str]) -> None:
        breaker = self._breakers.get(key)
        if breaker is not None:
            breaker.trial_in_flight = False


def _log_busy(request: ProviderRequest, busy: ProviderBusy) -> None:
    log.warning(
        "routing.provider_busy",
        request_id=request.request_id,
        provider=busy.provider,
        waited_seconds=round(busy.waited, 3),
    )


def _exhausted(
    last_error: errors.UpstreamError | None, busy: ProviderBusy | None = None
) -> errors.ImagegenError:
    """The caller's error once every deployment was given up on: 503 with Retry-After when
    a deployment was only too busy (waiting longer would outlive the caller's patience, and
    a retry soon may find a slot), else 502."""
    if busy is not None:
        return errors.ServiceUnavailable(
            f"The provider for this model is at its concurrency limit (max_concurrency of "
            f"'{busy.provider}'); retry shortly."
        )
    if last_error is None:
        return errors.UpstreamError(
            "Every provider for this model is failing and temporarily skipped; retry in a minute."
        )
    if isinstance(last_error, errors.UpstreamModelUnavailable):
        return errors.UpstreamError(
            f"The model is unavailable upstream: provider '{last_error.provider}' no longer "
            f"offers '{last_error.upstream_model}'."
        )
    return errors.UpstreamError(f"The upstream provider failed: {last_error.message}")


def _for(request: ProviderRequest, deployment: Deployment) -> ProviderRequest:
    """The request as ``deployment`` gets it: with its upstream model."""
    if request.upstream_model == deployment.upstream_model:
        return request  # frozen: nothing to copy
    return replace(request, upstream_model=deployment.upstream_model)
