"""What checking an upstream image costs: the header parse and the completeness check that
every image from an HTTP provider passes before it counts as delivered."""

from __future__ import annotations

import io
import time

from PIL import Image

from imagegen_service.providers.http import HttpUpstream, is_complete

SIZES = ((256, 256), (1024, 1024), (1536, 1024))
FORMATS = (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"))


def _image(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


def _microseconds(work: object, data: bytes, mime: str, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        work(data, mime)  # type: ignore[operator]
    return (time.perf_counter() - started) / rounds * 1e6


def measure(rounds: int = 2000) -> list[str]:
    """One line per size and format: microseconds per image for the whole inspection and
    for the completeness check alone."""
    upstream = HttpUpstream("bench", timeout_seconds=1, max_connections=1)
    lines = [
        "image checks (python -m tests.bench.image_checks): microseconds per image",
        f"  {'size':<10} {'format':<6} {'bytes':>9} {'inspect':>9} {'complete?':>10}",
    ]
    for width, height in SIZES:
        for fmt, mime in FORMATS:
            data = _image(width, height, fmt)
            assert is_complete(data, mime) and not is_complete(data[: len(data) // 2], mime)
            whole = _microseconds(lambda d, m: upstream.inspect(d, 0), data, mime, rounds)
            tail = _microseconds(is_complete, data, mime, rounds)
            lines.append(
                f"  {f'{width}x{height}':<10} {fmt:<6} {len(data):>9,} {whole:>9.1f} {tail:>10.2f}"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(measure()))
