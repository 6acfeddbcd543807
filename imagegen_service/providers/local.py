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
import contextlib
import hashlib
import io
import random
import re
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from imagegen_service.config import ProviderConfig
from imagegen_service.errors import InvalidParameter
from imagegen_service.providers.base import (
    PartialImage,
    ProviderImage,
    ProviderRequest,
    ProviderResult,
    StreamEvent,
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


def _draw_frames(
    words: list[str],
    width: int,
    height: int,
    seed: int,
    *,
    frames: int = 1,
    transparent: bool = False,
    extra_palette: Sequence[RGB] = (),
) -> Iterator[Image.Image]:
    """The prompt's picture, drawn progressively: ``frames`` images at the final size, the
    first ones with only a leading share of the shapes, the last one complete.

    With ``transparent`` the sky is left out: the images are RGBA, opaque where a band or
    shape was drawn and transparent behind them.
    """
    palette = _palette(words) + list(extra_palette)
    rng = random.Random(int.from_bytes(_digest("layout", str(seed), *words), "big"))

    w = max(1, -(-width // _DRAW_SCALE))
    h = max(1, -(-height // _DRAW_SCALE))

    # A 2x3 image upscaled bilinearly is a smooth sky gradient at the cost of one resize.
    corners = Image.new("RGB", (2, 3))
    corners.putdata([_vary(rng.choice(palette), rng) for _ in range(6)])
    canvas = corners.resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas, "RGBA")
    # Where something was drawn: the alpha channel of a transparent picture.
    cover = Image.new("L", (w, h), 0) if transparent else None
    cover_draw = ImageDraw.Draw(cover) if cover is not None else None

    # Horizontal bands read as hills or waves and anchor the composition.
    bands = 1 + rng.randrange(3)
    for b in range(bands):
        base_y = h * (0.55 + 0.4 * b / bands + rng.uniform(-0.05, 0.05))
        steps = 6 + rng.randrange(6)
        amp = h * rng.uniform(0.03, 0.12)
        ridge = [(w * i / steps, base_y + amp * rng.uniform(-1.0, 1.0)) for i in range(steps + 1)]
        fill = (*_vary(rng.choice(palette), rng), 150 + rng.randrange(100))
        draw.polygon([*ridge, (w, h), (0, h)], fill=fill)
        if cover_draw is not None:
            cover_draw.polygon([*ridge, (w, h), (0, h)], fill=255)

    # More words give a busier picture, but bounded so big prompts stay fast.
    shapes = min(40, 6 + 3 * len(words))
    short = min(w, h)
    # Every shape's parameters come from the generator in the same order whatever the
    # number of frames, so each partial frame is a true prefix of the final picture.
    for frame in range(frames):
        first = shapes * frame // frames
        last = shapes * (frame + 1) // frames
        for _ in range(first, last):
            _draw_shape(draw, cover_draw, rng, palette, w, h, short)
        picture: Image.Image = canvas.filter(ImageFilter.BoxBlur(1))
        if cover is not None:
            picture = picture.convert("RGBA")
            picture.putalpha(cover.filter(ImageFilter.BoxBlur(1)))
        if (w, h) != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
        yield picture


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    cover: ImageDraw.ImageDraw | None,
    rng: random.Random,
    palette: Sequence[RGB],
    w: int,
    h: int,
    short: int,
) -> None:
    kind = rng.randrange(4)
    fill = (*_vary(rng.choice(palette), rng), 90 + rng.randrange(140))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    size = short * rng.uniform(0.04, 0.22)
    targets = [(draw, fill)] + ([(cover, 255)] if cover is not None else [])
    if kind == 0:
        for target, ink in targets:
            target.ellipse((cx - size, cy - size, cx + size, cy + size), fill=ink)
    elif kind == 1:
        aspect = rng.uniform(0.3, 2.5)
        half_w, half_h = size * aspect, size / aspect
        for target, ink in targets:
            target.rectangle((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=ink)
    elif kind == 2:
        sides, rotation = 3 + rng.randrange(5), rng.uniform(0, 360)
        for target, ink in targets:
            target.regular_polygon((cx, cy, size), sides, rotation=rotation, fill=ink)
    else:
        points = [
            (cx + size * rng.uniform(-1.5, 1.5), cy + size * rng.uniform(-1.5, 1.5))
            for _ in range(3 + rng.randrange(4))
        ]
        for target, ink in targets:
            target.polygon(points, fill=ink)


def _encode(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    """``compression`` is OpenAI's output_compression (0-100, 100 the finest): the JPEG or
    WEBP quality. None keeps the defaults below."""
    pil_format = _PIL_FORMATS.get(output_format)
    if pil_format is None:
        raise ValueError(f"unsupported output format {output_format!r}")
    out = io.BytesIO()
    if pil_format == "PNG":
        # Level 1 keeps encoding a 1536x1024 image in the tens of milliseconds.
        image.save(out, "PNG", compress_level=1)
    elif pil_format == "JPEG":
        image.convert("RGB").save(out, "JPEG", quality=90 if compression is None else compression)
    else:
        # method=0 is libwebp's fastest; the default spends far longer for little gain here.
        image.save(out, "WEBP", quality=85 if compression is None else compression, method=0)
    return out.getvalue()


def _check(width: int, height: int, output_format: str) -> None:
    if output_format not in _PIL_FORMATS:
        raise ValueError(f"unsupported output format {output_format!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def render_image(
    prompt: str,
    width: int,
    height: int,
    seed: int = 0,
    output_format: str = "png",
    *,
    background: str = "auto",
    compression: int | None = None,
) -> bytes:
    """Draw the prompt's procedural picture and encode it.

    Raises ``ValueError`` for a non-positive size or an ``output_format`` other than
    "png", "jpeg" or "webp".
    """
    return render_frames(
        prompt,
        width,
        height,
        seed,
        output_format,
        background=background,
        compression=compression,
    )[-1]


def render_frames(
    prompt: str,
    width: int,
    height: int,
    seed: int = 0,
    output_format: str = "png",
    *,
    partials: int = 0,
    background: str = "auto",
    compression: int | None = None,
) -> list[bytes]:
    """``partials`` progressive renders, then the finished picture (the same bytes as
    :func:`render_image` gives), all encoded at the final size."""
    _check(width, height, output_format)
    frames = _draw_frames(
        _WORD_RE.findall(prompt.lower()),
        width,
        height,
        seed,
        frames=partials + 1,
        transparent=background == "transparent",
    )
    return [_encode(frame, output_format, compression) for frame in frames]


def _open_rgba(data: bytes, size: tuple[int, int]) -> Image.Image:
    """A caller's image, decoded, as RGBA at ``size``."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise InvalidParameter("The image could not be decoded.", param="image") from None
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def _average_colours(image: Image.Image) -> list[RGB]:
    """The mean colours of the image's four quadrants: a palette taken from a picture."""
    quads = image.convert("RGB").resize((2, 2), Image.Resampling.BOX)
    return [quads.getpixel((x, y)) for y in range(2) for x in range(2)]  # type: ignore[misc]


def edit_frames(
    prompt: str,
    images: Sequence[bytes],
    mask: bytes | None,
    width: int,
    height: int,
    seed: int = 0,
    output_format: str = "png",
    *,
    partials: int = 0,
    background: str = "auto",
    compression: int | None = None,
) -> list[bytes]:
    """The prompt's picture painted into the first image where the mask is transparent
    (alpha 0), every other pixel left as it was; without a mask, blended over the whole
    image. Further images lend their colours to the palette. Progressive like
    :func:`render_frames`."""
    _check(width, height, output_format)
    size = (width, height)
    base = _open_rgba(images[0], size)
    palette = [c for data in images[1:] for c in _average_colours(_open_rgba(data, size))]
    if mask is None:
        region = Image.new("L", size, 128)
    else:
        alpha = _open_rgba(mask, size).getchannel("A")
        region = alpha.point(lambda a: 255 if a == 0 else 0)
    # Keep alpha only where the result can have it: asked for, or carried by the input.
    keep_alpha = output_format != "jpeg" and (
        background == "transparent"
        or (background == "auto" and base.getchannel("A").getextrema()[0] != 255)
    )
    words = _WORD_RE.findall(prompt.lower())
    frames = _draw_frames(
        words,
        width,
        height,
        int.from_bytes(_digest("edit", str(seed), hashlib.sha256(images[0]).hexdigest())[:4]),
        frames=partials + 1,
        transparent=background == "transparent",
        extra_palette=palette,
    )
    out = []
    for frame in frames:
        edited = Image.composite(frame.convert("RGBA"), base, region)
        out.append(
            _encode(edited if keep_alpha else edited.convert("RGB"), output_format, compression)
        )
    return out


def vary_image(
    image: bytes,
    width: int,
    height: int,
    seed: int = 0,
    output_format: str = "png",
    *,
    compression: int | None = None,
) -> bytes:
    """A variation of ``image``: recoloured (a hue turn), sometimes mirrored, and overlaid
    with a few translucent shapes in the picture's own colours. The same image and seed
    always give the same bytes; another seed gives another variation."""
    _check(width, height, output_format)
    base = _open_rgba(image, (width, height)).convert("RGB")
    rng = random.Random(
        int.from_bytes(_digest("vary", str(seed), hashlib.sha256(image).hexdigest()), "big")
    )
    palette = _average_colours(base)
    shift = round(rng.uniform(0.1, 0.9) * 256)
    hue, sat, val = base.convert("HSV").split()
    hue = hue.point(lambda x: (x + shift) % 256)
    varied = Image.merge("HSV", (hue, sat, val)).convert("RGB")
    if rng.random() < 0.5:
        varied = ImageOps.mirror(varied)
    draw = ImageDraw.Draw(varied, "RGBA")
    short = min(width, height)
    for _ in range(4 + rng.randrange(6)):
        _draw_shape(draw, None, rng, palette, width, height, short)
    return _encode(varied, output_format, compression)


_PRECOMPUTED_PROMPT = "precomputed benchmark image: sky ocean gold"


class LocalRenderer:
    """A Provider that draws images locally with :func:`render_image`; it also edits
    (:func:`edit_frames`), makes variations (:func:`vary_image`) and streams real
    progressive renders (each partial shows a leading share of the final picture's shapes).

    Image ``i`` of a request uses seed ``(request.seed or 0) + i``. Drawing runs in worker
    threads so the event loop stays responsive.

    With ``precomputed=True`` (a benchmark mode) it draws one fixed picture per
    ``(width, height, output_format)``, caches the bytes, and returns that same bytes object
    for every image of every generation, ignoring prompt and seed; benchmarks then measure
    the request path rather than drawing. ``revised_prompt`` is still the request's prompt.
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
        if self._precomputed:
            datas = [await self._precomputed_bytes(request)] * request.n
        else:
            datas = await self._each_image(
                request, lambda seed: self._generate_frames(request, seed)
            )
        return self._result(request, datas)

    async def edit(self, request: ProviderRequest) -> ProviderResult:
        self.check(request)
        return self._result(
            request, await self._each_image(request, lambda seed: self._edit_frames(request, seed))
        )

    async def vary(self, request: ProviderRequest) -> ProviderResult:
        self.check(request)
        if not request.images:
            raise InvalidParameter("A variation needs an image.", param="image")

        def one(seed: int) -> list[bytes]:
            return [
                vary_image(
                    request.images[0].data,
                    request.width,
                    request.height,
                    seed,
                    request.output_format,
                    compression=request.output_compression,
                )
            ]

        return self._result(request, await self._each_image(request, one))

    async def generate_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]:
        self.check(request)
        async with contextlib.aclosing(
            self._stream(request, lambda seed: self._generate_frames(request, seed))
        ) as events:
            async for event in events:
                yield event

    async def edit_stream(self, request: ProviderRequest) -> AsyncGenerator[StreamEvent]:
        self.check(request)
        async with contextlib.aclosing(
            self._stream(request, lambda seed: self._edit_frames(request, seed))
        ) as events:
            async for event in events:
                yield event

    # -- drawing -----------------------------------------------------------------------------

    def _generate_frames(self, request: ProviderRequest, seed: int) -> list[bytes]:
        return render_frames(
            request.prompt,
            request.width,
            request.height,
            seed,
            request.output_format,
            partials=request.partial_images,
            background=request.background,
            compression=request.output_compression,
        )

    def _edit_frames(self, request: ProviderRequest, seed: int) -> list[bytes]:
        if not request.images:
            raise InvalidParameter("An edit needs an image.", param="image")
        return edit_frames(
            request.prompt,
            [image.data for image in request.images],
            request.mask.data if request.mask is not None else None,
            request.width,
            request.height,
            seed,
            request.output_format,
            partials=request.partial_images,
            background=request.background,
            compression=request.output_compression,
        )

    async def _each_image(
        self, request: ProviderRequest, frames: Callable[[int], list[bytes]]
    ) -> list[bytes]:
        """Every image's finished bytes, drawn concurrently in worker threads."""
        base_seed = request.seed or 0
        drawn = await asyncio.gather(
            *(asyncio.to_thread(frames, base_seed + i) for i in range(request.n))
        )
        return [images[-1] for images in drawn]

    async def _stream(
        self, request: ProviderRequest, frames: Callable[[int], list[bytes]]
    ) -> AsyncGenerator[StreamEvent]:
        """Image by image, in order: its partial renders, then the image."""
        mime_type = MIME_TYPES[request.output_format]
        base_seed = request.seed or 0
        for i in range(request.n):
            drawn = await asyncio.to_thread(frames, base_seed + i)
            for k, data in enumerate(drawn[:-1]):
                yield PartialImage(i, k, data, mime_type, request.width, request.height)
            yield self._image(request, drawn[-1])
        yield TokenUsage()

    def _image(self, request: ProviderRequest, data: bytes) -> ProviderImage:
        return ProviderImage(
            data=data,
            mime_type=MIME_TYPES[request.output_format],
            width=request.width,
            height=request.height,
            revised_prompt=request.prompt,
        )

    def _result(self, request: ProviderRequest, datas: list[bytes]) -> ProviderResult:
        return ProviderResult(images=[self._image(request, d) for d in datas], usage=TokenUsage())

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
