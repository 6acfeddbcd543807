"""Money: exact charges per delivered image, holds that never overdraw, ledger == balance."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import aiohttp
import orjson
import pytest
from PIL import Image

from imagegen_service.gen import admin_pb2
from tests.conftest import (
    ADMIN_METADATA,
    FAKE_DALLE,
    LOCAL_256,
    LOCAL_DEFAULT,
    LOCAL_HD,
    Stack,
    assert_openai_error,
    bearer,
    image_size,
)
from tests.fakes.openai_upstream import FakeOpenAIUpstream, raw

GENERATIONS = "/v1/images/generations"


async def _generate(
    stack: Stack, http: aiohttp.ClientSession, key: str, **fields: Any
) -> tuple[int, dict[str, Any]]:
    body = {"model": "local-sketch", "prompt": "a ledger", "response_format": "b64_json", **fields}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("fields", "cost"),
    [
        ({"n": 3, "size": "256x256"}, 3 * LOCAL_256),
        ({"n": 1, "size": "256x256"}, LOCAL_256),
        ({"n": 2, "size": "512x512"}, 2 * LOCAL_DEFAULT),
        ({"n": 2, "size": "1024x1024", "quality": "hd"}, 2 * LOCAL_HD),
        ({"n": 1, "size": "1536x1024", "quality": "hd"}, LOCAL_HD),
        ({"n": 4, "size": "1024x1536", "quality": "standard"}, 4 * LOCAL_DEFAULT),
        ({"n": 2, "size": "256x256", "response_format": "url"}, 2 * LOCAL_256),
    ],
    ids=["3x256", "1x256", "2x512", "2x1024hd", "1x1536hd", "4x1024x1536", "2x256url"],
)
async def test_charge_is_exactly_the_price_times_images_delivered(
    stack: Stack, http: aiohttp.ClientSession, fields: dict[str, Any], cost: int
) -> None:
    opening = 1_000_000
    account_id, key, _ = await stack.new_account(opening)
    status, answer = await _generate(stack, http, key, **fields)
    assert status == 200, answer
    assert len(answer["data"]) == fields["n"]
    await stack.assert_balance(account_id, opening - cost)
    entries = await stack.ledger(account_id)
    assert [(e.kind, e.available_delta_micros, e.held_delta_micros) for e in entries] == [
        ("credit", opening, 0),
        ("hold", -cost, cost),
        ("capture", 0, -cost),
    ]
    assert entries[1].hold_id == entries[2].hold_id != ""


async def test_charges_accumulate_across_requests(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    opening = 100_000
    account_id, key, _ = await stack.new_account(opening)
    spent = 0
    for fields, cost in [
        ({"n": 2, "size": "256x256"}, 2 * LOCAL_256),
        ({"n": 1, "size": "512x512", "quality": "hd"}, LOCAL_HD),
        ({"n": 1, "size": "1024x1024"}, LOCAL_DEFAULT),
    ]:
        status, _ = await _generate(stack, http, key, **fields)
        assert status == 200
        spent += cost
        await stack.assert_balance(account_id, opening - spent)


async def test_a_balance_of_exactly_the_price_is_enough_and_then_empty(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(2 * LOCAL_256)
    status, _ = await _generate(stack, http, key, n=2, size="256x256")
    assert status == 200
    await stack.assert_balance(account_id, 0)
    async with http.post(
        stack.http_url + GENERATIONS,
        json={"model": "local-sketch", "prompt": "one more", "size": "256x256"},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(
            resp, 402, "insufficient_balance", error_type="insufficient_quota", should_retry=False
        )
    await stack.assert_balance(account_id, 0)


async def test_a_request_that_does_not_fit_whole_is_refused_whole(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # 1500 micros pays for one 256x256 image, not for two: nothing is delivered or held.
    opening = LOCAL_256 + LOCAL_256 // 2
    account_id, key, _ = await stack.new_account(opening)
    async with http.post(
        stack.http_url + GENERATIONS,
        json={"model": "local-sketch", "prompt": "two please", "size": "256x256", "n": 2},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 402, "insufficient_balance", should_retry=False)
    await stack.assert_untouched(account_id, opening)


async def test_an_empty_account_gets_402(stack: Stack, http: aiohttp.ClientSession) -> None:
    account_id, key, _ = await stack.new_account(0)
    async with http.post(
        stack.http_url + GENERATIONS,
        json={"model": "local-sketch", "prompt": "free lunch", "size": "256x256"},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 402, "insufficient_balance")
    await stack.assert_balance(account_id, 0)
    assert await stack.ledger(account_id) == []


async def test_upstream_images_cost_the_upstream_models_price(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    opening = 100_000
    account_id, key, _ = await stack.new_account(opening)
    status, answer = await _generate(
        stack, http, key, model="fake-dalle", n=2, size="256x256", response_format="b64_json"
    )
    assert status == 200, answer
    assert [image_size(base64.b64decode(d["b64_json"])) for d in answer["data"]] == [
        (256, 256),
        (256, 256),
    ]
    assert fake.hits == 1
    await stack.assert_balance(account_id, opening - 2 * FAKE_DALLE)


async def test_concurrent_requests_never_overdraw(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    affordable = 7
    account_id, key, _ = await stack.new_account(affordable * LOCAL_256)
    body = {
        "model": "local-sketch",
        "prompt": "a rush",
        "n": 1,
        "size": "256x256",
        "response_format": "b64_json",
    }

    async def one() -> tuple[int, dict[str, Any]]:
        async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
            return resp.status, await resp.json()

    answers = await asyncio.gather(*(one() for _ in range(100)))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(200) == affordable
    assert statuses.count(402) == 100 - affordable
    for status, answer in answers:
        if status == 200:
            assert image_size(base64.b64decode(answer["data"][0]["b64_json"])) == (256, 256)
        else:
            assert answer["error"]["code"] == "insufficient_balance"
    await stack.assert_balance(account_id, 0, 0)
    kinds = [e.kind for e in await stack.ledger(account_id)]
    assert kinds.count("hold") == affordable
    assert kinds.count("capture") == affordable
    assert "release" not in kinds


async def test_a_credit_through_the_admin_api_unblocks_the_account(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(0)
    status, _ = await _generate(stack, http, key, size="256x256")
    assert status == 402
    credited = await stack.admin.CreditAccount(
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=5_000, note="top-up"),
        metadata=ADMIN_METADATA,
    )
    assert credited.available_micros == 5_000
    status, _ = await _generate(stack, http, key, size="256x256")
    assert status == 200
    await stack.assert_balance(account_id, 5_000 - LOCAL_256)


def _upstream_answer(images: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 90)).save(buffer, format="PNG")
    item = {"b64_json": base64.b64encode(buffer.getvalue()).decode(), "revised_prompt": ""}
    return orjson.dumps({"created": 1, "data": [item] * images})


async def test_fewer_images_than_asked_are_charged_as_delivered(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    opening = 100_000
    account_id, key, _ = await stack.new_account(opening)
    fake.script(raw(200, _upstream_answer(1, (256, 256))))
    status, answer = await _generate(stack, http, key, model="fake-dalle", n=3, size="256x256")
    assert status == 200, answer
    assert len(answer["data"]) == 1
    await stack.assert_balance(account_id, opening - FAKE_DALLE)
    entries = await stack.ledger(account_id)
    assert [(e.kind, e.available_delta_micros, e.held_delta_micros) for e in entries] == [
        ("credit", opening, 0),
        ("hold", -3 * FAKE_DALLE, 3 * FAKE_DALLE),
        ("capture", 0, -FAKE_DALLE),
        ("release", 2 * FAKE_DALLE, -2 * FAKE_DALLE),
    ]


async def test_more_images_than_asked_are_cut_and_not_charged(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    opening = 100_000
    account_id, key, _ = await stack.new_account(opening)
    fake.script(raw(200, _upstream_answer(4, (256, 256))))
    status, answer = await _generate(stack, http, key, model="fake-dalle", n=2, size="256x256")
    assert status == 200, answer
    assert len(answer["data"]) == 2
    await stack.assert_balance(account_id, opening - 2 * FAKE_DALLE)


async def test_an_upstream_answer_without_images_is_502_and_free(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    opening = 100_000
    account_id, key, _ = await stack.new_account(opening)
    fake.script(raw(200, _upstream_answer(0, (256, 256))))
    status, answer = await _generate(stack, http, key, model="fake-dalle", n=2, size="256x256")
    assert status == 502, answer
    assert answer["error"]["code"] == "upstream_error"
    await stack.assert_not_charged(account_id, opening)
