"""POST /v1/images/edits on Imagen through the real stack: the official SDK, the gateway, the
service and the Vertex AI Imagen adapter against the loopback fake of ``:predict``."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.fakes.google_imagen_upstream import FakeGoogleImagen, prompt_blocked
from tests.fakes.loopback import image_bytes
from tests.stack import Stack, start_stack

TOKEN = "ya29.stack-edit-token-7f3a"
OPENING = 1_000_000
# The model's price per image, in micro-dollars.
IMAGEN_EDIT = 40_000


def _config_toml(root: str, upstream_url: str) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{root}/data"

        [routing]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.1
        breaker_failures = 1000

        [providers.vertex]
        type = "vertex-imagen"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_VERTEX_EDIT_TOKEN"
        project = "test-project"
        location = "us-central1"
        timeout_seconds = 5
        max_retries = 0

        [models.imagen-edit]
        provider = "vertex"
        upstream_model = "imagen-3.0-capability-001"
        owned_by = "google"
        sizes = ["1024x1024"]
        max_images = 4
        operations = ["generate", "edit"]
        input_formats = ["png", "jpeg", "webp"]
        max_input_images = 1

        [models.imagen-edit.price_usd]
        default = "0.04"
        """
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeGoogleImagen]:
    async with FakeGoogleImagen.vertex_ai(TOKEN) as upstream:
        yield upstream


@pytest.fixture
async def stack(fake: FakeGoogleImagen, tmp_path: Path) -> AsyncIterator[Stack]:
    async with start_stack(
        _config_toml(str(tmp_path), fake.base_url),
        tmp_path,
        environ={"IMAGEGEN_TEST_VERTEX_EDIT_TOKEN": TOKEN},
    ) as running:
        yield running


def _mask(width: int, height: int) -> bytes:
    """OpenAI's convention: the top half transparent (edit), the rest opaque (keep)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width, height // 2))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_an_imagen_edit_through_the_stack_is_charged_exactly_and_a_refusal_not(
    stack: Stack, fake: FakeGoogleImagen
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    source = image_bytes(640, 480)
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="imagen-edit",
            image=("photo.png", source, "image/png"),
            mask=("mask.png", _mask(640, 480), "image/png"),
            prompt="a hot-air balloon in the sky",
            n=2,
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 2
    for item in answer.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) as edited:
            # Imagen edits keep the input's own pixel size.
            assert edited.size == (640, 480)

    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.path.endswith("/models/imagen-3.0-capability-001:predict")
    assert seen.body["parameters"]["editMode"] == "EDIT_MODE_INPAINT_INSERTION"
    assert seen.body["parameters"]["sampleCount"] == 2
    raw_ref, mask_ref = seen.body["instances"][0]["referenceImages"]
    assert base64.b64decode(raw_ref["referenceImage"]["bytesBase64Encoded"]) == source
    encoded_mask = base64.b64decode(mask_ref["referenceImage"]["bytesBase64Encoded"])
    with Image.open(io.BytesIO(encoded_mask)) as mask:
        assert (mask.getpixel((5, 5)), mask.getpixel((5, 470))) == (255, 0)
    await stack.assert_balance(account_id, OPENING - 2 * IMAGEN_EDIT)

    # A refusal costs nothing.
    refused_account, refused_key, _ = await stack.new_account(OPENING)
    fake.script(prompt_blocked())
    async with stack.openai_client(refused_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="imagen-edit",
                image=("photo.png", source, "image/png"),
                mask=("mask.png", _mask(640, 480), "image/png"),
                prompt="something refused",
            )
    assert raised.value.code == "content_policy_violation"
    await stack.assert_not_charged(refused_account, OPENING)
