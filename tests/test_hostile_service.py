"""Hostile input and faults, against the real stack: decompression bombs meet a decode budget
per request and per process (peak memory measured), a revoked key is answered as an unknown
one from the moment it is revoked, on every replica, each gRPC call has one request id that
its caller gets back, and undecodable messages are refused plainly.

The stack runs the service in this process, so the test process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) is the service's peak under a bomb.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from PIL import Image

from imagegen_service import inputs
from imagegen_service.gen import admin_pb2, admin_pb2_grpc, images_pb2, images_pb2_grpc
from imagegen_service.providers.registry import FACTORIES
from imagegen_service.stores.ledger_sql import LedgerStore
from tests.conftest import assert_openai_error, bearer
from tests.images_stack import FAKE_GPT_IMAGE, ImagesStack
from tests.stack import ADMIN_METADATA, ADMIN_TOKEN, Stack, start_stack
from tests.test_logging import CapturedLogs, logs  # noqa: F401
from tests.test_replicas import Replicas, database_url  # noqa: F401

BIN = Path(sys.executable).parent
OPENING = 10_000_000
LOCAL_IMAGE = 3_000  # micro-dollars per image of local-image
LOCAL_SKETCH = 1_000
EDITS = "/v1/images/edits"
GENERATIONS = "/v1/images/generations"
# Refused by validation for an active key: local-sketch makes 256x256 only.
INVALID_BODY = {"model": "local-sketch", "prompt": "a kite", "size": "3x3"}
VALID_BODY = {"model": "local-sketch", "prompt": "a kite", "size": "256x256"}
UNKNOWN_KEY = "sk-ig-" + "x" * 43
# A length-delimited field whose length never ends: no message type can parse it.
GARBAGE = b"\x0a\xff\xff\xff\xff\xff\xff"
MiB = 1024 * 1024


def _config(data_dir: Path) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{data_dir}"

        [gateway]
        max_upload_bytes = {3 * MiB}

        # Every answer carries rate-limit metadata; none of these tests comes near it.
        [rate_limits]
        requests_per_minute = 100000
        images_per_minute = 100000

        [providers.local]
        type = "local"

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256"]
        max_images = 4
        parameters = ["partial_images"]

        [models.local-sketch.price_usd]
        default = "0.001"

        [models.local-image]
        provider = "local"
        sizes = ["256x256", "1024x1024"]
        max_images = 4
        operations = ["generate", "edit", "variation"]
        max_input_image_bytes = {2 * MiB}

        [models.local-image.price_usd]
        default = "0.003"
        """
    )


@dataclass
class HostileStack(Stack):
    # Its configuration file and data directory, for imagegen-admin.
    home: Path


@pytest.fixture(scope="module")
async def hostile(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HostileStack]:
    root = tmp_path_factory.mktemp("hostile")
    async with start_stack(
        _config(root / "data"), root, stack_class=HostileStack, home=root
    ) as running:
        assert isinstance(running, HostileStack)
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- decoding: the budget per request and per process ---------------------------------------


def zeros_png(side: int) -> bytes:
    """A greyscale PNG of zeros: 8192x8192 compresses to about 63 KiB."""
    out = io.BytesIO()
    Image.new("L", (side, side), 0).save(out, "PNG", optimize=True)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims ``width`` x ``height`` and holds almost no data: what a
    bomb looks like to anything that reads only its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class Peak:
    before_mib: float = 0.0
    peak_mib: float = 0.0

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.before_mib


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@contextmanager
def peak_memory() -> Iterator[Peak]:
    """The process's resident set before the block and its high-water mark during it."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    peak = Peak(before_mib=_status_mib("VmRSS"))
    clear_refs.write_text("5")  # resets VmHWM to the current resident set
    yield peak
    peak.peak_mib = _status_mib("VmHWM")


def _edit_form(image: bytes, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in {"model": "local-image", "prompt": "a red kite", **fields}.items():
        form.add_field(name, value)
    form.add_field("image", io.BytesIO(image), filename="image.png", content_type="image/png")
    return form


async def test_a_decompression_bomb_is_refused_from_its_header_before_money_moves(
    hostile: HostileStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    bomb = zeros_png(8192)
    assert len(bomb) < 64 * 1024

    with peak_memory() as peak:
        async with http.post(
            hostile.http_url + EDITS,
            data=_edit_form(bomb, n="4", size="1024x1024", response_format="b64_json"),
            headers=bearer(key),
        ) as resp:
            error = await assert_openai_error(
                resp, 400, "invalid_value", param="image", should_retry=False
            )

    # 4 images of 8192x8192, each drawn from its own decode: four times the request's limit.
    assert f"{4 * 8192 * 8192:,}" in error["message"]
    assert f"{inputs.MAX_REQUEST_PIXELS:,} pixels per request" in error["message"]
    await hostile.assert_untouched(account_id, OPENING)
    # Before the budget, this request took the service to 2.5 GiB (docs/operations.md).
    assert peak.growth_mib < 64, peak


async def test_a_bomb_within_the_request_budget_is_served(
    hostile: HostileStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    with peak_memory() as peak:
        async with http.post(
            hostile.http_url + EDITS,
            data=_edit_form(zeros_png(8192), size="256x256", response_format="b64_json"),
            headers=bearer(key),
        ) as resp:
            assert resp.status == 200, await resp.text()
    await hostile.assert_balance(account_id, OPENING - LOCAL_IMAGE)
    # One decode of 64 Mi pixels: about 10 bytes a pixel at its peak.
    assert peak.growth_mib < 800, peak


async def test_a_flood_of_large_images_is_held_to_the_process_decode_budget(
    hostile: HostileStack,
) -> None:
    """Six requests at once, each at the request limit: two fit the process's budget, the
    others are told to retry; peak memory stays that of two decodes."""
    account_id, key, _ = await hostile.new_account(OPENING)
    stub = images_pb2_grpc.ImageGenerationStub(hostile.channel)
    image = zeros_png(8192)
    request = images_pb2.EditImagesRequest(
        model="local-image", prompt="x", images=[image], size="256x256", response_format="b64_json"
    )

    async def edit() -> grpc.aio.AioRpcError | None:
        call = stub.EditImages(request, metadata=(("authorization", f"Bearer {key}"),))
        try:
            [m async for m in call]
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    with peak_memory() as peak:
        outcomes = await asyncio.gather(*(edit() for _ in range(6)))

    refused = [exc for exc in outcomes if exc is not None]
    served = len(outcomes) - len(refused)
    assert 1 <= served <= 2 + 2, outcomes  # two at once; a late one may find room again
    assert refused, "every request found room: the budget was never reached"
    for exc in refused:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        info = _error_info(exc)
        assert info.reason == "RATE_LIMITED"
        assert info.metadata["retry_after_seconds"] == "1"
    await hostile.assert_balance(account_id, OPENING - served * LOCAL_IMAGE)
    # Two decodes at once (~650 MiB each), not six (~3.6 GiB).
    assert peak.growth_mib < 1600, peak


async def test_a_request_that_finds_the_budget_taken_gets_429_with_retry_after(
    hostile: HostileStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    budget = hostile.running.pipeline.decode_budget
    small = zeros_png(256)
    # As if other requests were decoding all the process may hold.
    with budget.reserve(budget.max_pixels - 256 * 256 + 1):
        async with http.post(
            hostile.http_url + EDITS,
            data=_edit_form(small, response_format="b64_json"),
            headers=bearer(key),
        ) as resp:
            await assert_openai_error(resp, 429, "rate_limit_exceeded", should_retry=True)
            assert resp.headers["Retry-After"] == "1"
    await hostile.assert_untouched(account_id, OPENING)
    assert budget.in_use == 0

    async with http.post(
        hostile.http_url + EDITS,
        data=_edit_form(small, response_format="b64_json"),
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200, await resp.text()
    await hostile.assert_balance(account_id, OPENING - LOCAL_IMAGE)
    assert budget.in_use == 0


@pytest.mark.parametrize(
    ("width", "height", "says"),
    [
        # Over twice Pillow's limit: Image.open itself refuses it.
        (20000, 20000, "larger than 8192x8192 pixels"),
        # Over the limit, under twice it: Pillow only warns; the side check refuses it.
        (9000, 9000, "is 9000x9000; each side must be at most 8192 pixels"),
    ],
)
async def test_an_image_too_large_is_refused_from_its_header(
    hostile: HostileStack, http: aiohttp.ClientSession, width: int, height: int, says: str
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    async with http.post(
        hostile.http_url + EDITS,
        data=_edit_form(png_header_only(width, height), response_format="b64_json"),
        headers=bearer(key),
    ) as resp:
        error = await assert_openai_error(resp, 400, "invalid_value", param="image")
    assert says in error["message"]
    await hostile.assert_untouched(account_id, OPENING)


async def test_an_upstream_that_takes_the_bytes_as_they_are_costs_no_decode_budget(
    images_stack: ImagesStack, images_fake: Any
) -> None:
    """The same bomb, n=4, to a model on an OpenAI upstream: this process never decodes it
    (only its header is read), so the decode budget does not refuse it."""
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with images_stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="fake-gpt-image",
            image=("bomb.png", zeros_png(8192), "image/png"),
            prompt="a red kite",
            n=4,
        )
    assert answer.data is not None
    assert len(answer.data) == 4
    await images_stack.assert_balance(account_id, OPENING - 4 * FAKE_GPT_IMAGE)


def test_every_provider_type_says_what_it_decodes() -> None:
    modules = {target.partition(":")[0] for target in FACTORIES.values()}
    assert modules <= set(inputs.DECODING), modules - set(inputs.DECODING)


def test_the_request_budget_counts_what_the_serving_provider_decodes() -> None:
    from imagegen_service.providers.base import InputImage
    from imagegen_service.providers.local import LocalRenderer

    image = InputImage(data=b"", format="png", width=4000, height=3000)
    mask = InputImage(data=b"", format="png", width=4000, height=3000, has_alpha=True)
    local = LocalRenderer()
    # The local renderer decodes every input once per image, in parallel; streamed, in turn.
    assert inputs.decode_pixels([local], [image, image], mask, n=3, stream=False) == 108_000_000
    assert inputs.decode_pixels([local], [image, image], mask, n=3, stream=True) == 36_000_000
    assert inputs.decode_pixels([], [image], mask, n=3, stream=False) == 0


# -- revocation: at once, whatever the request, on every replica ----------------------------


async def _answer(
    http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any], str | None]:
    async with http.post(url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        return resp.status, await resp.json(), resp.headers.get("x-should-retry")


def _admin_cli(root: Path, *args: str, database: str | None = None) -> None:
    """``imagegen-admin`` as an operator runs it, on the stack's own database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(IMAGEGEN_CONFIG=str(root / "imagegen.toml"), IMAGEGEN_DATA_DIR=str(root / "data"))
    if database is not None:
        env["IMAGEGEN_DATABASE_URL"] = database
    subprocess.run(
        [str(BIN / "imagegen-admin"), *args], env=env, capture_output=True, timeout=60, check=True
    )


@pytest.mark.parametrize("revoke_with", ["admin_api", "cli"])
async def test_a_revoked_key_is_answered_as_an_unknown_one_at_once(
    hostile: HostileStack, http: aiohttp.ClientSession, revoke_with: str
) -> None:
    account_id, key, key_id = await hostile.new_account(OPENING)
    # Authenticated once: the service's key cache now holds the key.
    assert (await _answer(http, hostile.http_url, key, VALID_BODY))[0] == 200
    assert (await _answer(http, hostile.http_url, key, INVALID_BODY))[0] == 400

    if revoke_with == "cli":
        await asyncio.to_thread(_admin_cli, hostile.home, "keys", "revoke", key_id)
    else:
        await hostile.revoke(key_id)

    for body in (INVALID_BODY, VALID_BODY, {**VALID_BODY, "n": 99}):
        revoked = await _answer(http, hostile.http_url, key, body)
        unknown = await _answer(http, hostile.http_url, UNKNOWN_KEY, body)
        assert revoked == unknown, body
        assert revoked[0] == 401
        assert revoked[1]["error"]["code"] == "invalid_api_key"
    await hostile.assert_balance(account_id, OPENING - LOCAL_SKETCH)


async def test_a_revoked_key_over_its_rate_limit_gets_401_not_429(
    hostile: HostileStack, http: aiohttp.ClientSession
) -> None:
    _, key, key_id = await hostile.new_account(OPENING)
    await hostile.running.ledger.set_key_limits(key_id, 1, None)
    assert (await _answer(http, hostile.http_url, key, VALID_BODY))[0] == 200
    assert (await _answer(http, hostile.http_url, key, VALID_BODY))[0] == 429

    await hostile.revoke(key_id)

    revoked = await _answer(http, hostile.http_url, key, VALID_BODY)
    assert revoked == await _answer(http, hostile.http_url, UNKNOWN_KEY, VALID_BODY)
    assert revoked[0] == 401


async def _grpc_answer(
    channel: grpc.aio.Channel, key: str, request: images_pb2.GenerateImagesRequest
) -> tuple[Any, ...]:
    """Everything a gRPC caller sees of a refused call, but the request id."""
    call = images_pb2_grpc.ImageGenerationStub(channel).GenerateImages(
        request, metadata=(("authorization", f"Bearer {key}"),)
    )
    messages = []
    try:
        async for message in call:
            messages.append(message)
    except grpc.aio.AioRpcError as exc:
        trailing = tuple((k, v) for k, v in exc.trailing_metadata() or () if k != "x-request-id")
        initial = tuple(await call.initial_metadata() or ())
        return exc.code(), exc.details(), trailing, initial, len(messages)
    raise AssertionError("the call succeeded")


async def test_a_revoked_keys_grpc_answer_is_an_unknown_keys_metadata_and_all(
    hostile: HostileStack,
) -> None:
    """Streams with rate limits send their headers ahead of the first image: only once the
    hold has found the key active, so a revoked key's stream gets none."""
    _, key, key_id = await hostile.new_account(OPENING)
    stream = images_pb2.GenerateImagesRequest(
        model="local-sketch", prompt="a kite", size="256x256", stream=True
    )
    invalid = images_pb2.GenerateImagesRequest(model="local-sketch", prompt="a kite", size="3x3")
    call = images_pb2_grpc.ImageGenerationStub(hostile.channel).GenerateImages(
        stream, metadata=(("authorization", f"Bearer {key}"),)
    )
    assert [m async for m in call][-1].HasField("summary")
    assert any(k == "x-ratelimit-limit-requests" for k, _ in await call.initial_metadata())

    await hostile.revoke(key_id)

    for request in (stream, invalid):
        revoked = await _grpc_answer(hostile.channel, key, request)
        assert revoked == await _grpc_answer(hostile.channel, UNKNOWN_KEY, request)
        assert revoked[0] == grpc.StatusCode.UNAUTHENTICATED


class _AdminReplicas(Replicas):
    """Service replicas in their own processes, with the Admin API open."""

    def env(self, port: int) -> dict[str, str]:
        return {**super().env(port), "IMAGEGEN_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.mark.timeout(180)
async def test_a_revocation_reaches_every_replica_at_once(
    database_url: str,  # noqa: F811
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Two replicas on one database (SQLite file, PostgreSQL): this process's (behind the
    gateway) and another process. Both have the keys cached; a key revoked with the CLI, and
    another with the other replica's Admin API, are each refused by both at once."""
    root = tmp_path / "stack"
    root.mkdir()
    async with start_stack(
        _config(root / "data"),
        root,
        environ={"IMAGEGEN_DATABASE_URL": database_url},
        stack_class=HostileStack,
        home=root,
    ) as here:
        replicas_root = tmp_path / "replicas"
        replicas_root.mkdir()
        replicas = _AdminReplicas(replicas_root, database_url, _config(replicas_root / "data"))
        try:
            (port,) = await replicas.start(1)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as there:
                account_id, by_cli, by_cli_id = await here.new_account(OPENING)
                other = await here.admin.CreateKey(
                    admin_pb2.CreateKeyRequest(account_id=account_id), metadata=ADMIN_METADATA
                )
                by_api, by_api_id = other.secret, other.key.id
                valid = images_pb2.GenerateImagesRequest(
                    model="local-sketch", prompt="a kite", size="256x256"
                )
                invalid = images_pb2.GenerateImagesRequest(
                    model="local-sketch", prompt="a kite", size="3x3"
                )
                for key in (by_cli, by_api):
                    assert (await _answer(http, here.http_url, key, VALID_BODY))[0] == 200
                    stub = images_pb2_grpc.ImageGenerationStub(there)
                    call = stub.GenerateImages(
                        valid, metadata=(("authorization", f"Bearer {key}"),)
                    )
                    assert [m async for m in call][-1].HasField("summary")

                unknown_http = await _answer(http, here.http_url, UNKNOWN_KEY, INVALID_BODY)
                unknown_grpc = await _grpc_answer(there, UNKNOWN_KEY, invalid)
                assert unknown_grpc[0] == grpc.StatusCode.UNAUTHENTICATED

                await asyncio.to_thread(
                    _admin_cli, root, "keys", "revoke", by_cli_id, database=database_url
                )
                assert await _answer(http, here.http_url, by_cli, INVALID_BODY) == unknown_http
                assert await _grpc_answer(there, by_cli, invalid) == unknown_grpc

                await admin_pb2_grpc.AdminStub(there).RevokeKey(
                    admin_pb2.RevokeKeyRequest(key_id=by_api_id), metadata=ADMIN_METADATA
                )
                assert await _answer(http, here.http_url, by_api, INVALID_BODY) == unknown_http
                assert await _grpc_answer(there, by_api, invalid) == unknown_grpc

                store = LedgerStore(database_url)
                try:
                    account = await store.get_account(account_id)
                finally:
                    await store.close()
                assert (account.available_micros, account.held_micros) == (
                    OPENING - 4 * LOCAL_SKETCH,
                    0,
                )
        finally:
            replicas.stop_all()


# -- request ids: one per call, in every log line of the call and back to the caller -------


def _request_ids(metadata: Any) -> list[str]:
    return [v for k, v in metadata or () if k == "x-request-id"]


async def test_a_refused_grpc_call_without_a_request_id_gets_one_and_is_logged_under_it(
    hostile: HostileStack,
    logs: CapturedLogs,  # noqa: F811
) -> None:
    call = images_pb2_grpc.ImageGenerationStub(hostile.channel).GenerateImages(
        images_pb2.GenerateImagesRequest(model="local-sketch", prompt="a kite"),
        metadata=(("authorization", f"Bearer {UNKNOWN_KEY}"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        [m async for m in call]

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [request_id] = _request_ids(refused.value.trailing_metadata())
    assert request_id.startswith("req_")
    assert _request_ids(await call.initial_metadata()) == []
    logged = [line for line in logs.lines() if "request_id" in line]
    assert {line["request_id"] for line in logged} == {request_id}
    assert [line["reason"] for line in logged if line["event"] == "rpc.refused"] == [
        "INVALID_API_KEY"
    ]


async def test_a_served_grpc_call_returns_the_id_its_log_lines_carry(
    hostile: HostileStack,
    logs: CapturedLogs,  # noqa: F811
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    call = images_pb2_grpc.ImageGenerationStub(hostile.channel).GenerateImages(
        images_pb2.GenerateImagesRequest(model="local-sketch", prompt="a kite"),
        metadata=(("authorization", f"Bearer {key}"),),
    )
    assert [m async for m in call][-1].HasField("summary")

    trailing = await call.trailing_metadata()
    [request_id] = _request_ids(trailing)
    # The rate-limit metadata travels beside it.
    assert any(k == "x-ratelimit-limit-requests" for k, _ in trailing)
    [generation] = [line for line in logs.lines() if line["event"] == "generation"]
    assert (generation["request_id"], generation["account_id"]) == (request_id, account_id)
    assert {line["request_id"] for line in logs.lines() if "request_id" in line} == {request_id}


@pytest.mark.parametrize(
    ("given", "kept"),
    [("req-from-the-caller.42", True), ("two words", False), ("x" * 129, False)],
)
async def test_a_callers_request_id_is_kept_when_it_is_a_plain_token(
    hostile: HostileStack, given: str, kept: bool
) -> None:
    call = images_pb2_grpc.ImageGenerationStub(hostile.channel).ListModels(
        images_pb2.ListModelsRequest(),
        metadata=(("authorization", f"Bearer {UNKNOWN_KEY}"), ("x-request-id", given)),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    [request_id] = _request_ids(await call.trailing_metadata())
    assert (request_id == given) is kept
    if not kept:
        assert request_id.startswith("req_")


# -- undecodable messages: INVALID_ARGUMENT and one log line, whatever the method -----------


def _every_method() -> list[tuple[str, bool]]:
    """(full method name, server-streaming) for every method the service registers."""
    services = [
        images_pb2.DESCRIPTOR.services_by_name["ImageGeneration"],
        admin_pb2.DESCRIPTOR.services_by_name["Admin"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return [
        (f"/{service.full_name}/{method.name}", method.server_streaming)
        for service in services
        for method in service.methods
    ]


async def test_undecodable_messages_are_refused_with_one_line_and_no_traceback(
    hostile: HostileStack,
    logs: CapturedLogs,  # noqa: F811
) -> None:
    methods = _every_method()
    assert len(methods) >= 10
    for method, server_streaming in methods:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            if server_streaming:
                stream = hostile.channel.unary_stream(method)
                [m async for m in stream(GARBAGE, timeout=10)]
            else:
                await hostile.channel.unary_unary(method)(GARBAGE, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert method in (refused.value.details() or ""), method
        assert _error_info(refused.value).reason == "INVALID_PARAMETER", method
        assert len(_request_ids(refused.value.trailing_metadata())) == 1, method

    # gRPC's own debug chatter aside, one line per message.
    lines = [line for line in logs.lines() if line["level"] != "debug"]
    assert [line["event"] for line in lines] == ["rpc.undecodable"] * len(methods), lines
    assert [line["method"] for line in lines] == [method for method, _ in methods]
    assert all(line["level"] == "info" and "exception" not in line for line in lines)
    assert "Traceback" not in logs.text


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info
