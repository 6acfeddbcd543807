"""The HTTP status table, OpenAI's error shape, request ids and upstream failures."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import (
    FAKE_DALLE,
    LOCAL_256,
    MAX_BODY_BYTES,
    Stack,
    assert_openai_error,
    bearer,
)
from tests.fakes.openai_upstream import (
    FakeOpenAIUpstream,
    content_policy_violation,
    garbage,
    invalid_value,
    server_error,
    service_unavailable,
    slow,
    truncated,
    wrong_content_type,
)

GENERATIONS = "/v1/images/generations"
OPENING = 50_000
_OK = {"model": "local-sketch", "prompt": "a small boat", "size": "256x256"}

# -- the status table through the official SDK -------------------------------------------


async def test_sdk_success_is_200(stack: Stack) -> None:
    _, key, _ = await stack.new_account(OPENING)
    async with stack.openai_client(key) as client:
        raw = await client.images.with_raw_response.generate(
            model="local-sketch", prompt="a boat", size="256x256", response_format="b64_json"
        )
    assert raw.status_code == 200
    assert raw.headers.get("x-request-id")
    answer = raw.parse()
    assert answer.data is not None
    assert len(answer.data) == 1


async def test_sdk_invalid_size_is_bad_request_naming_the_param(stack: Stack) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    async with stack.openai_client(key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model="local-sketch", prompt="a boat", size="999x999")
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_value"
    assert caught.value.param == "size"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.response.headers.get("x-should-retry") == "false"
    await stack.assert_untouched(account_id, OPENING)


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("no-such-model", "model_not_found"),
        ("hidden-model", "model_not_found"),
        ("gpt-4o", "model_not_supported"),
    ],
)
async def test_sdk_models_that_cannot_serve_are_bad_requests(
    stack: Stack, model: str, code: str
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    async with stack.openai_client(key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model=model, prompt="a boat")
    assert caught.value.status_code == 400
    assert caught.value.code == code
    assert caught.value.param == "model"
    await stack.assert_untouched(account_id, OPENING)


async def test_sdk_unknown_key_is_authentication_error(stack: Stack) -> None:
    async with stack.openai_client("sk-ig-this-key-does-not-exist") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.images.generate(model="local-sketch", prompt="a boat")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


async def test_sdk_low_balance_is_402_insufficient_balance(stack: Stack) -> None:
    account_id, key, _ = await stack.new_account(LOCAL_256 - 1)
    async with stack.openai_client(key) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.images.generate(model="local-sketch", prompt="a boat", size="256x256")
    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_balance"
    assert caught.value.type == "insufficient_quota"
    assert caught.value.response.headers.get("x-should-retry") == "false"
    await stack.assert_untouched(account_id, LOCAL_256 - 1)


async def test_sdk_upstream_failure_is_502_upstream_error(
    stack: Stack, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(server_error())
    async with stack.openai_client(key) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.images.generate(
                model="fake-dalle", prompt="a boat", size="256x256", response_format="b64_json"
            )
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert caught.value.type == "api_error"
    assert fake.hits == 1
    await stack.assert_not_charged(account_id, OPENING)


# -- malformed requests through raw HTTP -------------------------------------------------

_MALFORMED: list[tuple[str, Any, str, str | None]] = [
    # (id, body: bytes as sent or a JSON-able value, expected code, expected param)
    ("not-json", b"{model: local-sketch", "invalid_value", None),
    ("empty-body", b"", "invalid_value", None),
    ("whitespace-body", b"   \n", "invalid_value", None),
    ("json-array", [_OK], "invalid_value", None),
    ("json-string", "a boat", "invalid_value", None),
    ("missing-model", {"prompt": "a boat"}, "invalid_value", "model"),
    ("missing-prompt", {"model": "local-sketch"}, "invalid_value", "prompt"),
    ("empty-prompt", {**_OK, "prompt": ""}, "invalid_value", "prompt"),
    ("blank-prompt", {**_OK, "prompt": "   "}, "invalid_value", "prompt"),
    ("prompt-too-long", {**_OK, "prompt": "x" * 4001}, "invalid_value", "prompt"),
    ("model-number", {**_OK, "model": 3}, "invalid_value", "model"),
    ("prompt-object", {**_OK, "prompt": {"text": "a boat"}}, "invalid_value", "prompt"),
    ("n-string", {**_OK, "n": "2"}, "invalid_value", "n"),
    ("n-float", {**_OK, "n": 2.5}, "invalid_value", "n"),
    ("n-bool", {**_OK, "n": True}, "invalid_value", "n"),
    ("n-zero", {**_OK, "n": 0}, "invalid_value", "n"),
    ("n-negative", {**_OK, "n": -1}, "invalid_value", "n"),
    ("n-eleven", {**_OK, "n": 11}, "invalid_value", "n"),
    ("n-huge", {**_OK, "n": 2**40}, "invalid_value", "n"),
    ("size-unsupported", {**_OK, "size": "999x999"}, "invalid_value", "size"),
    ("size-word", {**_OK, "size": "big"}, "invalid_value", "size"),
    ("size-number", {**_OK, "size": 256}, "invalid_value", "size"),
    ("quality-ultra", {**_OK, "quality": "ultra"}, "invalid_value", "quality"),
    ("response-format-png", {**_OK, "response_format": "png"}, "invalid_value", "response_format"),
    ("style-dreamy", {**_OK, "style": "dreamy"}, "invalid_value", "style"),
    ("seed-negative", {**_OK, "seed": -1}, "invalid_value", "seed"),
    ("fake-dalle-n-too-many", {**_OK, "model": "fake-dalle", "n": 5}, "invalid_value", "n"),
    ("fake-dalle-size", {**_OK, "model": "fake-dalle", "size": "1024x1024"}, "invalid_value", "size"),
    ("unknown-model", {**_OK, "model": "dall-e-9"}, "model_not_found", "model"),
    ("hidden-model", {**_OK, "model": "hidden-model"}, "model_not_found", "model"),
    ("chat-model", {**_OK, "model": "gpt-4o"}, "model_not_supported", "model"),
]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [pytest.param(body, code, param, id=name) for name, body, code, param in _MALFORMED],
)
async def test_malformed_request_is_400_and_costs_nothing(
    stack: Stack,
    http: aiohttp.ClientSession,
    fake: FakeOpenAIUpstream,
    body: Any,
    code: str,
    param: str | None,
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    headers = {**bearer(key), "Content-Type": "application/json"}
    payload = body if isinstance(body, bytes) else aiohttp.JsonPayload(body)
    async with http.post(stack.http_url + GENERATIONS, data=payload, headers=headers) as resp:
        error = await assert_openai_error(resp, 400, code, param=param, should_retry=False)
    assert error["type"] == "invalid_request_error"
    assert key not in error["message"]
    assert fake.hits == 0
    await stack.assert_untouched(account_id, OPENING)


# -- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Token abc",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer sk-ig-unknownunknownunknownunknownunknownunknown1",
    ],
    ids=["missing", "empty", "token-scheme", "bearer-alone", "bearer-blank", "basic", "unknown"],
)
async def test_missing_malformed_or_unknown_key_is_401(
    stack: Stack, http: aiohttp.ClientSession, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with http.post(stack.http_url + GENERATIONS, json=_OK, headers=headers) as resp:
        error = await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)
    assert error["param"] is None


async def test_a_key_of_another_scheme_with_a_valid_secret_is_refused(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    async with http.post(
        stack.http_url + GENERATIONS, json=_OK, headers={"Authorization": f"Token {key}"}
    ) as resp:
        await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)
    await stack.assert_untouched(account_id, OPENING)


async def test_auth_is_checked_before_the_body_is_judged_by_the_service(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # A well-formed body for an unknown model: the service says 401 first, never
    # revealing which models exist to a caller without a key.
    async with http.post(
        stack.http_url + GENERATIONS, json={**_OK, "model": "no-such-model"}
    ) as resp:
        await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)


# -- request ids -------------------------------------------------------------------------


async def test_every_answer_carries_a_request_id(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(OPENING)
    seen: list[str] = []
    async with http.post(stack.http_url + GENERATIONS, json=_OK, headers=bearer(key)) as resp:
        assert resp.status == 200
        seen.append(resp.headers["x-request-id"])
    async with http.post(stack.http_url + GENERATIONS, json={**_OK, "n": 0}) as resp:
        assert resp.status == 401
        seen.append(resp.headers["x-request-id"])
    async with http.post(
        stack.http_url + GENERATIONS, json={**_OK, "n": 0}, headers=bearer(key)
    ) as resp:
        assert resp.status == 400
        seen.append(resp.headers["x-request-id"])
    async with http.get(stack.http_url + "/v1/no/such/route") as resp:
        await assert_openai_error(resp, 404, "not_found")
        seen.append(resp.headers["x-request-id"])
    async with http.get(stack.http_url + "/healthz") as resp:
        assert resp.status == 200
        seen.append(resp.headers["x-request-id"])
    async with http.get(stack.http_url + GENERATIONS) as resp:
        await assert_openai_error(resp, 405, "method_not_allowed")
        seen.append(resp.headers["x-request-id"])
    assert all(seen)
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("expected_status", [200, 400, 401, 404])
async def test_a_given_request_id_is_echoed_back(
    stack: Stack, http: aiohttp.ClientSession, expected_status: int
) -> None:
    _, key, _ = await stack.new_account(OPENING)
    request_id = f"client-trace-{expected_status}-{time.monotonic_ns()}"
    headers = {"X-Request-ID": request_id}
    path, body = GENERATIONS, dict(_OK)
    if expected_status in (200, 400):
        headers.update(bearer(key))
    if expected_status == 400:
        body["size"] = "big"
    if expected_status == 404:
        path = "/v1/nowhere"
    async with http.post(stack.http_url + path, json=body, headers=headers) as resp:
        assert resp.status == expected_status
        assert resp.headers["x-request-id"] == request_id


async def test_the_request_id_reaches_the_ledger(stack: Stack, http: aiohttp.ClientSession) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    request_id = f"ledger-trace-{time.monotonic_ns()}"
    async with http.post(
        stack.http_url + GENERATIONS,
        json=_OK,
        headers={**bearer(key), "X-Request-ID": request_id},
    ) as resp:
        assert resp.status == 200
    entries = await stack.ledger(account_id)
    assert [(e.kind, e.request_id) for e in entries[1:]] == [
        ("hold", request_id),
        ("capture", request_id),
    ]


async def test_an_unusable_request_id_is_replaced(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        stack.http_url + "/healthz", headers={"X-Request-ID": "bad id with spaces"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"]
        assert resp.headers["x-request-id"] != "bad id with spaces"


# -- size limit --------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_in_openai_shape(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    body = {**_OK, "prompt": "x" * (MAX_BODY_BYTES + 1)}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 413, "request_too_large", should_retry=False)
    await stack.assert_untouched(account_id, OPENING)


# -- upstream failures -------------------------------------------------------------------

_FAKE_OK = {
    "model": "fake-dalle",
    "prompt": "a lighthouse",
    "size": "256x256",
    "response_format": "b64_json",
}


@pytest.mark.parametrize(
    "behaviour",
    [server_error(), service_unavailable(), garbage(), truncated(), wrong_content_type()],
    ids=["500", "503", "garbage", "truncated", "html"],
)
async def test_upstream_failure_is_502_and_charges_nothing(
    stack: Stack,
    http: aiohttp.ClientSession,
    fake: FakeOpenAIUpstream,
    behaviour: Any,
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(behaviour)
    async with http.post(stack.http_url + GENERATIONS, json=_FAKE_OK, headers=bearer(key)) as resp:
        error = await assert_openai_error(resp, 502, "upstream_error", error_type="api_error")
    assert fake.hits == 1
    assert "sk-upstream-test" not in error["message"]
    await stack.assert_not_charged(account_id, OPENING)


async def test_refused_connection_is_502_and_charges_nothing(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    body = {**_FAKE_OK, "model": "dead-model"}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        error = await assert_openai_error(resp, 502, "upstream_error")
    assert "127.0.0.1" not in error["message"]
    await stack.assert_not_charged(account_id, OPENING)


async def test_slow_upstream_times_out_as_502_and_charges_nothing(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(slow(3))
    started = time.monotonic()
    async with http.post(stack.http_url + GENERATIONS, json=_FAKE_OK, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 502, "upstream_error")
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 2.9, elapsed
    await stack.assert_not_charged(account_id, OPENING)


async def test_content_policy_refusal_is_400_and_charges_nothing(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(content_policy_violation())
    async with http.post(stack.http_url + GENERATIONS, json=_FAKE_OK, headers=bearer(key)) as resp:
        await assert_openai_error(
            resp, 400, "content_policy_violation", error_type="invalid_request_error"
        )
        assert resp.headers.get("x-should-retry") == "false"
    await stack.assert_not_charged(account_id, OPENING)


async def test_upstream_rejection_of_a_value_is_400_with_its_param(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(invalid_value(param="size"))
    async with http.post(stack.http_url + GENERATIONS, json=_FAKE_OK, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 400, "invalid_value", param="size", should_retry=False)
    await stack.assert_not_charged(account_id, OPENING)


async def test_success_through_the_upstream_is_charged_per_image(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    async with stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="fake-dalle",
            prompt="a lighthouse",
            n=2,
            size="512x512",
            response_format="b64_json",
        )
    assert answer.data is not None
    assert len(answer.data) == 2
    assert fake.hits == 1
    sent = fake.requests[0]
    assert sent.body["model"] == "dall-e-2"
    assert sent.body["n"] == 2
    assert sent.body["size"] == "512x512"
    assert sent.headers["Authorization"] == "Bearer sk-upstream-test"
    await stack.assert_balance(account_id, OPENING - 2 * FAKE_DALLE)


async def test_after_an_upstream_failure_the_next_request_succeeds(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(server_error(), "ok")
    statuses = []
    for _ in range(2):
        async with http.post(
            stack.http_url + GENERATIONS, json=_FAKE_OK, headers=bearer(key)
        ) as resp:
            statuses.append(resp.status)
    assert statuses == [502, 200]
    await stack.assert_balance(account_id, OPENING - FAKE_DALLE)
