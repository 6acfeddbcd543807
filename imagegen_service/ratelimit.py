"""Per-key rate limits: requests per minute and images per minute.

Fixed one-minute windows aligned to the clock: simple to reason about, one counter pair per
key and minute, and the same arithmetic in-process and in Redis. A limit of 0 means no
limit. The counters live in ``stores/ratelimit_memory.py`` (one process) or
``stores/ratelimit_redis.py`` (shared by every replica).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from imagegen_service import errors
from imagegen_service.stores.ledger_sql import ApiKey

log = structlog.get_logger("imagegen.ratelimit")
WINDOW_SECONDS = 60


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


class RateLimiter:
    def __init__(self, counters: CounterStore, defaults: Limits) -> None:
        self.counters = counters
        self.defaults = defaults

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
        try:
            allowed, requests, used = await self.counters.take(key_id, window, images, limits)
        except Exception:
            # The counters (Redis) are down: serving without limits beats refusing everyone.
            log.warning("ratelimit.unavailable", exc_info=True)
            return Decision(True, limits, 0, 0, reset)
        return Decision(allowed, limits, requests, used, reset)
