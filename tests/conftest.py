"""Shared fixtures: the real stack (fake upstream, gRPC service, HTTP gateway) on loopback.

The stack is started once per session. Every test makes its own account through the real
Admin gRPC API, so tests never share money. Helpers for the assertions that several test
files make (OpenAI error shape, untouched balances, image sizes) live here too.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from PIL import Image

from tests import stack as stack_module
from tests.fakes.loopback import free_port
from tests.fakes.openai_upstream import FakeOpenAIUpstream

# The second session stack (gpt-image parameters, streaming, edits, variations).
from tests.images_stack import images_fake, images_stack  # noqa: F401
from tests.stack import ADMIN_METADATA, ADMIN_TOKEN, SIGNING_KEY, start_stack

# Re-exported: test modules import these from here.
__all__ = ["ADMIN_METADATA", "ADMIN_TOKEN", "SIGNING_KEY"]

UPSTREAM_KEY = "sk-upstream-test"
MAX_BODY_BYTES = 65536

# Prices of the test catalog, in micro-dollars.
LOCAL_256 = 1_000
LOCAL_DEFAULT = 2_000
LOCAL_HD = 4_000
FAKE_DALLE = 20_000
DEADEND_DALLE = 30_000


def _config_toml(data_dir: Path, upstream_url: str, dead_port: int) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{data_dir}"
        url_ttl_seconds = 3600
        hold_ttl_seconds = 900

        [gateway]
        max_body_bytes = {MAX_BODY_BYTES}

        # Retries and circuit breakers are exercised by their own tests here: the other
        # providers make one attempt each, and no test's failures open a circuit for the next.
        [routing]
        backoff_base_seconds = 0.05
        backoff_max_seconds = 0.1
        breaker_failures = 1000

        [providers.local]
        type = "local"

        [providers.upstream]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        timeout_seconds = 2
        max_retries = 0

        # The same fake upstream, with one retry.
        [providers.retrying]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        timeout_seconds = 2
        max_retries = 1

        [providers.deadend]
        type = "openai"
        base_url = "http://127.0.0.1:{dead_port}/v1"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        timeout_seconds = 2
        max_retries = 0

        [providers.nokey]
        type = "openai"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "IMAGEGEN_TEST_MISSING_KEY"

        [catalog]
        non_image_models = ["gpt-4o"]

        [models.local-sketch]
        provider = "local"
        owned_by = "imagegen"
        sizes = ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536"]
        default_size = "1024x1024"
        qualities = ["standard", "hd"]
        styles = ["vivid", "natural"]
        max_images = 10
        max_prompt_chars = 4000

        [models.local-sketch.price_usd]
        default = "0.002"
        "256x256" = "0.001"
        "*/hd" = "0.004"

        [models.fake-dalle]
        provider = "upstream"
        upstream_model = "dall-e-2"
        owned_by = "openai"
        sizes = ["256x256", "512x512"]
        max_images = 4

        [models.fake-dalle.price_usd]
        default = "0.02"

        [models.dead-model]
        provider = "deadend"
        sizes = ["256x256"]

        [models.dead-model.price_usd]
        default = "0.01"

        [models.retry-dalle]
        provider = "retrying"
        upstream_model = "dall-e-2"
        owned_by = "openai"
        sizes = ["256x256"]
        max_images = 4

        [models.retry-dalle.price_usd]
        default = "0.02"

        # Tried in order: the dead end (dearer) first, then the fake upstream.
        [models.failover-dalle]
        owned_by = "openai"
        sizes = ["256x256"]
        max_images = 4

        [models.failover-dalle.price_usd]
        default = "0.02"

        [[models.failover-dalle.deployments]]
        provider = "deadend"
        upstream_model = "dall-e-2"

        [models.failover-dalle.deployments.price_usd]
        default = "0.03"

        [[models.failover-dalle.deployments]]
        provider = "upstream"
        upstream_model = "dall-e-2"

        [models.hidden-model]
        provider = "nokey"
        sizes = ["256x256"]

        [models.hidden-model.price_usd]
        default = "0.01"
        """
    )


@dataclass
class Stack(stack_module.Stack):
    """The session's stack (see tests/stack.py), with its fake OpenAI upstream."""

    fake: FakeOpenAIUpstream = field(kw_only=True)


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY) as fake:
        root = tmp_path_factory.mktemp("stack")
        config = _config_toml(root / "data", fake.base_url, free_port())
        async with start_stack(
            config,
            root,
            environ={"IMAGEGEN_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
            stack_class=Stack,
            fake=fake,
        ) as running:
            yield cast(Stack, running)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw HTTP client (no base URL: pass stack.http_url + path)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def fake(stack: Stack) -> Iterator[FakeOpenAIUpstream]:
    """The session's fake upstream, with no leftover script or recorded requests."""
    stack.fake.reset()
    yield stack.fake
    stack.fake.reset()


# -- assertion helpers -------------------------------------------------------------------


def image_size(data: bytes, fmt: str = "PNG") -> tuple[int, int]:
    """Decodes the image fully and returns its pixel size; checks its format."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt
        image.load()
        return image.size


async def assert_openai_error(
    resp: aiohttp.ClientResponse,
    status: int,
    code: str,
    *,
    param: str | None = None,
    error_type: str | None = None,
    should_retry: bool | None = None,
) -> dict[str, Any]:
    """The response is ``status`` with exactly OpenAI's error shape and ``code``."""
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    assert error["code"] == code, error
    assert error["param"] == param, error
    if error_type is not None:
        assert error["type"] == error_type, error
    if should_retry is not None:
        assert resp.headers.get("x-should-retry") == ("true" if should_retry else "false")
    assert resp.headers.get("x-request-id")
    return error  # type: ignore[no-any-return]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
