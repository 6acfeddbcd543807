"""Contract tests: the official ``openai`` SDK (3.51.0) and our adapters make the same call
against one loopback recorder, and what each sent is compared field by field.

A fake is not evidence of a wire format; the SDK is. The recorder takes any method and path,
records method, path, query, headers and body (JSON parsed, multipart parsed into a form) and
answers a valid ImagesResponse with a real tiny PNG in ``b64_json`` (server-sent events when
the request streams, OpenAI's list shape for ``/models``). Each test states the differences
between the two that are legitimate, and asserts them too.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from openai import AsyncAzureOpenAI, AsyncOpenAI
from PIL import Image

from imagegen_service.providers.base import (
    InputImage,
    PartialImage,
    ProviderImage,
    ProviderRequest,
    StreamEvent,
)
from imagegen_service.providers.openai_compat import (
    AZURE_GPT_IMAGE_API_VERSION,
    AzureOpenAIProvider,
    OpenAICompatibleProvider,
)
from tests.fakes.loopback import LoopbackServer, RecordedRequest, image_bytes, provider_request
from tests.fakes.openai_upstream import Form, parse_form

API_KEY = "sk-contract-0123456789"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
ENTRA_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.contract-token.signature"
PROMPT = "a lighthouse at dusk"
PNG = image_bytes(8, 8)
# The headers that carry a credential: they must match exactly, absent ones included.
AUTH_HEADERS = ("Authorization", "api-key")


class Recorder(LoopbackServer[None]):
    """Records every request and answers it as OpenAI would, with a real 8x8 PNG."""

    def __init__(self) -> None:
        super().__init__(None)

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._any)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        seen = await self.record(request)
        form = parse_form(request.headers.get("Content-Type", ""), seen.body)
        if form is not None:
            seen = RecordedRequest(seen.method, seen.path, seen.headers, seen.query, form)
            self.requests[-1] = seen
        if seen.path.endswith("/models"):
            model = {"id": "gpt-image-2", "object": "model", "created": 1, "owned_by": "system"}
            return web.json_response({"object": "list", "data": [model]})
        fields: dict[str, Any] = form.fields if form is not None else dict(seen.body or {})
        n = int(fields.get("n", 1))
        streams = fields.get("stream") in (True, "true")
        if streams:
            return await self._events(request, n, int(fields.get("partial_images", 0)))
        answer = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(PNG).decode()} for _ in range(n)],
            "output_format": "png",
            "usage": _usage(),
        }
        return web.json_response(answer)

    async def _events(self, request: web.Request, n: int, partials: int) -> web.StreamResponse:
        prefix = "image_edit" if request.path.endswith("/edits") else "image_generation"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        b64 = base64.b64encode(PNG).decode()
        common = {"b64_json": b64, "created_at": 1, "size": "8x8", "quality": "high"}
        common.update(background="opaque", output_format="png")
        for _ in range(n):
            for k in range(partials):
                event = {"type": f"{prefix}.partial_image", "partial_image_index": k, **common}
                await response.write(_sse(event))
            await response.write(_sse({"type": f"{prefix}.completed", "usage": _usage(), **common}))
        await response.write_eof()
        return response


def _usage() -> dict[str, Any]:
    return {
        "input_tokens": 5,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 5},
        "output_tokens": 272,
        "total_tokens": 277,
    }


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    async with Recorder() as server:
        yield server


def request(**overrides: Any) -> ProviderRequest:
    return provider_request(prompt=PROMPT, **overrides)


def openai_sdk(recorder: Recorder, api_key: str = API_KEY, path: str = "/v1") -> AsyncOpenAI:
    return AsyncOpenAI(api_key=api_key, base_url=recorder.origin + path, max_retries=0)


def ours(recorder: Recorder) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider("openai", base_url=recorder.origin + "/v1", api_key=API_KEY)


def media_type(seen: RecordedRequest) -> str:
    return seen.headers.get("Content-Type", "").split(";")[0].strip()


def assert_same_address_and_auth(sdk: RecordedRequest, mine: RecordedRequest) -> None:
    assert (mine.method, mine.path, mine.query) == (sdk.method, sdk.path, sdk.query)
    for header in AUTH_HEADERS:
        assert mine.headers.get(header) == sdk.headers.get(header), header
    assert media_type(mine) == media_type(sdk)


def png_input(width: int = 64, height: int = 64) -> InputImage:
    return InputImage(image_bytes(width, height), "png", width, height)


def alpha_mask(width: int = 64, height: int = 64) -> InputImage:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 0, 0)).save(buffer, "PNG")
    return InputImage(buffer.getvalue(), "png", width, height, has_alpha=True)


def as_file(image: InputImage, name: str) -> tuple[str, bytes, str]:
    return (name, image.data, image.mime_type)


def files_by_field(form: Form) -> dict[str, list[tuple[str, bytes]]]:
    """File parts by field name as (content type, bytes): file names are the client's own."""
    return {
        name: [(part.content_type, part.data) for part in parts]
        for name, parts in form.files.items()
    }


# -- OpenAI --------------------------------------------------------------------------------


async def test_gpt_image_2_generate_sends_what_the_sdk_sends(recorder: Recorder) -> None:
    async with openai_sdk(recorder) as client:
        await client.images.generate(
            model="gpt-image-2",
            prompt=PROMPT,
            n=1,
            size="1536x864",
            quality="high",
            output_format="webp",
            output_compression=70,
            background="transparent",
            moderation="low",
            safety_identifier="user-7",
        )
    adapter = ours(recorder)
    try:
        await adapter.generate(
            request(
                upstream_model="gpt-image-2",
                width=1536,
                height=864,
                quality="high",
                output_format="webp",
                output_compression=70,
                background="transparent",
                moderation="low",
                user="user-7",
            )
        )
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert (mine.path, media_type(mine)) == ("/v1/images/generations", "application/json")
    assert mine.body == sdk.body
    assert "user" not in mine.body


async def test_gpt_image_2_5_generate_with_xhigh_sends_what_the_sdk_sends(
    recorder: Recorder,
) -> None:
    async with openai_sdk(recorder) as client:
        await client.images.generate(
            model="gpt-image-2.5-flare", prompt=PROMPT, n=2, size="2048x2048", quality="xhigh"
        )
    adapter = ours(recorder)
    try:
        result = await adapter.generate(
            request(
                upstream_model="gpt-image-2.5-flare", n=2, width=2048, height=2048, quality="xhigh"
            )
        )
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert mine.body == sdk.body
    assert len(result.images) == 2


async def test_chatgpt_image_latest_gets_no_response_format_and_n_is_ours_alone(
    recorder: Recorder,
) -> None:
    async with openai_sdk(recorder) as client:
        # The SDK sends n only when given; we always say how many images we pay for.
        await client.images.generate(
            model="chatgpt-image-latest", prompt=PROMPT, size="1024x1024", quality="medium"
        )
    adapter = ours(recorder)
    try:
        # Our catalog's legacy quality name and a style the model does not take.
        await adapter.generate(
            request(upstream_model="chatgpt-image-latest", quality="standard", style="vivid")
        )
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    mine_body = dict(mine.body)
    assert mine_body.pop("n") == 1
    assert "n" not in sdk.body
    assert mine_body == sdk.body
    for absent in ("response_format", "style", "user"):
        assert absent not in mine.body


async def test_an_edit_of_two_images_with_a_mask_sends_the_sdks_multipart_fields(
    recorder: Recorder,
) -> None:
    first, second, mask = png_input(), png_input(32, 48), alpha_mask()
    async with openai_sdk(recorder) as client:
        await client.images.edit(
            model="gpt-image-2",
            image=[as_file(first, "first.png"), as_file(second, "second.png")],
            mask=as_file(mask, "mask.png"),
            prompt=PROMPT,
            n=1,
            size="1024x1024",
            quality="high",
            background="opaque",
            output_format="jpeg",
            safety_identifier="user-8",
        )
    adapter = ours(recorder)
    try:
        await adapter.edit(
            request(
                upstream_model="gpt-image-2",
                images=(first, second),
                mask=mask,
                quality="hd",
                background="opaque",
                output_format="jpeg",
                user="user-8",
            )
        )
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert (mine.path, media_type(mine)) == ("/v1/images/edits", "multipart/form-data")
    assert isinstance(sdk.body, Form)
    assert isinstance(mine.body, Form)
    assert mine.body.fields == sdk.body.fields
    assert set(mine.body.files) == set(sdk.body.files) == {"image[]", "mask"}
    assert files_by_field(mine.body) == files_by_field(sdk.body)


async def test_an_edit_of_one_image_is_the_plain_image_field_as_in_the_sdk(
    recorder: Recorder,
) -> None:
    image = png_input()
    async with openai_sdk(recorder) as client:
        await client.images.edit(
            model="gpt-image-1.5",
            image=as_file(image, "in.png"),
            prompt=PROMPT,
            n=1,
            size="1024x1024",
        )
    adapter = ours(recorder)
    try:
        await adapter.edit(request(upstream_model="gpt-image-1.5", images=(image,)))
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert isinstance(sdk.body, Form)
    assert isinstance(mine.body, Form)
    assert mine.body.fields == sdk.body.fields
    assert files_by_field(mine.body) == files_by_field(sdk.body)
    assert set(mine.body.files) == {"image"}


async def test_a_streamed_generate_sends_what_the_sdk_sends_and_reads_the_same_events(
    recorder: Recorder,
) -> None:
    sdk_events: list[str] = []
    async with openai_sdk(recorder) as client:
        stream = await client.images.generate(
            model="gpt-image-2",
            prompt=PROMPT,
            n=1,
            size="1024x1024",
            quality="low",
            stream=True,
            partial_images=2,
        )
        async for event in stream:
            sdk_events.append(event.type)
    adapter = ours(recorder)
    mine_events: list[StreamEvent] = []
    try:
        async for ours_event in adapter.generate_stream(
            request(upstream_model="gpt-image-2", quality="low", partial_images=2)
        ):
            mine_events.append(ours_event)
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert mine.body == sdk.body
    assert (mine.body["stream"], mine.body["partial_images"]) == (True, 2)
    assert sdk_events == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [type(e) for e in mine_events] == [PartialImage, PartialImage, ProviderImage]
    # Each asks for the answer it expects: we name the event stream, the SDK keeps JSON.
    assert mine.headers["Accept"] == "text/event-stream"


async def test_list_models_reads_the_same_list_the_sdk_reads(recorder: Recorder) -> None:
    async with openai_sdk(recorder) as client:
        sdk_ids = {model.id async for model in client.models.list()}
    adapter = ours(recorder)
    try:
        mine_ids = await adapter.list_models()
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert (mine.method, mine.path) == ("GET", "/v1/models")
    assert mine_ids == frozenset(sdk_ids) == {"gpt-image-2"}


# -- Azure ---------------------------------------------------------------------------------


async def test_azure_deployment_routes_send_what_azure_openai_sends(recorder: Recorder) -> None:
    async with AsyncAzureOpenAI(
        azure_endpoint=recorder.origin,
        api_key=AZURE_KEY,
        api_version=AZURE_GPT_IMAGE_API_VERSION,
        max_retries=0,
    ) as client:
        await client.images.generate(
            model="painter",
            prompt=PROMPT,
            n=1,
            size="1024x1024",
            quality="high",
            output_format="jpeg",
            user="user-9",
        )
    adapter = AzureOpenAIProvider("azure", base_url=recorder.origin, api_key=AZURE_KEY)
    try:
        await adapter.generate(
            request(
                upstream_model="painter",
                family="gpt-image",
                quality="high",
                output_format="jpeg",
                user="user-9",
            )
        )
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert mine.path == "/openai/deployments/painter/images/generations"
    assert mine.query == {"api-version": AZURE_GPT_IMAGE_API_VERSION}
    assert mine.headers["api-key"] == AZURE_KEY
    # The SDK repeats the deployment as `model` in the body; we leave it out, since the path
    # names the deployment. The dated API gets `user`, as the SDK passes it through.
    sdk_body = dict(sdk.body)
    assert sdk_body.pop("model") == "painter"
    assert "model" not in mine.body
    assert mine.body == sdk_body


async def test_azure_deployment_routes_with_an_entra_token_edit_as_azure_openai_does(
    recorder: Recorder, tmp_path: Path
) -> None:
    image, mask = png_input(), alpha_mask()
    async with AsyncAzureOpenAI(
        azure_endpoint=recorder.origin,
        azure_ad_token=ENTRA_TOKEN,
        api_version=AZURE_GPT_IMAGE_API_VERSION,
        max_retries=0,
    ) as client:
        await client.images.edit(
            model="painter",
            image=as_file(image, "in.png"),
            mask=as_file(mask, "mask.png"),
            prompt=PROMPT,
            n=1,
            size="1024x1024",
        )
    token_file = tmp_path / "token"
    token_file.write_text(ENTRA_TOKEN + "\n")
    adapter = AzureOpenAIProvider(
        "azure", base_url=recorder.origin, api_key=None, token_file=str(token_file)
    )
    try:
        await adapter.edit(
            request(upstream_model="painter", family="gpt-image", images=(image,), mask=mask)
        )
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert_same_address_and_auth(sdk, mine)
    assert mine.headers["Authorization"] == f"Bearer {ENTRA_TOKEN}"
    assert "api-key" not in mine.headers
    assert mine.path == "/openai/deployments/painter/images/edits"
    assert isinstance(sdk.body, Form)
    assert isinstance(mine.body, Form)
    sdk_fields = dict(sdk.body.fields)
    assert sdk_fields.pop("model") == "painter"
    assert mine.body.fields == sdk_fields
    assert files_by_field(mine.body) == files_by_field(sdk.body)


async def test_azure_v1_with_an_entra_token_sends_what_the_openai_client_sends(
    recorder: Recorder, tmp_path: Path
) -> None:
    # Microsoft's v1 guidance: the plain OpenAI client on {resource}/openai/v1/, the token as
    # its api_key.
    async with openai_sdk(recorder, api_key=ENTRA_TOKEN, path="/openai/v1/") as client:
        await client.images.generate(
            model="canvas",
            prompt=PROMPT,
            n=1,
            size="1536x864",
            quality="high",
            output_format="jpeg",
            safety_identifier="user-10",
        )
        sdk_ids = {model.id async for model in client.models.list()}
    token_file = tmp_path / "token"
    token_file.write_text(ENTRA_TOKEN + "\n")
    adapter = AzureOpenAIProvider(
        "azure", base_url=recorder.origin, api_key=None, api="v1", token_file=str(token_file)
    )
    try:
        await adapter.generate(
            request(
                upstream_model="canvas",
                family="gpt-image-2",
                width=1536,
                height=864,
                quality="high",
                output_format="jpeg",
                user="user-10",
            )
        )
        mine_ids = await adapter.list_models()
    finally:
        await adapter.aclose()

    sdk_generate, sdk_list, mine_generate, mine_list = recorder.requests
    assert_same_address_and_auth(sdk_generate, mine_generate)
    assert (mine_generate.path, mine_generate.query) == ("/openai/v1/images/generations", {})
    assert mine_generate.headers["Authorization"] == f"Bearer {ENTRA_TOKEN}"
    assert mine_generate.body == sdk_generate.body
    assert mine_generate.body["model"] == "canvas"
    assert_same_address_and_auth(sdk_list, mine_list)
    assert mine_list.path == "/openai/v1/models"
    assert mine_ids == frozenset(sdk_ids)


async def test_azure_v1_with_a_key_uses_azures_key_header_where_the_openai_client_uses_bearer(
    recorder: Recorder,
) -> None:
    async with openai_sdk(recorder, api_key=AZURE_KEY, path="/openai/v1/") as client:
        await client.images.generate(model="canvas", prompt=PROMPT, n=1, size="1024x1024")
    adapter = AzureOpenAIProvider("azure", base_url=recorder.origin, api_key=AZURE_KEY, api="v1")
    try:
        await adapter.generate(request(upstream_model="canvas", family="gpt-image-2"))
    finally:
        await adapter.aclose()

    sdk, mine = recorder.requests
    assert (mine.method, mine.path, mine.query) == (sdk.method, sdk.path, sdk.query)
    assert mine.body == sdk.body
    # The one legitimate difference: a resource key goes in `api-key`, as AzureOpenAI sends
    # it on every Azure route (lib/azure.py), never as a Bearer token that would read as an
    # Entra ID token; the OpenAI client only knows Bearer.
    assert sdk.headers["Authorization"] == f"Bearer {AZURE_KEY}"
    assert "api-key" not in sdk.headers
    assert mine.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in mine.headers
