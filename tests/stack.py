"""The real stack on loopback, built from a TOML string: the gRPC service (``load_config`` +
``start_service``) and the HTTP gateway (``create_app`` on an AppRunner), plus the ``Stack``
handle through which tests make accounts and check money via the Admin gRPC API.

``tests/conftest.py`` builds the session's stack with it; test modules that need their own
configuration (other providers, other routing settings) build theirs the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
from aiohttp import web

from http_gateway.app import create_app
from http_gateway.config import load_gateway_config
from imagegen_service.config import ServiceConfig, load_config
from imagegen_service.gen import admin_pb2, admin_pb2_grpc
from imagegen_service.server import RunningService, start_service

ADMIN_TOKEN = "test-admin-token"
SIGNING_KEY = "test-signing-key"
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@dataclass
class Stack:
    http_url: str
    grpc_address: str
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
        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.http_url + "/v1", api_key=key, **kw)

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


@asynccontextmanager
async def start_stack(
    config_toml: str,
    root: Path,
    *,
    environ: Mapping[str, str] | None = None,
    stack_class: type[Stack] = Stack,
    **extra: Any,
) -> AsyncIterator[Stack]:
    """Writes ``config_toml`` to ``root/imagegen.toml`` and runs the service and the gateway
    from it (data in ``root/data``; the gateway reads the same file's ``[gateway]`` table)
    until the block ends. ``environ`` adds to the environment the service sees (provider
    credentials); the admin token and the signing key are always the ones above.
    ``stack_class`` and ``extra`` let a caller hand back a Stack subclass with more fields."""
    data_dir = root / "data"
    config_path = root / "imagegen.toml"
    config_path.write_text(config_toml)
    config = load_config(
        environ={
            "IMAGEGEN_CONFIG": str(config_path),
            "IMAGEGEN_DATA_DIR": str(data_dir),
            "IMAGEGEN_ADMIN_TOKEN": ADMIN_TOKEN,
            "IMAGEGEN_SIGNING_KEY": SIGNING_KEY,
            # Stacks run side by side: no fixed metrics port unless a test asks for one.
            "IMAGEGEN_METRICS_PORT": "0",
            **(environ or {}),
        }
    )
    running: RunningService | None = None
    runner: web.AppRunner | None = None
    channel: grpc.aio.Channel | None = None
    try:
        running = await start_service(config, port=0)
        grpc_address = f"127.0.0.1:{running.port}"
        gateway_config = load_gateway_config(
            environ={"IMAGEGEN_CONFIG": str(config_path), "IMAGEGEN_SERVICE_ADDRESS": grpc_address}
        )
        runner = web.AppRunner(create_app(gateway_config), shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        channel = grpc.aio.insecure_channel(grpc_address)
        yield stack_class(
            http_url=f"http://{host}:{port}",
            grpc_address=grpc_address,
            config=config,
            running=running,
            channel=channel,
            **extra,
        )
    finally:
        if channel is not None:
            await channel.close(grace=None)
        if runner is not None:
            await runner.cleanup()
        if running is not None:
            await running.stop(grace=1)
