"""Logs of the real stack, captured as the processes write them: ``configure_logging`` points
the one handler of the process at a buffer, in JSON, at DEBUG, and real requests go through
the gateway, the service and the fake upstream.
"""

from __future__ import annotations

import asyncio
import io
import logging
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import aiohttp
import orjson
import pytest
import structlog

from imagegen_service.logging_setup import configure_logging
from tests.conftest import UPSTREAM_KEY, Stack, bearer
from tests.fakes.openai_upstream import FakeOpenAIUpstream, server_error
from tests.stack import start_stack

PROMPT_CHARS = 12


class CapturedLogs:
    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Every line written so far; each one must be a JSON object."""
        return [orjson.loads(line) for line in self.text.splitlines()]

    def events(self, event: str, request_id: str) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines()
            if line["event"] == event and line.get("request_id") == request_id
        ]


@pytest.fixture
def logs() -> Iterator[CapturedLogs]:
    loggers = [logging.getLogger(name) for name in ("", "aiohttp.access", "alembic", "aiosqlite")]
    saved_levels = [logger.level for logger in loggers]
    saved_handlers = list(loggers[0].handlers)
    saved_structlog = structlog.get_config()
    captured = CapturedLogs()
    configure_logging(json_logs=True, level="DEBUG", stream=captured.buffer)
    try:
        yield captured
    finally:
        loggers[0].handlers[:] = saved_handlers
        for logger, level in zip(loggers, saved_levels, strict=True):
            logger.setLevel(level)
        structlog.configure(**saved_structlog)


async def _generate(
    http: aiohttp.ClientSession,
    stack: Stack,
    key: str,
    *,
    model: str,
    prompt: str,
    request_id: str,
) -> int:
    async with http.post(
        stack.http_url + "/v1/images/generations",
        json={"model": model, "prompt": prompt, "size": "256x256"},
        headers={**bearer(key), "x-request-id": request_id},
    ) as resp:
        await resp.read()
        return resp.status


async def test_a_request_makes_one_gateway_line_and_one_generation_line(
    stack: Stack, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession, logs: CapturedLogs
) -> None:
    account_id, key, _ = await stack.new_account(1_000_000)

    status = await _generate(
        http, stack, key, model="fake-dalle", prompt="a red kite", request_id="req-log-ok"
    )

    assert status == 200
    [request] = logs.events("http.request", "req-log-ok")
    assert request["method"] == "POST"
    assert request["route"] == "/v1/images/generations"
    assert request["status"] == 200
    assert request["latency_ms"] >= 0
    [generation] = logs.events("generation", "req-log-ok")
    assert {k: generation[k] for k in ("account_id", "model", "provider", "n", "status")} == {
        "account_id": account_id,
        "model": "fake-dalle",
        "provider": "upstream",
        "n": 1,
        "status": "ok",
    }
    assert generation["cost_micros"] == 20_000
    assert generation["latency_ms"] >= 0
    assert generation["level"] == "info"
    assert "prompt_prefix" not in generation
    # The same id went on to the provider.
    assert fake.requests[-1].headers["X-Request-ID"] == "req-log-ok"


async def test_failed_generations_get_their_line_with_the_reason(
    stack: Stack, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession, logs: CapturedLogs
) -> None:
    account_id, key, _ = await stack.new_account(30_000)
    poor_id, poor_key, _ = await stack.new_account(10)

    fake.script(server_error())
    assert (
        await _generate(http, stack, key, model="fake-dalle", prompt="p", request_id="r-502") == 502
    )
    assert (
        await _generate(http, stack, poor_key, model="fake-dalle", prompt="p", request_id="r-402")
        == 402
    )
    assert (
        await _generate(http, stack, key, model="no-such-model", prompt="p", request_id="r-400")
        == 400
    )

    expected = {
        "r-502": (account_id, "upstream_error"),
        "r-402": (poor_id, "insufficient_balance"),
        "r-400": (account_id, "model_not_found"),
    }
    for request_id, (account, reason) in expected.items():
        [generation] = logs.events("generation", request_id)
        assert (generation["account_id"], generation["status"]) == (account, reason)
        assert (generation["n"], generation["cost_micros"]) == (0, 0)
        [request] = logs.events("http.request", request_id)
        assert request["status"] == int(request_id[2:])


async def test_no_key_no_provider_credential_and_no_prompt_reach_the_logs(
    stack: Stack, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession, logs: CapturedLogs
) -> None:
    _, key, key_id = await stack.new_account(1_000_000)
    prompts = ["a lighthouse called Maribelle", "a teapot called Ottoline", "a fox named Quill"]

    assert (
        await _generate(http, stack, key, model="fake-dalle", prompt=prompts[0], request_id="s1")
        == 200
    )
    fake.script(server_error())
    assert (
        await _generate(http, stack, key, model="fake-dalle", prompt=prompts[1], request_id="s2")
        == 502
    )
    await stack.revoke(key_id)
    assert (
        await _generate(http, stack, key, model="fake-dalle", prompt=prompts[2], request_id="s3")
        == 401
    )

    # All three were logged, by both processes...
    for request_id in ("s1", "s2", "s3"):
        assert logs.events("http.request", request_id)
    assert logs.events("generation", "s1")
    assert logs.events("generation", "s2")
    # ...and none of the secrets or the words of a prompt is anywhere in the output.
    text = logs.text
    assert key.startswith("sk-")
    assert key not in text
    assert key[len("sk-ig-") :][:16] not in text
    assert UPSTREAM_KEY not in text
    assert "Bearer" not in text
    for word in ("Maribelle", "Ottoline", "Quill", "lighthouse", "teapot"):
        assert word not in text


@pytest.fixture(scope="module")
async def prefix_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    config = textwrap.dedent(
        """
        [providers.local]
        type = "local"

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256"]

        [models.local-sketch.price_usd]
        default = "0.001"
        """
    )
    async with start_stack(
        config,
        tmp_path_factory.mktemp("prefix"),
        environ={"IMAGEGEN_LOG_PROMPT_CHARS": str(PROMPT_CHARS)},
    ) as running:
        yield cast(Stack, running)


async def test_a_configured_prompt_prefix_is_logged_and_nothing_past_it(
    prefix_stack: Stack, http: aiohttp.ClientSession, logs: CapturedLogs
) -> None:
    _, key, _ = await prefix_stack.new_account(1_000_000)
    prompt = "Twelve chars then a secret tail nobody may read"
    assert prompt[:PROMPT_CHARS] == "Twelve chars"

    status = await _generate(
        http, prefix_stack, key, model="local-sketch", prompt=prompt, request_id="req-prefix"
    )

    assert status == 200
    [generation] = logs.events("generation", "req-prefix")
    assert generation["prompt_prefix"] == "Twelve chars"
    assert "secret tail" not in logs.text
    assert key not in logs.text


async def test_library_logs_come_out_through_the_same_renderer(
    stack: Stack, logs: CapturedLogs
) -> None:
    # A request line aiohttp's parser rejects: aiohttp.server logs it, with a traceback.
    host, port = stack.http_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert b" 400 " in await reader.readline()
    writer.close()
    await writer.wait_closed()

    [line] = [line for line in logs.lines() if line.get("logger") == "aiohttp.server"]
    # aiohttp picks the level (debug or error) by whether a response was already started.
    assert line["level"] in ("debug", "error")
    assert "timestamp" in line
    assert "BadHttpMethod" in line["exception"]
