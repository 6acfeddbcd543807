"""Images a caller sends (edits, variations): what they are, by their bytes, never by name,
and how many pixels decoding them may cost.

Only the header is read here (format, size, alpha), so checking sixteen large images costs
microseconds; a file whose header lies is caught when the provider decodes it.

Decoding is where a small upload becomes a large allocation: a 63 KiB PNG of zeros can say
8192x8192, 64 Mi pixels, about 600 MiB while the local renderer decodes it. So decoding has
a budget, counted in pixels from the headers before anything is decoded:

* per request, ``MAX_REQUEST_PIXELS``: what the providers that may serve the request would
  decode for it (``decode_pixels``); more is the caller's 400 on ``image``;
* per process, ``MAX_PROCESS_PIXELS``: what all requests in flight may be decoding at once
  (``DecodeBudget``); a request that does not fit now is told to retry (429, Retry-After).
"""

from __future__ import annotations

import contextlib
import enum
import io
import warnings
from collections.abc import Iterable, Iterator, Sequence

from PIL import Image

from imagegen_service import errors
from imagegen_service.providers.base import InputImage

# A larger picture is refused before anything decodes it: no upstream takes more.
MAX_SIDE = 8192
# Pillow's own guard, set deliberately for every decode in the process (the adapters' and
# the local renderer's included): it warns above this many pixels and raises
# DecompressionBombError above twice as many. Nothing that passed ``inspect`` reaches it.
MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Decoding costs about 10 bytes per pixel at its peak (the local renderer holds the decoded
# image, a copy and an RGBA conversion), so one request's budget, a single 8192x8192 image,
# peaks near 650 MiB, and the process's, two such requests, near 1.3 GiB: below the 2 GiB
# the production overlay gives a service pod, with room for the requests themselves.
MAX_REQUEST_PIXELS = MAX_IMAGE_PIXELS
MAX_PROCESS_PIXELS = 2 * MAX_REQUEST_PIXELS
# A request refused for want of budget may retry after this long: decodes take seconds.
DECODE_RETRY_AFTER_SECONDS = 1

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def sniff_format(data: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` from the magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def inspect(data: bytes, *, param: str, what: str = "image") -> InputImage:
    """Format, size and alpha of one uploaded image; InvalidParameter naming ``param``."""
    if not data:
        raise errors.InvalidParameter(f"The {what} is empty.", param=param)
    fmt = sniff_format(data)
    if fmt is None:
        raise errors.InvalidParameter(
            f"The {what} is not a PNG, JPEG or WEBP image.",
            param=param,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                mode = image.mode
                has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
                    mode in ("P", "L", "RGB") and "transparency" in image.info
                )
                opened = _PIL_FORMATS.get(image.format or "")
                if opened == "png":
                    # Walks the chunks and their checksums without decoding: a cut-off or
                    # corrupted PNG is refused here, before any money moves.
                    image.verify()
    except Image.DecompressionBombError:
        # Pillow refuses to open more than twice MAX_IMAGE_PIXELS: some side is over MAX_SIDE.
        raise errors.InvalidParameter(
            f"The {what} is larger than {MAX_SIDE}x{MAX_SIDE} pixels; each side must be at "
            f"most {MAX_SIDE} pixels.",
            param=param,
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise errors.InvalidParameter(f"The {what} could not be read.", param=param) from None
    if opened != fmt:
        raise errors.InvalidParameter(f"The {what} could not be read.", param=param)
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise errors.InvalidParameter(
            f"The {what} is {width}x{height}; each side must be at most {MAX_SIDE} pixels.",
            param=param,
        )
    return InputImage(data=data, format=fmt, width=width, height=height, has_alpha=has_alpha)


class Decoding(enum.Enum):
    """What a provider decodes of a request's input images while it serves the request."""

    # The caller's bytes go upstream as they came.
    NONE = "none"
    # The first image and the mask, once (converted to the upstream's mask or format).
    FIRST_AND_MASK = "first_and_mask"
    # Every image and the mask, once per image made, the images drawn in parallel threads
    # (one after another when streamed): the local renderer.
    EVERY_INPUT_PER_IMAGE = "every_input_per_image"


# By the module that defines the provider's class (or one of its bases). Every provider the
# registry can build is listed (tests/test_hostile_service.py checks it); a provider found
# nowhere here is taken to decode as much as the local renderer does.
DECODING: dict[str, Decoding] = {
    "imagegen_service.providers.local": Decoding.EVERY_INPUT_PER_IMAGE,
    "imagegen_service.providers.stability": Decoding.FIRST_AND_MASK,
    "imagegen_service.providers.bfl": Decoding.FIRST_AND_MASK,
    "imagegen_service.providers.google_imagen": Decoding.FIRST_AND_MASK,
    "imagegen_service.providers.openai_compat": Decoding.NONE,
    "imagegen_service.providers.gemini_image": Decoding.NONE,
}


def decoding_of(provider: object) -> Decoding:
    for cls in type(provider).__mro__:
        found = DECODING.get(cls.__module__)
        if found is not None:
            return found
    return Decoding.EVERY_INPUT_PER_IMAGE


def decode_pixels(
    providers: Iterable[object],
    images: Sequence[InputImage],
    mask: InputImage | None,
    *,
    n: int,
    stream: bool,
) -> int:
    """The most pixels any of ``providers`` (the deployments that may serve the request, in
    turn) would hold decoded at once for these inputs. Header sizes only: nothing decodes."""
    mask_pixels = mask.width * mask.height if mask is not None else 0
    every = sum(image.width * image.height for image in images) + mask_pixels
    first = (images[0].width * images[0].height if images else 0) + mask_pixels
    most = 0
    for provider in providers:
        decoding = decoding_of(provider)
        if decoding is Decoding.EVERY_INPUT_PER_IMAGE:
            most = max(most, every if stream else every * n)
        elif decoding is Decoding.FIRST_AND_MASK:
            most = max(most, first)
    return most


def check_request_pixels(pixels: int) -> None:
    """InvalidParameter on ``image`` when one request would decode more than its budget."""
    if pixels > MAX_REQUEST_PIXELS:
        raise errors.InvalidParameter(
            f"Decoding the input images of this request would take {pixels:,} pixels (each "
            f"image and the mask, once per image asked for where the model draws them here); "
            f"the limit is {MAX_REQUEST_PIXELS:,} pixels per request. Send smaller images or "
            "ask for fewer.",
            param="image",
        )


class DecodeBudget:
    """The pixels this process's requests may be decoding at once.

    A request reserves what it may decode (``decode_pixels``) before any money moves and
    gives it back when it ends; one that does not fit is refused at once with RateLimited
    (429 and Retry-After), never queued, so a flood of bombs costs the process no memory.
    Used on the event loop only, so it needs no lock.
    """

    def __init__(self, max_pixels: int = MAX_PROCESS_PIXELS) -> None:
        self.max_pixels = max_pixels
        self.in_use = 0

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        if self.in_use + pixels > self.max_pixels:
            raise errors.RateLimited(
                "The service is decoding as many input images as it can hold at once. "
                f"Retry in {DECODE_RETRY_AFTER_SECONDS} second(s).",
                retry_after_seconds=DECODE_RETRY_AFTER_SECONDS,
            )
        self.in_use += pixels
        try:
            yield
        finally:
            self.in_use -= pixels
