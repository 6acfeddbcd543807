"""The gpt-image parameters on POST /v1/images/generations: background, output_format,
output_compression, moderation (and quality low|medium|high|auto), accepted by the models
that declare them and refused by the others; the echo fields and OpenAI's usage object."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.conftest import assert_openai_error, bearer
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.images_stack import (
    FAKE_GPT_IMAGE,
    LOCAL_IMAGE,
    LOCAL_IMAGE_LOW,
    ImagesStack,
)

GENERATIONS = "/v1/images/generations"
OPENING = 1_000_000
_USAGE_KEYS = {
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "input_tokens_details",
    "output_tokens",
}


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


async def _generate(
    stack: ImagesStack, http: aiohttp.ClientSession, key: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    body.setdefault("prompt", "a red kite over green hills")
    body.setdefault("size", "256x256")
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        return resp.status, await resp.json()


async def test_the_answer_echoes_the_settings_and_carries_openai_usage(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(
        images_stack, http, key, model="local-image", response_format="b64_json"
    )
    assert status == 200, answer
    assert set(answer) == {
        "created",
        "data",
        "background",
        "output_format",
        "quality",
        "size",
        "usage",
    }
    # auto is made (and priced) as high; the backdrop of an opaque picture is opaque.
    assert (answer["background"], answer["output_format"], answer["quality"], answer["size"]) == (
        "opaque",
        "png",
        "high",
        "256x256",
    )
    assert set(answer["usage"]) == _USAGE_KEYS
    assert answer["usage"]["input_tokens_details"] == {"text_tokens": 0, "image_tokens": 0}
    assert _decode(answer["data"][0]["b64_json"]).size == (256, 256)
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)


async def test_the_sdk_reads_the_echo_fields(images_stack: ImagesStack) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    async with images_stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="local-image",
            prompt="a lantern",
            size="512x512",
            quality="low",
            background="opaque",
            output_format="webp",
            output_compression=60,
            moderation="low",
            response_format="b64_json",
        )
    assert (answer.background, answer.output_format, answer.quality, answer.size) == (
        "opaque",
        "webp",
        "low",
        "512x512",
    )
    assert answer.usage is not None
    assert answer.usage.total_tokens == 0
    assert answer.data is not None
    image = _decode(answer.data[0].b64_json or "")
    assert (image.format, image.size) == ("WEBP", (512, 512))


@pytest.mark.parametrize("output_format", ["png", "webp"])
async def test_a_transparent_background_really_has_alpha(
    images_stack: ImagesStack, http: aiohttp.ClientSession, output_format: str
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(
        images_stack,
        http,
        key,
        model="local-image",
        background="transparent",
        output_format=output_format,
        response_format="b64_json",
        seed=3,
    )
    assert status == 200, answer
    assert answer["background"] == "transparent"
    image = _decode(answer["data"][0]["b64_json"])
    assert image.format == output_format.upper()
    assert image.mode == "RGBA"
    alpha = image.getchannel("A")
    histogram = alpha.histogram()
    # A transparent backdrop behind opaque shapes: both kinds of pixel, plenty of each.
    assert histogram[0] > 256 * 256 // 20
    assert histogram[255] > 256 * 256 // 20


async def test_an_opaque_background_has_no_alpha(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(
        images_stack,
        http,
        key,
        model="local-image",
        background="opaque",
        response_format="b64_json",
    )
    assert status == 200
    assert _decode(answer["data"][0]["b64_json"]).mode == "RGB"


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_jpeg_and_webp_come_in_their_format_and_compression_changes_them(
    images_stack: ImagesStack, http: aiohttp.ClientSession, output_format: str, pil_format: str
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    sizes = []
    for compression in (5, 95):
        status, answer = await _generate(
            images_stack,
            http,
            key,
            model="local-image",
            output_format=output_format,
            output_compression=compression,
            response_format="b64_json",
            seed=9,
        )
        assert status == 200, answer
        assert answer["output_format"] == output_format
        data = base64.b64decode(answer["data"][0]["b64_json"])
        assert _decode(answer["data"][0]["b64_json"]).format == pil_format
        sizes.append(len(data))
    # 0-100 is the encoder's quality: a low number makes a much smaller file.
    assert sizes[0] < sizes[1] / 2


async def test_quality_low_is_priced_low(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(images_stack, http, key, model="local-image", quality="low")
    assert status == 200
    assert answer["quality"] == "low"
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE_LOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("background", "transparent"),
        ("output_format", "png"),
        ("output_compression", 50),
        ("moderation", "low"),
        ("partial_images", 1),
    ],
)
async def test_a_model_without_the_gpt_image_parameters_refuses_each_one(
    images_stack: ImagesStack, http: aiohttp.ClientSession, field: str, value: object
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with http.post(
        images_stack.http_url + GENERATIONS,
        json={"model": "local-sketch", "prompt": "a boat", field: value},
        headers=bearer(key),
    ) as resp:
        error = await assert_openai_error(resp, 400, "invalid_value", param=field)
    assert "local-sketch" in error["message"]
    await images_stack.assert_untouched(account_id, OPENING)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": "transparent", "output_format": "jpeg"}, "background"),
        ({"background": "purple"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"output_format": "webp", "output_compression": -1}, "output_compression"),
        ({"moderation": "strict"}, "moderation"),
        ({"quality": "hd"}, "quality"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
    ],
)
async def test_values_a_gpt_image_model_cannot_take_are_refused(
    images_stack: ImagesStack, http: aiohttp.ClientSession, fields: dict[str, Any], param: str
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with http.post(
        images_stack.http_url + GENERATIONS,
        json={"model": "local-image", "prompt": "a boat", **fields},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 400, "invalid_value", param=param)
    await images_stack.assert_untouched(account_id, OPENING)


@pytest.mark.parametrize(
    ("field", "value"),
    [("stream", "yes"), ("output_compression", "50"), ("background", 1), ("partial_images", 1.5)],
)
async def test_fields_of_the_wrong_json_type_are_400(
    images_stack: ImagesStack, http: aiohttp.ClientSession, field: str, value: object
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with http.post(
        images_stack.http_url + GENERATIONS,
        json={"model": "local-image", "prompt": "a boat", field: value},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 400, "invalid_value", param=field)
    await images_stack.assert_untouched(account_id, OPENING)


async def test_models_without_the_parameters_answer_as_before(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(images_stack, http, key, model="local-sketch")
    assert status == 200
    assert set(answer) == {"created", "data", "usage"}
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_the_parameters_reach_an_openai_gpt_image_upstream(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(
        images_stack,
        http,
        key,
        model="fake-gpt-image",
        prompt="a glass fox",
        size="1024x1024",
        quality="medium",
        background="transparent",
        output_format="webp",
        output_compression=40,
        moderation="low",
    )
    assert status == 200, answer
    sent = images_fake.requests[-1].body
    assert {k: sent[k] for k in ("background", "output_format", "output_compression")} == {
        "background": "transparent",
        "output_format": "webp",
        "output_compression": 40,
    }
    assert (sent["moderation"], sent["quality"]) == ("low", "medium")
    assert "response_format" not in sent
    assert (answer["background"], answer["output_format"], answer["quality"]) == (
        "transparent",
        "webp",
        "medium",
    )
    # The upstream's token usage, in both vocabularies.
    usage = answer["usage"]
    assert usage["input_tokens"] == usage["prompt_tokens"] == 3
    assert usage["input_tokens_details"] == {"text_tokens": 3, "image_tokens": 0}
    assert usage["output_tokens"] == usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert "b64_json" in answer["data"][0] or "url" in answer["data"][0]
    await images_stack.assert_balance(account_id, OPENING - FAKE_GPT_IMAGE)


async def test_a_gpt_image_model_answers_base64_unless_asked_for_urls(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    # OpenAI's gpt-image models always answer b64_json; clients written for them send no
    # response_format and read b64_json. dall-e-style models keep answering URLs.
    _, key, _ = await images_stack.new_account(OPENING)
    status, answer = await _generate(images_stack, http, key, model="local-image")
    assert status == 200, answer
    assert set(answer["data"][0]) >= {"b64_json"} and "url" not in answer["data"][0]
    with Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))) as image:
        assert image.size == (256, 256)
    status, answer = await _generate(
        images_stack, http, key, model="local-image", response_format="url"
    )
    assert status == 200 and answer["data"][0]["url"].startswith(images_stack.http_url)
    status, answer = await _generate(images_stack, http, key, model="local-sketch")
    assert status == 200 and "url" in answer["data"][0] and "b64_json" not in answer["data"][0]
