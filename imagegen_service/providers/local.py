"""The built-in local renderer: a procedural picture drawn from the prompt's words.

This is NOT a generative model. It paints a deterministic abstract picture (a gradient sky,
a few layered bands and some circles, rectangles and polygons) whose palette and composition
are derived from the prompt's words, so the service can be tried end to end without network
access, API keys or model weights, and so tests get real, decodable images quickly.

The same prompt, size, seed and format always give the same bytes: every choice is derived
from SHA-256 digests (never Python's per-process salted ``hash()``) and nothing depends on the
clock. Colour words such as "red", "ocean" or "sunset" steer the palette, so "a red barn"
visibly leans red.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import re
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFilter

from imagegen_service.config import ProviderConfig
from imagegen_service.errors import InvalidParameter
from imagegen_service.providers.base import (
    ProviderImage,
    ProviderRequest,
    ProviderResult,
    TokenUsage,
)

RGB = tuple[int, int, int]

MIME_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}

_PIL_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

# Some words name a whole mood rather than one colour, hence several colours per entry.
_COLOUR_WORDS: dict[str, tuple[RGB, ...]] = {
    "red": ((200, 30, 40), (150, 20, 30), (235, 80, 70)),
    "crimson": ((170, 20, 50), (120, 10, 35)),
    "orange": ((240, 130, 30), (210, 95, 20)),
    "yellow": ((245, 215, 50), (225, 185, 30)),
    "gold": ((215, 170, 50), (180, 135, 30), (240, 205, 110)),
    "golden": ((215, 170, 50), (240, 205, 110)),
    "green": ((40, 160, 70), (25, 110, 50), (110, 200, 100)),
    "blue": ((35, 80, 200), (20, 50, 150), (80, 140, 230)),
    "purple": ((120, 50, 170), (85, 30, 130), (170, 110, 210)),
    "violet": ((140, 80, 200), (100, 50, 160)),
    "pink": ((240, 130, 180), (215, 90, 150)),
    "brown": ((120, 75, 40), (90, 55, 30)),
    "black": ((10, 10, 12), (30, 30, 35)),
    "white": ((245, 245, 245), (220, 222, 228)),
    "grey": ((128, 128, 132), (95, 95, 100)),
    "gray": ((128, 128, 132), (95, 95, 100)),
    "silver": ((190, 195, 200), (160, 165, 172)),
    "sunset": ((250, 120, 50), (230, 70, 90), (120, 50, 130), (255, 190, 90)),
    "sunrise": ((255, 170, 90), (240, 110, 120), (130, 150, 210)),
    "fire": ((230, 60, 20), (250, 150, 30), (150, 20, 10)),
    "ocean": ((15, 70, 140), (20, 120, 170), (10, 40, 90), (60, 170, 190)),
    "sea": ((20, 90, 150), (40, 140, 170)),
    "sky": ((110, 170, 235), (70, 130, 210), (200, 225, 245)),
    "forest": ((20, 80, 35), (45, 120, 50), (70, 60, 30), (100, 150, 70)),
    "grass": ((80, 160, 60), (50, 120, 40)),
    "night": ((10, 15, 45), (25, 30, 80), (5, 5, 20), (60, 60, 120)),
    "snow": ((235, 240, 250), (200, 215, 235)),
    "desert": ((220, 180, 120), (190, 140, 80), (240, 210, 160)),
}

# Filler words carry no visual meaning; letting them pick colours would dilute the palette.
_STOPWORDS = frozenset(
    {"a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "with", "for", "from", "by"}
    | {"is", "are", "under", "over", "into", "its"}
)

# \w rather than [a-z0-9] so prompts in any script still get their own picture.
_WORD_RE = re.compile(r"\w+")

# Shapes are drawn on a canvas this many times smaller and then upscaled: that is both the
# cheapest way to draw and what gives the picture its soft, painted edges.
_DRAW_SCALE = 2


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _hashed_colour(word: str) -> RGB:
    d = _digest("colour", word)
    # Keep every channel away from the extremes so hashed colours look like paint, not noise.
    return (40 + d[0] % 190, 40 + d[1] % 190, 40 + d[2] % 190)


def _palette(words: Sequence[str]) -> list[RGB]:
    named: list[RGB] = []
    hashed: list[RGB] = []
    for word in words:
        if word in _COLOUR_WORDS:
            named.extend(_COLOUR_WORDS[word])
        elif word not in _STOPWORDS:
            hashed.append(_hashed_colour(word))
    if not named:
        return hashed or [_hashed_colour(""), _hashed_colour("\x00")]
    # Named colours dominate: other words only tint them, so the colour word stays visible.
    anchor = named[int.from_bytes(_digest("anchor", *words)[:4], "big") % len(named)]
    return named + [_mix(c, anchor, 0.7) for c in hashed]


def _vary(colour: RGB, rng: random.Random) -> RGB:
    # Small shifts in lightness keep shapes of one colour distinguishable without losing hue.
    shade = rng.uniform(-0.25, 0.2)
    target: RGB = (255, 255, 255) if shade > 0 else (0, 0, 0)
    return _mix(colour, target, abs(shade))


def _draw(words: list[str], width: int, height: int, seed: int) -> Image.Image:
    palette = _palette(words)
    rng = random.Random(int.from_bytes(_digest("layout", str(seed), *words), "big"))

    w = max(1, -(-width // _DRAW_SCALE))
    h = max(1, -(-height // _DRAW_SCALE))

    # A 2x3 image upscaled bilinearly is a smooth sky gradient at the cost of one resize.
    corners = Image.new("RGB", (2, 3))
    corners.putdata([_vary(rng.choice(palette), rng) for _ in range(6)])
    canvas = corners.resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas, "RGBA")

    # Horizontal bands read as hills or waves and anchor the composition.
    bands = 1 + rng.randrange(3)
    for b in range(bands):
        base_y = h * (0.55 + 0.4 * b / bands + rng.uniform(-0.05, 0.05))
        steps = 6 + rng.randrange(6)
        amp = h * rng.uniform(0.03, 0.12)
        ridge = [(w * i / steps, base_y + amp * rng.uniform(-1.0, 1.0)) for i in range(steps + 1)]
        fill = (*_vary(rng.choice(palette), rng), 150 + rng.randrange(100))
        draw.polygon([*ridge, (w, h), (0, h)], fill=fill)

    # More words give a busier picture, but bounded so big prompts stay fast.
    shapes = min(40, 6 + 3 * len(words))
    short = min(w, h)
    for _ in range(shapes):
        kind = rng.randrange(4)
        fill = (*_vary(rng.choice(palette), rng), 90 + rng.randrange(140))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = short * rng.uniform(0.04, 0.22)
        if kind == 0:
            draw.ellipse((cx - size, cy - size, cx + size, cy + size), fill=fill)
        elif kind == 1:
            aspect = rng.uniform(0.3, 2.5)
            half_w, half_h = size * aspect, size / aspect
            draw.rectangle((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=fill)
        elif kind == 2:
            draw.regular_polygon(
                (cx, cy, size), 3 + rng.randrange(5), rotation=rng.uniform(0, 360), fill=fill
            )
        else:
            points = [
                (cx + size * rng.uniform(-1.5, 1.5), cy + size * rng.uniform(-1.5, 1.5))
                for _ in range(3 + rng.randrange(4))
            ]
            draw.polygon(points, fill=fill)

    canvas = canvas.filter(ImageFilter.BoxBlur(1))
    if (w, h) != (width, height):
        canvas = canvas.resize((width, height), Image.Resampling.BILINEAR)
    return canvas


def render_image(
    prompt: str, width: int, height: int, seed: int = 0, output_format: str = "png"
) -> bytes:
    """Draw the prompt's procedural picture and encode it.

    Raises ``ValueError`` for a non-positive size or an ``output_format`` other than
    "png", "jpeg" or "webp".
    """
    pil_format = _PIL_FORMATS.get(output_format)
    if pil_format is None:
        raise ValueError(f"unsupported output format {output_format!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    image = _draw(_WORD_RE.findall(prompt.lower()), width, height, seed)
    out = io.BytesIO()
    if pil_format == "PNG":
        # Level 1 keeps encoding a 1536x1024 image in the tens of milliseconds.
        image.save(out, "PNG", compress_level=1)
    elif pil_format == "JPEG":
        image.save(out, "JPEG", quality=90)
    else:
        # method=0 is libwebp's fastest; the default spends far longer for little gain here.
        image.save(out, "WEBP", quality=85, method=0)
    return out.getvalue()


_PRECOMPUTED_PROMPT = "precomputed benchmark image: sky ocean gold"


class LocalRenderer:
    """A Provider that draws images locally with :func:`render_image`.

    Image ``i`` of a request uses seed ``(request.seed or 0) + i``. Drawing runs in worker
    threads so the event loop stays responsive.

    With ``precomputed=True`` (a benchmark mode) it draws one fixed picture per
    ``(width, height, output_format)``, caches the bytes, and returns that same bytes object
    for every image of every request, ignoring prompt and seed; benchmarks then measure the
    request path rather than drawing. ``revised_prompt`` is still the request's prompt.
    """

    def __init__(self, name: str = "local", *, precomputed: bool = False) -> None:
        self.name = name
        self._precomputed = precomputed
        self._cache: dict[tuple[int, int, str], bytes] = {}

    def check(self, request: ProviderRequest) -> None:
        if request.output_format not in MIME_TYPES:
            raise InvalidParameter(
                f"unsupported output format {request.output_format!r}", param="output_format"
            )
        if request.width <= 0 or request.height <= 0:
            raise InvalidParameter(f"invalid size {request.size}", param="size")

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        self.check(request)
        mime_type = MIME_TYPES[request.output_format]

        if self._precomputed:
            datas = [await self._precomputed_bytes(request)] * request.n
        else:
            base_seed = request.seed or 0
            datas = list(
                await asyncio.gather(
                    *(
                        asyncio.to_thread(
                            render_image,
                            request.prompt,
                            request.width,
                            request.height,
                            base_seed + i,
                            request.output_format,
                        )
                        for i in range(request.n)
                    )
                )
            )

        images = [
            ProviderImage(
                data=data,
                mime_type=mime_type,
                width=request.width,
                height=request.height,
                revised_prompt=request.prompt,
            )
            for data in datas
        ]
        return ProviderResult(images=images, usage=TokenUsage())

    async def _precomputed_bytes(self, request: ProviderRequest) -> bytes:
        key = (request.width, request.height, request.output_format)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        data = await asyncio.to_thread(
            render_image,
            _PRECOMPUTED_PROMPT,
            request.width,
            request.height,
            0,
            request.output_format,
        )
        # Two first requests may race to render; setdefault makes both return the same object.
        return self._cache.setdefault(key, data)

    async def aclose(self) -> None:
        """Nothing to release: the renderer holds no connections or files."""


def from_config(config: ProviderConfig, credential: str | None) -> LocalRenderer:
    return LocalRenderer(config.name, precomputed=config.precomputed)
