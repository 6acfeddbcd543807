"""From an OpenAI ``size`` to what a provider that speaks in aspect ratios can make.

First an exact table (OpenAI's usual sizes), then the nearest ratio the provider supports.
A size whose nearest ratio is still far off cannot be served by that provider at all: that
is a 400 before any money moves. The image that comes back has the provider's real pixel
size, which need not equal the requested one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from imagegen_service.errors import InvalidParameter

# OpenAI sizes (and the local renderer's) to the ratio they mean.
EXACT_RATIOS: Mapping[str, str] = {
    "256x256": "1:1",
    "512x512": "1:1",
    "1024x1024": "1:1",
    "1536x1024": "3:2",
    "1024x1536": "2:3",
    "1792x1024": "16:9",
    "1024x1792": "9:16",
    "1536x640": "21:9",
    "1344x768": "16:9",
    "768x1344": "9:16",
    "1152x896": "4:3",
    "896x1152": "3:4",
    "1216x832": "3:2",
    "832x1216": "2:3",
}
# How far (as a ratio of ratios) the nearest supported aspect ratio may be from the asked one.
MAX_DISTORTION = 1.25


def ratio_value(ratio: str) -> float:
    w, _, h = ratio.partition(":")
    return int(w) / int(h)


def aspect_ratio_for(width: int, height: int, supported: Sequence[str]) -> str:
    """The provider's aspect ratio for ``width x height``; InvalidParameter if none fits."""
    exact = EXACT_RATIOS.get(f"{width}x{height}")
    if exact is not None and exact in supported:
        return exact
    wanted = math.log(width / height)
    best = min(supported, key=lambda r: abs(math.log(ratio_value(r)) - wanted))
    if abs(math.log(ratio_value(best)) - wanted) > math.log(MAX_DISTORTION):
        raise InvalidParameter(
            f"The size {width}x{height} has no close aspect ratio at this provider "
            f"(supported: {', '.join(supported)}).",
            param="size",
        )
    return best
