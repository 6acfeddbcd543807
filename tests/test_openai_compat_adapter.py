"""The OpenAI-compatible adapter, driven against a real loopback fake of the upstream."""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from PIL import Image

from imagegen_service.config import ProviderConfig
from imagegen_service.errors import (
    ContentPolicy,
    ImagegenError,
    InvalidParameter,
    UpstreamError,
    UpstreamModelUnavailable,
)
from imagegen_service.providers.base import InputImage, ModelListing, ProviderRequest
from imagegen_service.providers.openai_compat import OpenAICompatibleProvider, from_config
from tests.fakes.loopback import error_texts, free_port, image_bytes, provider_request
from tests.fakes.openai_upstream import (
    LIVE_IMAGE_MODELS,
    OPENAI_RETIRED_MODELS,
    Behaviour,
    FakeOpenAIUpstream,
    content_policy_violation,
    http_error,
    invalid_value,
    model_deprecated,
    model_not_found,
    moderation_blocked,
    ok,
    rate_limited,
    raw,
    server_error,
    service_unavailable,
    slow,
)

API_KEY = "sk-upstream-test"
COMPATIBLE_MODEL = "sdxl-turbo"


def make_request(**overrides: Any) -> ProviderRequest:
    # Not an OpenAI id: such upstreams get the request as it is, at any size.
    defaults: dict[str, Any] = {"upstream_model": COMPATIBLE_MODEL, "width": 64, "height": 48}
    return provider_request(**{**defaults, **overrides})


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIUpstream]:
    async with FakeOpenAIUpstream(api_key=API_KEY) as upstream:
        yield upstream


@pytest.fixture
async def provider(fake: FakeOpenAIUpstream) -> AsyncIterator[OpenAICompatibleProvider]:
    adapter = OpenAICompatibleProvider("openai", base_url=fake.base_url + "/", api_key=API_KEY)
    try:
        yield adapter
    finally:
        await adapter.aclose()


async def test_two_images_come_back_at_the_requested_pixel_size_as_png(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    result = await provider.generate(make_request(n=2, width=64, height=48))

    assert len(result.images) == 2
    for image in result.images:
        assert image.mime_type == "image/png"
        assert (image.width, image.height) == (64, 48)
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.size == (64, 48)
        assert image.revised_prompt == "revised: a lighthouse at dusk"
    assert result.usage.total_tokens == 0


async def test_the_upstream_sees_the_openai_request_shape_and_headers(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    await provider.generate(make_request(n=2, request_id="req-123"))

    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Request-ID"] == "req-123"
    assert seen.body == {
        "model": COMPATIBLE_MODEL,
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "64x48",
        "response_format": "b64_json",
    }


async def test_quality_style_and_user_are_sent_only_when_set(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    await provider.generate(make_request(quality="hd", style="vivid", user="user-7"))

    body = fake.requests[0].body
    assert (body["quality"], body["style"], body["user"]) == ("hd", "vivid", "user-7")
    assert "X-Request-ID" not in fake.requests[0].headers


async def test_no_authorization_header_is_sent_without_an_api_key() -> None:
    async with FakeOpenAIUpstream(api_key=None) as upstream:
        adapter = OpenAICompatibleProvider("local", base_url=upstream.base_url, api_key=None)
        try:
            result = await adapter.generate(make_request())
        finally:
            await adapter.aclose()
    assert len(result.images) == 1
    assert "Authorization" not in upstream.requests[0].headers


async def test_url_style_answers_are_downloaded_without_the_api_key(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script("url")

    result = await provider.generate(make_request(n=2, width=32, height=32))

    assert fake.file_hits == 2
    assert all("Authorization" not in seen.headers for seen in fake.file_requests)
    assert [(i.width, i.height, i.mime_type) for i in result.images] == [
        (32, 32, "image/png"),
        (32, 32, "image/png"),
    ]


async def test_gpt_image_token_usage_is_read(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(
        ok(
            usage={
                "input_tokens": 50,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 50},
                "output_tokens": 4160,
                "total_tokens": 4210,
            }
        )
    )

    result = await provider.generate(
        make_request(upstream_model="gpt-image-1.5", width=1024, height=1024)
    )

    assert (result.usage.input_tokens, result.usage.output_tokens) == (50, 4160)


async def test_chat_style_token_usage_names_are_read_too(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(ok(usage={"prompt_tokens": 12, "completion_tokens": 30}))

    result = await provider.generate(make_request())

    assert (result.usage.input_tokens, result.usage.output_tokens) == (12, 30)


@pytest.mark.parametrize(
    "behaviour",
    [server_error(), service_unavailable(), rate_limited(retry_after=3)],
    ids=["500", "503", "429"],
)
async def test_upstream_failures_and_rate_limits_become_upstream_errors(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=rf"upstream 'openai' answered HTTP {behaviour.status}"):
        await provider.generate(make_request())


@pytest.mark.parametrize(
    "behaviour",
    [
        rate_limited(retry_after=7),
        http_error(503, message="Overloaded.", type="server_error", headers={"Retry-After": "7"}),
    ],
    ids=["429", "503"],
)
async def test_the_upstreams_retry_after_reaches_the_caller(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 7.0


async def test_a_5xx_without_retry_after_carries_none(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(server_error())

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds is None


async def test_a_slow_upstream_times_out_as_an_upstream_error(
    fake: FakeOpenAIUpstream,
) -> None:
    fake.script(slow(2.0))
    adapter = OpenAICompatibleProvider(
        "openai", base_url=fake.base_url, api_key=API_KEY, timeout_seconds=0.3
    )
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_a_refused_connection_is_an_upstream_error() -> None:
    adapter = OpenAICompatibleProvider(
        "openai", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=API_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("behaviour", ["garbage", "truncated", "wrong_content_type"])
async def test_unreadable_answers_are_upstream_errors(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: str
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


async def test_a_cookie_an_upstream_sets_is_not_sent_on_later_calls(
    fake: FakeOpenAIUpstream,
) -> None:
    png = image_bytes(64, 48)
    answer = {"created": 1, "data": [{"b64_json": base64.b64encode(png).decode()}]}
    fake.script(raw(200, orjson.dumps(answer), headers={"Set-Cookie": "session=tenant-a; Path=/"}))
    # By name: a cookie jar would keep nothing for a bare IP address anyway.
    base_url = fake.base_url.replace("127.0.0.1", "localhost") + "/"
    provider = OpenAICompatibleProvider("openai", base_url=base_url, api_key=API_KEY)
    try:
        await provider.generate(make_request())
        await provider.generate(make_request())
    finally:
        await provider.aclose()

    assert len(fake.requests) == 2
    assert "Cookie" not in fake.requests[1].headers


async def test_base64_wrapped_in_lines_is_read_whole(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    png = image_bytes(64, 48)
    # MIME-style encoders break the text every 76 characters.
    wrapped = base64.encodebytes(png).decode()
    assert "\n" in wrapped
    fake.script(raw(200, orjson.dumps({"created": 1, "data": [{"b64_json": wrapped}]})))

    result = await provider.generate(make_request())

    assert [image.data for image in result.images] == [png]


@pytest.mark.parametrize(
    "answer",
    [
        {"created": 1, "data": []},
        {"created": 1},
        {"created": 1, "data": [{"revised_prompt": "no image here"}]},
        {"created": 1, "data": [{"b64_json": "***not base64***"}]},
        {"created": 1, "data": [{"b64_json": "iVBORw0KGgo"}]},
        {"created": 1, "data": [{"b64_json": base64.b64encode(b"hello, not a png").decode()}]},
        {"created": 1, "data": [{"b64_json": base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()}]},
        ["not", "an", "object"],
    ],
    ids=[
        "empty",
        "no-data",
        "no-image",
        "bad-base64",
        "unpadded-base64",
        "not-image",
        "broken-png",
        "list",
    ],
)
async def test_answers_without_usable_images_are_upstream_errors(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, answer: object
) -> None:
    fake.script(raw(200, orjson.dumps(answer)))

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


@pytest.mark.parametrize(
    "behaviour", [content_policy_violation(), moderation_blocked()], ids=["dall-e", "gpt-image"]
)
async def test_a_content_policy_refusal_becomes_content_policy(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == "The prompt was refused by the provider's content policy."


async def test_another_bad_request_becomes_invalid_parameter_carrying_the_param(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(invalid_value(param="size", message="Invalid value: '64x48'."))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert raised.value.param == "size"
    assert raised.value.message == "Invalid value: '64x48'."


@pytest.mark.parametrize(
    ("code", "param", "message"),
    [
        ("invalid_image_mask", "mask", "Invalid mask image: the mask must be the image's size."),
        ("invalid_image_format", "image", "Invalid image file or mode for image 1."),
        (None, None, "The image could not be read; please upload a PNG, WEBP or JPEG."),
    ],
    ids=["bad-mask", "bad-format", "no-code"],
)
async def test_a_user_correctable_image_error_is_invalid_parameter_not_a_refusal(
    fake: FakeOpenAIUpstream,
    provider: OpenAICompatibleProvider,
    code: str | None,
    param: str | None,
    message: str,
) -> None:
    # OpenAI gives every correctable image error the type image_generation_user_error; only
    # the code moderation_blocked makes it a refusal.
    fake.script(
        http_error(400, message=message, type="image_generation_user_error", code=code, param=param)
    )

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request(upstream_model="gpt-image-2", width=1024, height=1024))
    assert raised.value.message == message
    assert raised.value.param == param
    assert fake.hits == 1


async def test_a_long_upstream_message_is_cut_to_300_characters(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(http_error(400, message="x" * 1000))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert len(raised.value.message) == 300
    assert raised.value.param is None


async def test_a_wrong_api_key_is_an_upstream_error(fake: FakeOpenAIUpstream) -> None:
    adapter = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key="sk-wrong-0042")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401 \(invalid_api_key\)") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert "sk-wrong-0042" not in str(raised.value)


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        rate_limited(),
        content_policy_violation(),
        invalid_value(param="prompt", message=f"Header was Authorization: Bearer {API_KEY}"),
        http_error(403, message=f"Key {API_KEY} may not use this model", code="forbidden"),
        http_error(404, message=f"No model for key {API_KEY}", code="model_not_found"),
        "garbage",
        "truncated",
        "wrong_content_type",
        raw(200, orjson.dumps({"data": [{"url": "http://127.0.0.1:1/gone.png"}]})),
    ],
    ids=[
        "500",
        "429",
        "policy",
        "400-echoing-key",
        "403",
        "404",
        "garbage",
        "truncated",
        "content-type",
        "dead-url",
    ],
)
async def test_no_error_message_contains_the_api_key(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)

    with pytest.raises(ImagegenError) as raised:
        await provider.generate(make_request())
    assert API_KEY not in error_texts(raised.value)


async def test_no_error_message_contains_the_api_key_when_unreachable_or_slow(
    fake: FakeOpenAIUpstream,
) -> None:
    fake.script(slow(2.0))
    for base_url in (fake.base_url, f"http://127.0.0.1:{free_port()}/v1"):
        adapter = OpenAICompatibleProvider(
            "openai", base_url=base_url, api_key=API_KEY, timeout_seconds=0.3
        )
        try:
            with pytest.raises(UpstreamError) as raised:
                await adapter.generate(make_request())
        finally:
            await adapter.aclose()
        assert API_KEY not in error_texts(raised.value)


async def test_the_provider_repr_does_not_show_the_api_key(
    provider: OpenAICompatibleProvider,
) -> None:
    assert API_KEY not in repr(provider)


async def test_the_session_is_reopened_after_aclose(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    await provider.generate(make_request())
    await provider.aclose()

    result = await provider.generate(make_request())

    assert len(result.images) == 1
    assert fake.hits == 2


# -- the legacy path: compatible servers that still take the retired dall-e ids -----------


def sent_bodies(fake: FakeOpenAIUpstream) -> list[dict[str, object]]:
    return [seen.body for seen in fake.requests]


async def test_dall_e_3_with_n_3_makes_three_single_image_calls_and_merges_them(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    result = await provider.generate(
        make_request(upstream_model="dall-e-3", n=3, width=1792, height=1024)
    )

    assert [(i.width, i.height, i.mime_type) for i in result.images] == [
        (1792, 1024, "image/png")
    ] * 3
    assert result.filtered == 0
    assert fake.hits == 3
    assert all(body["n"] == 1 and body["model"] == "dall-e-3" for body in sent_bodies(fake))


async def test_dall_e_3_calls_run_concurrently_under_one_deadline(
    fake: FakeOpenAIUpstream,
) -> None:
    fake.script(slow(0.4), slow(0.4), slow(0.4))
    adapter = OpenAICompatibleProvider(
        "openai", base_url=fake.base_url, api_key=API_KEY, timeout_seconds=1.0
    )
    started = time.monotonic()
    try:
        result = await adapter.generate(
            make_request(upstream_model="dall-e-3", n=3, width=1024, height=1024)
        )
    finally:
        await adapter.aclose()

    assert len(result.images) == 3
    assert time.monotonic() - started < 0.9


async def test_dall_e_3_calls_that_outlast_the_deadline_together_time_out(
    fake: FakeOpenAIUpstream,
) -> None:
    fake.script(slow(2.0), slow(2.0))
    adapter = OpenAICompatibleProvider(
        "openai", base_url=fake.base_url, api_key=API_KEY, timeout_seconds=0.3
    )
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await adapter.generate(
                make_request(upstream_model="dall-e-3", n=2, width=1024, height=1024)
            )
    finally:
        await adapter.aclose()


async def test_one_refused_dall_e_3_call_is_counted_filtered_and_the_rest_delivered(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script("ok", content_policy_violation(), "ok")

    result = await provider.generate(
        make_request(upstream_model="dall-e-3", n=3, width=1024, height=1024)
    )

    assert len(result.images) == 2
    assert result.filtered == 1


async def test_dall_e_3_calls_all_refused_are_a_content_policy_error(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(content_policy_violation(), content_policy_violation())

    with pytest.raises(ContentPolicy):
        await provider.generate(
            make_request(upstream_model="dall-e-3", n=2, width=1024, height=1024)
        )


async def test_one_failed_dall_e_3_call_fails_the_request_without_waiting_for_the_others(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    fake.script(rate_limited(retry_after=4), slow(2.0), slow(2.0))
    started = time.monotonic()

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(
            make_request(upstream_model="dall-e-3", n=3, width=1024, height=1024)
        )

    assert raised.value.retry_after_seconds == 4.0
    assert time.monotonic() - started < 1.0


async def test_dall_e_3_gets_quality_and_style_and_is_asked_for_base64(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    await provider.generate(
        make_request(
            upstream_model="dall-e-3", width=1024, height=1792, quality="hd", style="natural"
        )
    )

    assert sent_bodies(fake) == [
        {
            "model": "dall-e-3",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1024x1792",
            "response_format": "b64_json",
            "quality": "hd",
            "style": "natural",
        }
    ]


async def test_dall_e_2_never_gets_quality_or_style_and_takes_n_in_one_call(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    result = await provider.generate(
        make_request(
            upstream_model="dall-e-2",
            n=4,
            width=512,
            height=512,
            quality="standard",
            style="vivid",
            user="user-7",
        )
    )

    assert [(i.width, i.height) for i in result.images] == [(512, 512)] * 4
    assert sent_bodies(fake) == [
        {
            "model": "dall-e-2",
            "prompt": "a lighthouse at dusk",
            "n": 4,
            "size": "512x512",
            "response_format": "b64_json",
            "user": "user-7",
        }
    ]


# -- the GPT image families -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("standard", "medium"), ("hd", "high"), ("low", "low"), ("high", "high"), ("auto", "auto")],
)
async def test_gpt_image_gets_its_own_quality_names_and_no_response_format_or_style(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, ours: str, theirs: str
) -> None:
    await provider.generate(
        make_request(
            upstream_model="gpt-image-1.5", width=1024, height=1024, quality=ours, style="vivid"
        )
    )

    assert sent_bodies(fake) == [
        {
            "model": "gpt-image-1.5",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1024x1024",
            "quality": theirs,
        }
    ]


async def test_chatgpt_image_latest_gets_the_gpt_image_payload_not_the_dall_e_one(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    result = await provider.generate(
        make_request(
            upstream_model="chatgpt-image-latest",
            width=1024,
            height=1536,
            quality="hd",
            style="natural",
            user="user-7",
        )
    )

    assert sent_bodies(fake) == [
        {
            "model": "chatgpt-image-latest",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1024x1536",
            "quality": "high",
            "safety_identifier": "user-7",
        }
    ]
    assert [(i.width, i.height) for i in result.images] == [(1024, 1536)]


@pytest.mark.parametrize(
    "model", ["gpt-image-1.5", "gpt-image-2", "gpt-image-2.5-flare", "chatgpt-image-latest"]
)
async def test_the_callers_user_goes_out_as_safety_identifier_never_as_user(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, model: str
) -> None:
    await provider.generate(make_request(upstream_model=model, width=1024, height=1024, user="u-9"))

    body = fake.requests[0].body
    assert body["safety_identifier"] == "u-9"
    assert "user" not in body


async def test_a_legacy_id_still_gets_user_and_no_safety_identifier(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    await provider.generate(make_request(user="u-9"))

    body = fake.requests[0].body
    assert body["user"] == "u-9"
    assert "safety_identifier" not in body


async def test_gpt_image_2_takes_a_free_size_and_every_gpt_image_parameter(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    result = await provider.generate(
        make_request(
            upstream_model="gpt-image-2",
            width=1536,
            height=864,
            quality="high",
            output_format="webp",
            output_compression=80,
            background="opaque",
            moderation="low",
            user="user-7",
        )
    )

    assert sent_bodies(fake) == [
        {
            "model": "gpt-image-2",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1536x864",
            "quality": "high",
            "output_format": "webp",
            "output_compression": 80,
            "background": "opaque",
            "moderation": "low",
            "safety_identifier": "user-7",
        }
    ]
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/webp", 1536, 864)]


@pytest.mark.parametrize("quality", ["xhigh", "max"])
async def test_gpt_image_2_5_takes_its_extra_qualities(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, quality: str
) -> None:
    result = await provider.generate(
        make_request(
            upstream_model="gpt-image-2.5-sunburst", width=2048, height=2048, quality=quality
        )
    )

    assert fake.requests[0].body["quality"] == quality
    assert [(i.width, i.height) for i in result.images] == [(2048, 2048)]
    assert result.usage.output_tokens > 0


async def test_the_catalogs_family_decides_the_payload_over_the_id(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    # A dated or renamed id the prefixes do not know, named a gpt-image-2 model by the catalog.
    request = make_request(
        upstream_model="house-painter", family="gpt-image-2", width=1536, height=864, user="u"
    )
    provider.check(request)
    await provider.generate(request)

    body = fake.requests[0].body
    assert "response_format" not in body
    assert body["safety_identifier"] == "u"
    with pytest.raises(InvalidParameter) as raised:
        provider.check(dataclasses.replace(request, width=1000, height=1000))
    assert raised.value.param == "size"


async def test_a_family_that_is_not_openais_leaves_the_request_on_the_legacy_path(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    await provider.generate(make_request(family="flux-2", user="u"))

    assert fake.requests[0].body["response_format"] == "b64_json"
    assert fake.requests[0].body["user"] == "u"


@pytest.mark.parametrize("model", ["gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2.6-flare"])
async def test_every_gpt_image_model_answers_n_images_in_one_call_with_token_usage(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, model: str
) -> None:
    result = await provider.generate(
        make_request(upstream_model=model, n=2, width=1536, height=1024, quality="standard")
    )

    assert [(i.width, i.height, i.mime_type) for i in result.images] == [
        (1536, 1024, "image/png")
    ] * 2
    assert fake.hits == 1
    assert "response_format" not in fake.requests[0].body
    # The fake bills as OpenAI does: 1584 output tokens per 1536x1024 medium image.
    assert (result.usage.input_tokens, result.usage.output_tokens) == (4, 2 * 1584)


@pytest.mark.parametrize(
    ("output_format", "mime_type"),
    [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")],
)
async def test_gpt_image_is_asked_for_the_output_format_and_answers_in_it(
    fake: FakeOpenAIUpstream,
    provider: OpenAICompatibleProvider,
    output_format: str,
    mime_type: str,
) -> None:
    result = await provider.generate(
        make_request(
            upstream_model="gpt-image-1.5", width=1024, height=1536, output_format=output_format
        )
    )

    sent = fake.requests[0].body
    assert sent.get("output_format") == (None if output_format == "png" else output_format)
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [(mime_type, 1024, 1536)]


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("dall-e-2", "1792x1024"),
        ("dall-e-2", "64x48"),
        ("dall-e-3", "512x512"),
        ("dall-e-3", "1536x1024"),
        ("dall-e-3", "4096x256"),
        ("gpt-image-1.5", "1792x1024"),
        ("gpt-image-1-mini", "256x256"),
        ("chatgpt-image-latest", "1536x864"),
        ("gpt-image-2.6-sunburst", "2048x2048"),
        ("gpt-image-2", "1000x1000"),  # not multiples of 16
        ("gpt-image-2", "512x512"),  # under 655,360 pixels
        ("gpt-image-2", "3840x1024"),  # wider than 3:1
        ("gpt-image-2-2026-04-21", "4096x2160"),  # an edge over 3840
        ("gpt-image-2.5-flare", "3840x2400"),  # over 3840x2160 pixels
    ],
)
def test_check_refuses_sizes_an_openai_model_can_never_make(model: str, size: str) -> None:
    adapter = OpenAICompatibleProvider("openai", base_url="http://127.0.0.1:9/v1", api_key=API_KEY)
    width, height = (int(side) for side in size.split("x"))

    with pytest.raises(InvalidParameter) as raised:
        adapter.check(make_request(upstream_model=model, width=width, height=height))
    assert raised.value.param == "size"
    assert size in raised.value.message


@pytest.mark.parametrize(
    ("model", "sizes"),
    [
        ("dall-e-2", ["256x256", "512x512", "1024x1024"]),
        ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"]),
        ("gpt-image-1.5", ["1024x1024", "1536x1024", "1024x1536"]),
        ("chatgpt-image-latest", ["1024x1024", "1536x1024", "1024x1536"]),
        ("gpt-image-2", ["1536x864", "864x1536", "1024x1024", "2560x1440", "3840x2160"]),
        ("gpt-image-2.5-sunburst-2026-09-08", ["1536x864", "1280x1280", "2160x3840"]),
        (COMPATIBLE_MODEL, ["64x48", "4096x256", "1792x1024"]),
    ],
)
def test_check_accepts_what_each_model_can_make_and_any_size_for_other_upstreams(
    model: str, sizes: list[str]
) -> None:
    adapter = OpenAICompatibleProvider("openai", base_url="http://127.0.0.1:9/v1", api_key=API_KEY)
    for size in sizes:
        width, height = (int(side) for side in size.split("x"))
        adapter.check(make_request(upstream_model=model, width=width, height=height, n=10))


@pytest.mark.parametrize(
    ("model", "quality", "accepted"),
    [
        ("gpt-image-2.5-flare", "xhigh", True),
        ("gpt-image-2.5-sunburst", "max", True),
        ("gpt-image-2", "xhigh", False),
        ("gpt-image-1.5", "max", False),
        ("chatgpt-image-latest", "standard", True),  # the legacy name, mapped to medium
        ("gpt-image-2", "ultra", False),
    ],
)
def test_check_refuses_qualities_the_family_does_not_take(
    model: str, quality: str, accepted: bool
) -> None:
    adapter = OpenAICompatibleProvider("openai", base_url="http://127.0.0.1:9/v1", api_key=API_KEY)
    request = make_request(upstream_model=model, width=1024, height=1024, quality=quality)

    if accepted:
        adapter.check(request)
        return
    with pytest.raises(InvalidParameter) as raised:
        adapter.check(request)
    assert raised.value.param == "quality"


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (
            {"model": "gpt-image-2", "prompt": "p", "quality": "xhigh"},
            "Invalid value: 'xhigh'. Supported values are: 'low', 'medium', 'high', and 'auto'.",
            "quality",
        ),
        (
            {"model": "gpt-image-2", "prompt": "p", "size": "1000x1000"},
            "Invalid value: '1000x1000'. Width and height must both be divisible by 16.",
            "size",
        ),
        (
            {"model": "chatgpt-image-latest", "prompt": "p", "size": "1536x864"},
            "Invalid value: '1536x864'. Supported values are: '1024x1024', '1536x1024', "
            "'1024x1536', and 'auto'.",
            "size",
        ),
        (
            {"model": "gpt-image-1.5", "prompt": "p", "response_format": "b64_json"},
            "Unknown parameter: 'response_format'.",
            "response_format",
        ),
        (
            {"model": "gpt-image-1.5", "prompt": "p", "style": "vivid"},
            "Unknown parameter: 'style'.",
            "style",
        ),
        (
            {"model": "dall-e-3", "prompt": "p", "n": 2},
            "You must provide n=1 for this model.",
            None,
        ),
        (
            {"model": "dall-e-2", "prompt": "p", "quality": "standard"},
            "Unknown parameter: 'quality'.",
            "quality",
        ),
        (
            {"model": "dall-e-2", "prompt": "p", "style": "vivid"},
            "Unknown parameter: 'style'.",
            "style",
        ),
    ],
    ids=[
        "gpt-image-2-xhigh",
        "gpt-image-2-size",
        "chatgpt-image-free-size",
        "gpt-image-response_format",
        "gpt-image-style",
        "dall-e-3-n",
        "dall-e-2-quality",
        "dall-e-2-style",
    ],
)
async def test_the_fake_rejects_what_openai_rejects(
    fake: FakeOpenAIUpstream, body: dict[str, object], message: str, param: str | None
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            fake.base_url + "/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp,
    ):
        answer = await resp.json()
    assert resp.status == 400
    assert answer["error"]["message"] == message
    assert answer["error"]["param"] == param


async def test_from_config_builds_a_working_provider(fake: FakeOpenAIUpstream) -> None:
    config = ProviderConfig(
        name="openai", type="openai", base_url=fake.base_url, timeout_seconds=5, max_connections=4
    )
    adapter = from_config(config, API_KEY)
    try:
        assert adapter.name == "openai"
        assert adapter.timeout_seconds == 5
        result = await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert len(result.images) == 1
    assert fake.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


# -- models the upstream no longer offers ------------------------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        model_not_found("gpt-image-1.5"),
        model_deprecated("gpt-image-1.5"),
        model_deprecated("gpt-image-1.5", status=404),
        http_error(400, message="gpt-image-1.5 was shut down on October 23, 2026."),
        http_error(
            400, message="This model is no longer available.", param="model", code="invalid_value"
        ),
    ],
    ids=["404-model_not_found", "400-deprecated", "404-deprecated", "400-shut-down", "400-param"],
)
async def test_an_upstream_that_says_the_model_is_gone_raises_model_unavailable_after_one_call(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamModelUnavailable) as raised:
        await provider.generate(
            make_request(upstream_model="gpt-image-1.5", width=1024, height=1024)
        )

    assert fake.hits == 1
    assert (raised.value.upstream_model, raised.value.provider) == ("gpt-image-1.5", "openai")
    assert raised.value.ambiguous is False
    assert isinstance(raised.value, UpstreamError)


@pytest.mark.parametrize("model", sorted(OPENAI_RETIRED_MODELS))
async def test_the_models_openai_retired_are_reported_unavailable(model: str) -> None:
    async with FakeOpenAIUpstream(api_key=API_KEY, retired_models=OPENAI_RETIRED_MODELS) as fake:
        adapter = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        try:
            with pytest.raises(
                UpstreamModelUnavailable, match=rf"no longer offers the model '{model}'"
            ):
                await adapter.generate(make_request(upstream_model=model, width=1024, height=1024))
        finally:
            await adapter.aclose()
    assert fake.hits == 1


async def test_an_edit_of_a_retired_model_is_model_unavailable_too() -> None:
    image = InputImage(image_bytes(256, 256), "png", 256, 256)
    async with FakeOpenAIUpstream(api_key=API_KEY, retired_models={"gpt-image-1"}) as fake:
        adapter = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        try:
            with pytest.raises(UpstreamModelUnavailable):
                await adapter.edit(make_request(upstream_model="gpt-image-1", images=(image,)))
        finally:
            await adapter.aclose()
    assert [seen.path for seen in fake.requests] == ["/v1/images/edits"]


@pytest.mark.parametrize(
    "behaviour",
    [
        http_error(400, message="Image edits are not supported by this model.", param="model"),
        http_error(400, message="Unknown parameter: 'style'.", param="style"),
        http_error(400, message="The parameter `user` is deprecated; the model ignores it."),
        invalid_value(param="size", message="Invalid value: '64x48'."),
    ],
    ids=["model-param-other-reason", "unknown-parameter", "deprecated-parameter", "size"],
)
async def test_other_bad_requests_are_not_taken_for_a_missing_model(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(InvalidParameter):
        await provider.generate(make_request())


async def test_a_404_for_a_wrong_path_is_a_plain_upstream_error(fake: FakeOpenAIUpstream) -> None:
    adapter = OpenAICompatibleProvider("openai", base_url=fake.origin + "/v2", api_key=API_KEY)
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 404") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert not isinstance(raised.value, UpstreamModelUnavailable)


# -- the model list ------------------------------------------------------------------------


async def test_list_models_reads_the_ids_of_openais_model_list(
    fake: FakeOpenAIUpstream, provider: OpenAICompatibleProvider
) -> None:
    assert isinstance(provider, ModelListing)

    models = await provider.list_models()

    assert models == frozenset(LIVE_IMAGE_MODELS)
    seen = fake.requests[0]
    assert (seen.method, seen.path, seen.query) == ("GET", "/v1/models", {})
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"


async def test_list_models_leaves_out_models_whose_shutdown_date_has_passed() -> None:
    listed = ["gpt-image-1", "gpt-image-2", "gpt-image-2.5-flare", "chatgpt-image-latest"]
    dates = {
        "gpt-image-1": "2026-10-23",
        "gpt-image-2": "2099-01-01",
        "chatgpt-image-latest": "not a date",
    }
    async with FakeOpenAIUpstream(
        api_key=API_KEY, listed_models=listed, shutdown_dates=dates
    ) as fake:
        adapter = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key=API_KEY)
        try:
            models = await adapter.list_models()
        finally:
            await adapter.aclose()
    assert models == frozenset({"gpt-image-2", "gpt-image-2.5-flare", "chatgpt-image-latest"})


async def test_list_models_with_a_wrong_key_is_an_upstream_error_without_the_key(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = OpenAICompatibleProvider("openai", base_url=fake.base_url, api_key="sk-wrong-0042")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401 \(invalid_api_key\)") as raised:
            await adapter.list_models()
    finally:
        await adapter.aclose()
    assert "sk-wrong-0042" not in error_texts(raised.value)


@pytest.mark.parametrize(
    "answer",
    [b"not json", orjson.dumps({"object": "list"}), orjson.dumps({"data": ["gpt-image-2"]})],
    ids=["garbage", "no-data", "not-objects"],
)
async def test_an_unreadable_model_list_is_an_upstream_error(answer: bytes) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    adapter = OpenAICompatibleProvider(
        "openai", base_url=f"http://{host}:{port}/v1", api_key=API_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="unreadable answer"):
            await adapter.list_models()
    finally:
        await adapter.aclose()
        await runner.cleanup()


async def test_list_models_on_an_unreachable_upstream_is_an_upstream_error() -> None:
    adapter = OpenAICompatibleProvider(
        "openai", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=API_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await adapter.list_models()
    finally:
        await adapter.aclose()
