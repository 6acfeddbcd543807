from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest
from PIL import Image, ImageStat

from imagegen_service.errors import InvalidParameter
from imagegen_service.providers.base import ProviderRequest, TokenUsage
from imagegen_service.providers.local import LocalRenderer, render_image


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _mean_rgb(data: bytes) -> tuple[float, float, float]:
    r, g, b = ImageStat.Stat(_open(data).convert("RGB")).mean
    return r, g, b


_BASE_REQUEST = ProviderRequest(
    upstream_model="local",
    prompt="a lighthouse on a cliff",
    n=1,
    width=256,
    height=256,
    quality="standard",
)


def _request(**overrides: Any) -> ProviderRequest:
    return dataclasses.replace(_BASE_REQUEST, **overrides)


@pytest.mark.parametrize(
    ("width", "height"),
    [(256, 256), (512, 512), (1024, 1024), (1536, 1024), (1024, 1536)],
)
def test_png_has_exactly_the_requested_size(width: int, height: int) -> None:
    image = _open(render_image("a lighthouse on a cliff", width, height))
    assert image.format == "PNG"
    assert image.size == (width, height)


def test_odd_sizes_are_still_exact() -> None:
    assert _open(render_image("tiny", 1, 1)).size == (1, 1)
    assert _open(render_image("odd", 333, 77)).size == (333, 77)


def test_same_inputs_give_identical_bytes() -> None:
    first = render_image("a fox in the snow", 512, 512, seed=7)
    second = render_image("a fox in the snow", 512, 512, seed=7)
    assert first == second


def test_a_different_prompt_gives_different_bytes() -> None:
    assert render_image("a fox in the snow", 256, 256) != render_image("a fox in a box", 256, 256)


def test_a_different_seed_gives_different_bytes() -> None:
    assert render_image("a fox", 256, 256, seed=1) != render_image("a fox", 256, 256, seed=2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_red_words_make_the_image_lean_red(seed: int) -> None:
    r, _g, b = _mean_rgb(render_image("red red red", 256, 256, seed=seed))
    assert r > b + 60


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_blue_words_make_the_image_lean_blue(seed: int) -> None:
    r, _g, b = _mean_rgb(render_image("blue ocean", 256, 256, seed=seed))
    assert b > r + 60


def test_a_colour_word_shifts_a_plain_prompt_towards_that_colour() -> None:
    r, _g, b = _mean_rgb(render_image("a red barn", 256, 256))
    assert r > b + 30


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_produce_those_formats(fmt: str, pil_format: str) -> None:
    image = _open(render_image("a harbour at dawn", 512, 256, output_format=fmt))
    assert image.format == pil_format
    assert image.size == (512, 256)


def test_jpeg_and_webp_are_deterministic_too() -> None:
    for fmt in ("jpeg", "webp"):
        assert render_image("x", 256, 256, 3, fmt) == render_image("x", 256, 256, 3, fmt)


@pytest.mark.parametrize("fmt", ["gif", "PNG", "jpg", ""])
def test_an_unknown_format_raises_value_error(fmt: str) -> None:
    with pytest.raises(ValueError, match="format"):
        render_image("a fox", 256, 256, output_format=fmt)


def test_a_non_positive_size_raises_value_error() -> None:
    with pytest.raises(ValueError, match="size"):
        render_image("a fox", 0, 256)


async def test_generate_returns_n_distinct_images_of_the_right_size_and_type() -> None:
    renderer = LocalRenderer()
    result = await renderer.generate(_request(n=3, width=512, height=256, seed=10))
    assert len(result.images) == 3
    assert len({image.data for image in result.images}) == 3
    for image in result.images:
        assert image.mime_type == "image/png"
        assert (image.width, image.height) == (512, 256)
        assert _open(image.data).size == (512, 256)
        assert image.revised_prompt == "a lighthouse on a cliff"
    assert result.usage == TokenUsage()
    await renderer.aclose()


async def test_generate_image_i_uses_seed_plus_i() -> None:
    result = await LocalRenderer().generate(_request(n=2, seed=5))
    assert result.images[0].data == render_image("a lighthouse on a cliff", 256, 256, 5)
    assert result.images[1].data == render_image("a lighthouse on a cliff", 256, 256, 6)


async def test_generate_without_a_seed_starts_from_zero() -> None:
    result = await LocalRenderer().generate(_request(n=1, seed=None))
    assert result.images[0].data == render_image("a lighthouse on a cliff", 256, 256, 0)


@pytest.mark.parametrize(
    ("fmt", "mime"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
async def test_generate_reports_the_mime_type_of_the_output_format(fmt: str, mime: str) -> None:
    result = await LocalRenderer().generate(_request(output_format=fmt))
    assert result.images[0].mime_type == mime
    assert Image.MIME[_open(result.images[0].data).format or ""] == mime


async def test_generate_rejects_an_unknown_format_as_an_invalid_parameter() -> None:
    with pytest.raises(InvalidParameter) as caught:
        await LocalRenderer().generate(_request(output_format="gif"))
    assert caught.value.param == "output_format"


async def test_precomputed_mode_returns_the_identical_bytes_object_every_time() -> None:
    renderer = LocalRenderer("bench", precomputed=True)
    assert renderer.name == "bench"
    first = await renderer.generate(_request(n=2, prompt="one", seed=1))
    second = await renderer.generate(_request(n=1, prompt="two", seed=99))
    data = first.images[0].data
    assert first.images[1].data is data
    assert second.images[0].data is data
    assert second.images[0].revised_prompt == "two"
    assert _open(data).size == (256, 256)


async def test_precomputed_mode_caches_per_size_and_format() -> None:
    renderer = LocalRenderer(precomputed=True)
    png = (await renderer.generate(_request())).images[0]
    wide = (await renderer.generate(_request(width=512))).images[0]
    jpeg = (await renderer.generate(_request(output_format="jpeg"))).images[0]
    assert _open(wide.data).size == (512, 256)
    assert _open(jpeg.data).format == "JPEG"
    assert len({id(png.data), id(wide.data), id(jpeg.data)}) == 3


async def test_a_pillow_failure_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> Image.Image:
        raise OSError("encoder exploded")

    monkeypatch.setattr("imagegen_service.providers.local._draw_frames", broken)
    with pytest.raises(OSError, match="encoder exploded"):
        await LocalRenderer().generate(_request())


@pytest.mark.parametrize("prompt", ["", "a the of", "!!! ???", "日本の風景"])
def test_prompts_without_usable_words_still_render(prompt: str) -> None:
    assert _open(render_image(prompt, 256, 128)).size == (256, 128)


def test_prompts_in_other_scripts_get_their_own_picture() -> None:
    assert render_image("日本の風景", 256, 256) != render_image("Пейзаж", 256, 256)
