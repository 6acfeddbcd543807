"""Rate-limit counters in Redis, shared by every service replica.

One Lua script checks and counts both limits atomically, so concurrent requests on
different replicas can never overshoot. Each window's keys expire on their own.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from imagegen_service.ratelimit import WINDOW_SECONDS, Limits

_TAKE = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local images = tonumber(redis.call('GET', KEYS[2]) or '0')
local request_limit = tonumber(ARGV[1])
local image_limit = tonumber(ARGV[2])
local asked = tonumber(ARGV[3])
if (request_limit > 0 and requests + 1 > request_limit)
    or (image_limit > 0 and images + asked > image_limit) then
  return {0, requests, images}
end
requests = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
images = redis.call('INCRBY', KEYS[2], asked)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, requests, images}
"""


class RedisCounters:
    def __init__(self, url: str, *, prefix: str = "imagegen:rl") -> None:
        # One immediate retry, for a pooled connection Redis closed (a restart); no more: a
        # request must not wait out a backoff for its rate limit, which fails open anyway.
        self._redis = aioredis.from_url(
            url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = prefix
        self._take = self._redis.register_script(_TAKE)

    async def take(
        self, key_id: str, window: int, images: int, limits: Limits
    ) -> tuple[bool, int, int]:
        base = f"{self._prefix}:{key_id}:{window}"
        result = cast(
            list[Any],
            await self._take(
                keys=[f"{base}:requests", f"{base}:images"],
                args=[
                    limits.requests_per_minute,
                    limits.images_per_minute,
                    images,
                    WINDOW_SECONDS * 2,
                ],
            ),
        )
        return bool(result[0]), int(result[1]), int(result[2])

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
