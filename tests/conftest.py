"""Shared fixtures: the real stack (fake upstream, gRPC service, HTTP gateway) on loopback.

The stack is started once per session. Every test makes its own account through the real
Admin gRPC API, so tests never share money. Helpers for the assertions that several test
files make (OpenAI error shape, untouched balances, image sizes) live here too.
"""

from __future__ import annotations

import io
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from aiohttp import web
from PIL import Image

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig
from imagegen_service.config import ServiceConfig, load_config
from imagegen_service.gen import admin_pb2, admin_pb2_grpc
from imagegen_service.server import RunningService, start_service
from tests.fakes.openai_upstream import FakeOpenAIUpstream

ADMIN_TOKEN = "test-admin-token"
SIGNING_KEY = "test-signing-key"
UPSTREAM_KEY = "sk-upstream-test"
MAX_BODY_BYTES = 65536
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

# Prices of the test catalog, in micro-dollars.
LOCAL_256 = 1_000
LOCAL_DEFAULT = 2_000
LOCAL_HD = 4_000
FAKE_DALLE = 20_000
DEADEND_DALLE = 30_000


def free_closed_port() -> int:
    """A loopback port that nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


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
class Stack:
    http_url: str
    grpc_address: str
    fake: FakeOpenAIUpstream
    config: ServiceConfig
    running: RunningService
    # A channel to the service, shared by the helpers and by tests that speak gRPC.
    channel: grpc.aio.Channel
    admin: admin_pb2_grpc.AdminAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    async def new_account(self, balance_micros: int) -> tuple[str, str, str]:
        """A fresh account with one API key: (account_id, api_key_secret, key_id)."""
        account = await self.admin.CreateAccount(
            admin_pb2.CreateAccountRequest(name="test", initial_balance_micros=balance_micros),
            metadata=ADMIN_METADATA,
        )
        created = await self.admin.CreateKey(
            admin_pb2.CreateKeyRequest(account_id=account.id), metadata=ADMIN_METADATA
        )
        return account.id, created.secret, created.key.id

    async def revoke(self, key_id: str) -> admin_pb2.ApiKey:
        return await self.admin.RevokeKey(
            admin_pb2.RevokeKeyRequest(key_id=key_id), metadata=ADMIN_METADATA
        )

    async def account(self, account_id: str) -> admin_pb2.Account:
        return await self.admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account_id), metadata=ADMIN_METADATA
        )

    async def ledger(self, account_id: str) -> list[admin_pb2.LedgerEntry]:
        """The account's ledger entries through the Admin API, oldest first."""
        answer = await self.admin.ListLedger(
            admin_pb2.ListLedgerRequest(account_id=account_id, limit=1000),
            metadata=ADMIN_METADATA,
        )
        return sorted(answer.entries, key=lambda e: e.id)

    def openai_client(self, key: str, **kw: Any) -> openai.AsyncOpenAI:
        """The official SDK pointed at the gateway; the caller must close it."""
        return openai.AsyncOpenAI(base_url=self.http_url + "/v1", api_key=key, max_retries=0, **kw)

    async def assert_balance(self, account_id: str, available: int, held: int = 0) -> None:
        """The account holds exactly this, and its ledger entries sum to it."""
        account = await self.account(account_id)
        assert (account.available_micros, account.held_micros) == (available, held)
        assert await self.running.ledger.ledger_sums(account_id) == (available, held)

    async def assert_untouched(self, account_id: str, opening_micros: int) -> None:
        """Nothing was held or charged: the opening credit is the only ledger entry."""
        await self.assert_balance(account_id, opening_micros, 0)
        entries = await self.ledger(account_id)
        assert [(e.kind, e.available_delta_micros, e.held_delta_micros) for e in entries] == [
            ("credit", opening_micros, 0)
        ]

    async def assert_not_charged(self, account_id: str, opening_micros: int) -> None:
        """A hold may have been placed, but it was released in full and nothing captured."""
        await self.assert_balance(account_id, opening_micros, 0)
        kinds = [e.kind for e in await self.ledger(account_id)]
        assert "capture" not in kinds
        assert kinds in (["credit"], ["credit", "hold", "release"])


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    fake = FakeOpenAIUpstream(api_key=UPSTREAM_KEY)
    upstream_url = await fake.start()
    runner: web.AppRunner | None = None
    running: RunningService | None = None
    channel: grpc.aio.Channel | None = None
    try:
        root = tmp_path_factory.mktemp("stack")
        data_dir = root / "data"
        config_path = root / "imagegen.toml"
        config_path.write_text(_config_toml(data_dir, upstream_url, free_closed_port()))
        config = load_config(
            environ={
                "IMAGEGEN_CONFIG": str(config_path),
                "IMAGEGEN_DATA_DIR": str(data_dir),
                "IMAGEGEN_ADMIN_TOKEN": ADMIN_TOKEN,
                "IMAGEGEN_SIGNING_KEY": SIGNING_KEY,
                "IMAGEGEN_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
            }
        )
        running = await start_service(config, port=0)
        grpc_address = f"127.0.0.1:{running.port}"
        app = create_app(GatewayConfig(service_address=grpc_address, max_body_bytes=MAX_BODY_BYTES))
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        channel = grpc.aio.insecure_channel(grpc_address)
        yield Stack(
            http_url=f"http://{host}:{port}",
            grpc_address=grpc_address,
            fake=fake,
            config=config,
            running=running,
            channel=channel,
        )
    finally:
        if channel is not None:
            await channel.close(grace=None)
        if runner is not None:
            await runner.cleanup()
        if running is not None:
            await running.stop(grace=1)
        await fake.stop()


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
