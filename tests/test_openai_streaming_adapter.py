"""The OpenAI adapter's gpt-image streams, driven against real loopback servers: the fake
upstream, and a bare server that writes server-sent events exactly as a test needs them
(huge events in small pieces, CRLF line ends, comments, ``[DONE]``, a JSON answer)."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from PIL import Image

from imagegen_service.errors import ContentPolicy, UpstreamError, UpstreamModelUnavailable
from imagegen_service.providers.base import (
    InputImage,
    PartialImage,
    ProviderImage,
    ProviderRequest,
    StreamEvent,
)
from imagegen_service.providers.openai_compat import OpenAICompatibleProvider
from tests.fakes.loopback import provider_request
from tests.fakes.openai_upstream import FakeOpenAIUpstream, model_not_found, stream_error

API_KEY = "sk-upstream-test"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {
        "upstream_model": "gpt-image-1",
        "prompt": "a lighthouse",
        "quality": "low",
        "partial_images": 2,
    }
    return provider_request(**{**defaults, **overrides})


def _noise_png(side: int) -> bytes:
    size = 3 * side * side
    image = Image.frombytes("RGB", (side, side), (bytes(range(251)) * (size // 251 + 1))[:size])
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=0)
    return out.getvalue()


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/images/{operation}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()


async def _collect(
    provider: OpenAICompatibleProvider, request: ProviderRequest
) -> list[StreamEvent]:
    try:
        return [event async for event in provider.generate_stream(request)]
    finally:
        await provider.aclose()


async def test_events_far_larger_than_a_line_buffer_arrive_whole() -> None:
    big = _noise_png(700)  # ~1.5 MB of PNG, ~2 MB of base64 on one data line
    encoded = base64.b64encode(big).decode()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        partial = {
            "type": "image_generation.partial_image",
            "b64_json": encoded,
            "partial_image_index": 0,
        }
        done = {
            "type": "image_generation.completed",
            "b64_json": encoded,
            "usage": {
                "input_tokens": 3,
                "output_tokens": 9,
                "total_tokens": 12,
                "input_tokens_details": {"text_tokens": 3, "image_tokens": 0},
            },
        }
        payload = b": keep-alive\r\n\r\n"
        for event in (partial, done):
            payload += (
                b"event: "
                + str(event["type"]).encode()
                + b"\r\ndata: "
                + orjson.dumps(event)
                + b"\r\n\r\n"
            )
        payload += b"data: [DONE]\r\n\r\n"
        # Odd-sized pieces, so line ends fall anywhere, CRLFs split across writes.
        for start in range(0, len(payload), 7919):
            await resp.write(payload[start : start + 7919])
        await resp.write_eof()
        return resp

    async with _server(handler) as base_url:
        events = await _collect(
            OpenAICompatibleProvider("openai", base_url=base_url, api_key=API_KEY), _request()
        )
    assert len(events) == 2
    partial, image = events
    assert isinstance(partial, PartialImage)
    assert (partial.index, partial.partial_image_index, partial.data) == (0, 0, big)
    assert isinstance(image, ProviderImage)
    assert (image.data, image.width) == (big, 700)
    assert image.usage is not None
    assert (image.usage.input_tokens, image.usage.output_tokens, image.usage.input_text_tokens) == (
        3,
        9,
        3,
    )


async def test_a_server_that_answers_json_instead_of_a_stream_still_serves() -> None:
    png = _noise_png(32)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]}
        )

    async with _server(handler) as base_url:
        events = await _collect(
            OpenAICompatibleProvider("openai", base_url=base_url, api_key=API_KEY), _request()
        )
    assert [type(e).__name__ for e in events] == ["ProviderImage", "TokenUsage"]


async def test_a_stream_that_ends_short_is_an_upstream_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = {
            "type": "image_generation.completed",
            "b64_json": base64.b64encode(_noise_png(8)).decode(),
        }
        await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await resp.write_eof()
        return resp

    async with _server(handler) as base_url:
        provider = OpenAICompatibleProvider("openai", base_url=base_url, api_key=API_KEY)
        with pytest.raises(UpstreamError, match="after 1 of 2 images"):
            await _collect(provider, _request(n=2))


async def test_a_moderation_error_event_is_a_content_policy_refusal() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        error = {"type": "error", "error": {"code": "moderation_blocked", "message": "no"}}
        await resp.write(b"event: error\ndata: " + orjson.dumps(error) + b"\n\n")
        await resp.write_eof()
        return resp

    async with _server(handler) as base_url:
        provider = OpenAICompatibleProvider("openai", base_url=base_url, api_key=API_KEY)
        with pytest.raises(ContentPolicy):
            await _collect(provider, _request())


async def test_the_fake_upstream_streams_and_its_error_event_ends_the_stream() -> None:
    async with FakeOpenAIUpstream(api_key=API_KEY) as fake:
        provider = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        events = await _collect(provider, _request(n=2, partial_images=1))
        assert [type(e).__name__ for e in events] == ["PartialImage", "ProviderImage"] * 2
        assert [e.index for e in events if isinstance(e, PartialImage)] == [0, 1]
        assert fake.requests[-1].body["stream"] is True
        fake.script(stream_error(after_events=1))
        seen: list[StreamEvent] = []
        with pytest.raises(UpstreamError, match="server_error"):
            async for event in provider.generate_stream(_request(partial_images=1)):
                seen.append(event)
        assert [type(e).__name__ for e in seen] == ["PartialImage"]
        await provider.aclose()


async def test_a_gpt_image_edit_streams_as_multipart() -> None:
    async with FakeOpenAIUpstream(api_key=API_KEY) as fake:
        provider = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        png = _noise_png(64)
        image = InputImage(png, "png", 64, 64)
        try:
            events = [
                e
                async for e in provider.edit_stream(
                    _request(images=(image,), partial_images=1, background="opaque")
                )
            ]
        finally:
            await provider.aclose()
    assert [type(e).__name__ for e in events] == ["PartialImage", "ProviderImage"]
    form = fake.requests[-1].body
    assert fake.requests[-1].path == "/v1/images/edits"
    assert (form.fields["stream"], form.fields["partial_images"]) == ("true", "1")
    assert (form.fields["background"], form.fields["quality"]) == ("opaque", "low")
    assert [p.data for p in form.files["image"]] == [png]


@pytest.mark.parametrize(
    ("model", "size", "quality"),
    [
        ("chatgpt-image-latest", (1536, 1024), "high"),
        ("gpt-image-2", (1536, 864), "medium"),
        ("gpt-image-2.5-sunburst", (864, 1536), "xhigh"),
    ],
)
async def test_every_gpt_image_family_streams(
    model: str, size: tuple[int, int], quality: str
) -> None:
    async with FakeOpenAIUpstream(api_key=API_KEY) as fake:
        provider = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        events = await _collect(
            provider,
            _request(
                upstream_model=model,
                width=size[0],
                height=size[1],
                quality=quality,
                partial_images=1,
                user="u-5",
            ),
        )
    assert [type(e).__name__ for e in events] == ["PartialImage", "ProviderImage"]
    image = events[-1]
    assert isinstance(image, ProviderImage)
    assert (image.width, image.height) == size
    body = fake.requests[0].body
    assert (body["stream"], body["partial_images"], body["quality"]) == (True, 1, quality)
    assert body["safety_identifier"] == "u-5"
    assert "response_format" not in body


async def test_a_legacy_id_is_not_streamed_but_answered_whole() -> None:
    async with FakeOpenAIUpstream(api_key=API_KEY) as fake:
        provider = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        events = await _collect(
            provider, _request(upstream_model="sdxl-turbo", quality="", width=64, height=48)
        )
    assert [type(e).__name__ for e in events] == ["ProviderImage", "TokenUsage"]
    assert "stream" not in fake.requests[0].body


async def test_a_stream_for_a_model_that_is_gone_fails_before_any_event() -> None:
    async with FakeOpenAIUpstream(api_key=API_KEY) as fake:
        fake.script(model_not_found("gpt-image-2"))
        provider = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        seen: list[StreamEvent] = []
        with pytest.raises(UpstreamModelUnavailable):
            try:
                async for event in provider.generate_stream(_request(upstream_model="gpt-image-2")):
                    seen.append(event)
            finally:
                await provider.aclose()
    assert seen == []
    assert fake.hits == 1
