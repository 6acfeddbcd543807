"""The OpenAPI document at /openapi.json: valid OpenAPI 3.1, covering every route, and true.

"True" means real answers of the live stack — successes and every error status we can
produce — validate against the response the document declares for their operation and
status: the JSON body against its schema (``$ref``s resolved within the document), the
declared headers present where required and of their declared type, the content type one
of those listed. ``GET /v1/models/{model}`` is tested here too, raw and through the SDK.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from http_gateway.app import create_app
from http_gateway.config import GatewayConfig
from tests import stack as tests_stack
from tests.conftest import (
    LOCAL_256,
    MAX_BODY_BYTES,
    UPSTREAM_KEY,
    Stack,
    assert_openai_error,
    bearer,
    image_size,
)
from tests.fakes.loopback import free_port
from tests.fakes.openai_upstream import (
    FakeOpenAIUpstream,
    raw,
    server_error,
    slow,
    stream_error,
)

GENERATIONS = "/v1/images/generations"
OK_BODY = {"model": "local-sketch", "prompt": "a lighthouse at dusk", "size": "256x256"}
_DOC_URI = "urn:imagegen:openapi"
# Routes another change may not have landed yet: documented, perhaps not served.
_MAYBE_UNSERVED = {("/v1/images/edits", "post"), ("/v1/images/variations", "post")}


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class Contract:
    """Checks real HTTP answers against the document's declared responses."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(_DOC_URI, resource)

    def _follow(self, obj: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
        """Follows local ``$ref``s: the object and the JSON pointer where it lives."""
        while "$ref" in obj:
            ref = obj["$ref"]
            assert ref.startswith("#/"), ref
            pointer = ref[1:]
            obj = self.doc
            for part in pointer.split("/")[1:]:
                obj = obj[part.replace("~1", "/").replace("~0", "~")]
        return obj, pointer

    def validate_json(self, pointer: str, instance: Any) -> None:
        """``instance`` against the schema at ``pointer`` in the document."""
        validator = Draft202012Validator(
            {"$ref": f"{_DOC_URI}#{pointer}"},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        failures = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not failures, (
            "\n".join(f"{list(e.path)}: {e.message}" for e in failures)
            + f"\n{json.dumps(instance)[:2000]}"
        )

    def check(
        self,
        path: str,
        method: str,
        status: int,
        headers: Any,
        content_type: str,
        body: bytes,
    ) -> None:
        operation = self.doc["paths"][path][method]
        responses = operation["responses"]
        assert str(status) in responses, (
            f"{method.upper()} {path} answered {status}, which the document does not declare: "
            f"{body[:300]!r}"
        )
        base = f"/paths/{_escape(path)}/{method}/responses/{status}"
        response, pointer = self._follow(responses[str(status)], base)
        for name, declared in response.get("headers", {}).items():
            header, _ = self._follow(declared, "")
            value = headers.get(name)
            if header.get("required"):
                assert value is not None, f"{status} lacks the required header {name}"
            if value is not None:
                schema = header["schema"]
                instance: Any = int(value) if schema.get("type") == "integer" else value
                header_pointer = (
                    declared["$ref"][1:]
                    if "$ref" in declared
                    else f"{pointer}/headers/{_escape(name)}"
                )
                self.validate_json(f"{header_pointer}/schema", instance)
        content = response.get("content", {})
        assert content_type in content, f"{status} as {content_type}, declared: {list(content)}"
        if content_type == "application/json":
            self.validate_json(
                f"{pointer}/content/{_escape(content_type)}/schema", json.loads(body)
            )

    async def response(self, resp: aiohttp.ClientResponse, path: str, method: str) -> bytes:
        """Checks ``resp`` (for the operation ``method path``) and returns its body."""
        body = await resp.read()
        self.check(path, method, resp.status, resp.headers, resp.content_type, body)
        return body


@pytest.fixture(scope="module")
async def contract(stack: Stack) -> Contract:
    async with (
        aiohttp.ClientSession() as http,
        http.get(stack.http_url + "/openapi.json") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = await resp.json()
    contract = Contract(doc)
    # The document describes its own answer too.
    contract.check("/openapi.json", "get", 200, resp.headers, resp.content_type, b"{}")
    return contract


@asynccontextmanager
async def _gateway(config: GatewayConfig) -> AsyncIterator[str]:
    """A second gateway with its own settings; yields its base URL."""
    runner = web.AppRunner(create_app(config), shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _png(side: int = 256) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (200, 40, 40, 255)).save(out, format="PNG")
    return out.getvalue()


# -- the document itself ---------------------------------------------------------------------


async def test_the_document_is_valid_openapi_3_1_and_needs_no_key(
    stack: Stack, contract: Contract
) -> None:
    doc = contract.doc
    assert doc["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(doc).validate()
    assert doc["servers"] == [{"url": stack.http_url, "description": "This gateway."}]
    assert doc["components"]["securitySchemes"]["ApiKeyAuth"] == {
        **doc["components"]["securitySchemes"]["ApiKeyAuth"],
        "type": "http",
        "scheme": "bearer",
    }


def test_every_route_the_gateway_serves_is_documented(contract: Contract) -> None:
    app = create_app(GatewayConfig())
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(path, method) for path, item in contract.doc["paths"].items() for method in item}
    assert served <= documented, served - documented
    assert documented - served <= _MAYBE_UNSERVED


def test_every_error_response_is_the_openai_error_schema(contract: Contract) -> None:
    for path, item in contract.doc["paths"].items():
        for method, operation in item.items():
            for status, declared in operation["responses"].items():
                if int(status) < 400 or path == "/readyz":
                    continue
                response, _ = contract._follow(declared, "")
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
                assert "x-should-retry" in response["headers"], (method, path, status)


def test_the_error_schema_is_exactly_openais_shape(contract: Contract) -> None:
    pointer = "/components/schemas/ErrorResponse"
    good = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": "c"}}
    contract.validate_json(pointer, good)
    for bad in (
        {"error": {"message": "m", "type": "t", "param": None}},
        {"error": {**good["error"], "extra": 1}},
        {**good, "detail": "x"},
        {"message": "m"},
    ):
        with pytest.raises(AssertionError):
            contract.validate_json(pointer, bad)


# -- successes -------------------------------------------------------------------------------


async def test_b64_json_and_url_answers_and_the_image_match(
    stack: Stack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(100_000)
    async with http.post(
        stack.http_url + GENERATIONS,
        json={**OK_BODY, "n": 2, "response_format": "b64_json"},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200
        body = json.loads(await contract.response(resp, GENERATIONS, "post"))
    assert len(body["data"]) == 2
    assert all("b64_json" in item for item in body["data"])

    async with http.post(
        stack.http_url + GENERATIONS, json={**OK_BODY, "user": "u-1"}, headers=bearer(key)
    ) as resp:
        assert resp.status == 200
        body = json.loads(await contract.response(resp, GENERATIONS, "post"))
    url = body["data"][0]["url"]
    assert url.startswith(stack.http_url + "/v1/files/images/")
    async with http.get(url) as resp:
        assert resp.status == 200
        png = await contract.response(resp, "/v1/files/images/{token}", "get")
    assert image_size(png) == (256, 256)


async def test_an_image_of_several_chunks_downloads_whole(
    stack: Stack, contract: Contract, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    """GetImage streams 1 MiB chunks: an incompressible 512x512 PNG needs two of them."""
    noise = Image.frombytes("RGBA", (512, 512), os.urandom(512 * 512 * 4))
    out = io.BytesIO()
    noise.save(out, format="PNG")
    png = out.getvalue()
    assert len(png) > 1024 * 1024
    answer = {"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]}
    fake.script(raw(200, json.dumps(answer).encode()))
    _, key, _ = await stack.new_account(100_000)
    async with http.post(
        stack.http_url + GENERATIONS,
        json={"model": "fake-dalle", "prompt": "static", "size": "512x512"},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200, await resp.text()
        url = (await resp.json())["data"][0]["url"]
    async with http.get(url) as resp:
        assert resp.status == 200
        assert await contract.response(resp, "/v1/files/images/{token}", "get") == png


async def test_health_metrics_and_models_match(
    stack: Stack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        async with http.get(stack.http_url + path) as resp:
            assert resp.status == 200
            await contract.response(resp, path, "get")
    async with http.get(
        stack.http_url + "/metrics", headers={"Accept": "application/openmetrics-text"}
    ) as resp:
        assert resp.status == 200
        await contract.response(resp, "/metrics", "get")

    _, key, _ = await stack.new_account(0)
    async with http.get(stack.http_url + "/v1/models", headers=bearer(key)) as resp:
        assert resp.status == 200
        models = json.loads(await contract.response(resp, "/v1/models", "get"))
    listed = {m["id"] for m in models["data"]}
    assert "local-sketch" in listed

    async with http.get(stack.http_url + "/v1/models/local-sketch", headers=bearer(key)) as resp:
        assert resp.status == 200
        model = json.loads(await contract.response(resp, "/v1/models/{model}", "get"))
    assert model == next(m for m in models["data"] if m["id"] == "local-sketch")
    assert model["object"] == "model"
    assert model["owned_by"] == "imagegen"


# -- GET /v1/models/{model} ------------------------------------------------------------------


async def test_the_sdk_retrieves_a_model_and_gets_not_found_for_others(stack: Stack) -> None:
    _, key, _ = await stack.new_account(0)
    async with stack.openai_client(key) as client:
        model = await client.models.retrieve("local-sketch")
        assert (model.id, model.object, model.owned_by) == ("local-sketch", "model", "imagegen")
        assert isinstance(model.created, int)
        listed = [m.id async for m in client.models.list()]
        assert "local-sketch" in listed
        # Unknown, and known to the catalog but not able to serve (no provider credential).
        for missing in ("no-such-model", "hidden-model"):
            with pytest.raises(openai.NotFoundError) as caught:
                await client.models.retrieve(missing)
            assert caught.value.status_code == 404
            assert caught.value.code == "model_not_found"
            assert caught.value.param == "model"
            assert caught.value.type == "invalid_request_error"
            assert caught.value.body == {
                "message": f"The model '{missing}' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
            assert caught.value.response.headers["x-should-retry"] == "false"


async def test_retrieving_a_model_needs_a_key(
    stack: Stack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    path = "/v1/models/{model}"
    async with http.get(stack.http_url + "/v1/models/local-sketch") as resp:
        await contract.response(resp, path, "get")
        await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)
    async with http.get(
        stack.http_url + "/v1/models/local-sketch", headers=bearer("sk-ig-wrong")
    ) as resp:
        await contract.response(resp, path, "get")
        await assert_openai_error(resp, 401, "invalid_api_key")
    _, key, _ = await stack.new_account(0)
    async with http.get(stack.http_url + "/v1/models/no%2Fsuch", headers=bearer(key)) as resp:
        await contract.response(resp, path, "get")
        error = await assert_openai_error(
            resp, 404, "model_not_found", param="model", should_retry=False
        )
    assert error["message"] == "The model 'no/such' does not exist"


# -- every error status we can produce -------------------------------------------------------


async def _post_checked(
    http: aiohttp.ClientSession,
    stack: Stack,
    contract: Contract,
    status: int,
    code: str,
    *,
    key: str | None,
    body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> aiohttp.ClientResponse:
    all_headers = {**(bearer(key) if key else {}), **(headers or {})}
    resp = await http.post(
        stack.http_url + GENERATIONS,
        json=body if data is None else None,
        data=data,
        headers=all_headers,
    )
    await contract.response(resp, GENERATIONS, "post")
    await assert_openai_error(resp, status, code, param=param)
    return resp


async def test_client_errors_match_the_document(
    stack: Stack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(100_000)
    # 400: a value the model does not take; a body that is not JSON; a field of the wrong type.
    await _post_checked(
        http, stack, contract, 400, "invalid_value", key=key,
        body={**OK_BODY, "size": "999x999"}, param="size",
    )  # fmt: skip
    await _post_checked(
        http, stack, contract, 400, "invalid_value", key=key, data=b"{not json",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    await _post_checked(
        http, stack, contract, 400, "invalid_value", key=key, body={**OK_BODY, "n": "2"},
        param="n",
    )  # fmt: skip
    await _post_checked(
        http, stack, contract, 400, "model_not_found", key=key,
        body={**OK_BODY, "model": "no-such-model"}, param="model",
    )  # fmt: skip
    # 401
    await _post_checked(http, stack, contract, 401, "invalid_api_key", key=None, body=OK_BODY)
    await _post_checked(
        http, stack, contract, 401, "invalid_api_key", key="sk-ig-nope", body=OK_BODY
    )
    async with http.get(stack.http_url + "/v1/models", headers=bearer("sk-ig-nope")) as resp:
        await contract.response(resp, "/v1/models", "get")
        assert resp.status == 401
    # 402
    _, poor, _ = await stack.new_account(LOCAL_256 - 1)
    await _post_checked(http, stack, contract, 402, "insufficient_balance", key=poor, body=OK_BODY)
    # 404: a tampered image token.
    async with http.get(stack.http_url + "/v1/files/images/img_x.png.1.bad") as resp:
        await contract.response(resp, "/v1/files/images/{token}", "get")
        assert resp.status == 404
    # 409: the same Idempotency-Key with another body.
    idem = {"Idempotency-Key": "openapi-409"}
    async with http.post(
        stack.http_url + GENERATIONS, json=OK_BODY, headers={**bearer(key), **idem}
    ) as resp:
        assert resp.status == 200
        await contract.response(resp, GENERATIONS, "post")
    await _post_checked(
        http, stack, contract, 409, "idempotency_key_reused", key=key,
        body={**OK_BODY, "prompt": "another"}, headers=idem,
    )  # fmt: skip
    # 413
    await _post_checked(
        http, stack, contract, 413, "request_too_large", key=key,
        body={**OK_BODY, "prompt": "x" * MAX_BODY_BYTES},
    )  # fmt: skip


async def test_rate_limited_answers_match_the_document(
    stack: Stack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    _, key, key_id = await stack.new_account(100_000)
    await stack.running.ledger.set_key_limits(key_id, 1, 5)
    async with http.post(stack.http_url + GENERATIONS, json=OK_BODY, headers=bearer(key)) as resp:
        assert resp.status == 200
        await contract.response(resp, GENERATIONS, "post")
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert resp.headers["x-ratelimit-remaining-images"] == "4"
    resp = await _post_checked(
        http, stack, contract, 429, "rate_limit_exceeded", key=key, body=OK_BODY
    )
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.headers["x-ratelimit-limit-requests"] == "1"


async def test_an_upstream_failure_matches_the_document(
    stack: Stack, contract: Contract, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(100_000)
    fake.script(server_error())
    await _post_checked(
        http, stack, contract, 502, "upstream_error", key=key,
        body={"model": "fake-dalle", "prompt": "a boat", "size": "256x256"},
    )  # fmt: skip


async def test_an_unreachable_service_matches_the_document(
    stack: Stack, contract: Contract, http: aiohttp.ClientSession
) -> None:
    config = GatewayConfig(service_address=f"127.0.0.1:{free_port()}")
    async with _gateway(config) as url:
        async with http.get(url + "/v1/models", headers=bearer("sk-ig-any")) as resp:
            await contract.response(resp, "/v1/models", "get")
            await assert_openai_error(resp, 503, "service_unavailable", should_retry=True)
        async with http.get(url + "/readyz") as resp:
            assert resp.status == 503
            await contract.response(resp, "/readyz", "get")


async def test_a_gateway_timeout_matches_the_document(
    stack: Stack, contract: Contract, fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(100_000)
    fake.script(slow(1.0))
    config = GatewayConfig(service_address=stack.grpc_address, request_timeout_seconds=0.3)
    async with (
        _gateway(config) as url,
        http.post(
            url + GENERATIONS,
            json={"model": "fake-dalle", "prompt": "a boat", "size": "256x256"},
            headers=bearer(key),
        ) as resp,
    ):
        await contract.response(resp, GENERATIONS, "post")
        await assert_openai_error(resp, 504, "timeout", should_retry=True)


# -- routes that may land after this document ------------------------------------------------


async def _answer_or_skip(resp: aiohttp.ClientResponse, route: str) -> None:
    if resp.status == 404:
        body = await resp.json(content_type=None)
        if body["error"]["message"].startswith("Unknown request URL"):
            pytest.skip(f"{route} is documented but not served yet (404 Unknown request URL)")


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/images/edits", {"prompt": "add a moon", "model": "local-sketch", "size": "256x256"}),
        ("/v1/images/variations", {"model": "local-sketch", "size": "256x256"}),
    ],
)
async def test_multipart_image_routes_match_the_document(
    stack: Stack,
    contract: Contract,
    http: aiohttp.ClientSession,
    path: str,
    fields: dict[str, str],
) -> None:
    _, key, _ = await stack.new_account(100_000)

    def form(with_image: bool) -> aiohttp.FormData:
        data = aiohttp.FormData()
        for name, value in fields.items():
            data.add_field(name, value)
        if with_image:
            data.add_field("image", _png(), filename="in.png", content_type="image/png")
        return data

    async with http.post(stack.http_url + path, data=form(True), headers=bearer(key)) as resp:
        await _answer_or_skip(resp, f"POST {path}")
        await contract.response(resp, path, "post")
    # Without the required image: an OpenAI-shaped 400.
    async with http.post(stack.http_url + path, data=form(False), headers=bearer(key)) as resp:
        await contract.response(resp, path, "post")
        assert resp.status == 400
    async with http.post(stack.http_url + path, data=form(True)) as resp:
        await contract.response(resp, path, "post")
        assert resp.status == 401


def _sse_events(text: str) -> list[Any]:
    """The JSON of every `data:` line of a Server-Sent Events body."""
    return [
        json.loads(line[len("data:") :])
        for line in text.splitlines()
        if line.startswith("data:") and line[len("data:") :].strip() not in ("", "[DONE]")
    ]


_GPT_IMAGE_TOML = """
[service]
data_dir = "{data_dir}"

[providers.upstream]
type = "openai"
base_url = "{upstream_url}"
api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
timeout_seconds = 5
max_retries = 0

[models.fake-gpt-image]
provider = "upstream"
upstream_model = "gpt-image-1"
owned_by = "openai"
sizes = ["1024x1024"]
qualities = ["auto", "low", "medium", "high"]
default_quality = "low"
max_images = 2
parameters = ["background", "output_format", "output_compression", "moderation", "partial_images"]

[models.fake-gpt-image.price_usd]
default = "0.01"
"""


@pytest.fixture
async def gpt_image_stack(
    stack: Stack, fake: FakeOpenAIUpstream, tmp_path: Path
) -> AsyncIterator[tests_stack.Stack]:
    """A stack whose one model is gpt-image behind the session's fake upstream."""
    toml = _GPT_IMAGE_TOML.format(data_dir=tmp_path / "data", upstream_url=fake.base_url)
    async with tests_stack.start_stack(
        toml, tmp_path, environ={"IMAGEGEN_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    ) as running:
        yield running


async def test_gpt_image_answers_and_streams_match_the_document(
    gpt_image_stack: tests_stack.Stack,
    contract: Contract,
    fake: FakeOpenAIUpstream,
    http: aiohttp.ClientSession,
) -> None:
    running = gpt_image_stack
    _, key, _ = await running.new_account(1_000_000)
    body = {
        "model": "fake-gpt-image",
        "prompt": "a red kite",
        "size": "1024x1024",
        "background": "opaque",
        "output_format": "webp",
        "output_compression": 80,
        "moderation": "low",
    }
    async with http.post(running.http_url + GENERATIONS, json=body, headers=bearer(key)) as resp:
        assert resp.status == 200, await resp.text()
        answer = json.loads(await contract.response(resp, GENERATIONS, "post"))
    assert len(answer["data"]) == 1

    async with http.post(
        running.http_url + GENERATIONS,
        json={**body, "stream": True, "partial_images": 2},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        text = (await resp.read()).decode()
        contract.check(GENERATIONS, "post", 200, resp.headers, resp.content_type, b"")
    events = _sse_events(text)
    pointer = f"/paths/{_escape(GENERATIONS)}/post/responses/200/content/text~1event-stream/schema"
    for event in events:
        contract.validate_json(pointer, event)
    assert [e["type"] for e in events][-1] == "image_generation.completed"
    assert any(e["type"] == "image_generation.partial_image" for e in events)

    # A stream that fails after its first event ends with an `error` event.
    fake.script(stream_error(1))
    async with http.post(
        running.http_url + GENERATIONS,
        json={**body, "stream": True, "partial_images": 2},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200
        events = _sse_events((await resp.read()).decode())
    for event in events:
        contract.validate_json(pointer, event)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "upstream_error"
