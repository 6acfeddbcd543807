"""Streaming (``stream: true`` with ``partial_images``): OpenAI's server-sent events, carried
end to end over the gRPC stream, and the money rule for streams: each image the caller took
is charged once, a failure midway releases the rest."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import aiohttp
import grpc
import openai
import orjson
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from imagegen_service.gen import images_pb2, images_pb2_grpc
from tests.conftest import assert_openai_error, bearer
from tests.fakes.openai_upstream import FakeOpenAIUpstream, stream_cut, stream_error
from tests.images_stack import FAKE_GPT_IMAGE, LOCAL_IMAGE, ImagesStack

GENERATIONS = "/v1/images/generations"
OPENING = 1_000_000
_PARTIAL_FIELDS = {
    "type",
    "b64_json",
    "created_at",
    "size",
    "quality",
    "background",
    "output_format",
    "partial_image_index",
}
_COMPLETED_FIELDS = (_PARTIAL_FIELDS - {"partial_image_index"}) | {"usage"}


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each server-sent event."""
    events = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        events.append((fields[b"event"].decode(), orjson.loads(fields[b"data"])))
    return events


async def _stream_raw(
    stack: ImagesStack, http: aiohttp.ClientSession, key: str, **body: Any
) -> tuple[aiohttp.ClientResponse, list[tuple[str, dict[str, Any]]]]:
    body.setdefault("prompt", "a paper boat on a pond")
    async with http.post(
        stack.http_url + GENERATIONS, json={"stream": True, **body}, headers=bearer(key)
    ) as resp:
        raw = await resp.read()
    assert resp.status == 200, raw
    assert resp.content_type == "text/event-stream"
    return resp, parse_sse(raw)


async def test_the_sdk_streams_partials_then_the_completed_image(
    images_stack: ImagesStack,
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with images_stack.openai_client(key) as client:
        stream = await client.images.generate(
            model="local-image",
            prompt="a lighthouse at dusk, gold and blue",
            size="512x512",
            stream=True,
            partial_images=2,
            extra_body={"seed": 11},
        )
        events = [event async for event in stream]
        plain = await client.images.generate(
            model="local-image",
            prompt="a lighthouse at dusk, gold and blue",
            size="512x512",
            response_format="b64_json",
            extra_body={"seed": 11},
        )
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partials, completed = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]  # type: ignore[union-attr]
    for event in events:
        assert (event.size, event.quality, event.background, event.output_format) == (
            "512x512",
            "high",
            "opaque",
            "png",
        )
        assert event.created_at > 0
        assert _decode(event.b64_json).size == (512, 512)
    assert set(partials[0].model_dump(exclude_none=True)) == _PARTIAL_FIELDS
    assert set(completed.model_dump(exclude_none=True)) == _COMPLETED_FIELDS
    assert completed.usage.total_tokens == 0  # type: ignore[union-attr]
    # Progressive renders of one picture: each differs from the next, and the final image is
    # exactly what the same request gives unstreamed.
    pictures = [e.b64_json for e in events]
    assert len(set(pictures)) == 3
    assert plain.data is not None
    assert completed.b64_json == plain.data[0].b64_json
    await images_stack.assert_balance(account_id, OPENING - 2 * LOCAL_IMAGE)


async def test_partial_renders_show_a_growing_share_of_the_final_picture(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    _, events = await _stream_raw(
        images_stack,
        http,
        key,
        model="local-image",
        size="256x256",
        partial_images=3,
        background="transparent",
        seed=4,
    )
    covered = [
        sum(_decode(data["b64_json"]).getchannel("A").histogram()[128:]) for _, data in events
    ]
    # On a transparent backdrop, each frame covers at least as much as the one before.
    assert covered == sorted(covered)
    assert covered[0] < covered[-1]


async def test_raw_events_are_openai_server_sent_events(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    resp, events = await _stream_raw(
        images_stack,
        http,
        key,
        model="local-image",
        size="256x256",
        partial_images=1,
        output_format="webp",
        background="transparent",
    )
    assert resp.headers["x-request-id"]
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for name, data in events:
        assert data["type"] == name
        assert (data["output_format"], data["background"]) == ("webp", "transparent")
        assert _decode(data["b64_json"]).format == "WEBP"
    assert set(events[0][1]) == _PARTIAL_FIELDS
    assert set(events[1][1]) == _COMPLETED_FIELDS
    assert events[1][1]["usage"] == {
        "input_tokens": 0,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens": 0,
        "total_tokens": 0,
    }
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)


async def test_n_images_stream_one_after_another_and_each_is_charged_once(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    _, events = await _stream_raw(
        images_stack, http, key, model="local-image", size="256x256", n=3, partial_images=1
    )
    assert [name.rsplit(".", 1)[1] for name, _ in events] == [
        "partial_image",
        "completed",
    ] * 3
    finals = [data["b64_json"] for name, data in events if name.endswith("completed")]
    assert len(set(finals)) == 3
    await images_stack.assert_balance(account_id, OPENING - 3 * LOCAL_IMAGE)
    kinds = [e.kind for e in await images_stack.ledger(account_id)]
    assert kinds == ["credit", "hold", "capture"]


async def test_partial_images_0_streams_only_the_completed_image(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    _, events = await _stream_raw(
        images_stack, http, key, model="local-image", size="256x256", partial_images=0
    )
    assert [name for name, _ in events] == ["image_generation.completed"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "local-sketch", "stream": True}, "stream"),
        ({"model": "local-image", "stream": True, "response_format": "url"}, "response_format"),
        ({"model": "local-image", "stream": True, "partial_images": -1}, "partial_images"),
    ],
)
async def test_streams_a_model_or_answer_cannot_carry_are_400(
    images_stack: ImagesStack, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with http.post(
        images_stack.http_url + GENERATIONS,
        json={"prompt": "a boat", **body},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 400, "invalid_value", param=param)
    await images_stack.assert_untouched(account_id, OPENING)


async def test_a_refusal_before_the_first_event_is_an_ordinary_http_error(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(LOCAL_IMAGE - 1)
    async with http.post(
        images_stack.http_url + GENERATIONS,
        json={"model": "local-image", "prompt": "a boat", "stream": True},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 402, "insufficient_balance")
    await images_stack.assert_untouched(account_id, LOCAL_IMAGE - 1)


# -- the upstream fails midway -------------------------------------------------------------


async def test_an_upstream_stream_cut_midway_charges_only_the_delivered_image(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    # Image 0's partial and completed events, image 1's partial, then the connection drops.
    images_fake.script(stream_cut(after_events=3))
    _, events = await _stream_raw(
        images_stack, http, key, model="fake-gpt-image", size="1024x1024", n=2, partial_images=1
    )
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
        "image_generation.partial_image",
        "error",
    ]
    error = events[-1][1]
    assert set(error) == {"type", "error"}
    assert error["type"] == "error"
    assert set(error["error"]) == {"message", "type", "code", "param"}
    assert (error["error"]["type"], error["error"]["code"]) == ("api_error", "upstream_error")
    sent = images_fake.requests[-1].body
    assert (sent["stream"], sent["partial_images"], sent["n"]) == (True, 1, 2)
    # One image delivered, one charged; the other image's share of the hold went back.
    await images_stack.assert_balance(account_id, OPENING - FAKE_GPT_IMAGE)
    entries = await images_stack.ledger(account_id)
    assert [(e.kind, e.available_delta_micros, e.held_delta_micros) for e in entries] == [
        ("credit", OPENING, 0),
        ("hold", -2 * FAKE_GPT_IMAGE, 2 * FAKE_GPT_IMAGE),
        ("capture", 0, -FAKE_GPT_IMAGE),
        ("release", FAKE_GPT_IMAGE, -FAKE_GPT_IMAGE),
    ]


async def test_the_sdk_raises_on_the_error_event_after_the_delivered_events(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    images_fake.script(stream_error(after_events=2))
    seen = []
    async with images_stack.openai_client(key) as client:
        stream = await client.images.generate(
            model="fake-gpt-image",
            prompt="a glass fox",
            size="1024x1024",
            n=2,
            stream=True,
            partial_images=1,
        )
        with pytest.raises(openai.APIError) as caught:
            async for event in stream:
                seen.append(event.type)
    assert seen == ["image_generation.partial_image", "image_generation.completed"]
    assert caught.value.body is not None
    assert caught.value.body["code"] == "upstream_error"  # type: ignore[index]
    await images_stack.assert_balance(account_id, OPENING - FAKE_GPT_IMAGE)


async def test_a_failure_before_any_completed_image_charges_nothing(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    images_fake.script(stream_error(after_events=1))
    _, events = await _stream_raw(
        images_stack, http, key, model="fake-gpt-image", size="1024x1024", partial_images=2
    )
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    await images_stack.assert_not_charged(account_id, OPENING)


async def test_an_upstream_stream_that_completes_is_charged_per_image(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    _, events = await _stream_raw(
        images_stack,
        http,
        key,
        model="fake-gpt-image",
        size="1024x1024",
        n=2,
        partial_images=2,
        quality="low",
    )
    assert [name.rsplit(".", 1)[1] for name, _ in events] == [
        "partial_image",
        "partial_image",
        "completed",
    ] * 2
    completed = events[2][1]
    assert completed["usage"]["output_tokens"] > 0
    assert completed["usage"]["input_tokens_details"]["text_tokens"] == 6
    assert completed["quality"] == "low"
    await images_stack.assert_balance(account_id, OPENING - 2 * FAKE_GPT_IMAGE)


async def test_a_caller_who_leaves_midway_pays_only_for_what_it_took(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with http.post(
        images_stack.http_url + GENERATIONS,
        json={
            "model": "local-image",
            "prompt": "a busy market, red gold crimson orange, many stalls and lanterns",
            "size": "1024x1024",
            "n": 4,
            "stream": True,
            "partial_images": 3,
        },
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200
        buffered = b""
        while b"image_generation.completed" not in buffered:
            buffered += await resp.content.readany()
        resp.close()
    # The hold is settled once the service sees the caller gone.
    for _ in range(100):
        account = await images_stack.account(account_id)
        if account.held_micros == 0:
            break
        await asyncio.sleep(0.05)
    charged = OPENING - account.available_micros
    assert account.held_micros == 0
    assert charged % LOCAL_IMAGE == 0
    assert 1 <= charged // LOCAL_IMAGE < 4
    kinds = [e.kind for e in await images_stack.ledger(account_id)]
    assert kinds == ["credit", "hold", "capture", "release"]
    await images_stack.assert_balance(account_id, OPENING - charged)


# -- over gRPC ---------------------------------------------------------------------------


async def test_grpc_streams_partial_messages_then_images_then_the_summary(
    images_stack: ImagesStack,
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    stub = images_pb2_grpc.ImageGenerationStub(images_stack.channel)
    messages = [
        m
        async for m in stub.GenerateImages(
            images_pb2.GenerateImagesRequest(
                model="local-image",
                prompt="a kite",
                size="256x256",
                n=2,
                stream=True,
                partial_images=2,
            ),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=30,
        )
    ]
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds == ["partial", "partial", "image"] * 2 + ["summary"]
    partials = [m.partial for m in messages if m.HasField("partial")]
    assert [(p.index, p.partial_image_index) for p in partials] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(p.data.startswith(b"\x89PNG") for p in partials)
    images = [m.image for m in messages if m.HasField("image")]
    assert [i.index for i in images] == [0, 1]
    assert all(i.data and not i.url for i in images)
    summary = messages[-1].summary
    assert (summary.images, summary.cost_micros) == (2, 2 * LOCAL_IMAGE)
    assert (summary.background, summary.output_format, summary.quality) == ("opaque", "png", "high")


async def test_grpc_says_what_a_failed_stream_still_charged(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    images_fake.script(stream_cut(after_events=1))
    stub = images_pb2_grpc.ImageGenerationStub(images_stack.channel)
    kinds = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for m in stub.GenerateImages(
            images_pb2.GenerateImagesRequest(
                model="fake-gpt-image", prompt="a fox", n=3, stream=True, partial_images=0
            ),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=30,
        ):
            kinds.append(m.WhichOneof("event"))
    assert kinds == ["image"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "UPSTREAM_ERROR"
    assert dict(info.metadata) == {"images_charged": "1", "cost_micros": str(FAKE_GPT_IMAGE)}
