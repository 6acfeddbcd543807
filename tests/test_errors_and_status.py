"""The HTTP status table, OpenAI's error shape, request ids and upstream failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import (
    DEADEND_DALLE,
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
    http_error,
    invalid_value,
    rate_limited,
    raw,
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
    ("seed-too-big", {**_OK, "seed": 2**32}, "invalid_value", "seed"),
    ("seed-beyond-int64", {**_OK, "seed": 2**63}, "invalid_value", "seed"),
    ("user-number", {**_OK, "user": 7}, "invalid_value", "user"),
    ("fake-dalle-n-too-many", {**_OK, "model": "fake-dalle", "n": 5}, "invalid_value", "n"),
    (
        "fake-dalle-size",
        {**_OK, "model": "fake-dalle", "size": "1024x1024"},
        "invalid_value",
        "size",
    ),
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


async def _raw_exchange(stack: Stack, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends bytes no HTTP client library would (non-ASCII header values); parses the answer."""
    host, port = stack.http_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer caf\xc3\xa9", b"Bearer caf\xe9", b"Bearer sk-ig-\xe2\x82\xac\xe2\x82\xac"],
    ids=["utf8", "latin1", "euro-signs"],
)
@pytest.mark.parametrize("route", ["generations", "models"])
async def test_a_key_with_non_ascii_characters_is_401_not_500(
    stack: Stack, authorization: bytes, route: str
) -> None:
    # gRPC metadata must be printable ASCII: such a header cannot carry a valid key, and
    # must not make the gateway fail (500 invites the SDK to retry).
    if route == "generations":
        body = orjson.dumps(_OK)
        head = f"POST {GENERATIONS} HTTP/1.1\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n"
    else:
        body = b""
        head = "GET /v1/models HTTP/1.1\r\n"
    request = (
        head.encode()
        + b"Host: 127.0.0.1\r\nConnection: close\r\nAuthorization: "
        + authorization
        + b"\r\n\r\n"
        + body
    )
    status, headers, raw_body = await _raw_exchange(stack, request)
    error = orjson.loads(raw_body)["error"]
    assert (status, error["code"]) == (401, "invalid_api_key"), error
    assert set(error) == {"message", "type", "param", "code"}
    assert headers.get("x-should-retry") == "false"
    assert headers.get("x-request-id")


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


async def test_every_answer_carries_a_request_id(stack: Stack, http: aiohttp.ClientSession) -> None:
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


async def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(OPENING)
    compact = orjson.dumps(_OK)
    # Trailing whitespace is valid JSON: pad the body to the limit exactly.
    at_limit = compact + b" " * (MAX_BODY_BYTES - len(compact))
    headers = {**bearer(key), "Content-Type": "application/json"}
    async with http.post(stack.http_url + GENERATIONS, data=at_limit, headers=headers) as resp:
        assert resp.status == 200
    async with http.post(
        stack.http_url + GENERATIONS, data=at_limit + b" ", headers=headers
    ) as resp:
        await assert_openai_error(resp, 413, "request_too_large")


async def test_a_chunked_body_over_the_limit_is_413(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "local-sketch", "size": "256x256", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 1):
            yield b"y" * 4096
        yield b'"}'

    headers = {**bearer(key), "Content-Type": "application/json"}
    async with http.post(stack.http_url + GENERATIONS, data=chunks(), headers=headers) as resp:
        assert "Content-Length" not in resp.request_info.headers
        await assert_openai_error(resp, 413, "request_too_large")
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
    [
        server_error(),
        service_unavailable(),
        garbage(),
        truncated(),
        wrong_content_type(),
        rate_limited(retry_after=1),
        http_error(401, message="Incorrect API key provided: sk-upst****test", code="bad_key"),
        raw(200, b'{"created": 1, "data": [{"b64_json": "not base64!"}]}'),
        raw(200, b'{"created": 1, "data": [{"b64_json": "aGVsbG8="}]}'),
    ],
    ids=[
        "500",
        "503",
        "garbage",
        "truncated",
        "html",
        "429",
        "401",
        "bad-base64",
        "not-an-image",
    ],
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
    # The fake would answer 200 after 3 s: the 502 is the 2 s timeout, not an early error.
    assert time.monotonic() - started >= 1.5
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


async def test_the_request_id_is_passed_on_to_the_upstream(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    _, key, _ = await stack.new_account(OPENING)
    request_id = f"upstream-trace-{time.monotonic_ns()}"
    async with http.post(
        stack.http_url + GENERATIONS,
        json={**_FAKE_OK, "user": "end-user-42"},
        headers={**bearer(key), "X-Request-ID": request_id},
    ) as resp:
        assert resp.status == 200
    assert fake.hits == 1
    assert fake.requests[0].headers["X-Request-ID"] == request_id
    assert fake.requests[0].body["user"] == "end-user-42"
    # Our caller's key never travels upstream.
    assert key not in str(fake.requests[0].headers)


# -- retries and failover, as the caller and the ledger see them --------------------------


async def test_a_retried_upstream_failure_is_invisible_and_charged_once(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(server_error(), "ok")
    body = {**_FAKE_OK, "model": "retry-dalle", "n": 2}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 2
    assert fake.hits == 2
    await stack.assert_balance(account_id, OPENING - 2 * FAKE_DALLE)
    kinds = [e.kind for e in await stack.ledger(account_id)]
    assert kinds == ["credit", "hold", "capture"]


async def test_when_every_retry_fails_the_caller_gets_502_and_pays_nothing(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(server_error(), server_error(), "ok")
    body = {**_FAKE_OK, "model": "retry-dalle"}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 502, "upstream_error", should_retry=True)
    assert fake.hits == 2
    await stack.assert_not_charged(account_id, OPENING)


async def test_a_content_policy_refusal_is_not_retried(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    fake.script(content_policy_violation(), "ok")
    body = {**_FAKE_OK, "model": "retry-dalle"}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 400, "content_policy_violation")
    assert fake.hits == 1
    await stack.assert_not_charged(account_id, OPENING)


async def test_failover_serves_from_the_next_deployment_at_its_price(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    # The dead end refuses the connection; the fake upstream answers. The hold covers the
    # dearest deployment; the charge is the serving deployment's price.
    account_id, key, _ = await stack.new_account(OPENING)
    body = {**_FAKE_OK, "model": "failover-dalle", "n": 1}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200
    assert fake.hits == 1
    await stack.assert_balance(account_id, OPENING - FAKE_DALLE)
    entries = await stack.ledger(account_id)
    assert [(e.kind, e.available_delta_micros, e.held_delta_micros) for e in entries] == [
        ("credit", OPENING, 0),
        ("hold", -DEADEND_DALLE, DEADEND_DALLE),
        ("capture", 0, -FAKE_DALLE),
        ("release", DEADEND_DALLE - FAKE_DALLE, FAKE_DALLE - DEADEND_DALLE),
    ]


async def test_failover_needs_the_dearest_price_available(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream
) -> None:
    # Enough for the serving deployment, not for the dearest one: refused before any call.
    account_id, key, _ = await stack.new_account(FAKE_DALLE)
    body = {**_FAKE_OK, "model": "failover-dalle"}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 402, "insufficient_balance")
    assert fake.hits == 0
    await stack.assert_untouched(account_id, FAKE_DALLE)


# -- long values echoed in errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "é" * 2000),
        ("size", "9" * 5000),
        ("model", "m" * 9000),
        ("quality", "q" * 4000),
        ("style", "s" * 3000),
        ("response_format", "r" * 6000),
    ],
    ids=["size-accented", "size-digits", "model", "quality", "style", "response-format"],
)
async def test_a_long_value_is_refused_as_400_with_a_short_excerpt_not_a_500(
    stack: Stack, http: aiohttp.ClientSession, fake: FakeOpenAIUpstream, field: str, value: str
) -> None:
    account_id, key, _ = await stack.new_account(OPENING)
    body = {**_OK, "model": "local-sketch", field: value}
    async with http.post(stack.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        code = "model_not_found" if field == "model" else "invalid_value"
        error = await assert_openai_error(resp, 400, code, param=field, should_retry=False)
    # The caller's value comes back as a short escaped prefix at most, never whole.
    assert len(error["message"]) < 300
    assert value[:41] not in error["message"]
    assert fake.hits == 0
    await stack.assert_untouched(account_id, OPENING)
