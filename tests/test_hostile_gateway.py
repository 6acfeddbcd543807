"""Hostile callers and faults against the real gateway, driven with raw sockets where no
HTTP client would send such bytes:

- every gRPC status the gateway can receive has a deliberate HTTP answer in OpenAI's shape;
- an upload is refused before its body is read when its key is bad, its account empty, or
  too many uploads are in flight, and many large unauthenticated uploads leave the
  gateway's memory where it was;
- a client that leaves mid-body is counted as 499 and logged in one line, not as a 500;
- neither the key nor the prompt of a request aiohttp's parser rejects reaches any log line
  of the gateway process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import orjson
import pytest
import structlog
from aiohttp import web
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig
from imagegen_service.gen import images_pb2, images_pb2_grpc
from imagegen_service.logging_setup import configure_logging
from tests.conftest import assert_openai_error, bearer
from tests.fakes.loopback import free_port
from tests.stack import Stack, start_stack
from tests.test_openapi import Contract

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
GENERATIONS = "/v1/images/generations"
OPENING = 1_000_000
PRICE = 3_000
MiB = 1024 * 1024
BOUNDARY = "hostile-boundary-7f3a"
PROMPT = "a lighthouse called Maribelle on a stormy night"
PROMPT_WORDS = ("Maribelle", "lighthouse", "stormy")

_TOML = """
[providers.local]
type = "local"

[models.local-image]
provider = "local"
sizes = ["256x256"]
max_images = 2
operations = ["generate", "edit", "variation"]

[models.local-image.price_usd]
default = "0.003"
"""


@dataclass
class HostileStack(Stack):
    # Where the stack's configuration file lives (a gateway process reads it too).
    config_dir: Path = field(kw_only=True)


@pytest.fixture(scope="module")
async def hostile(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[HostileStack]:
    """A stack with the gateway's default upload limits (64 MiB, 4 in flight)."""
    root = tmp_path_factory.mktemp("hostile")
    async with start_stack(_TOML, root, stack_class=HostileStack, config_dir=root) as running:
        yield cast(HostileStack, running)


@pytest.fixture(scope="module")
async def contract(hostile: HostileStack) -> Contract:
    """The gateway's own OpenAPI document, to hold the answers below against."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(hostile.http_url + "/openapi.json") as resp,
    ):
        return Contract(await resp.json())


@asynccontextmanager
async def _gateway(config: GatewayConfig) -> AsyncIterator[str]:
    """Another real gateway with its own settings; yields its base URL."""
    runner = web.AppRunner(create_app(config), shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


# -- raw HTTP ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI error object; fails unless the body is exactly that shape."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        document = orjson.loads(self.body)
        assert set(document) == {"error"}, document
        error: dict[str, Any] = document["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["message"]
        assert self.headers.get("x-request-id")
        return error


def conforms(contract: Contract, path: str, answer: Answer, method: str = "post") -> None:
    content_type = answer.headers.get("content-type", "").split(";")[0]
    contract.check(path, method, answer.status, answer.headers, content_type, answer.body)


class Raw:
    """One TCP connection to a gateway, written and read by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Raw:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float = 5.0) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), within)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), within)
        return Answer(int(status_line.split()[1]), headers, body)

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.wait_closed()


def png(side: int = 256) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (30, 90, 160)).save(out, "PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], files: list[tuple[str, bytes]]) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, data in files:
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            'filename="in.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def upload_head(
    path: str, length: int, key: str | None = None, extra: tuple[str, ...] = ()
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {length}",
        *([f"Authorization: Bearer {key}"] if key is not None else []),
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_EDIT_FIELDS = {"model": "local-image", "prompt": "a red moon", "response_format": "b64_json"}
_VARIATION_FIELDS = {"model": "local-image", "response_format": "b64_json"}


def _fields(path: str) -> dict[str, str]:
    return _EDIT_FIELDS if path == EDITS else _VARIATION_FIELDS


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and labels.items() <= sample_labels.items()
        )


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        return Scrape(await resp.text())


# -- every gRPC status has an answer ---------------------------------------------------------


class ScriptedService(images_pb2_grpc.ImageGenerationServicer):
    """A real gRPC server whose every image RPC fails with the status set in ``status``; it
    has no CheckAccess unless ``check_access`` is set (a service older than the gateway)."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None
        self.check_access = True
        self.edits: list[images_pb2.EditImagesRequest] = []

    async def _fail(self, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        assert self.status is not None
        await context.abort(self.status.code, self.status.details, self.status.trailing_metadata)

    async def GenerateImages(  # type: ignore[override]
        self,
        request: images_pb2.GenerateImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        await self._fail(context)
        yield images_pb2.GenerateImagesResponse()

    async def EditImages(  # type: ignore[override]
        self,
        request: images_pb2.EditImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[images_pb2.GenerateImagesResponse]:
        self.edits.append(request)
        await self._fail(context)
        yield images_pb2.GenerateImagesResponse()

    async def ListModels(  # type: ignore[override]
        self,
        request: images_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> images_pb2.ListModelsResponse:
        await self._fail(context)
        raise AssertionError("abort() raises")

    async def CheckAccess(  # type: ignore[override]
        self,
        request: images_pb2.CheckAccessRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> images_pb2.CheckAccessResponse:
        if not self.check_access:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        return images_pb2.CheckAccessResponse(has_balance=True)


@dataclass
class Scripted:
    service: ScriptedService
    http_url: str


@pytest.fixture(scope="module")
async def scripted() -> AsyncIterator[Scripted]:
    service = ScriptedService()
    server = grpc.aio.server()
    images_pb2_grpc.add_ImageGenerationServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with _gateway(GatewayConfig(service_address=f"127.0.0.1:{port}")) as url:
            yield Scripted(service, url)
    finally:
        await server.stop(grace=None)


def _bare(code: grpc.StatusCode, details: str) -> grpc.Status:
    """A status as gRPC itself makes one: no ErrorInfo."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=details)
    return rpc_status.to_status(status)


def _with_reason(code: grpc.StatusCode, reason: str, details: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="imagegen")
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=details, details=[detail])
    return rpc_status.to_status(status)


# Every code but OK: (HTTP status, error.code, x-should-retry).
_BY_CODE = {
    grpc.StatusCode.CANCELLED: (503, "service_unavailable", True),
    grpc.StatusCode.UNKNOWN: (500, "server_error", True),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_value", False),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", True),
    grpc.StatusCode.NOT_FOUND: (404, "not_found", False),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict", False),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied", False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "request_too_large", False),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "failed_precondition", False),
    grpc.StatusCode.ABORTED: (409, "conflict", True),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_value", False),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented", False),
    grpc.StatusCode.INTERNAL: (500, "server_error", True),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", True),
    grpc.StatusCode.DATA_LOSS: (500, "server_error", True),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_api_key", False),
}


def test_every_grpc_status_code_has_an_answer() -> None:
    assert set(_BY_CODE) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


@pytest.mark.parametrize("code", list(_BY_CODE), ids=[c.name for c in _BY_CODE])
@pytest.mark.parametrize("route", ["generations", "models"])
async def test_a_status_without_error_info_gets_a_deliberate_answer(
    scripted: Scripted, contract: Contract, code: grpc.StatusCode, route: str
) -> None:
    # The details are gRPC's own words; they are not the caller's business.
    scripted.service.status = _bare(code, "Received message larger than max (5 vs. 4)")
    if route == "generations":
        body = orjson.dumps({"model": "m", "prompt": PROMPT})
        request = (
            f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nAuthorization: Bearer sk-ig-any\r\n\r\n"
        ).encode() + body
    else:
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-ig-any\r\n\r\n"
    raw = await Raw.open(scripted.http_url)
    try:
        await raw.send(request)
        answer = await raw.answer()
    finally:
        await raw.close()
    status, error_code, retry = _BY_CODE[code]
    error = answer.error()
    assert (answer.status, error["code"]) == (status, error_code), error
    assert answer.headers["x-should-retry"] == ("true" if retry else "false")
    assert "larger than max" not in error["message"]
    path, method = (GENERATIONS, "post") if route == "generations" else ("/v1/models", "get")
    # Where the document declares the status (all but the codes the service never sends
    # bare on this route), the answer is as it says.
    if str(status) in contract.doc["paths"][path][method]["responses"]:
        conforms(contract, path, answer, method)
    if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
        conforms(contract, path, answer, method)


async def test_a_metadata_limit_is_431_and_a_message_limit_413(
    scripted: Scripted, http: aiohttp.ClientSession
) -> None:
    url = scripted.http_url + "/v1/models"
    for details, status, code in [
        ("received initial metadata size exceeds limit", 431, "request_header_too_large"),
        ("Sent message larger than max (9 vs. 8)", 413, "request_too_large"),
    ]:
        scripted.service.status = _bare(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        async with http.get(url, headers=bearer("sk-ig-any")) as resp:
            await assert_openai_error(resp, status, code, should_retry=False)


async def test_a_reason_the_gateway_does_not_know_is_answered_by_its_code(
    scripted: Scripted, http: aiohttp.ClientSession
) -> None:
    scripted.service.status = _with_reason(
        grpc.StatusCode.FAILED_PRECONDITION, "SOME_FUTURE_REASON", "a newer service said so"
    )
    async with http.get(scripted.http_url + "/v1/models", headers=bearer("sk-ig-any")) as resp:
        await assert_openai_error(resp, 400, "failed_precondition", should_retry=False)


async def test_a_service_without_check_access_still_gets_the_upload(scripted: Scripted) -> None:
    # A gateway newer than its service (a rolling upgrade): the edit goes on as before.
    scripted.service.check_access = False
    scripted.service.edits.clear()
    scripted.service.status = _with_reason(
        grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE", "Your balance is too low."
    )
    image = png()
    body = multipart(_EDIT_FIELDS, [("image", image)])
    raw = await Raw.open(scripted.http_url)
    try:
        await raw.send(upload_head(EDITS, len(body), "sk-ig-any") + body)
        answer = await raw.answer()
    finally:
        await raw.close()
        scripted.service.check_access = True
    assert (answer.status, answer.error()["code"]) == (402, "insufficient_balance")
    [edit] = scripted.service.edits
    assert list(edit.images) == [image]


async def test_a_message_over_the_services_limit_is_413_through_the_stack(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # The operator let the gateway take larger uploads than the service accepts: gRPC
    # refuses to send the message (RESOURCE_EXHAUSTED, no ErrorInfo) before money moves.
    toml = _TOML + "\n[service]\nmax_receive_message_bytes = 1048576\n"
    toml += "\n[gateway]\nmax_upload_bytes = 4194304\n"
    async with start_stack(toml, tmp_path) as stack:
        account_id, key, _ = await stack.new_account(OPENING)
        body = multipart(_EDIT_FIELDS, [("image", os.urandom(2 * MiB))])
        async with http.post(
            stack.http_url + EDITS,
            data=io.BytesIO(body),
            headers={**bearer(key), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        ) as resp:
            await assert_openai_error(resp, 413, "request_too_large", should_retry=False)
        await stack.assert_untouched(account_id, OPENING)


@pytest.mark.parametrize(
    ("header", "path"),
    [
        ("Authorization", GENERATIONS),
        ("Authorization", EDITS),
        ("Authorization", "/v1/models"),
        # Only the image routes pass Idempotency-Key on.
        ("Idempotency-Key", GENERATIONS),
        ("Idempotency-Key", EDITS),
    ],
)
async def test_a_header_too_long_for_grpc_metadata_is_431_and_costs_nothing(
    hostile: HostileStack, contract: Contract, http: aiohttp.ClientSession, header: str, path: str
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    headers = {**bearer(key), header: "k" * 4000}
    if header == "Authorization":
        headers[header] = f"Bearer {key}" + "k" * 4000
    if path == "/v1/models":
        resp = await http.get(hostile.http_url + path, headers=headers)
    elif path == GENERATIONS:
        resp = await http.post(
            hostile.http_url + path,
            json={"model": "local-image", "prompt": "p", "size": "256x256"},
            headers=headers,
        )
    else:
        resp = await http.post(
            hostile.http_url + path,
            data=multipart(_EDIT_FIELDS, [("image", png())]),
            headers={**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
    async with resp:
        error = await assert_openai_error(resp, 431, "request_header_too_large", should_retry=False)
        await contract.response(resp, path, "get" if path == "/v1/models" else "post")
    assert header in error["message"]
    assert key not in error["message"]
    await hostile.assert_untouched(account_id, OPENING)


# -- uploads are judged before they are read -------------------------------------------------

# What a refused upload claims to send, and the little of it that is sent: the answer must
# come while the rest has not been.
_CLAIMED = 41 * MiB
_SENT = 64 * 1024


@pytest.mark.parametrize("path", [EDITS, VARIATIONS])
@pytest.mark.parametrize(
    "key", [None, "sk-ig-unknownunknownunknownunknownunknownunknown1"], ids=["none", "unknown"]
)
async def test_an_upload_without_a_good_key_is_401_before_its_body_is_read(
    hostile: HostileStack, contract: Contract, path: str, key: str | None
) -> None:
    raw = await Raw.open(hostile.http_url)
    try:
        await raw.send(upload_head(path, _CLAIMED, key) + b"\0" * _SENT)
        answer = await raw.answer(within=3.0)
    finally:
        await raw.close()
    assert (answer.status, answer.error()["code"]) == (401, "invalid_api_key")
    assert answer.headers["x-should-retry"] == "false"
    conforms(contract, path, answer)


@pytest.mark.parametrize("path", [EDITS, VARIATIONS])
async def test_an_upload_from_an_empty_account_is_402_before_its_body_is_read(
    hostile: HostileStack, contract: Contract, path: str
) -> None:
    account_id, key, _ = await hostile.new_account(0)
    raw = await Raw.open(hostile.http_url)
    try:
        await raw.send(upload_head(path, _CLAIMED, key) + b"\0" * _SENT)
        answer = await raw.answer(within=3.0)
    finally:
        await raw.close()
    error = answer.error()
    assert (answer.status, error["code"], error["type"]) == (
        402,
        "insufficient_balance",
        "insufficient_quota",
    )
    conforms(contract, path, answer)
    await hostile.assert_balance(account_id, 0, 0)
    assert not [e for e in await hostile.ledger(account_id) if e.kind != "credit"]


async def test_a_revoked_key_is_refused_before_its_next_upload(
    hostile: HostileStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, key_id = await hostile.new_account(OPENING)
    body = multipart(_EDIT_FIELDS, [("image", png())])
    content_type = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with http.post(
        hostile.http_url + EDITS, data=body, headers={**bearer(key), **content_type}
    ) as resp:
        assert resp.status == 200
    await hostile.revoke(key_id)
    raw = await Raw.open(hostile.http_url)
    try:
        await raw.send(upload_head(EDITS, _CLAIMED, key) + b"\0" * _SENT)
        answer = await raw.answer(within=3.0)
    finally:
        await raw.close()
    assert (answer.status, answer.error()["code"]) == (401, "invalid_api_key")
    await hostile.assert_balance(account_id, OPENING - PRICE)


async def test_a_client_that_expects_100_continue_sends_nothing_when_refused(
    hostile: HostileStack,
) -> None:
    raw = await Raw.open(hostile.http_url)
    try:
        await raw.send(upload_head(EDITS, _CLAIMED, None, ("Expect: 100-continue",)))
        answer = await raw.answer(within=3.0)
        # The final answer comes instead of 100 Continue, and says the connection ends with
        # it: the client need not send the body it announced.
        assert (answer.status, answer.error()["code"]) == (401, "invalid_api_key")
        assert answer.headers.get("connection", "").lower() == "close"
    finally:
        await raw.close()


async def test_a_client_that_expects_100_continue_is_told_to_go_on_when_its_key_is_good(
    hostile: HostileStack,
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    body = multipart(_EDIT_FIELDS, [("image", png())])
    raw = await Raw.open(hostile.http_url)
    try:
        await raw.send(upload_head(EDITS, len(body), key, ("Expect: 100-continue",)))
        interim = await raw.answer(within=3.0)
        assert interim.status == 100
        await raw.send(body)
        answer = await raw.answer(within=30.0)
    finally:
        await raw.close()
    assert answer.status == 200, answer.body[:300]
    assert len(orjson.loads(answer.body)["data"]) == 1
    await hostile.assert_balance(account_id, OPENING - PRICE)


async def test_uploads_past_the_in_flight_limit_get_429_before_their_body_is_read(
    hostile: HostileStack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    first_id, first_key, _ = await hostile.new_account(OPENING)
    second_id, second_key, _ = await hostile.new_account(OPENING)
    config = GatewayConfig(service_address=hostile.grpc_address, max_uploads_in_flight=1)
    body = multipart(_EDIT_FIELDS, [("image", png())])
    async with _gateway(config) as url:
        # The first upload takes the one slot and stays in flight: half its body is sent.
        first = await Raw.open(url)
        second = await Raw.open(url)
        try:
            await first.send(upload_head(EDITS, len(body), first_key) + body[: len(body) // 2])
            for _ in range(100):
                if (await scrape(url)).value("http_uploads_in_flight") == 1:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the first upload never took its slot")
            await second.send(upload_head(EDITS, _CLAIMED, second_key) + b"\0" * _SENT)
            refused = await second.answer(within=3.0)
            await first.send(body[len(body) // 2 :])
            served = await first.answer(within=30.0)
        finally:
            await first.close()
            await second.close()
        error = refused.error()
        assert (refused.status, error["code"]) == (429, "too_many_uploads")
        assert refused.headers["retry-after"] == "2"
        assert refused.headers["x-should-retry"] == "true"
        conforms(contract, EDITS, refused)
        assert served.status == 200
        # The slot is free again.
        async with http.post(
            url + EDITS,
            data=body,
            headers={
                **bearer(second_key),
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            },
        ) as resp:
            assert resp.status == 200
        assert (await scrape(url)).value("http_uploads_in_flight") == 0
    await hostile.assert_balance(first_id, OPENING - PRICE)
    await hostile.assert_balance(second_id, OPENING - PRICE)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
async def test_concurrent_large_uploads_without_a_key_get_401_fast_in_bounded_memory(
    hostile: HostileStack,
) -> None:
    # Four 41 MiB edits at once, no Authorization: each is refused before its body is read,
    # so the gateway (here, in this process with the service) holds none of them.
    uploads, size = 4, 41 * MiB
    # A well-formed form whose image is 41 MiB: read whole, each would be kept.
    closing = b"\r\n--" + BOUNDARY.encode() + b"--"
    head, tail = multipart(_EDIT_FIELDS, [("image", b"")]).split(closing)
    closing += tail
    chunk = b"\0" * MiB
    filler = size - len(head) - len(closing)

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(filler // MiB):
            yield chunk
        yield chunk[: filler % MiB]
        yield closing

    async def upload(http: aiohttp.ClientSession) -> tuple[int, float]:
        started = time.perf_counter()
        async with http.post(
            hostile.http_url + EDITS,
            data=body(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(size),
            },
        ) as resp:
            elapsed = time.perf_counter() - started
            await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)
            return resp.status, elapsed

    _reset_peak_rss()
    before = _peak_rss_bytes()
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(upload(http) for _ in range(uploads)))
    growth = _peak_rss_bytes() - before
    print(f"\npeak RSS: {before / MiB:.0f} MiB before, +{growth / MiB:.1f} MiB during")
    assert [status for status, _ in answers] == [401] * uploads
    assert max(elapsed for _, elapsed in answers) < 2.0
    # Reading one of them whole would take 41 MiB; before the check, they took 600 MiB.
    assert growth < 32 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"


# -- a client that leaves mid-body --------------------------------------------------------


@dataclass
class CapturedLogs:
    buffer: io.StringIO

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.buffer.getvalue().splitlines()]


@pytest.fixture
def logs() -> Iterator[CapturedLogs]:
    """Every line the process writes, in JSON, at DEBUG, aiohttp's access log included."""
    names = ("", "aiohttp.access", "alembic", "aiosqlite")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    handlers = list(loggers[0].handlers)
    saved_structlog = structlog.get_config()
    captured = CapturedLogs(io.StringIO())
    configure_logging(json_logs=True, level="DEBUG", stream=captured.buffer)
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        loggers[0].handlers[:] = handlers
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        structlog.configure(**saved_structlog)


@pytest.mark.parametrize("path", [GENERATIONS, EDITS])
async def test_a_client_that_leaves_mid_body_is_499_in_one_line_not_a_500(
    hostile: HostileStack, logs: CapturedLogs, path: str
) -> None:
    account_id, key, _ = await hostile.new_account(OPENING)
    request_id = f"req-gone-{path.rsplit('/', 1)[1]}"
    if path == GENERATIONS:
        body = orjson.dumps({"model": "local-image", "prompt": PROMPT, "size": "256x256"})
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode()
    else:
        body = multipart(_EDIT_FIELDS, [("image", png())])
        head = upload_head(path, len(body), None).removesuffix(b"\r\n")
    head += f"Authorization: Bearer {key}\r\nX-Request-ID: {request_id}\r\n\r\n".encode()
    before = await scrape(hostile.http_url)
    raw = await Raw.open(hostile.http_url)
    await raw.send(head + body[: len(body) // 2])
    await asyncio.sleep(0.2)
    await raw.close()
    for _ in range(100):
        mine = [line for line in logs.lines() if line.get("request_id") == request_id]
        if any(line["event"] == "http.request" for line in mine):
            break
        await asyncio.sleep(0.02)
    after = await scrape(hostile.http_url)

    [line] = [line for line in mine if line["logger"] == "imagegen.gateway"]
    assert (line["event"], line["status"], line["route"]) == ("http.request", 499, path)
    assert "exception" not in line
    assert not [line for line in logs.lines() if line["event"] == "http.failed"]
    labels = {"route": path, "method": "POST"}
    assert after.value("http_requests_total", status="499", **labels) == (
        before.value("http_requests_total", status="499", **labels) + 1
    )
    assert after.value("http_requests_total", status="500", **labels) == before.value(
        "http_requests_total", status="500", **labels
    )
    await hostile.assert_untouched(account_id, OPENING)


# -- nothing a caller sent reaches the logs ---------------------------------------------------


def _malformed(key: str) -> dict[str, bytes]:
    """Requests aiohttp's parser rejects, each carrying the key and the prompt."""
    auth = f"Authorization: Bearer {key}\r\n".encode()
    body = orjson.dumps({"model": "local-image", "prompt": PROMPT})
    post = f"POST {GENERATIONS} HTTP/1.1\r\nHost: x\r\n".encode()
    length = f"Content-Length: {len(body)}\r\n".encode()
    query = PROMPT.replace(" ", "%20").encode()
    return {
        "invalid-header-after-the-key": post
        + auth
        + b"X-Bad: a\x01b\r\n"
        + length
        + b"\r\n"
        + body,
        "invalid-char-in-the-key": post
        + auth.replace(b"\r\n", b"\x01\r\n")
        + length
        + b"\r\n"
        + body,
        "data-after-connection-close": post
        + b"Connection: close\r\n"
        + auth
        + length
        + b"\r\n"
        + body
        + b"GARBAGE "
        + body,
        "bad-chunk-size": post + auth + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body,
        "bad-chunk-end": post
        + auth
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"XX\r\n0\r\n\r\n",
        "bad-transfer-encoding": post
        + auth
        + b"Transfer-Encoding: gzip, chunked, x\r\n\r\n"
        + body,
        "length-and-chunked": post
        + auth
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body,
        "header-over-8k-with-the-key": post
        + auth.replace(b"\r\n", b"x" * 9000 + b"\r\n")
        + length
        + b"\r\n"
        + body,
        "header-over-8k-after-the-key": post
        + auth
        + b"X-Long: "
        + PROMPT.encode() * 300
        + b"\r\n"
        + length
        + b"\r\n"
        + body,
        "prompt-in-a-bad-url": f"POST {GENERATIONS}?prompt=".encode()
        + query
        + b"\x7f HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"\r\n",
        "too-many-headers": post
        + auth
        + b"X-P: "
        + query
        + b"\r\n" * 1
        + b"".join(b"X-%d: %s\r\n" % (i, query) for i in range(200))
        + b"\r\n",
        "bad-method": b"BREW " + GENERATIONS.encode() + b"?" + query + b" HTTP/1.1\r\n" + auth,
        "https-on-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        + key.encode()
        + b"\r\n\r\n",
    }


async def _send_malformed(url: str, key: str) -> dict[str, int]:
    statuses = {}
    for name, request in _malformed(key).items():
        raw = await Raw.open(url)
        try:
            await raw.send(request)
            try:
                statuses[name] = (await raw.answer(within=3.0)).status
            except (asyncio.IncompleteReadError, ConnectionResetError):
                statuses[name] = 0
        finally:
            await raw.close()
    return statuses


def _assert_nothing_of(text: str, key: str) -> None:
    assert key not in text
    assert key[len("sk-ig-") :][:12] not in text
    assert "Bearer" not in text
    for word in PROMPT_WORDS:
        assert word not in text, word


async def test_no_key_or_prompt_reaches_the_logs_of_the_gateway_process(
    hostile: HostileStack, logs: CapturedLogs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, key, _ = await hostile.new_account(OPENING)
    statuses = await _send_malformed(hostile.http_url, key)
    # The prompt in a query string reaches aiohttp's access log, which the gateway drops.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{hostile.http_url}/v1/models?prompt={PROMPT}", headers=bearer(key)) as resp,
    ):
        assert resp.status == 200
    await asyncio.sleep(0.1)

    assert set(statuses.values()) <= {400, 0}, statuses
    rejected = [line for line in logs.lines() if line["logger"] == "aiohttp.server"]
    # aiohttp still says what it rejected and where, without the bytes.
    assert len(rejected) >= len(statuses) - 2, rejected
    assert any("withheld" in line.get("exception", "") for line in rejected)
    assert any("LineTooLong" in line.get("exception", "") for line in rejected)
    _assert_nothing_of(logs.buffer.getvalue(), key)
    _assert_nothing_of(caplog.text, key)
    for record in caplog.records:
        _assert_nothing_of(record.getMessage(), key)


async def test_no_key_or_prompt_reaches_the_stderr_of_a_gateway_process(
    hostile: HostileStack, tmp_path: Path
) -> None:
    _, key, _ = await hostile.new_account(OPENING)
    port = free_port()
    stderr_path = tmp_path / "gateway.stderr"
    env = {
        **os.environ,
        "IMAGEGEN_CONFIG": str(hostile.config_dir / "imagegen.toml"),
        "IMAGEGEN_SERVICE_ADDRESS": hostile.grpc_address,
        "IMAGEGEN_HTTP_PORT": str(port),
        "IMAGEGEN_LOG_LEVEL": "DEBUG",
        "IMAGEGEN_LOG_FORMAT": "json",
    }
    url = f"http://127.0.0.1:{port}"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "http_gateway",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(stderr_path.read_text()[-2000:])
            await _send_malformed(url, key)
            async with http.post(
                url + GENERATIONS,
                json={"model": "local-image", "prompt": PROMPT, "size": "256x256"},
                headers=bearer(key),
            ) as resp:
                assert resp.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    text = stderr_path.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line.get("logger") == "aiohttp.server" for line in lines)
    assert any(line.get("event") == "http.request" for line in lines)
    _assert_nothing_of(text, key)


def test_redaction_keeps_the_reason_and_drops_the_bytes() -> None:
    from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader, LineTooLong

    from http_gateway.log_redaction import redacted

    secret = "sk-ig-" + "S" * 43
    cases = [
        (BadHttpMessage(f"Data after `Connection: close`:\n\n  b'{PROMPT}'\n   ^"),
         "400, message: Data after `Connection: close`"),
        (LineTooLong(f"Bearer {secret}".encode(), 8190), "400, message: Got more than 8190"),
        (InvalidHeader(f"Authorization: Bearer {secret}".encode()),
         "400, message: Invalid HTTP header"),
        (ValueError(f"'{secret}' is not valid"), ""),
    ]  # fmt: skip
    for exc, kept in cases:
        stand_in = redacted(exc)
        assert type(stand_in).__name__ == type(exc).__name__
        assert type(stand_in).__module__ == type(exc).__module__
        assert str(stand_in).startswith(kept)
        assert "withheld" in str(stand_in)
        assert secret not in str(stand_in)
        assert "Maribelle" not in str(stand_in)
