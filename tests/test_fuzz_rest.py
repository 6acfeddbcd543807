"""Thousands of hostile requests to the REST face, generated from a fixed seed, against the
real stack (gateway, service, the local renderer and a fake OpenAI upstream).

The generator mutates what a client could send to ``/v1/images/generations``, ``/edits``,
``/variations``, ``/v1/models`` and ``/v1/models/{model}``: bodies that are not JSON, JSON
of every wrong type, values out of every range, multipart forms with broken, lying or
missing images, wrong content types and methods, keys that are missing, malformed,
unknown, revoked, or belong to accounts with too little money, reused idempotency keys,
mangled request ids. Some requests are valid and some of those are served.

Every answer must be: no 5xx; every error in OpenAI's shape with ``x-request-id`` and
``x-should-retry``; a stream without error events. Afterwards every account's ledger sums to
its balance, nothing is held, and money was captured only for requests answered 200; and
the processes still serve.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.conftest import bearer
from tests.images_stack import ImagesStack

SEED = 20261203
REQUESTS = 3000
CONCURRENCY = 16
TIME_LIMIT_SECONDS = 60.0
# Above the images stack's max_upload_bytes (3 MiB): a few uploads are too large.
OVERSIZE = 3 * 1024 * 1024 + 1

RICH = 50_000_000
POOR = 500  # below every price of the stack: all it can get is refusals
EMPTY = 0

MODELS = ["local-image", "local-sketch", "fake-gpt-image", "fake-dalle", "no-such", "", "gpt-4o"]
SIZES = ["256x256", "512x512", "1024x1024", "0x0", "-1x5", "9999999x1", "256X256", "auto", ""]
QUALITIES = ["auto", "low", "high", "standard", "hd", "max", "", "x" * 300]
FORMATS = ["url", "b64_json", "png", "", "B64_JSON"]
WEIRD_STRINGS = [
    "",
    " ",
    "\x00",
    "é" * 50,
    "🦊" * 20,
    "\u202e" + "txt.exe",
    "a" * 5000,
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "%00%ff",
    "\r\nX-Injected: yes",
    "null",
    "NaN",
]
WEIRD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63) - 1,
    10**40,
    1.5,
    -0.0,
    1e308,
    [],
    [1, 2],
    {},
    {"a": {"b": []}},
    *WEIRD_STRINGS,
]
FIELDS = [
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "response_format",
    "style",
    "user",
    "seed",
    "background",
    "output_format",
    "output_compression",
    "moderation",
    "stream",
    "partial_images",
]


def _dumps(body: dict[str, Any]) -> bytes:
    # The standard library's: it writes integers past 64 bits, which a client may send.
    return json.dumps(body, ensure_ascii=False).encode()


def _png(rng: random.Random, mode: str = "RGB") -> bytes:
    side = rng.choice([16, 64, 256])
    image = Image.new(mode, (side, side), tuple(rng.randrange(256) for _ in mode))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _jpeg(rng: random.Random) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (rng.randrange(256), 10, 10)).save(out, "JPEG")
    return out.getvalue()


def _lying_png(side: int) -> bytes:
    """A PNG whose header says ``side``x``side`` and whose pixel data is cut off."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    account: str | None


class Fuzzer:
    """Makes the requests, all of them from one seeded generator."""

    def __init__(self, rng: random.Random, keys: dict[str, str], revoked: str) -> None:
        self.rng = rng
        self.keys = keys
        self.revoked = revoked
        self.idempotency_keys = [f"fuzz-idem-{i}" for i in range(8)]
        self.images = [_png(rng), _png(rng, "RGBA"), _jpeg(rng)]
        self.served = 0

    # -- who asks ---------------------------------------------------------------------------

    def _auth(self) -> tuple[dict[str, str], str | None]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            account = "rich"
        elif roll < 0.65:
            account = "poor"
        elif roll < 0.72:
            account = "empty"
        else:
            value = rng.choice(
                [
                    "",
                    "Bearer",
                    "Bearer ",
                    "Basic dXNlcjpwYXNz",
                    f"Bearer {self.revoked}",
                    "Bearer sk-ig-" + "x" * 43,
                    "Bearer sk-ig-é",
                    "bearer " + self.keys["rich"][:20],
                    "Bearer " + "k" * 3000,
                    "Token " + self.keys["rich"],
                    "Bearer  " + self.keys["rich"],
                ]
            )
            return ({} if rng.random() < 0.3 else {"Authorization": value}), None
        return bearer(self.keys[account]), account

    def _extra_headers(self) -> dict[str, str]:
        rng = self.rng
        headers: dict[str, str] = {}
        if rng.random() < 0.1:
            headers["Idempotency-Key"] = rng.choice(
                [*self.idempotency_keys, "", " ", "é", "k" * 300, "k" * 3000]
            )
        if rng.random() < 0.1:
            # The gateway replaces the unusable ones; a usable one is the caller's, unique.
            self.served += 1
            headers["X-Request-ID"] = rng.choice(["bad id", "é", "x" * 500, f"fz-{self.served}"])
        return headers

    # -- what they send -----------------------------------------------------------------------

    def _json_body(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {
            "model": rng.choice(MODELS[:4]),
            "prompt": "a small boat",
            "size": "256x256",
        }
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 5])):
            name = rng.choice([*FIELDS, "unknown_field", "PROMPT"])
            choice = rng.random()
            if choice < 0.5:
                body[name] = rng.choice(WEIRD_VALUES)
            elif choice < 0.6:
                body.pop(name, None)
            elif name == "model":
                body[name] = rng.choice(MODELS)
            elif name == "size":
                body[name] = rng.choice(SIZES)
            elif name == "quality":
                body[name] = rng.choice(QUALITIES)
            elif name == "response_format":
                body[name] = rng.choice(FORMATS)
            elif name in ("n", "seed", "output_compression", "partial_images"):
                body[name] = rng.choice([-1, 0, 1, 2, 3, 4, 11, 101, 2**31 - 1])
            elif name == "stream":
                body[name] = rng.choice([True, False, "true", 1])
            else:
                body[name] = rng.choice(WEIRD_STRINGS)
        if body.get("stream") is True and rng.random() < 0.7:
            body["response_format"] = "b64_json"
        return body

    def _generation(self) -> tuple[dict[str, str], bytes]:
        rng = self.rng
        roll = rng.random()
        content_type = {"Content-Type": "application/json"}
        if roll < 0.75:
            return content_type, _dumps(self._json_body())
        raw = rng.choice(
            [
                b"",
                b"   ",
                b"{",
                b'{"model": "local-image", "prompt": "a',
                b"[]",
                b'["model"]',
                b"null",
                b"42",
                b'"a string"',
                b"[" * 3000 + b"]" * 3000,
                b'{"model": "local-image", "prompt": "\xff\xfe"}',
                b'{"model": NaN}',
                b'{"a": 1, "a": 2, "prompt": "p", "model": "local-image"}',
                rng.randbytes(rng.randrange(1, 2048)),
                b'{"prompt": "' + b"x" * (70 * 1024) + b'"}',
            ]
        )
        if rng.random() < 0.3:
            content_type = {
                "Content-Type": rng.choice(
                    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
                )
            }
        return content_type, raw

    def _image(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            return rng.choice(self.images)
        return rng.choice(
            [
                b"",
                b"not an image",
                rng.randbytes(512),
                self.images[0][: len(self.images[0]) // 2],
                _lying_png(rng.choice([4096, 20000])),
                b"\x89PNG\r\n\x1a\n" + rng.randbytes(200),
                b"GIF89a" + rng.randbytes(100),
            ]
        )

    def _multipart(self, path: str) -> tuple[dict[str, str], bytes]:
        rng = self.rng
        boundary = f"fuzz{rng.randrange(10**9)}"
        parts: list[tuple[str, bytes, str | None]] = []
        fields: dict[str, Any] = {"model": rng.choice(["local-image", "fake-dalle"])}
        if path.endswith("edits"):
            fields["prompt"] = "a red moon"
        for _ in range(rng.choice([0, 1, 1, 2, 4])):
            name = rng.choice([*FIELDS, "image", "mask", "image[]"])
            fields[name] = rng.choice([*WEIRD_STRINGS, "1", "2", "true", "256x256", "b64_json"])
        for name, value in fields.items():
            parts.append((name, str(value).encode("utf-8", "surrogatepass"), None))
        image_names = (
            ["image"] if rng.random() < 0.7 else rng.choice([[], ["image[]"] * 3, ["image"] * 2])
        )
        for name in image_names:
            parts.append((name, self._image(), "in.png"))
        if path.endswith("edits") and rng.random() < 0.2:
            parts.append(("mask", self._image(), "mask.png"))
        if rng.random() < 0.03:
            parts.append(("image", b"\0" * OVERSIZE, "big.png"))
        body = bytearray()
        for name, value, filename in parts:
            disposition = f'form-data; name="{name}"'
            if filename is not None:
                disposition += f'; filename="{filename}"'
            body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
            if filename is not None:
                body += b"Content-Type: image/png\r\n"
            body += b"\r\n" + value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
        mangle = rng.random()
        if mangle < 0.05:
            content_type = "multipart/form-data"
        elif mangle < 0.1:
            content_type = f"multipart/form-data; boundary=other{boundary}"
        elif mangle < 0.15:
            body = body[: rng.randrange(len(body))]
        elif mangle < 0.18:
            content_type = "application/json"
            body = bytearray(_dumps(self._json_body()))
        elif mangle < 0.2:
            content_type = "application/x-www-form-urlencoded"
            body = bytearray(b"model=local-image&prompt=a+boat&n=1")
        return {"Content-Type": content_type}, bytes(body)

    def request(self) -> Request:
        rng = self.rng
        auth, account = self._auth()
        headers = {**auth, **self._extra_headers()}
        roll = rng.random()
        if roll < 0.45:
            method, path = "POST", "/v1/images/generations"
            extra, body = self._generation()
        elif roll < 0.65:
            method, path = "POST", "/v1/images/edits"
            extra, body = self._multipart(path)
        elif roll < 0.78:
            method, path = "POST", "/v1/images/variations"
            extra, body = self._multipart(path)
        elif roll < 0.9:
            method, path, extra, body = "GET", "/v1/models", {}, b""
            if rng.random() < 0.4:
                path += "/" + rng.choice(
                    ["local-image", "no-such", "%2e%2e", "é", "a" * 300, "fake-dalle", "%00"]
                )
        else:
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "POST", "OPTIONS"])
            path = rng.choice(
                [
                    "/v1/images/generations",
                    "/v1/images/edits",
                    "/v1/images",
                    "/v1/models/",
                    "/v1//models",
                    "/v1/images/generations/",
                    "/v1/files/images/x",
                    "/v2/images/generations",
                ]
            )
            extra, body = {"Content-Type": "application/json"}, _dumps(self._json_body())
        return Request(method, path, {**headers, **extra}, body, account)


@dataclass
class Outcome:
    request: Request
    status: int
    request_id: str
    problems: list[str]


async def _send(http: aiohttp.ClientSession, base_url: str, request: Request) -> Outcome:
    async with http.request(
        request.method,
        base_url + request.path,
        headers=request.headers,
        data=io.BytesIO(request.body) if request.body else None,
    ) as resp:
        body = await resp.read()
        problems = []
        if resp.status >= 500:
            problems.append(f"a server error: {resp.status} {body[:300]!r}")
        if not resp.headers.get("x-request-id"):
            problems.append("no x-request-id")
        if resp.status >= 400 and request.path.startswith("/v1"):
            problems += _openai_error_problems(resp, body)
        streamed = resp.status == 200 and resp.content_type == "text/event-stream"
        if streamed and b"event: error" in body:
            problems.append(f"an error event: {body[-300:]!r}")
        return Outcome(request, resp.status, resp.headers.get("x-request-id", ""), problems)


def _openai_error_problems(resp: aiohttp.ClientResponse, body: bytes) -> list[str]:
    problems = []
    if resp.content_type != "application/json":
        problems.append(f"an error answered as {resp.content_type!r}")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [*problems, f"an error that is not JSON: {body[:300]!r}"]
    error = document.get("error") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or set(document) != {"error"}
        or not isinstance(error, dict)
        or set(error) != {"message", "type", "param", "code"}
        or not (isinstance(error["message"], str) and error["message"])
        or not (isinstance(error["type"], str) and error["type"])
        or not isinstance(error["param"], str | None)
        or not isinstance(error["code"], str | None)
    ):
        problems.append(f"not OpenAI's error shape: {body[:300]!r}")
    if resp.headers.get("x-should-retry") not in ("true", "false"):
        problems.append("no x-should-retry on an error")
    return problems


async def test_thousands_of_hostile_requests_get_no_5xx_and_cost_nothing_when_refused(
    images_stack: ImagesStack,
) -> None:
    stack = images_stack
    accounts: dict[str, tuple[str, int]] = {}
    keys: dict[str, str] = {}
    for name, opening in (("rich", RICH), ("poor", POOR), ("empty", EMPTY)):
        account_id, key, _ = await stack.new_account(opening)
        accounts[name], keys[name] = (account_id, opening), key
    _, revoked, revoked_id = await stack.new_account(RICH)
    await stack.revoke(revoked_id)

    fuzzer = Fuzzer(random.Random(SEED), keys, revoked)
    requests = [fuzzer.request() for _ in range(REQUESTS)]
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    outcomes: list[Outcome] = []

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            outcomes.append(await _send(http, stack.http_url, request))

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started

    statuses = Counter(outcome.status for outcome in outcomes)
    print(f"\n{len(outcomes)} requests in {elapsed:.1f}s: {sorted(statuses.items())}")
    failures = [
        f"{o.request.method} {o.request.path} -> {o.status}: {'; '.join(o.problems)}"
        for o in outcomes
        if o.problems
    ]
    assert not failures, f"{len(failures)} bad answers, first ones:\n" + "\n".join(failures[:10])
    assert len(outcomes) == REQUESTS
    assert elapsed < TIME_LIMIT_SECONDS
    # The generator reaches more than refusals: successes, and each kind of refusal.
    assert {200, 400, 401, 402, 404, 405, 413, 431} <= set(statuses), statuses

    # Money: captured only for requests answered 200; every other hold went back whole.
    answered = {outcome.request_id: outcome.status for outcome in outcomes}
    for name, (account_id, opening) in accounts.items():
        entries = await stack.ledger(account_id)
        captured = 0
        for entry in entries:
            if entry.kind == "capture":
                assert answered.get(entry.request_id) == 200, (name, entry)
                captured -= entry.held_delta_micros
        account = await stack.account(account_id)
        assert account.held_micros == 0, name
        await stack.assert_balance(account_id, opening - captured, 0)
        if name != "rich":
            await stack.assert_balance(account_id, opening, 0)
            assert not [e for e in entries if e.kind == "capture"], name

    # The processes are alive and serve.
    async with aiohttp.ClientSession() as http:
        for probe in ("/healthz", "/readyz"):
            async with http.get(stack.http_url + probe) as resp:
                assert resp.status == 200, probe
        async with http.post(
            stack.http_url + "/v1/images/generations",
            json={"model": "local-image", "prompt": "still here", "size": "256x256"},
            headers=bearer(keys["rich"]),
        ) as resp:
            assert resp.status == 200
    health = health_pb2_grpc.HealthStub(stack.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
