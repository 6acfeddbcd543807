"""POST /v1/images/edits on Stability through the real stack: the official SDK, the gateway,
the service and the Stability adapter against the loopback fake of its inpaint endpoint."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.fakes.loopback import image_bytes
from tests.fakes.stability_upstream import FakeStabilityUpstream, content_moderation
from tests.stack import Stack, start_stack

UPSTREAM_KEY = "sk-stability-stack-7d1e"
OPENING = 1_000_000
# The model's price, in micro-dollars (Stable Image Core's list price).
CORE = 30_000


def _config_toml(root: str, upstream_url: str) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{root}/data"

        [routing]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.1
        breaker_failures = 1000

        [providers.stability]
        type = "stability"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_STABILITY_EDIT_KEY"
        timeout_seconds = 5
        max_retries = 0

        [models.stable-image-core]
        provider = "stability"
        owned_by = "stability"
        sizes = ["1024x1024", "1536x1024", "1024x1536"]
        max_images = 2
        operations = ["generate", "edit"]
        max_input_images = 1

        [models.stable-image-core.price_usd]
        default = "0.03"
        """
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeStabilityUpstream]:
    async with FakeStabilityUpstream(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


@pytest.fixture
async def stack(fake: FakeStabilityUpstream, tmp_path: Path) -> AsyncIterator[Stack]:
    async with start_stack(
        _config_toml(str(tmp_path), fake.base_url),
        tmp_path,
        environ={"IMAGEGEN_TEST_STABILITY_EDIT_KEY": UPSTREAM_KEY},
    ) as running:
        yield running


def _mask(size: tuple[int, int], hole: tuple[int, int, int, int]) -> bytes:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), hole)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def test_a_stability_inpaint_through_the_stack_is_charged_exactly_and_a_refusal_not(
    stack: Stack, fake: FakeStabilityUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    source = image_bytes(768, 512)
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="stable-image-core",
            image=("photo.png", source, "image/png"),
            mask=("mask.png", _mask((768, 512), (100, 100, 300, 300)), "image/png"),
            prompt="a red door",
            n=2,
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 2
    for item in answer.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) as edited:
            # Stability's inpaint answers at the input's own size.
            assert edited.size == (768, 512)
    assert [r.path for r in fake.requests] == ["/v2beta/stable-image/edit/inpaint"] * 2
    for seen in fake.requests:
        assert seen.body["image"] == source
        with Image.open(io.BytesIO(seen.body["mask"])) as mask:
            assert (mask.getpixel((200, 200)), mask.getpixel((500, 400))) == (255, 0)
    await stack.assert_balance(account_id, OPENING - 2 * CORE)

    # A refusal costs nothing.
    refused_account, refused_key, _ = await stack.new_account(OPENING)
    fake.script(content_moderation())
    async with stack.openai_client(refused_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="stable-image-core",
                image=("photo.png", source, "image/png"),
                prompt="something refused",
            )
    assert raised.value.code == "content_policy_violation"
    await stack.assert_not_charged(refused_account, OPENING)
