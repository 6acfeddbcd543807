"""Idempotency-Key makes the openai SDK's retries safe: one generation, one charge."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from tests.conftest import FAKE_DALLE, LOCAL_256, Stack, assert_openai_error, bearer
from tests.fakes.openai_upstream import FakeOpenAIUpstream, ok, server_error

BODY = {"model": "local-sketch", "prompt": "a quiet harbour", "size": "256x256", "n": 2}


async def _post(
    http: aiohttp.ClientSession, stack: Stack, key: str, body: dict[str, object], idem: str
) -> aiohttp.ClientResponse:
    return await http.post(
        stack.http_url + "/v1/images/generations",
        json=body,
        headers={**bearer(key), "Idempotency-Key": idem},
    )


async def test_a_retry_with_the_same_key_returns_the_same_result_and_charges_once(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account, key, _ = await stack.new_account(100_000)
    first = await _post(http, stack, key, {**BODY, "response_format": "b64_json"}, "retry-1")
    assert first.status == 200
    again = await _post(http, stack, key, {**BODY, "response_format": "b64_json"}, "retry-1")
    assert again.status == 200
    assert await again.json() == await first.json()
    await stack.assert_balance(account, 100_000 - 2 * LOCAL_256)
    assert [e.kind for e in await stack.ledger(account)] == ["credit", "hold", "capture"]


async def test_the_sdk_sends_the_key_and_a_replayed_url_answer_is_identical(stack: Stack) -> None:
    account, key, _ = await stack.new_account(100_000)
    async with stack.openai_client(key) as client:
        answers = [
            await client.images.generate(
                model="local-sketch",
                prompt="a quiet harbour",
                size="256x256",
                extra_headers={"Idempotency-Key": "sdk-1"},
            )
            for _ in range(3)
        ]
    assert answers[0].data[0].url
    assert all(a.model_dump() == answers[0].model_dump() for a in answers)
    await stack.assert_balance(account, 100_000 - LOCAL_256)


async def test_no_second_upstream_call_for_a_replay(
    stack: Stack, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account, key, _ = await stack.new_account(100_000)
    body = {"model": "fake-dalle", "prompt": "p", "size": "256x256", "response_format": "b64_json"}
    for _ in range(2):
        assert (await _post(http, stack, key, body, "upstream-1")).status == 200
    assert fake.hits == 1
    await stack.assert_balance(account, 100_000 - FAKE_DALLE)


async def test_the_same_key_with_another_body_is_409_and_free(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account, key, _ = await stack.new_account(100_000)
    assert (await _post(http, stack, key, BODY, "conflict-1")).status == 200
    other = await _post(http, stack, key, {**BODY, "prompt": "another"}, "conflict-1")
    await assert_openai_error(other, 409, "idempotency_key_reused", should_retry=False)
    await stack.assert_balance(account, 100_000 - 2 * LOCAL_256)


async def test_keys_are_per_account(stack: Stack, http: aiohttp.ClientSession) -> None:
    first, key_a, _ = await stack.new_account(100_000)
    second, key_b, _ = await stack.new_account(100_000)
    assert (await _post(http, stack, key_a, BODY, "shared-name")).status == 200
    assert (await _post(http, stack, key_b, BODY, "shared-name")).status == 200
    await stack.assert_balance(first, 100_000 - 2 * LOCAL_256)
    await stack.assert_balance(second, 100_000 - 2 * LOCAL_256)


async def test_a_failed_request_frees_its_key_so_the_retry_runs(
    stack: Stack, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account, key, _ = await stack.new_account(100_000)
    fake.script(server_error(), ok())
    body = {"model": "fake-dalle", "prompt": "p", "size": "256x256"}
    failed = await _post(http, stack, key, body, "fails-once")
    await assert_openai_error(failed, 502, "upstream_error")
    await stack.assert_balance(account, 100_000)
    assert (await _post(http, stack, key, body, "fails-once")).status == 200
    await stack.assert_balance(account, 100_000 - FAKE_DALLE)


async def test_a_concurrent_duplicate_gets_a_retryable_409_and_the_sdk_retry_succeeds(
    stack: Stack, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account, key, _ = await stack.new_account(100_000)
    fake.script(ok(delay=1.0))
    body = {"model": "fake-dalle", "prompt": "slow", "size": "256x256"}
    slow = asyncio.create_task(_post(http, stack, key, body, "concurrent-1"))
    await asyncio.sleep(0.3)
    duplicate = await _post(http, stack, key, body, "concurrent-1")
    await assert_openai_error(duplicate, 409, "idempotency_key_in_progress", should_retry=True)
    assert duplicate.headers["retry-after"] == "1"
    # The SDK retries a 409 by itself, after Retry-After: by then the first request is done
    # and the retry gets its stored answer.
    async with stack.openai_client(key, max_retries=2) as client:
        replay = await client.images.generate(
            model="fake-dalle",
            prompt="slow",
            size="256x256",
            extra_headers={"Idempotency-Key": "concurrent-1"},
        )
    first = await (await slow).json()
    assert replay.data[0].url == first["data"][0]["url"]
    assert fake.hits == 1
    await stack.assert_balance(account, 100_000 - FAKE_DALLE)


async def test_a_bad_key_header_is_400(stack: Stack, http: aiohttp.ClientSession) -> None:
    account, key, _ = await stack.new_account(100_000)
    too_long = await _post(http, stack, key, BODY, "k" * 256)
    await assert_openai_error(too_long, 400, "invalid_value", param="Idempotency-Key")
    await stack.assert_untouched(account, 100_000)


async def test_records_expire_after_a_day_with_their_stored_answers(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account, key, _ = await stack.new_account(100_000)
    assert (await _post(http, stack, key, BODY, "expires-1")).status == 200
    ledger = stack.running.ledger
    refs = await ledger.purge_expired_idempotency(now=int(time.time()) + 3600)
    assert refs == [], "a record must live 24 hours"
    refs = await ledger.purge_expired_idempotency(now=int(time.time()) + 24 * 3600 + 5)
    assert len(refs) >= 1
    blobs = stack.running.pipeline.images
    for ref in refs:
        await blobs.delete_blob(ref)
    # After expiry the key is free again: the same key runs (and charges) anew.
    assert (await _post(http, stack, key, BODY, "expires-1")).status == 200
    await stack.assert_balance(account, 100_000 - 4 * LOCAL_256)


@pytest.mark.parametrize("status", [openai.BadRequestError])
async def test_the_key_is_ignored_by_validation_errors(
    stack: Stack, status: type[Exception]
) -> None:
    account, key, _ = await stack.new_account(100_000)
    async with stack.openai_client(key) as client:
        for _ in range(2):
            with pytest.raises(status):
                await client.images.generate(
                    model="local-sketch",
                    prompt="p",
                    size="999x999",  # type: ignore[arg-type]
                    extra_headers={"Idempotency-Key": "invalid-1"},
                )
    await stack.assert_untouched(account, 100_000)
