"""Rate-limit counters in this process: right for one replica, wrong for several."""

from __future__ import annotations

from imagegen_service.ratelimit import Limits


class MemoryCounters:
    def __init__(self) -> None:
        self._window = -1
        self._counts: dict[str, tuple[int, int]] = {}

    async def take(
        self, key_id: str, window: int, images: int, limits: Limits
    ) -> tuple[bool, int, int]:
        if window != self._window:
            # A new minute: every key starts again, and the old counts cannot pile up.
            self._window, self._counts = window, {}
        requests, used = self._counts.get(key_id, (0, 0))
        over_requests = limits.requests_per_minute and requests + 1 > limits.requests_per_minute
        over_images = limits.images_per_minute and used + images > limits.images_per_minute
        if over_requests or over_images:
            return False, requests, used
        self._counts[key_id] = (requests + 1, used + images)
        return True, requests + 1, used + images

    async def close(self) -> None:
        """Nothing to release."""
