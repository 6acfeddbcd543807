"""POST /v1/images/edits through the real stack (the official SDK, the gateway, the service)
on Gemini native image (gemini-3.1-flash-image: inlineData parts in generateContent) and on
Azure OpenAI (multipart to the deployment's /images/edits), each against its loopback fake."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from tests.fakes.gemini_upstream import FakeGeminiUpstream, input_images, prompt_blocked
from tests.fakes.loopback import image_bytes
from tests.fakes.openai_upstream import (
    AZURE_API_VERSIONS,
    FakeOpenAIUpstream,
    Form,
    azure_content_policy_violation,
)
from tests.stack import Stack, start_stack

GEMINI_KEY = "AIza-stack-edit-key-77"
AZURE_KEY = "azure-stack-edit-key-0123456789ab"
OPENING = 1_000_000
# Prices, in micro-dollars.
GEMINI_PRICE = 39_000
AZURE_PRICE = 42_000


def _config_toml(root: str, gemini_url: str, azure_url: str) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{root}/data"

        [routing]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.1
        breaker_failures = 1000

        [providers.gemini]
        type = "gemini"
        base_url = "{gemini_url}"
        api_key_env = "IMAGEGEN_TEST_GEMINI_EDIT_KEY"
        timeout_seconds = 5
        max_retries = 0

        [providers.azure]
        type = "azure-openai"
        base_url = "{azure_url}"
        api_key_env = "IMAGEGEN_TEST_AZURE_EDIT_KEY"
        timeout_seconds = 5
        max_retries = 0

        # The family (families.py) fills in sizes, operations and input limits.
        [models."gemini-3.1-flash-image"]
        provider = "gemini"
        owned_by = "google"

        [models."gemini-3.1-flash-image".price_usd]
        default = "0.039"

        [models.azure-gpt-image]
        provider = "azure"
        upstream_model = "gpt-image-1"
        owned_by = "openai"
        sizes = ["1024x1024"]
        max_images = 4
        operations = ["generate", "edit"]

        [models.azure-gpt-image.price_usd]
        default = "0.042"
        """
    )


@pytest.fixture
async def gemini() -> AsyncIterator[FakeGeminiUpstream]:
    async with FakeGeminiUpstream(api_key=GEMINI_KEY) as upstream:
        yield upstream


@pytest.fixture
async def azure() -> AsyncIterator[FakeOpenAIUpstream]:
    async with FakeOpenAIUpstream(
        api_key=AZURE_KEY,
        azure_deployments={"gpt-image-1": "gpt-image-1"},
        azure_api_versions=AZURE_API_VERSIONS,
    ) as upstream:
        yield upstream


@pytest.fixture
async def stack(
    gemini: FakeGeminiUpstream, azure: FakeOpenAIUpstream, tmp_path: Path
) -> AsyncIterator[Stack]:
    async with start_stack(
        _config_toml(str(tmp_path), gemini.base_url, azure.base_url),
        tmp_path,
        environ={
            "IMAGEGEN_TEST_GEMINI_EDIT_KEY": GEMINI_KEY,
            "IMAGEGEN_TEST_AZURE_EDIT_KEY": AZURE_KEY,
        },
    ) as running:
        yield running


def _alpha_mask(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 0, 0)).save(out, "PNG")
    return out.getvalue()


async def test_a_gemini_edit_through_the_stack_is_charged_exactly_and_a_refusal_not(
    stack: Stack, gemini: FakeGeminiUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    source = image_bytes(768, 512)
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="gemini-3.1-flash-image",
            image=("photo.png", source, "image/png"),
            prompt="make the sky stormy",
            size="1536x1024",
            n=2,
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 2
    for item in answer.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) as edited:
            # 1536x1024 is Gemini's 3:2 at the 1K size, made at the model's own 1264x848.
            assert edited.size == (1264, 848)
    assert gemini.hits == 2
    for seen in gemini.requests:
        assert seen.path == "/v1/models/gemini-3.1-flash-image:generateContent"
        assert input_images(seen.body) == [("image/png", source)]
        assert seen.body["contents"][0]["parts"][-1] == {"text": "make the sky stormy"}
        assert seen.body["generationConfig"]["imageConfig"] == {
            "aspectRatio": "3:2",
            "imageSize": "1K",
        }
    await stack.assert_balance(account_id, OPENING - 2 * GEMINI_PRICE)

    # A refusal costs nothing.
    refused_account, refused_key, _ = await stack.new_account(OPENING)
    gemini.script(prompt_blocked())
    async with stack.openai_client(refused_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="gemini-3.1-flash-image",
                image=("photo.png", source, "image/png"),
                prompt="something refused",
                size="1024x1024",
            )
    assert raised.value.code == "content_policy_violation"
    await stack.assert_not_charged(refused_account, OPENING)

    # Gemini takes no mask: refused before any money moves or any call.
    masked_account, masked_key, _ = await stack.new_account(OPENING)
    hits = gemini.hits
    async with stack.openai_client(masked_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="gemini-3.1-flash-image",
                image=("photo.png", source, "image/png"),
                mask=("mask.png", _alpha_mask(768, 512), "image/png"),
                prompt="make the sky stormy",
                size="1024x1024",
            )
    assert raised.value.param == "mask"
    assert gemini.hits == hits
    await stack.assert_untouched(masked_account, OPENING)


async def test_an_azure_edit_through_the_stack_is_charged_exactly_and_a_refusal_not(
    stack: Stack, azure: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    source = image_bytes(1024, 1024)
    mask = _alpha_mask(1024, 1024)
    async with stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="azure-gpt-image",
            image=("photo.png", source, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="add a red door",
            size="1024x1024",
            response_format="b64_json",
        )
    assert answer.data is not None and len(answer.data) == 1
    with Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json or ""))) as edited:
        assert edited.size == (1024, 1024)
    assert azure.hits == 1
    seen = azure.requests[0]
    assert seen.path == "/openai/deployments/gpt-image-1/images/edits"
    assert seen.headers["api-key"] == AZURE_KEY
    assert isinstance(seen.body, Form)
    assert [p.data for p in seen.body.files["image"]] == [source]
    assert [p.data for p in seen.body.files["mask"]] == [mask]
    await stack.assert_balance(account_id, OPENING - AZURE_PRICE)

    refused_account, refused_key, _ = await stack.new_account(OPENING)
    azure.script(azure_content_policy_violation())
    async with stack.openai_client(refused_key) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.edit(
                model="azure-gpt-image",
                image=("photo.png", source, "image/png"),
                prompt="something refused",
                size="1024x1024",
            )
    assert raised.value.code == "content_policy_violation"
    await stack.assert_not_charged(refused_account, OPENING)
