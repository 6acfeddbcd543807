"""Several real service processes on one database: the money stays exact under a race
between replicas and through a crash between hold and capture. Runs on SQLite and on a
real PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagegen_service import keys
from imagegen_service.gen import images_pb2, images_pb2_grpc
from imagegen_service.stores.ledger_sql import LedgerStore
from tests.fakes.loopback import free_port
from tests.fakes.openai_upstream import FakeOpenAIUpstream, slow
from tests.services import scratch_postgres_database

PRICE = 1_000  # micro-dollars per 256x256 image in the config below


def _config(upstream_url: str = "http://127.0.0.1:9/v1", hold_ttl_seconds: int = 60) -> str:
    # A hold must outlive the slowest request; only the crash test wants it short.
    return textwrap.dedent(
        f"""
        [service]
        hold_ttl_seconds = {hold_ttl_seconds}
        housekeeping_seconds = 0.3

        [providers.local]
        type = "local"
        precomputed = true

        [providers.upstream]
        type = "openai"
        base_url = "{upstream_url}"
        api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
        timeout_seconds = 60
        max_retries = 0

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256"]
        max_images = 4

        [models.local-sketch.price_usd]
        default = "0.001"

        [models.slow-dalle]
        provider = "upstream"
        upstream_model = "dall-e-2"
        sizes = ["256x256"]

        [models.slow-dalle.price_usd]
        default = "0.001"
        """
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
        store = LedgerStore(url)
        await store.upgrade()
        await store.close()
        yield url
        return
    async with scratch_postgres_database() as url:
        store = LedgerStore(url)
        await store.upgrade()
        await store.close()
        yield url


class Replicas:
    def __init__(self, root: Path, database_url: str, config: str) -> None:
        self.root = root
        self.database_url = database_url
        (root / "imagegen.toml").write_text(config)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
        env.update(
            IMAGEGEN_CONFIG=str(self.root / "imagegen.toml"),
            IMAGEGEN_DATA_DIR=str(self.root / "data"),
            IMAGEGEN_DATABASE_URL=self.database_url,
            IMAGEGEN_GRPC_PORT=str(port),
            IMAGEGEN_METRICS_PORT="0",
            IMAGEGEN_SIGNING_KEY="replica-signing-key",
            IMAGEGEN_TEST_UPSTREAM_KEY="sk-upstream-test",
            IMAGEGEN_LOG_LEVEL="WARNING",
        )
        return env

    async def start(self, count: int) -> list[int]:
        ports = [free_port() for _ in range(count)]
        for port in ports:
            self._spawn(port)
        await asyncio.gather(*(self._wait_serving(port) for port in ports))
        return ports

    def _spawn(self, port: int) -> None:
        with (self.root / f"replica-{port}.log").open("ab") as log:
            self.processes[port] = subprocess.Popen(
                [sys.executable, "-m", "imagegen_service"],
                env=self.env(port),
                stdout=log,
                stderr=log,
            )

    async def _wait_serving(self, port: int) -> None:
        deadline = time.monotonic() + 60
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.processes[port].poll() is None, "the service exited at start"
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"service on port {port} did not start")

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def replicas_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "replicas"
    root.mkdir()
    yield root


async def _account(store: LedgerStore, balance: int) -> tuple[str, str]:
    account = await store.create_account("race", balance)
    secret = keys.new_secret()
    await store.create_key(account.id, keys.hash_secret(secret))
    return account.id, secret


async def _generate(
    channel: grpc.aio.Channel, secret: str, model: str = "local-sketch"
) -> grpc.StatusCode:
    stub = images_pb2_grpc.ImageGenerationStub(channel)
    call = stub.GenerateImages(
        images_pb2.GenerateImagesRequest(
            model=model, prompt="race", size="256x256", response_format="b64_json"
        ),
        metadata=(("authorization", f"Bearer {secret}"),),
        timeout=120,
    )
    try:
        messages = [m async for m in call]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert messages[-1].HasField("summary")
    return grpc.StatusCode.OK


@pytest.mark.timeout(180)
async def test_500_requests_over_4_replicas_spend_exactly_the_balance(
    database_url: str, replicas_root: Path
) -> None:
    replicas = Replicas(replicas_root, database_url, _config())
    store = LedgerStore(database_url)
    try:
        account_id, secret = await _account(store, 37 * PRICE)
        ports = await replicas.start(4)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        try:
            codes = await asyncio.gather(
                *(_generate(channels[i % len(channels)], secret) for i in range(500))
            )
        finally:
            for channel in channels:
                await channel.close()
        outcome = collections.Counter(code.name for code in codes)
        assert outcome == {"OK": 37, "FAILED_PRECONDITION": 463}, outcome
        account = await store.get_account(account_id)
        assert (account.available_micros, account.held_micros) == (0, 0)
        assert await store.ledger_sums(account_id) == (0, 0)
        entries = await store.ledger(account_id, 1000)
        assert sum(1 for e in entries if e.kind == "capture") == 37
    finally:
        replicas.stop_all()
        await store.close()


@pytest.mark.timeout(120)
async def test_a_replica_killed_between_hold_and_capture_leaves_nothing_charged(
    database_url: str, replicas_root: Path
) -> None:
    async with FakeOpenAIUpstream(api_key="sk-upstream-test") as upstream:
        upstream.script(slow(30))
        replicas = Replicas(
            replicas_root, database_url, _config(upstream.base_url, hold_ttl_seconds=2)
        )
        store = LedgerStore(database_url)
        try:
            account_id, secret = await _account(store, 5 * PRICE)
            (victim,) = await replicas.start(1)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{victim}")
            request = asyncio.create_task(_generate(channel, secret, model="slow-dalle"))
            deadline = time.monotonic() + 20
            while (await store.get_account(account_id)).held_micros == 0:
                assert time.monotonic() < deadline, "the hold was never placed"
                await asyncio.sleep(0.05)
            replicas.kill(victim)
            assert await request == grpc.StatusCode.UNAVAILABLE
            await channel.close()
            held = await store.get_account(account_id)
            assert (held.available_micros, held.held_micros) == (4 * PRICE, PRICE)

            # Another replica's housekeeping releases the orphaned hold once it expires.
            await replicas.start(1)
            deadline = time.monotonic() + 20
            while (await store.get_account(account_id)).held_micros:
                assert time.monotonic() < deadline, "the orphaned hold was never released"
                await asyncio.sleep(0.1)
            after = await store.get_account(account_id)
            assert (after.available_micros, after.held_micros) == (5 * PRICE, 0)
            assert await store.ledger_sums(account_id) == (5 * PRICE, 0)
            kinds = [e.kind for e in reversed(await store.ledger(account_id))]
            assert kinds == ["credit", "hold", "release"]
        finally:
            replicas.stop_all()
            await store.close()
