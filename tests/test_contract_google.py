"""Contract tests: our Gemini adapter against Google's own client, google-genai 3.3.0.

A fake is not evidence of a wire format. Here the official SDK and our adapter make the same
call, with equivalent parameters, to one loopback recorder, and what each put on the wire is
compared: method, path, query, the auth header, and the JSON body. The recorder answers as
Google does (a GenerateContentResponse with a real PNG in ``inlineData``, a model list page, an
error body) and both sides read the same answer.

The SDK and the adapter spell a few nested fields differently: google-genai sends
``thinkingConfig.thinking_level`` and ``inlineData.mime_type`` in snake_case (it dumps those
pydantic models without converting their keys, ``_common.convert_to_dict``), we send
camelCase; it encodes image bytes in URL-safe base64, we in standard base64. Google's JSON
parsing of protobuf messages takes either spelling of a field and either base64 alphabet, so
the bodies are compared with every key in camelCase and every image decoded, and the raw
spellings are pinned apart.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import google.oauth2.credentials
import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import _api_client, errors, types
from multidict import CIMultiDict

from imagegen_service.errors import UpstreamModelUnavailable
from imagegen_service.providers.base import InputImage, ProviderRequest
from imagegen_service.providers.gemini_image import (
    GEMINI_BASE_URL,
    REFUSAL_FINISH_REASONS,
    STANDARD_ASPECT_RATIOS,
    THINKING_LEVELS,
    GeminiImageProvider,
    VertexGeminiImageProvider,
)
from tests.fakes.loopback import LoopbackServer, RecordedRequest, image_bytes, provider_request

API_KEY = "AIza-contract-key-0042"
TOKEN = "ya29.contract-token-0042"
PROJECT = "contract-project"
FLASH = "gemini-3.1-flash-image"
PRO = "gemini-3-pro-image"
PROMPT = "a lighthouse at dusk"
ANSWER_PNG = image_bytes(8, 4)
PNG_IN = image_bytes(16, 16)
JPEG_IN = image_bytes(24, 16, "JPEG")


class Recorder(LoopbackServer[Any]):
    """Records every request and answers as Google does. ``answer`` is the JSON (and status)
    every generateContent call gets; model list pages are served from ``pages``."""

    def __init__(self) -> None:
        super().__init__(None)
        self.status = 200
        self.answer: Any = _image_answer()
        self.pages: list[dict[str, Any]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        await self.record(request)
        if request.method == "GET":
            token = request.query.get("pageToken", "")
            index = int(token.removeprefix("page-")) if token else 0
            return web.json_response(self.pages[index])
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.answer),
            content_type="application/json",
            charset="UTF-8",
        )


def _image_answer() -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "Here it is."},
                        {
                            "inlineData": {
                                "mimeType": "image/png",
                                "data": base64.b64encode(ANSWER_PNG).decode("ascii"),
                            }
                        },
                    ],
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 5,
            "candidatesTokenCount": 1120,
            "totalTokenCount": 1125,
        },
        "modelVersion": FLASH,
        "responseId": "contract-1",
    }


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    async with Recorder() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The SDK's transport: handed in, as ``HttpOptions.aiohttp_client`` allows, rather than
    the session google-genai would build by subclassing aiohttp's (which aiohttp warns of)."""
    async with aiohttp.ClientSession() as session:
        yield session


def camel(value: Any) -> Any:
    """``value`` with every object key in lowerCamelCase, as Google's JSON parser reads it."""
    if isinstance(value, dict):
        return {
            re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key): camel(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [camel(item) for item in value]
    return value


def inline_bytes(value: Any) -> Any:
    """``value`` with every ``inlineData.data`` decoded: google-genai encodes bytes in the
    URL-safe base64 alphabet (``_common.encode_unserializable_types``), we in the standard one;
    Google's JSON parsing of a bytes field takes either."""
    if isinstance(value, dict):
        out = {key: inline_bytes(item) for key, item in value.items()}
        inline = out.get("inlineData")
        if isinstance(inline, dict) and isinstance(inline.get("data"), str):
            data = inline["data"].replace("+", "-").replace("/", "_")
            out["inlineData"] = {**inline, "data": base64.urlsafe_b64decode(data)}
        return out
    if isinstance(value, list):
        return [inline_bytes(item) for item in value]
    return value


def wire(seen: RecordedRequest) -> tuple[str, str, dict[str, str], Any]:
    return seen.method, seen.path, seen.query, inline_bytes(camel(seen.body))


def auth(headers: CIMultiDict[str]) -> dict[str, str]:
    return {name: headers[name] for name in ("x-goog-api-key", "Authorization") if name in headers}


def gemini_client(recorder: Recorder, http: aiohttp.ClientSession) -> genai.Client:
    # The SDK's default API version for the Gemini API (v1 in 3.3.0), under our loopback host.
    options = types.HttpOptions(base_url=recorder.origin, aiohttp_client=http)
    return genai.Client(api_key=API_KEY, http_options=options)


def vertex_client(
    recorder: Recorder, http: aiohttp.ClientSession, location: str, api_version: str | None
) -> genai.Client:
    credentials = google.oauth2.credentials.Credentials(token=TOKEN)  # type: ignore[no-untyped-call]
    options = types.HttpOptions(
        base_url=recorder.origin, api_version=api_version, aiohttp_client=http
    )
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=location,
        credentials=credentials,
        http_options=options,
    )


def sdk_config(*, thinking: bool) -> types.GenerateContentConfig:
    """What our adapter sends for a 1792x1024 request with seed 5, in the SDK's terms."""
    return types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        candidate_count=1,
        seed=5,
        image_config=types.ImageConfig(aspect_ratio="16:9", image_size="1K"),
        thinking_config=types.ThinkingConfig(thinking_level=types.ThinkingLevel.HIGH)
        if thinking
        else None,
    )


def our_request(model: str, **overrides: Any) -> ProviderRequest:
    return provider_request(
        upstream_model=model, prompt=PROMPT, width=1792, height=1024, seed=5, **overrides
    )


# --- generateContent -------------------------------------------------------------------------


async def test_gemini_api_generation_matches_the_sdk_on_the_wire(
    recorder: Recorder, http: aiohttp.ClientSession
) -> None:
    client = gemini_client(recorder, http)
    try:
        answer = await client.aio.models.generate_content(
            model=FLASH, contents=PROMPT, config=sdk_config(thinking=True)
        )
    finally:
        await client.aio.aclose()
    adapter = GeminiImageProvider(
        "gemini", base_url=f"{recorder.origin}/v1", api_key=API_KEY, thinking_level="high"
    )
    try:
        result = await adapter.generate(our_request(FLASH))
    finally:
        await adapter.aclose()

    sdk, ours = recorder.requests
    assert wire(ours) == wire(sdk)
    assert ours.path == f"/v1/models/{FLASH}:generateContent"
    assert auth(ours.headers) == auth(sdk.headers) == {"x-goog-api-key": API_KEY}
    assert ours.headers["Content-Type"] == sdk.headers["Content-Type"] == "application/json"
    config = camel(ours.body)["generationConfig"]
    assert config["responseModalities"] == ["IMAGE"]
    assert config["imageConfig"] == {"aspectRatio": "16:9", "imageSize": "1K"}
    assert config["thinkingConfig"] == {"thinkingLevel": "HIGH"}
    # The spellings differ; the meaning does not.
    assert sdk.body["generationConfig"]["thinkingConfig"] == {"thinking_level": "HIGH"}
    assert ours.body["generationConfig"]["thinkingConfig"] == {"thinkingLevel": "HIGH"}

    # Both read the same image from the same answer.
    part = answer.candidates[0].content.parts[1]  # type: ignore[index,union-attr]
    assert part.inline_data.data == ANSWER_PNG  # type: ignore[union-attr]
    assert result.images[0].data == ANSWER_PNG
    assert result.images[0].revised_prompt == answer.text == "Here it is."


async def test_gemini_api_edit_matches_the_sdk_on_the_wire(
    recorder: Recorder, http: aiohttp.ClientSession
) -> None:
    client = gemini_client(recorder, http)
    try:
        await client.aio.models.generate_content(
            model=PRO,
            contents=[
                types.Part.from_bytes(data=PNG_IN, mime_type="image/png"),
                types.Part.from_bytes(data=JPEG_IN, mime_type="image/jpeg"),
                PROMPT,
            ],
            config=sdk_config(thinking=False),
        )
    finally:
        await client.aio.aclose()
    adapter = GeminiImageProvider("gemini", base_url=f"{recorder.origin}/v1", api_key=API_KEY)
    images = (
        InputImage(PNG_IN, "png", 16, 16),
        InputImage(JPEG_IN, "jpeg", 24, 16),
    )
    try:
        await adapter.edit(our_request(PRO, images=images))
    finally:
        await adapter.aclose()

    sdk, ours = recorder.requests
    assert wire(ours) == wire(sdk)
    parts = camel(ours.body)["contents"][0]["parts"]
    assert [sorted(part) for part in parts] == [["inlineData"], ["inlineData"], ["text"]]
    assert [p["inlineData"]["mimeType"] for p in parts[:2]] == ["image/png", "image/jpeg"]
    assert "thinkingConfig" not in camel(ours.body)["generationConfig"]
    assert sdk.body["contents"][0]["parts"][0]["inlineData"]["mime_type"] == "image/png"
    assert ours.body["contents"][0]["parts"][0]["inlineData"]["mimeType"] == "image/png"
    sdk_data = sdk.body["contents"][0]["parts"][1]["inlineData"]["data"]
    our_data = ours.body["contents"][0]["parts"][1]["inlineData"]["data"]
    assert base64.urlsafe_b64decode(sdk_data) == base64.b64decode(our_data) == JPEG_IN


@pytest.mark.parametrize("location", ["global", "us-central1"])
async def test_vertex_generation_matches_the_sdk_on_the_wire(
    recorder: Recorder, http: aiohttp.ClientSession, location: str
) -> None:
    # Our vertex-gemini speaks v1, as vertex-imagen does; the SDK's default is v1beta1.
    client = vertex_client(recorder, http, location, "v1")
    try:
        await client.aio.models.generate_content(
            model=FLASH, contents=PROMPT, config=sdk_config(thinking=True)
        )
    finally:
        await client.aio.aclose()
    adapter = VertexGeminiImageProvider(
        "vertex-gemini",
        project=PROJECT,
        location=location,
        base_url=f"{recorder.origin}/v1",
        credential=TOKEN,
        thinking_level="HIGH",
    )
    try:
        await adapter.generate(our_request(FLASH))
    finally:
        await adapter.aclose()

    sdk, ours = recorder.requests
    assert wire(ours) == wire(sdk)
    assert ours.path == (
        f"/v1/projects/{PROJECT}/locations/{location}/publishers/google/models/"
        f"{FLASH}:generateContent"
    )
    assert auth(ours.headers) == auth(sdk.headers) == {"Authorization": f"Bearer {TOKEN}"}


# --- models.list -----------------------------------------------------------------------------


async def test_gemini_api_model_list_matches_the_sdk(
    recorder: Recorder, http: aiohttp.ClientSession
) -> None:
    recorder.pages = [
        {
            "models": [{"name": f"models/{FLASH}"}, {"name": "models/gemini-3-flash"}],
            "nextPageToken": "page-1",
        },
        {"models": [{"name": f"models/{PRO}"}]},
    ]
    client = gemini_client(recorder, http)
    try:
        pager = await client.aio.models.list(config={"page_size": 1000})
        sdk_names = [model.name async for model in pager]
    finally:
        await client.aio.aclose()
    adapter = GeminiImageProvider("gemini", base_url=f"{recorder.origin}/v1", api_key=API_KEY)
    try:
        ours = await adapter.list_models()
    finally:
        await adapter.aclose()

    sdk_calls, our_calls = recorder.requests[:2], recorder.requests[2:]
    assert [(r.method, r.path, r.query) for r in our_calls] == [
        (r.method, r.path, r.query) for r in sdk_calls
    ]
    assert our_calls[0].path == "/v1/models"
    assert our_calls[1].query == {"pageSize": "1000", "pageToken": "page-1"}
    assert all(auth(r.headers) == {"x-goog-api-key": API_KEY} for r in recorder.requests)
    assert ours == {name.removeprefix("models/") for name in sdk_names if name}
    assert ours == {FLASH, PRO, "gemini-3-flash"}


async def test_vertex_model_list_matches_the_sdks_publisher_model_list(
    recorder: Recorder, http: aiohttp.ClientSession
) -> None:
    recorder.pages = [
        {
            "publisherModels": [{"name": f"publishers/google/models/{FLASH}"}],
            "nextPageToken": "page-1",
        },
        {"publisherModels": [{"name": f"publishers/google/models/{PRO}"}]},
    ]
    # The SDK's own default version: publisher models are listed on v1beta1.
    client = vertex_client(recorder, http, "global", None)
    try:
        pager = await client.aio.models.list(config={"page_size": 1000})
        sdk_names = [model.name async for model in pager]
    finally:
        await client.aio.aclose()
    adapter = VertexGeminiImageProvider(
        "vertex-gemini",
        project=PROJECT,
        location="global",
        base_url=f"{recorder.origin}/v1",
        credential=TOKEN,
    )
    try:
        ours = await adapter.list_models()
    finally:
        await adapter.aclose()

    sdk_calls, our_calls = recorder.requests[:2], recorder.requests[2:]
    assert [(r.method, r.path, r.query) for r in our_calls] == [
        (r.method, r.path, r.query) for r in sdk_calls
    ]
    # No project in the path: google-genai lists publisher models outside any project.
    assert our_calls[0].path == "/v1beta1/publishers/google/models"
    assert all(auth(r.headers) == {"Authorization": f"Bearer {TOKEN}"} for r in recorder.requests)
    assert ours == {name.rpartition("/")[2] for name in sdk_names if name} == {FLASH, PRO}


# --- errors ----------------------------------------------------------------------------------


async def test_a_model_google_does_not_have_reads_the_same_on_both_sides(
    recorder: Recorder, http: aiohttp.ClientSession
) -> None:
    recorder.status = 404
    recorder.answer = {
        "error": {
            "code": 404,
            "message": "models/gemini-2.5-flash-image is not found for API version v1, or is "
            "not supported for generateContent. Call ListModels to see the list of available "
            "models and their supported methods.",
            "status": "NOT_FOUND",
        }
    }
    client = gemini_client(recorder, http)
    try:
        with pytest.raises(errors.ClientError) as sdk_error:
            await client.aio.models.generate_content(
                model="gemini-2.5-flash-image", contents=PROMPT
            )
    finally:
        await client.aio.aclose()
    adapter = GeminiImageProvider("gemini", base_url=f"{recorder.origin}/v1", api_key=API_KEY)
    try:
        with pytest.raises(UpstreamModelUnavailable) as ours:
            await adapter.generate(our_request("gemini-2.5-flash-image"))
    finally:
        await adapter.aclose()

    assert (sdk_error.value.code, sdk_error.value.status) == (404, "NOT_FOUND")
    assert ours.value.upstream_model == "gemini-2.5-flash-image"


# --- the SDK's vocabulary --------------------------------------------------------------------


def test_the_refusal_endings_are_the_sdks_safety_finish_reasons() -> None:
    names = {reason.value for reason in types.FinishReason}
    assert names >= REFUSAL_FINISH_REASONS
    failures = {"MAX_TOKENS", "OTHER", "MALFORMED_RESPONSE", "IMAGE_OTHER", "NO_IMAGE", "STOP"}
    assert names >= failures
    assert not failures & REFUSAL_FINISH_REASONS


def test_the_thinking_levels_are_the_sdks() -> None:
    assert set(THINKING_LEVELS) | {"THINKING_LEVEL_UNSPECIFIED"} == {
        level.value for level in types.ThinkingLevel
    }


def test_the_standard_aspect_ratios_include_every_one_the_sdk_names() -> None:
    description = types.ImageConfig.model_fields["aspect_ratio"].description or ""
    named = set(re.findall(r'"(\d+:\d+)"', description))
    assert named and named <= set(STANDARD_ASPECT_RATIOS)


def test_the_default_endpoint_uses_the_sdks_default_api_version() -> None:
    assert GEMINI_BASE_URL.endswith("/" + _api_client.GOOGLE_AI_API_DEFAULT_VERSION)
