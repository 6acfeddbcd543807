"""Graceful shutdown of the real processes: ``python -m imagegen_service`` and
``python -m http_gateway`` get SIGTERM while a slow generation is in flight.

Both must finish that generation (200), refuse new work while they drain, and exit 0.
The slow part is the fake upstream, which runs in this test's event loop. The service's
drain follows its providers' ``timeout_seconds``: the generation here takes longer than the
fixed 10 s the service used to allow, and is charged once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig
from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from tests.conftest import UPSTREAM_KEY, Stack, bearer
from tests.fakes.loopback import free_port
from tests.fakes.openai_upstream import FakeOpenAIUpstream, slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADMIN_TOKEN = "shutdown-admin-token"
# Longer than the fixed grace the service once had (10 s), shorter than the provider's
# timeout_seconds below, which sets the drain now.
UPSTREAM_DELAY = 11.0
PROVIDER_TIMEOUT_SECONDS = 20
STARTUP_SECONDS = 20.0

SERVICE_TOML = """
[service]
grpc_host = "127.0.0.1"

[providers.upstream]
type = "openai"
base_url = "{upstream_url}"
api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
timeout_seconds = {timeout}
max_retries = 0

[models.slow-dalle]
provider = "upstream"
upstream_model = "dall-e-2"
sizes = ["256x256"]

[models.slow-dalle.price_usd]
default = "0.02"
"""


@contextlib.asynccontextmanager
async def process(
    module: str, environ: Mapping[str, str], log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m module`` with only ``environ`` of ours (no IMAGEGEN_* of the caller's),
    its stderr in ``log_path``; killed if the test leaves it running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(environ, IMAGEGEN_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def log_lines(log_path: Path) -> list[dict[str, object]]:
    lines = []
    for raw in log_path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            lines.append(orjson.loads(raw))
    return lines


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, seconds: float = STARTUP_SECONDS
) -> None:
    """Waits until ``check()`` says True."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _generate(http: aiohttp.ClientSession, url: str, key: str, model: str) -> int:
    async with http.post(
        url + "/v1/images/generations",
        json={
            "model": model,
            "prompt": "a slow snail",
            "size": "256x256",
            "response_format": "b64_json",
        },
        headers=bearer(key),
    ) as resp:
        body = await resp.json()
        if resp.status == 200:
            assert len(body["data"]) == 1
            assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG")
        return resp.status


async def test_service_drains_in_flight_generations_on_sigterm_and_exits_0(
    tmp_path: Path,
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY, default=slow(UPSTREAM_DELAY)) as fake:
        config_path = tmp_path / "imagegen.toml"
        config_path.write_text(
            textwrap.dedent(
                SERVICE_TOML.format(upstream_url=fake.base_url, timeout=PROVIDER_TIMEOUT_SECONDS)
            )
        )
        environ = {
            "IMAGEGEN_CONFIG": str(config_path),
            "IMAGEGEN_DATA_DIR": str(tmp_path / "data"),
            "IMAGEGEN_GRPC_PORT": str(grpc_port),
            "IMAGEGEN_METRICS_PORT": str(metrics_port),
            "IMAGEGEN_ADMIN_TOKEN": ADMIN_TOKEN,
            "IMAGEGEN_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
        }
        log_path = tmp_path / "service.log"
        async with (
            process("imagegen_service", environ, log_path) as service,
            grpc.aio.insecure_channel(address) as channel,
            aiohttp.ClientSession() as http,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                assert service.returncode is None, log_path.read_text()
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, "the service to serve")
            gateway = web.AppRunner(create_app(GatewayConfig(service_address=address)))
            await gateway.setup()
            try:
                await web.TCPSite(gateway, "127.0.0.1", 0).start()
                host, port = gateway.addresses[0][:2]
                account_id = await _drain_service(
                    service, channel, http, f"http://{host}:{port}", fake
                )
            finally:
                await gateway.cleanup()

            assert await asyncio.wait_for(service.wait(), 15) == 0
    lines = {line["event"]: line for line in log_lines(log_path)}
    # The drain bound comes from the configuration: the provider's timeout and a margin.
    assert lines["service.stopping"]["grace_seconds"] == PROVIDER_TIMEOUT_SECONDS + 15
    drained = lines["service.stopped"]["drained_seconds"]
    assert isinstance(drained, float) and drained < PROVIDER_TIMEOUT_SECONDS
    # Charged once for the generation that finished during the drain, nothing held.
    admin = await asyncio.create_subprocess_exec(
        str(BIN / "imagegen-admin"),
        "--json",
        "ledger",
        account_id,
        env={**os.environ, **environ},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(admin.communicate(), 60)
    assert admin.returncode == 0
    ledger = json.loads(out)
    kinds = [entry["kind"] for entry in ledger["entries"]]
    assert kinds.count("capture") == 1, kinds
    assert sum(e["available_delta_micros"] for e in ledger["entries"]) == 1_000_000 - 20_000


async def _drain_service(
    service: asyncio.subprocess.Process,
    channel: grpc.aio.Channel,
    http: aiohttp.ClientSession,
    gateway_url: str,
    fake: FakeOpenAIUpstream,
) -> str:
    """Stops the service in the middle of a generation; returns the paying account's id."""
    admin = admin_pb2_grpc.AdminStub(channel)
    admin_md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    account = await admin.CreateAccount(
        admin_pb2.CreateAccountRequest(name="drain", initial_balance_micros=1_000_000),
        metadata=admin_md,
    )
    key = (
        await admin.CreateKey(admin_pb2.CreateKeyRequest(account_id=account.id), metadata=admin_md)
    ).secret
    async with http.get(gateway_url + "/readyz") as resp:
        assert resp.status == 200

    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    in_flight = asyncio.create_task(_generate(http, gateway_url, key, "slow-dalle"))

    async def upstream_reached() -> bool:
        return fake.hits == 1

    await eventually(upstream_reached, "the generation to reach the upstream", seconds=5)
    service.send_signal(signal.SIGTERM)

    # The health service says so at once...
    update = await asyncio.wait_for(watch.read(), 5)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    # ...and new calls are refused while the generation is still running.
    images = images_pb2_grpc.ImageGenerationStub(channel)

    async def refused() -> bool:
        try:
            await images.ListModels(images_pb2.ListModelsRequest(), timeout=1)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    await eventually(refused, "new calls to be refused", seconds=5)
    async with http.get(gateway_url + "/readyz") as resp:
        assert resp.status == 503
    assert await _generate(http, gateway_url, key, "slow-dalle") == 503
    assert not in_flight.done()
    assert fake.hits == 1

    assert await in_flight == 200
    return str(account.id)


async def test_gateway_finishes_in_flight_requests_on_sigterm_and_exits_0(
    stack: Stack, fake: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    fake.script(slow(1.0))
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    environ = {"IMAGEGEN_HTTP_PORT": str(http_port), "IMAGEGEN_SERVICE_ADDRESS": stack.grpc_address}
    log_path = tmp_path / "gateway.log"
    async with (
        process("http_gateway", environ, log_path) as gateway,
        aiohttp.ClientSession() as http,
    ):

        async def healthy() -> bool:
            assert gateway.returncode is None, log_path.read_text()
            # Bounded: a connection left hanging as the gateway stops fails the test.
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as fresh,
                    fresh.get(url + "/healthz") as resp,
                ):
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False
            except TimeoutError:
                pytest.fail("a connection made while the gateway stopped was left hanging")

        await eventually(healthy, "the gateway to listen")
        in_flight = asyncio.create_task(_generate(http, url, key, "fake-dalle"))

        async def upstream_reached() -> bool:
            return fake.hits == 1

        await eventually(upstream_reached, "the request to reach the upstream", seconds=5)
        gateway.send_signal(signal.SIGTERM)

        async def refusing() -> bool:
            return not await healthy()

        await eventually(refusing, "the gateway to stop accepting", seconds=5)
        assert not in_flight.done()
        assert await in_flight == 200
        assert await asyncio.wait_for(gateway.wait(), 15) == 0
    requests = [line for line in log_lines(log_path) if line["event"] == "http.request"]
    assert [r["status"] for r in requests if r["route"] == "/v1/images/generations"] == [200]
    events = {line["event"]: line for line in log_lines(log_path)}
    # Its drain bound: the requests' gRPC deadline (request_timeout_seconds) and a margin.
    assert events["gateway.stopping"]["grace_seconds"] == 300 + 5
    # It stops once that request is answered, not at the end of its grace.
    drained = events["gateway.stopped"]["drained_seconds"]
    assert isinstance(drained, float) and drained < 5, drained
