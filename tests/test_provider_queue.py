"""A provider's max_concurrency is a queue with a bound: a call waits at most
max_queue_seconds for a slot, the wait is measured, and past the bound the next deployment is
tried or, with none left, the caller gets 503 with Retry-After, its hold released."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import assert_openai_error, bearer
from tests.fakes import openai_upstream as oai
from tests.stack import Stack, start_stack

KEY = "sk-queue-upstream-0123456789"
OPENING = 1_000_000
PRICE = 10_000
SLOW_SECONDS = 1.0


def _config(narrow_url: str, wide_url: str) -> str:
    return textwrap.dedent(
        f"""
        [providers.narrow]
        type = "openai"
        base_url = "{narrow_url}"
        api_key_env = "IMAGEGEN_TEST_QUEUE_KEY"
        max_concurrency = 1
        max_queue_seconds = 0.2
        max_retries = 0

        [providers.wide]
        type = "openai"
        base_url = "{wide_url}"
        api_key_env = "IMAGEGEN_TEST_QUEUE_KEY"
        max_retries = 0

        [models.narrow-only]
        provider = "narrow"
        upstream_model = "gpt-image-1.5"
        sizes = ["1024x1024"]
        max_images = 1

        [models.narrow-only.price_usd]
        default = "0.01"

        [models.narrow-then-wide]
        sizes = ["1024x1024"]
        max_images = 1

        [models.narrow-then-wide.price_usd]
        default = "0.01"

        [[models.narrow-then-wide.deployments]]
        provider = "narrow"
        upstream_model = "gpt-image-1.5"

        [[models.narrow-then-wide.deployments]]
        provider = "wide"
        upstream_model = "gpt-image-1.5"
        """
    )


@dataclass
class World:
    stack: Stack
    narrow: oai.FakeOpenAIUpstream
    wide: oai.FakeOpenAIUpstream


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with (
        oai.FakeOpenAIUpstream(api_key=KEY, default=oai.slow(SLOW_SECONDS)) as narrow,
        oai.FakeOpenAIUpstream(api_key=KEY) as wide,
        start_stack(
            _config(narrow.base_url, wide.base_url),
            tmp_path_factory.mktemp("queue"),
            environ={"IMAGEGEN_TEST_QUEUE_KEY": KEY},
        ) as stack,
    ):
        yield World(stack, narrow, wide)


async def _post(
    world: World, http: aiohttp.ClientSession, key: str, model: str
) -> tuple[int, dict[str, str], dict[str, object]]:
    async with http.post(
        world.stack.http_url + "/v1/images/generations",
        json={"model": model, "prompt": "a lighthouse", "quality": "low"},
        headers=bearer(key),
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def _sample(world: World, name: str, **labels: str) -> float:
    value = world.stack.running.pipeline.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_past_the_queue_bound_the_caller_gets_503_with_retry_after_and_pays_nothing(
    world: World, http: aiohttp.ClientSession
) -> None:
    world.narrow.reset()
    account_id, key, _ = await world.stack.new_account(OPENING)
    full_before = _sample(world, "imagegen_provider_queue_full_total", provider="narrow")
    first = asyncio.create_task(_post(world, http, key, "narrow-only"))
    await asyncio.sleep(0.1)  # the first call holds narrow's only slot for a second
    async with http.post(
        world.stack.http_url + "/v1/images/generations",
        json={"model": "narrow-only", "prompt": "a lighthouse", "quality": "low"},
        headers=bearer(key),
    ) as resp:
        error = await assert_openai_error(resp, 503, "service_unavailable", should_retry=True)
        assert resp.headers["Retry-After"] == "1"
    assert "concurrency limit" in error["message"]
    status, _, _ = await first
    assert status == 200
    # Only the first reached the upstream; only it is charged.
    assert world.narrow.hits == 1
    await world.stack.assert_balance(account_id, OPENING - PRICE)
    assert _sample(world, "imagegen_provider_queue_full_total", provider="narrow") == (
        full_before + 1
    )
    # Every call's wait is measured, the refused one's (about 0.2 s) too.
    assert _sample(world, "imagegen_provider_queue_seconds_count", provider="narrow") >= 2
    assert _sample(world, "imagegen_provider_queue_seconds_sum", provider="narrow") >= 0.19


async def test_a_busy_deployment_is_skipped_for_the_next_one(
    world: World, http: aiohttp.ClientSession
) -> None:
    world.narrow.reset()
    world.wide.reset()
    account_id, key, _ = await world.stack.new_account(OPENING)
    first = asyncio.create_task(_post(world, http, key, "narrow-then-wide"))
    await asyncio.sleep(0.1)
    status, _, _ = await _post(world, http, key, "narrow-then-wide")
    assert status == 200
    assert (await first)[0] == 200
    assert (world.narrow.hits, world.wide.hits) == (1, 1)
    await world.stack.assert_balance(account_id, OPENING - 2 * PRICE)
