"""An upstream image's size read from its header bytes agrees with Pillow for every layout
PNG and WEBP encoders write; anything else goes to Pillow, and garbage is unreadable."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagegen_service.errors import UpstreamError
from imagegen_service.providers.http import HttpUpstream, header_size

SIZES = [(1, 1), (17, 9), (256, 256), (1535, 1023), (3840, 2160), (4097, 33)]


def _encoded(size: tuple[int, int], fmt: str, mode: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 100, 50, 128)[: len(mode)]).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("fmt", "mode", "options", "mime", "chunk"),
    [
        ("PNG", "RGB", {}, "image/png", b"IHDR"),
        ("PNG", "RGBA", {}, "image/png", b"IHDR"),
        ("WEBP", "RGB", {"quality": 80}, "image/webp", b"VP8 "),
        ("WEBP", "RGB", {"lossless": True}, "image/webp", b"VP8L"),
        ("WEBP", "RGBA", {"quality": 80}, "image/webp", b"VP8X"),
    ],
    ids=["png", "png-alpha", "webp-lossy", "webp-lossless", "webp-extended"],
)
def test_the_header_size_is_the_decoded_size(
    size: tuple[int, int],
    fmt: str,
    mode: str,
    options: dict[str, object],
    mime: str,
    chunk: bytes,
) -> None:
    if fmt == "WEBP" and max(size) > 16383:
        pytest.skip("beyond WEBP's limit")
    data = _encoded(size, fmt, mode, **options)
    # The layout under test is the one the encoder wrote.
    assert chunk in data[:40]
    assert header_size(data, mime) == size
    upstream = HttpUpstream("test", timeout_seconds=1, max_connections=1)
    image = upstream.inspect(data, 0)
    assert (image.width, image.height) == size


def test_jpeg_is_left_to_pillow() -> None:
    data = _encoded((300, 200), "JPEG", "RGB")
    assert header_size(data, "image/jpeg") is None
    image = HttpUpstream("test", timeout_seconds=1, max_connections=1).inspect(data, 0)
    assert (image.width, image.height) == (300, 200)


@pytest.mark.parametrize(
    "data",
    [
        # A PNG signature and IEND with no IHDR chunk.
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"\x00\x00\x00\x00IEND\xaeB`\x82",
        # IHDR announcing a zero width.
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"
        + b"\x00\x00\x00\x00\x00\x00\x00\x10"
        + b"\x00" * 20
        + b"\x00\x00\x00\x00IEND\xaeB`\x82",
    ],
    ids=["no-ihdr", "zero-width"],
)
def test_a_png_with_a_broken_header_is_unreadable(data: bytes) -> None:
    with pytest.raises(UpstreamError, match="not an image"):
        HttpUpstream("test", timeout_seconds=1, max_connections=1).inspect(data, 0)
