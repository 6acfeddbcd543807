"""A second session stack for the rest of the Images API: the gpt-image parameters,
streaming, edits and variations. It has a catalog of its own (so the session stack's model
list stays what its tests expect) and a fake OpenAI upstream of its own.

Models:

* ``local-image``: the local renderer with every gpt-image parameter, streaming, edits and
  variations; files up to ``LOCAL_IMAGE_MAX_FILE`` bytes.
* ``local-sketch``: the local renderer as the session stack has it: none of that.
* ``fake-gpt-image``: gpt-image-1 on the fake upstream (parameters, streaming, edits).
* ``fake-dalle``: dall-e-2 on the fake upstream (edits and variations of one PNG < 4 MB).

The gateway takes multipart bodies up to ``MAX_UPLOAD_BYTES``.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests import stack as stack_module
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.stack import start_stack

UPSTREAM_KEY = "sk-upstream-images"
MAX_UPLOAD_BYTES = 3 * 1024 * 1024
LOCAL_IMAGE_MAX_FILE = 2 * 1024 * 1024

# Prices, in micro-dollars.
LOCAL_IMAGE = 3_000
LOCAL_IMAGE_LOW = 1_000
LOCAL_SKETCH = 1_000
FAKE_GPT_IMAGE = 50_000
FAKE_DALLE = 20_000

GPT_IMAGE_PARAMETERS = (
    '["background", "output_format", "output_compression", "moderation", "partial_images"]'
)


def _config_toml(data_dir: Path, upstream_url: str) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{data_dir}"

        [gateway]
        max_upload_bytes = {MAX_UPLOAD_BYTES}

        [routing]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.1
        breaker_failures = 1000

        [providers.local]
        type = "local"

        [providers.upstream]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_IMAGES_UPSTREAM_KEY"
        timeout_seconds = 5
        max_retries = 0

        [models.local-image]
        provider = "local"
        sizes = ["256x256", "512x512", "1024x1024"]
        qualities = ["auto", "low", "medium", "high"]
        default_quality = "auto"
        max_images = 4
        parameters = {GPT_IMAGE_PARAMETERS}
        operations = ["generate", "edit", "variation"]
        max_input_image_bytes = {LOCAL_IMAGE_MAX_FILE}

        [models.local-image.price_usd]
        default = "0.003"
        "*/low" = "0.001"

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256"]
        max_images = 4

        [models.local-sketch.price_usd]
        default = "0.001"

        [models.fake-gpt-image]
        provider = "upstream"
        upstream_model = "gpt-image-1"
        owned_by = "openai"
        sizes = ["1024x1024"]
        qualities = ["auto", "low", "medium", "high"]
        default_quality = "auto"
        max_images = 4
        parameters = {GPT_IMAGE_PARAMETERS}
        operations = ["generate", "edit"]

        [models.fake-gpt-image.price_usd]
        default = "0.05"

        [models.fake-dalle]
        provider = "upstream"
        upstream_model = "dall-e-2"
        owned_by = "openai"
        sizes = ["256x256", "512x512"]
        max_images = 4
        operations = ["generate", "edit", "variation"]
        input_formats = ["png"]
        max_input_images = 1
        max_input_image_bytes = 4194304

        [models.fake-dalle.price_usd]
        default = "0.02"
        """
    )


@dataclass
class ImagesStack(stack_module.Stack):
    fake: FakeOpenAIUpstream = field(kw_only=True)


@pytest.fixture(scope="session")
async def images_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ImagesStack]:
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY) as fake:
        root = tmp_path_factory.mktemp("images-stack")
        async with start_stack(
            _config_toml(root / "data", fake.base_url),
            root,
            environ={"IMAGEGEN_TEST_IMAGES_UPSTREAM_KEY": UPSTREAM_KEY},
            stack_class=ImagesStack,
            fake=fake,
        ) as running:
            yield cast(ImagesStack, running)


@pytest.fixture
def images_fake(images_stack: ImagesStack) -> Iterator[FakeOpenAIUpstream]:
    """The images stack's fake upstream, with no leftover script or recorded requests."""
    images_stack.fake.reset()
    yield images_stack.fake
    images_stack.fake.reset()
