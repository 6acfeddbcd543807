"""Per-key rate limits: 429 with Retry-After and x-ratelimit-* headers, in one process and
shared across replicas through Redis."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from imagegen_service.gen import images_pb2, images_pb2_grpc
from tests.conftest import LOCAL_256, Stack, assert_openai_error, bearer
from tests.images_stack import ImagesStack
from tests.services import scratch_redis_url
from tests.stack import start_stack

BODY = {"model": "local-sketch", "prompt": "p", "size": "256x256"}


async def _generate(
    http: aiohttp.ClientSession, url: str, key: str, n: int = 1
) -> aiohttp.ClientResponse:
    return await http.post(
        url + "/v1/images/generations", json={**BODY, "n": n}, headers=bearer(key)
    )


async def test_requests_over_the_per_minute_limit_get_429_with_retry_after(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account, key, key_id = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(key_id, 2, None)
    for remaining in ("1", "0"):
        ok = await _generate(http, stack.http_url, key)
        assert ok.status == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == remaining
        assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    limited = await _generate(http, stack.http_url, key)
    await assert_openai_error(limited, 429, "rate_limit_exceeded", should_retry=True)
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    # A refused request holds and charges nothing.
    await stack.assert_balance(account, 100_000 - 2 * LOCAL_256)


async def test_grpc_callers_get_the_limits_in_metadata(images_stack: ImagesStack) -> None:
    """Over gRPC the x-ratelimit-* values come in the trailing metadata, with the status;
    a streamed request also gets them in the initial metadata, before its first event."""
    stack = images_stack
    _, key, key_id = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(key_id, 5, None)
    images = images_pb2_grpc.ImageGenerationStub(stack.channel)
    auth = (("authorization", f"Bearer {key}"),)
    plain = images.GenerateImages(
        images_pb2.GenerateImagesRequest(model="local-sketch", prompt="p", size="256x256"),
        metadata=auth,
    )
    assert [m.WhichOneof("event") async for m in plain] == ["image", "summary"]
    trailing = dict(await plain.trailing_metadata())
    assert trailing["x-ratelimit-limit-requests"] == "5"
    assert trailing["x-ratelimit-remaining-requests"] == "4"
    assert not any(k.startswith("x-ratelimit-") for k, _ in await plain.initial_metadata())

    streamed = images.GenerateImages(
        images_pb2.GenerateImagesRequest(
            model="local-image", prompt="p", size="1024x1024", stream=True
        ),
        metadata=auth,
    )
    initial = dict(await streamed.initial_metadata())
    assert initial["x-ratelimit-remaining-requests"] == "3"
    assert [m.WhichOneof("event") async for m in streamed][-1] == "summary"
    assert dict(await streamed.trailing_metadata())["x-ratelimit-remaining-requests"] == "3"


async def test_images_per_minute_count_n_and_an_impossible_n_is_400(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account, key, key_id = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(key_id, None, 3)
    assert (await _generate(http, stack.http_url, key, n=2)).status == 200
    limited = await _generate(http, stack.http_url, key, n=2)
    await assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert limited.headers["x-ratelimit-remaining-images"] == "1"
    never = await _generate(http, stack.http_url, key, n=4)
    await assert_openai_error(never, 400, "invalid_value", param="n", should_retry=False)
    await stack.assert_balance(account, 100_000 - 2 * LOCAL_256)


async def test_limits_are_per_key(stack: Stack, http: aiohttp.ClientSession) -> None:
    _, limited_key, limited_id = await stack.new_account(100_000)
    _, free_key, _ = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(limited_id, 1, None)
    assert (await _generate(http, stack.http_url, limited_key)).status == 200
    assert (await _generate(http, stack.http_url, limited_key)).status == 429
    assert (await _generate(http, stack.http_url, free_key)).status == 200


async def test_the_sdk_sees_a_rate_limit_error(stack: Stack) -> None:
    import openai

    _, key, key_id = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(key_id, 1, None)
    async with stack.openai_client(key) as client:
        await client.images.generate(model="local-sketch", prompt="p", size="256x256")
        with pytest.raises(openai.RateLimitError) as caught:
            await client.images.generate(model="local-sketch", prompt="p", size="256x256")
    assert caught.value.status_code == 429


def _replica_config(data_dir: Path) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{data_dir}"

        [rate_limits]
        requests_per_minute = 3
        images_per_minute = 0

        [providers.local]
        type = "local"

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256"]
        max_images = 4

        [models.local-sketch.price_usd]
        default = "0.001"
        """
    )


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with scratch_redis_url() as url:
        yield url


async def test_redis_limits_hold_across_two_replicas(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    shared_db = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {"IMAGEGEN_REDIS_URL": redis_url, "IMAGEGEN_DATABASE_URL": shared_db}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        start_stack(_replica_config(tmp_path / "a" / "data"), tmp_path / "a", environ=env) as a,
        start_stack(_replica_config(tmp_path / "b" / "data"), tmp_path / "b", environ=env) as b,
    ):
        _, key, _ = await a.new_account(100_000)
        statuses = [(await _generate(http, s.http_url, key)).status for s in (a, b, a, b)]
    # Three per minute for the key, whichever replica serves it.
    assert statuses == [200, 200, 200, 429]


async def test_without_redis_the_service_keeps_serving(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Nothing listens there: the limiter fails open rather than refusing everyone.
    env = {"IMAGEGEN_REDIS_URL": "redis://127.0.0.1:1/0"}
    async with start_stack(_replica_config(tmp_path / "data"), tmp_path, environ=env) as stack:
        _, key, _ = await stack.new_account(100_000)
        assert (await _generate(http, stack.http_url, key)).status == 200
