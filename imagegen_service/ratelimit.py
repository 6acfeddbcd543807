"""Per-key rate limits: requests per minute and images per minute.

Fixed one-minute windows aligned to the clock: simple to reason about, one counter pair per
key and minute, and the same arithmetic in-process and in Redis. A limit of 0 means no
limit. The counters live in ``stores/ratelimit_memory.py`` (one process) or
``stores/ratelimit_redis.py`` (shared by every replica).

Counters that cannot be reached (Redis down) fail open: requests are served without limits.
The outage is logged once (``ratelimit.unavailable``) and its end once
(``ratelimit.recovered``), and reported to the metrics; meanwhile the counters are tried
again at most once a second, so a Redis that does not answer costs requests no waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog

from imagegen_service import errors
from imagegen_service.stores.ledger_sql import ApiKey

log = structlog.get_logger("imagegen.ratelimit")
WINDOW_SECONDS = 60
# While the counters are unreachable, at most one request a second tries them again.
RETRY_UNAVAILABLE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int = 0
    images_per_minute: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limits: Limits
    requests_used: int
    images_used: int
    # Seconds until the current window ends and the counters start again.
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* values (only for the limits that are set)."""
        result: dict[str, str] = {}
        for kind, limit, used in (
            ("requests", self.limits.requests_per_minute, self.requests_used),
            ("images", self.limits.images_per_minute, self.images_used),
        ):
            if limit:
                result[f"x-ratelimit-limit-{kind}"] = str(limit)
                result[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
                result[f"x-ratelimit-reset-{kind}"] = f"{self.reset_seconds}s"
        return result


class CounterStore(Protocol):
    async def take(
        self, key_id: str, window: int, images: int, limits: Limits
    ) -> tuple[bool, int, int]:
        """Atomically: if one more request and ``images`` more images fit in this window,
        count them; returns (allowed, requests used, images used) after the decision."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Pingable(Protocol):
    """Counters kept elsewhere (Redis), whose reachability can be checked."""

    async def ping(self) -> None: ...


class BackendRecorder(Protocol):
    """Where the limiter reports the state of its counters (metrics.ServiceMetrics)."""

    def rate_limit_backend(self, up: bool) -> None: ...

    def rate_limit_failed_open(self) -> None: ...


class RateLimiter:
    def __init__(
        self,
        counters: CounterStore,
        defaults: Limits,
        *,
        recorder: BackendRecorder | None = None,
    ) -> None:
        self.counters = counters
        self.defaults = defaults
        self._recorder = recorder
        # Since when the counters are unreachable (monotonic), or None while they answer.
        self._down_since: float | None = None
        self._retry_at = 0.0
        # Requests served without limits during the current outage.
        self._failed_open = 0
        if recorder is not None:
            recorder.rate_limit_backend(True)

    def limits_for(self, requests_per_minute: int | None, images_per_minute: int | None) -> Limits:
        return Limits(
            self.defaults.requests_per_minute
            if requests_per_minute is None
            else requests_per_minute,
            self.defaults.images_per_minute if images_per_minute is None else images_per_minute,
        )

    async def admit(self, key: ApiKey, images: int) -> Decision:
        """Counts one request of ``images`` images against the key's limits, or raises
        RateLimited (with the decision's headers) when it does not fit."""
        limits = self.limits_for(key.requests_per_minute, key.images_per_minute)
        if limits.images_per_minute and images > limits.images_per_minute:
            raise errors.InvalidParameter(
                f"n={images} exceeds this key's limit of {limits.images_per_minute} images "
                "per minute.",
                param="n",
            )
        decision = await self.acquire(key.id, images, limits)
        if not decision.allowed:
            raise errors.RateLimited(
                "Rate limit reached for this API key. Retry after the time in Retry-After.",
                retry_after_seconds=decision.reset_seconds,
                headers=decision.headers(),
            )
        return decision

    async def acquire(self, key_id: str, images: int, limits: Limits) -> Decision:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        reset = max(1, int((window + 1) * WINDOW_SECONDS - now + 0.999))
        if not limits.requests_per_minute and not limits.images_per_minute:
            return Decision(True, limits, 0, 0, reset)
        if self._down_since is not None and time.monotonic() < self._retry_at:
            return self._fail_open(limits, reset)
        try:
            allowed, requests, used = await self.counters.take(key_id, window, images, limits)
        except Exception as exc:
            # The counters (Redis) are down: serving without limits beats refusing everyone.
            self._unavailable(exc)
            return self._fail_open(limits, reset)
        self._available()
        return Decision(allowed, limits, requests, used, reset)

    async def check_backend(self) -> None:
        """Asks counters kept elsewhere whether they answer, so that an outage and its end
        are noticed (and the metric is right) even when no request comes."""
        if not isinstance(self.counters, Pingable):
            return
        try:
            await self.counters.ping()
        except Exception as exc:
            self._unavailable(exc)
            return
        self._available()

    def _fail_open(self, limits: Limits, reset: int) -> Decision:
        self._failed_open += 1
        if self._recorder is not None:
            self._recorder.rate_limit_failed_open()
        return Decision(True, limits, 0, 0, reset)

    def _unavailable(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._retry_at = now + RETRY_UNAVAILABLE_SECONDS
        if self._down_since is not None:
            return
        self._down_since = now
        self._failed_open = 0
        # One line per outage, without the traceback: the cause says it all.
        log.warning("ratelimit.unavailable", error=_describe(exc), serving="without limits")
        if self._recorder is not None:
            self._recorder.rate_limit_backend(False)

    def _available(self) -> None:
        if self._down_since is None:
            return
        log.info(
            "ratelimit.recovered",
            down_seconds=round(time.monotonic() - self._down_since, 1),
            requests_without_limits=self._failed_open,
        )
        self._down_since = None
        if self._recorder is not None:
            self._recorder.rate_limit_backend(True)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
