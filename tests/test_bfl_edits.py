"""POST /v1/images/edits on FLUX.1 Kontext through the real stack: the official SDK, the
gateway, the service and the BFL adapter against the loopback fake of the FLUX API."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.fakes.bfl_upstream import FakeBflUpstream, moderated
from tests.fakes.loopback import image_bytes
from tests.stack import Stack, start_stack

UPSTREAM_KEY = "bfl-stack-key-51c2"
OPENING = 1_000_000
# The model's price, in micro-dollars (BFL's list price for Kontext [pro]).
KONTEXT = 40_000
FILL = 50_000
# FLUX.2 [pro] by megapixel (1024 x 1024 pixels): the first output megapixel, then each
# started input megapixel.
FLUX2_FIRST = 30_000
FLUX2_INPUT = 15_000


def _config_toml(root: str, upstream_url: str) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{root}/data"

        [routing]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.1
        breaker_failures = 1000

        [providers.bfl]
        type = "bfl"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_BFL_EDIT_KEY"
        timeout_seconds = 5
        max_retries = 0
        poll_interval_seconds = 0.01

        [models.flux-kontext-pro]
        provider = "bfl"
        owned_by = "black-forest-labs"
        sizes = ["1024x1024", "1536x1024", "1024x1536"]
        max_images = 2
        operations = ["generate", "edit"]

        [models.flux-kontext-pro.price_usd]
        default = "0.04"

        [models.flux-fill]
        provider = "bfl"
        upstream_model = "flux-pro-1.0-fill"
        sizes = ["1024x1024"]
        max_images = 2
        operations = ["edit"]
        max_input_images = 1

        [models.flux-fill.price_usd]
        default = "0.05"

        [models.flux-2-pro]
        provider = "bfl"
        owned_by = "black-forest-labs"

        [models.flux-2-pro.megapixel_price_usd]
        first = "0.03"
        additional = "0.015"
        input = "0.015"
        """
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeBflUpstream]:
    async with FakeBflUpstream(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


@pytest.fixture
async def stack(fake: FakeBflUpstream, tmp_path: Path) -> AsyncIterator[Stack]:
    async with start_stack(
        _config_toml(str(tmp_path), fake.origin),
        tmp_path,
        environ={"IMAGEGEN_TEST_BFL_EDIT_KEY": UPSTREAM_KEY},
    ) as running:
        yield running


async def test_a_kontext_edit_through_the_stack_is_charged_exactly_and_a_refusal_not(
    stack: Stack, fake: FakeBflUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    source = image_bytes(768, 512)
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="flux-kontext-pro",
            image=("photo.png", source, "image/png"),
            prompt="make the sky stormy",
            n=2,
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 2
    for item in answer.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) as edited:
            # About 1 MP in the input's 3:2, Kontext's own choice of pixels.
            assert edited.size == (1248, 832)
    assert [submit.path for submit in fake.submits] == ["/v1/flux-kontext-pro"] * 2
    assert all(base64.b64decode(s.body["input_image"]) == source for s in fake.submits)
    assert all("aspect_ratio" not in s.body for s in fake.submits)
    await stack.assert_balance(account_id, OPENING - 2 * KONTEXT)

    # A refusal costs nothing.
    refused_account, refused_key, _ = await stack.new_account(OPENING)
    fake.script(moderated("Request Moderated"))
    async with stack.openai_client(refused_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="flux-kontext-pro",
                image=("photo.png", source, "image/png"),
                prompt="something refused",
            )
    assert raised.value.code == "content_policy_violation"
    await stack.assert_not_charged(refused_account, OPENING)

    # Kontext edits by instruction: a mask is refused before any money moves.
    masked_account, masked_key, _ = await stack.new_account(OPENING)
    hits = fake.hits
    mask = io.BytesIO()
    Image.new("RGBA", (768, 512), (0, 0, 0, 0)).save(mask, "PNG")
    async with stack.openai_client(masked_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="flux-kontext-pro",
                image=("photo.png", source, "image/png"),
                mask=("mask.png", mask.getvalue(), "image/png"),
                prompt="make the sky stormy",
            )
    assert raised.value.param == "mask"
    assert fake.hits == hits
    await stack.assert_untouched(masked_account, OPENING)


async def test_a_masked_edit_goes_to_the_fill_model_with_bfls_mask(
    stack: Stack, fake: FakeBflUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    source = image_bytes(512, 256)
    mask = Image.new("RGBA", (512, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (128, 64, 384, 192))
    mask_png = io.BytesIO()
    mask.save(mask_png, "PNG")
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="flux-fill",
            image=("photo.png", source, "image/png"),
            mask=("mask.png", mask_png.getvalue(), "image/png"),
            prompt="a red balloon",
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 1
    with Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or ""))) as edited:
        assert edited.size == (512, 256)
    (submit,) = fake.submits
    assert submit.path == "/v1/flux-pro-1.0-fill"
    assert base64.b64decode(submit.body["image"]) == source
    with Image.open(io.BytesIO(base64.b64decode(submit.body["mask"]))) as sent:
        assert (sent.getpixel((256, 128)), sent.getpixel((10, 10))) == (255, 0)
    await stack.assert_balance(account_id, OPENING - FILL)


async def test_a_flux2_edit_with_several_images_through_the_stack(
    stack: Stack, fake: FakeBflUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    first, second = image_bytes(768, 512), image_bytes(512, 512, "JPEG")
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="flux-2-pro",
            image=[("a.png", first, "image/png"), ("b.jpg", second, "image/jpeg")],
            prompt="put the cat from the second image on the sofa of the first",
            size="1024x1024",
            n=2,
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 2
    for item in answer.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) as edited:
            assert edited.size == (1024, 1024)
    assert [submit.path for submit in fake.submits] == ["/v1/flux-2-pro"] * 2
    for submit in fake.submits:
        assert base64.b64decode(submit.body["input_image"]) == first
        assert base64.b64decode(submit.body["input_image_2"]) == second
        assert (submit.body["width"], submit.body["height"]) == (1024, 1024)
        assert "aspect_ratio" not in submit.body
    # Each image: one output megapixel, plus the inputs' 0.625 MP as one started megapixel.
    await stack.assert_balance(account_id, OPENING - 2 * (FLUX2_FIRST + FLUX2_INPUT))
