"""Images a caller sends (edits, variations): what they are, by their bytes, never by name.

Only the header is read here (format, size, alpha), so checking sixteen large images costs
microseconds; a file whose header lies is caught when the provider decodes it.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from imagegen_service import errors
from imagegen_service.providers.base import InputImage

# A larger picture is refused before anything decodes it: no upstream takes more, and it
# keeps Pillow's decompression-bomb guard from ever being reached.
MAX_SIDE = 8192

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
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise errors.InvalidParameter(f"The {what} could not be read.", param=param) from None
    if opened != fmt:
        raise errors.InvalidParameter(f"The {what} could not be read.", param=param)
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise errors.InvalidParameter(
            f"The {what} is {width}x{height}; each side must be at most {MAX_SIDE} pixels.",
            param=param,
        )
    return InputImage(data=data, format=fmt, width=width, height=height, has_alpha=has_alpha)
