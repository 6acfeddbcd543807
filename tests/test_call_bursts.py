"""A burst of calls arriving at once is served, not dropped.

gRPC's server keeps calls that its application has not picked up yet in a pending queue,
and by default sheds them at random past 1,000 pending (all past 3,000) with CANCELLED,
before any of our code sees them. A service whose event loop is busy for a moment (or a
gateway reconnecting with a backlog) then turns capacity it has into 503s that no log or
metric of the service explains. The real service process is paused while one connection
queues 2,000 calls, then resumed: it must take every one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from collections import Counter
from pathlib import Path

import grpc

from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from tests.fakes.loopback import free_port
from tests.test_shutdown import ADMIN_TOKEN, process
from tests.test_startup_faults import serving

BURST = 2_000
PRICE_MICROS = 1
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

SERVICE_TOML = """
[service]
grpc_host = "127.0.0.1"

[rate_limits]
requests_per_minute = 0
images_per_minute = 0

[providers.local]
type = "local"
precomputed = true

[models.burst-sketch]
provider = "local"
sizes = ["256x256"]

[models.burst-sketch.price_usd]
default = "0.000001"
"""


async def test_two_thousand_calls_queued_at_once_are_all_served_and_charged(
    tmp_path: Path,
) -> None:
    grpc_port = free_port()
    address = f"127.0.0.1:{grpc_port}"
    config_path = tmp_path / "imagegen.toml"
    config_path.write_text(textwrap.dedent(SERVICE_TOML))
    environ = {
        "IMAGEGEN_CONFIG": str(config_path),
        "IMAGEGEN_DATA_DIR": str(tmp_path / "data"),
        "IMAGEGEN_GRPC_PORT": str(grpc_port),
        "IMAGEGEN_METRICS_PORT": "0",
        "IMAGEGEN_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    log_path = tmp_path / "service.log"
    async with (
        process("imagegen_service", environ, log_path) as service,
        grpc.aio.insecure_channel(address) as channel,
    ):
        await serving(channel, service, log_path)
        admin = admin_pb2_grpc.AdminStub(channel)
        opening = 1_000_000
        account = await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(name="burst", initial_balance_micros=opening),
            metadata=ADMIN,
        )
        created = await admin.CreateKey(
            admin_pb2.CreateKeyRequest(account_id=account.id), metadata=ADMIN
        )
        images = images_pb2_grpc.ImageGenerationStub(channel)
        auth = (("authorization", f"Bearer {created.secret}"),)
        request = images_pb2.GenerateImagesRequest(
            model="burst-sketch", prompt="a flock of starlings", size="256x256"
        )

        async def call() -> str:
            try:
                async for _ in images.GenerateImages(request, metadata=auth, timeout=120):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        # Paused, the service reads nothing: every call's headers wait in its socket, and
        # on resuming its gRPC core has them all before the application has taken one.
        os.kill(service.pid, signal.SIGSTOP)
        try:
            calls = [asyncio.ensure_future(call()) for _ in range(BURST)]
            await asyncio.sleep(1.0)
        finally:
            os.kill(service.pid, signal.SIGCONT)
        outcomes = Counter(await asyncio.gather(*calls))

        assert outcomes == {"OK": BURST}, outcomes
        after = await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account.id), metadata=ADMIN
        )
        assert (after.available_micros, after.held_micros) == (
            opening - BURST * PRICE_MICROS,
            0,
        )
