"""The Stability adapter, driven against a real loopback fake of Stability's v2beta API."""

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
from PIL import Image

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import (
    ContentPolicy,
    ImagegenError,
    InvalidParameter,
    UpstreamError,
    UpstreamModelUnavailable,
)
from imagegen_service.providers.base import InputImage, ProviderRequest
from imagegen_service.providers.stability import (
    MAX_SEED,
    STABILITY_BASE_URL,
    StabilityProvider,
    from_config,
)
from tests.fakes.loopback import error_texts, free_port, image_bytes, provider_request
from tests.fakes.stability_upstream import (
    RETIRED_SD3_MODELS,
    SD3_MODELS,
    Behaviour,
    FakeStabilityUpstream,
    bad_request,
    content_filtered,
    content_moderation,
    dropped,
    ok,
    payload_too_large,
    payment_required,
    rate_limited,
    raw,
    server_error,
    service_unavailable,
    slow,
    stability_error,
)

API_KEY = "sk-stability-test-0123456789"
POLICY_MESSAGE = "The prompt was refused by the provider's content policy."


def make_request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"upstream_model": "stable-image-core"}
    return provider_request(**{**defaults, **overrides})


@pytest.fixture
async def fake() -> AsyncIterator[FakeStabilityUpstream]:
    async with FakeStabilityUpstream(api_key=API_KEY) as upstream:
        yield upstream


@pytest.fixture
async def provider(fake: FakeStabilityUpstream) -> AsyncIterator[StabilityProvider]:
    adapter = StabilityProvider("stability", base_url=fake.base_url + "/", api_key=API_KEY)
    try:
        yield adapter
    finally:
        await adapter.aclose()


# -- success ----------------------------------------------------------------------------


async def test_two_images_come_from_two_calls_at_stabilitys_real_pixel_size(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    result = await provider.generate(make_request(n=2))

    assert fake.hits == 2
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [
        ("image/png", 1024, 1024),
        ("image/png", 1024, 1024),
    ]
    assert result.filtered == 0
    assert result.usage.total_tokens == 0


async def test_each_call_sends_stabilitys_multipart_form_and_headers(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    await provider.generate(make_request(width=1792, height=1024, user="user-7"))

    seen = fake.requests[0]
    assert seen.method == "POST"
    assert seen.path == "/v2beta/stable-image/generate/core"
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Accept"] == "image/*"
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert seen.headers["stability-client-id"] == "imagegen"
    assert seen.headers["stability-client-user-id"] == "user-7"
    assert seen.body == {
        "prompt": "a lighthouse at dusk",
        "aspect_ratio": "16:9",
        "output_format": "png",
    }


async def test_no_user_header_is_sent_without_a_user(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    await provider.generate(make_request())

    assert "stability-client-user-id" not in fake.requests[0].headers


async def test_seeds_count_up_from_the_requested_seed_one_per_call(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    await provider.generate(make_request(n=3, seed=41))

    assert sorted(int(r.body["seed"]) for r in fake.requests) == [41, 42, 43]


async def test_seeds_past_stabilitys_maximum_wrap_to_1_not_to_random_0(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    await provider.generate(make_request(n=2, seed=MAX_SEED))

    assert sorted(int(r.body["seed"]) for r in fake.requests) == [1, MAX_SEED]


@pytest.mark.parametrize(
    ("upstream_model", "endpoint", "model_field"),
    [
        ("stable-image-core", "core", None),
        ("core", "core", None),
        ("stable-image-ultra", "ultra", None),
        ("ultra", "ultra", None),
        ("sd3.5-large", "sd3", "sd3.5-large"),
        ("sd3.5-large-turbo", "sd3", "sd3.5-large-turbo"),
        ("sd3.5-medium", "sd3", "sd3.5-medium"),
        ("sd3.5-flash", "sd3", "sd3.5-flash"),
    ],
)
async def test_the_upstream_model_picks_the_endpoint_and_sd3_sends_its_model(
    fake: FakeStabilityUpstream,
    provider: StabilityProvider,
    upstream_model: str,
    endpoint: str,
    model_field: str | None,
) -> None:
    result = await provider.generate(
        make_request(upstream_model=upstream_model, width=512, height=512)
    )

    seen = fake.requests[0]
    assert seen.path == f"/v2beta/stable-image/generate/{endpoint}"
    assert seen.body.get("model") == model_field
    side = 2048 if endpoint == "ultra" else 1024
    assert (result.images[0].width, result.images[0].height) == (side, side)


@pytest.mark.parametrize(
    ("size", "ratio", "real_size"),
    [
        ((1792, 1024), "16:9", (1344, 768)),
        ((1024, 1792), "9:16", (768, 1344)),
        ((1536, 1024), "3:2", (1216, 832)),
        ((1024, 1536), "2:3", (832, 1216)),
        ((256, 256), "1:1", (1024, 1024)),
        ((1152, 896), "5:4", (1152, 896)),
        ((896, 1152), "4:5", (896, 1152)),
        ((1536, 640), "21:9", (1536, 640)),
        ((640, 1536), "9:21", (640, 1536)),
    ],
)
async def test_openai_sizes_become_aspect_ratios_and_the_real_size_comes_back(
    fake: FakeStabilityUpstream,
    provider: StabilityProvider,
    size: tuple[int, int],
    ratio: str,
    real_size: tuple[int, int],
) -> None:
    result = await provider.generate(make_request(width=size[0], height=size[1]))

    assert fake.requests[0].body["aspect_ratio"] == ratio
    assert (result.images[0].width, result.images[0].height) == real_size


async def test_ultra_returns_its_larger_real_size(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    result = await provider.generate(
        make_request(upstream_model="stable-image-ultra", width=1792, height=1024)
    )

    assert fake.requests[0].body["aspect_ratio"] == "16:9"
    assert (result.images[0].width, result.images[0].height) == (2688, 1536)


@pytest.mark.parametrize(("fmt", "mime"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
async def test_the_output_format_is_asked_for_and_returned(
    fake: FakeStabilityUpstream, provider: StabilityProvider, fmt: str, mime: str
) -> None:
    result = await provider.generate(make_request(output_format=fmt, width=1536, height=1024))

    assert fake.requests[0].body["output_format"] == fmt
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [(mime, 1216, 832)]


async def test_json_answers_are_read_as_well(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(ok(as_json=True))

    result = await provider.generate(make_request(width=1344, height=768))

    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/png", 1344, 768)]


# -- check() ----------------------------------------------------------------------------


async def test_a_size_with_no_close_aspect_ratio_is_rejected_by_check_before_any_call(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    request = make_request(width=4096, height=256)

    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "size"
    with pytest.raises(InvalidParameter):
        await provider.generate(request)
    assert fake.hits == 0


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"upstream_model": "dall-e-3"}, "model"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": -1}, "seed"),
        ({"output_format": "gif"}, "output_format"),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"n": 0}, "n"),
    ],
)
def test_check_rejects_what_stability_cannot_serve(
    overrides: dict[str, object], param: str
) -> None:
    adapter = StabilityProvider("stability", api_key=API_KEY)

    with pytest.raises(InvalidParameter) as raised:
        adapter.check(make_request(**overrides))
    assert raised.value.param == param


def test_check_accepts_a_seed_of_zero_and_stabilitys_maximum() -> None:
    adapter = StabilityProvider("stability", api_key=API_KEY)

    adapter.check(make_request(seed=0))
    adapter.check(make_request(seed=MAX_SEED, upstream_model="sd3.5-medium"))


# -- refusals ---------------------------------------------------------------------------


async def test_a_403_content_moderation_becomes_content_policy(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(content_moderation())

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == POLICY_MESSAGE


@pytest.mark.parametrize("as_json", [False, True], ids=["header", "json"])
async def test_content_filtered_inside_a_200_becomes_content_policy(
    fake: FakeStabilityUpstream, provider: StabilityProvider, as_json: bool
) -> None:
    fake.script(content_filtered(as_json=as_json), content_filtered(as_json=as_json))

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request(n=2))
    assert raised.value.message == POLICY_MESSAGE


async def test_a_partial_refusal_returns_the_rest_and_counts_the_filtered(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script("ok", content_filtered(), content_moderation(), "ok")

    result = await provider.generate(make_request(n=4))

    assert fake.hits == 4
    assert len(result.images) == 2
    assert result.filtered == 2
    # The blurred image of a filtered answer is never handed on (the fake makes it grey).
    assert all(i.data == result.images[0].data for i in result.images)


# -- request errors ---------------------------------------------------------------------


async def test_a_bad_request_becomes_invalid_parameter_naming_our_param(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(bad_request("aspect_ratio: must be one of 16:9, 1:1"))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert raised.value.message == "aspect_ratio: must be one of 16:9, 1:1"
    assert raised.value.param == "size"


async def test_a_422_rejection_becomes_invalid_parameter(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(stability_error(422, "invalid_language", "English is the only supported language."))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert raised.value.message == "English is the only supported language."
    assert raised.value.param is None


async def test_a_413_becomes_invalid_parameter_on_the_prompt(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(payload_too_large())

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert raised.value.param == "prompt"


async def test_a_long_upstream_message_is_cut_to_300_characters(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(bad_request("x" * 1000))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert len(raised.value.message) == 300


# -- upstream failures ------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", [server_error(), service_unavailable()], ids=["500", "503"])
async def test_server_errors_become_upstream_errors(
    fake: FakeStabilityUpstream, provider: StabilityProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=rf"answered HTTP {behaviour.status} \(") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds is None


async def test_a_429_is_an_upstream_error_carrying_retry_after(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(rate_limited(retry_after=3))

    with pytest.raises(UpstreamError, match=r"HTTP 429 \(rate_limit_exceeded\)") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 3.0


async def test_a_429_without_retry_after_waits_out_stabilitys_60_second_penalty(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(rate_limited(retry_after=None))

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 60.0


async def test_running_out_of_credits_is_an_upstream_error_not_worth_retrying(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(payment_required())

    with pytest.raises(UpstreamError, match=r"HTTP 402 \(payment_required\)") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 60.0


async def test_a_wrong_credential_is_an_upstream_error(fake: FakeStabilityUpstream) -> None:
    adapter = StabilityProvider("stability", base_url=fake.base_url, api_key="sk-wrong-0042")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401 \(unauthorized\)") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert "sk-wrong-0042" not in error_texts(raised.value)


async def test_a_missing_credential_sends_no_authorization_and_fails_upstream(
    fake: FakeStabilityUpstream,
) -> None:
    adapter = StabilityProvider("stability", base_url=fake.base_url, api_key=None)
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert "Authorization" not in fake.requests[0].headers


async def test_a_forbidden_answer_that_is_no_refusal_is_an_upstream_error(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(stability_error(403, "forbidden", "This key may not use this endpoint."))

    with pytest.raises(UpstreamError, match=r"HTTP 403 \(forbidden\)"):
        await provider.generate(make_request())


async def test_a_slow_upstream_times_out_as_an_upstream_error(
    fake: FakeStabilityUpstream,
) -> None:
    fake.script(slow(2.0))
    adapter = StabilityProvider(
        "stability", base_url=fake.base_url, api_key=API_KEY, timeout_seconds=0.3
    )
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_a_refused_connection_is_an_upstream_error() -> None:
    adapter = StabilityProvider(
        "stability", base_url=f"http://127.0.0.1:{free_port()}", api_key=API_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_one_failed_call_fails_the_request_without_waiting_for_the_others(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script("ok", server_error(), slow(2.0))
    started = time.monotonic()

    with pytest.raises(UpstreamError, match=r"HTTP 500"):
        await provider.generate(make_request(n=3))
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("garbage", "not a PNG, JPEG or WEBP image"),
        ("garbage_json", "not JSON"),
        ("truncated", "dropped the connection"),
        ("half_image", "item 0 is cut short"),
        ("wrong_content_type", "content type 'text/html'"),
    ],
)
async def test_unreadable_answers_are_upstream_errors(
    fake: FakeStabilityUpstream, provider: StabilityProvider, behaviour: str, reason: str
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=reason):
        await provider.generate(make_request())


@pytest.mark.parametrize(
    "answer",
    [
        {"finish_reason": "SUCCESS", "seed": 1},
        {"image": "***not base64***", "finish_reason": "SUCCESS"},
        {"image": base64.b64encode(b"hello, not a png").decode(), "finish_reason": "SUCCESS"},
        ["not", "an", "object"],
    ],
    ids=["no-image", "bad-base64", "not-image", "list"],
)
async def test_json_answers_without_a_usable_image_are_upstream_errors(
    fake: FakeStabilityUpstream, provider: StabilityProvider, answer: object
) -> None:
    fake.script(raw(200, orjson.dumps(answer)))

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


async def test_an_unknown_finish_reason_is_an_upstream_error(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script("unknown_finish_reason")

    with pytest.raises(UpstreamError, match="finished with ERROR"):
        await provider.generate(make_request())


async def test_an_image_without_a_finish_reason_header_is_accepted(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(raw(200, image_bytes(64, 32), content_type="image/png"))

    result = await provider.generate(make_request())

    assert [(i.width, i.height) for i in result.images] == [(64, 32)]


# -- credentials ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        rate_limited(),
        content_moderation(),
        bad_request(f"prompt: header was Authorization: Bearer {API_KEY}"),
        stability_error(403, "forbidden", f"Key {API_KEY} may not use this model"),
        stability_error(401, "unauthorized", f"Key {API_KEY} is revoked"),
        stability_error(404, API_KEY, f"No model for key {API_KEY}"),
        raw(200, orjson.dumps({"image": API_KEY, "finish_reason": "SUCCESS"})),
        raw(200, orjson.dumps({"finish_reason": API_KEY})),
        "garbage",
        "truncated",
        "wrong_content_type",
    ],
    ids=[
        "500",
        "429",
        "policy",
        "400-echoing-key",
        "403",
        "401",
        "404-key-as-name",
        "key-as-image",
        "key-as-reason",
        "garbage",
        "truncated",
        "content-type",
    ],
)
async def test_no_error_message_contains_the_credential(
    fake: FakeStabilityUpstream, provider: StabilityProvider, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)

    with pytest.raises(ImagegenError) as raised:
        await provider.generate(make_request())
    assert API_KEY not in error_texts(raised.value)


async def test_no_error_message_contains_the_credential_when_unreachable_or_slow(
    fake: FakeStabilityUpstream,
) -> None:
    fake.script(slow(2.0))
    for base_url in (fake.base_url, f"http://127.0.0.1:{free_port()}"):
        adapter = StabilityProvider(
            "stability", base_url=base_url, api_key=API_KEY, timeout_seconds=0.3
        )
        try:
            with pytest.raises(UpstreamError) as raised:
                await adapter.generate(make_request())
        finally:
            await adapter.aclose()
        assert API_KEY not in error_texts(raised.value)


def test_the_provider_repr_does_not_show_the_credential() -> None:
    assert API_KEY not in repr(StabilityProvider("stability", api_key=API_KEY))


# -- configuration and lifecycle --------------------------------------------------------


async def test_from_config_builds_a_working_provider_with_its_options(
    fake: FakeStabilityUpstream,
) -> None:
    config = ProviderConfig(
        name="stability-eu",
        type="stability",
        base_url=fake.base_url,
        api_key_env="STABILITY_API_KEY",
        timeout_seconds=5.0,
        max_connections=4,
        options={"client_id": "my-app"},
    )
    adapter = from_config(config, API_KEY)
    try:
        result = await adapter.generate(make_request(upstream_model="sd3.5-large"))
    finally:
        await adapter.aclose()

    assert adapter.name == "stability-eu"
    assert adapter.timeout_seconds == 5.0
    assert len(result.images) == 1
    assert fake.requests[0].headers["stability-client-id"] == "my-app"
    assert fake.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"


def test_from_config_defaults_to_stabilitys_public_endpoint() -> None:
    adapter = from_config(ProviderConfig(name="stability", type="stability"), API_KEY)

    assert adapter.base_url == STABILITY_BASE_URL == "https://api.stability.ai"


def test_from_config_rejects_a_client_id_that_is_not_a_string() -> None:
    config = ProviderConfig(name="stability", type="stability", options={"client_id": 7})

    with pytest.raises(ConfigError, match="client_id"):
        from_config(config, API_KEY)


async def test_the_session_is_reopened_after_aclose(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    await provider.generate(make_request())
    await provider.aclose()

    result = await provider.generate(make_request())

    assert len(result.images) == 1
    assert fake.hits == 2


# -- edits (POST /v2beta/stable-image/edit/inpaint) --------------------------------------

INPAINT = "/v2beta/stable-image/edit/inpaint"
# The square the OpenAI-style mask marks for editing (alpha 0 inside, opaque outside).
HOLE = (16, 16, 48, 48)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _input(data: bytes) -> InputImage:
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").lower()
        return InputImage(
            data=data, format=fmt, width=img.width, height=img.height, has_alpha="A" in img.mode
        )


def openai_mask(size: tuple[int, int] = (96, 64)) -> InputImage:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), HOLE)
    return _input(_png(image))


def edit_request(**overrides: object) -> ProviderRequest:
    fields: dict[str, object] = {
        "images": (_input(image_bytes(96, 64)),),
        "mask": openai_mask(),
        "prompt": "a red door",
    }
    fields.update(overrides)
    return make_request(**fields)


async def test_an_edit_posts_the_image_and_a_black_and_white_mask_to_inpaint(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    request = edit_request(n=2, seed=7, user="user-7", request_id="req-42")

    result = await provider.edit(request)

    assert fake.hits == 2
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/png", 96, 64)] * 2
    seen = fake.requests[0]
    assert seen.path == INPAINT
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["Accept"] == "image/*"
    assert seen.headers["X-Request-ID"] == "req-42"
    assert seen.headers["stability-client-user-id"] == "user-7"
    assert {k: v for k, v in seen.body.items() if isinstance(v, str)} == {
        "prompt": "a red door",
        "output_format": "png",
        "seed": seen.body["seed"],
    }
    assert sorted(int(r.body["seed"]) for r in fake.requests) == [7, 8]
    assert seen.body["image"] == request.images[0].data
    with Image.open(io.BytesIO(seen.body["mask"])) as mask:
        assert mask.mode == "L"
        assert mask.size == (96, 64)
        # OpenAI's transparent hole is Stability's white; the opaque rest is black.
        assert mask.getpixel((32, 32)) == 255
        assert mask.getpixel((0, 0)) == 0
        assert mask.getpixel((80, 50)) == 0


async def test_without_a_mask_an_image_with_alpha_is_sent_alone(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    transparent = _input(_png(Image.new("RGBA", (64, 64), (0, 0, 0, 0))))

    await provider.edit(edit_request(images=(transparent,), mask=None, output_format="webp"))

    body = fake.requests[0].body
    assert set(body) == {"image", "prompt", "output_format"}
    assert body["output_format"] == "webp"


async def test_without_a_mask_or_alpha_the_whole_image_is_repainted(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    result = await provider.edit(edit_request(mask=None, upstream_model="sd3.5-large"))

    with Image.open(io.BytesIO(fake.requests[0].body["mask"])) as mask:
        assert mask.getextrema() == (255, 255)
    assert (result.images[0].width, result.images[0].height) == (96, 64)


async def test_an_edit_refusal_is_content_policy(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(content_moderation(), content_filtered())

    with pytest.raises(ContentPolicy):
        await provider.edit(edit_request(n=2))


async def test_an_edit_the_upstream_rejects_is_invalid_parameter_on_the_image(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(bad_request("image: aspect ratio must be between 1:2.5 and 2.5:1"))

    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(edit_request())
    assert raised.value.param == "image"
    fake.script(payload_too_large())
    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(edit_request())
    assert raised.value.param == "image"


@pytest.mark.parametrize("behaviour", [server_error(), service_unavailable()], ids=["500", "503"])
async def test_an_edit_server_error_is_an_upstream_error(
    fake: FakeStabilityUpstream, provider: StabilityProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=rf"HTTP {behaviour.status}") as raised:
        await provider.edit(edit_request())
    assert API_KEY not in error_texts(raised.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"images": ()},
        {"images": (_input(image_bytes(96, 64)), _input(image_bytes(96, 64)))},
        {"images": (_input(image_bytes(32, 64)),), "mask": None},
    ],
    ids=["none", "two", "too-small"],
)
async def test_check_rejects_edits_the_inpaint_endpoint_cannot_take(
    fake: FakeStabilityUpstream, provider: StabilityProvider, overrides: dict[str, object]
) -> None:
    request = edit_request(**overrides)

    if request.images:
        with pytest.raises(InvalidParameter) as raised:
            provider.check(request)
        assert raised.value.param == "image"
    with pytest.raises(InvalidParameter):
        await provider.edit(request)
    assert fake.hits == 0


async def test_the_fake_rejects_a_misnamed_edit_field(fake: FakeStabilityUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("init_image", image_bytes(64, 64), filename="a.png")
        form.add_field("prompt", "x")
        async with session.post(
            fake.base_url + INPAINT, data=form, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"] == ["init_image: unknown field for this endpoint"]


# -- models Stability does not offer -----------------------------------------------------------


@pytest.mark.parametrize("model", sorted(RETIRED_SD3_MODELS - {"sd3", "sd3-turbo"}))
async def test_a_retired_sd3_model_is_unavailable_and_not_an_invalid_request(
    fake: FakeStabilityUpstream, provider: StabilityProvider, model: str
) -> None:
    with pytest.raises(UpstreamModelUnavailable) as raised:
        await provider.generate(make_request(upstream_model=model))

    assert raised.value.upstream_model == model
    assert raised.value.provider == "stability"
    assert fake.hits == 1
    assert fake.requests[0].body["model"] == model


async def test_a_404_on_the_route_is_an_unavailable_model(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    fake.script(stability_error(404, "not_found", "/v2beta/stable-image/generate/ultra"))

    with pytest.raises(UpstreamModelUnavailable, match=r"HTTP 404") as raised:
        await provider.generate(make_request(upstream_model="stable-image-ultra"))
    assert raised.value.upstream_model == "stable-image-ultra"


async def test_the_fake_serves_only_the_live_sd3_models(fake: FakeStabilityUpstream) -> None:
    assert {"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"} == SD3_MODELS
    async with aiohttp.ClientSession() as session:
        for model, status in [("sd3.5-flash", 200), ("sd3-large", 400), ("sd3-medium", 400)]:
            form = aiohttp.FormData(default_to_multipart=True)
            form.add_field("prompt", "x")
            form.add_field("model", model)
            async with session.post(
                fake.base_url + "/v2beta/stable-image/generate/sd3",
                data=form,
                headers={"Authorization": f"Bearer {API_KEY}", "Accept": "image/*"},
            ) as resp:
                assert resp.status == status, model
        async with session.post(
            fake.base_url + "/v2beta/stable-image/generate/sdxl",
            data=aiohttp.FormData({"prompt": "x"}, default_to_multipart=True),
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as resp:
            assert resp.status == 404


# -- ambiguous failures: paid work whose outcome is unknown -----------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [slow(2.0), dropped(), "truncated", "garbage"],
    ids=["timeout", "dropped", "truncated", "garbage"],
)
async def test_a_call_that_may_have_been_billed_fails_as_ambiguous_and_is_not_repeated(
    fake: FakeStabilityUpstream, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)
    adapter = StabilityProvider(
        "stability", base_url=fake.base_url, api_key=API_KEY, timeout_seconds=0.5
    )
    try:
        with pytest.raises(UpstreamError) as raised:
            await adapter.generate(make_request())
        await fake.pause(0.1)
    finally:
        await adapter.aclose()

    assert raised.value.ambiguous is True
    assert fake.hits == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        rate_limited(retry_after=1),
        payment_required(),
        stability_error(401, "unauthorized", "bad key"),
        stability_error(403, "forbidden", "This key may not use this endpoint."),
        server_error(),
        service_unavailable(),
    ],
    ids=["429", "402", "401", "403", "500", "503"],
)
async def test_a_call_stability_refused_or_failed_outright_is_not_ambiguous(
    fake: FakeStabilityUpstream, provider: StabilityProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.ambiguous is False


async def test_a_refused_connection_is_not_ambiguous() -> None:
    adapter = StabilityProvider(
        "stability", base_url=f"http://127.0.0.1:{free_port()}", api_key=API_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="could not be reached") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert raised.value.ambiguous is False


async def test_a_429_after_a_sibling_delivered_is_ambiguous_since_that_image_was_paid(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    # The 429 comes last, once the first image is made (and billed).
    fake.script("ok", dataclasses.replace(rate_limited(retry_after=1), delay=0.2))

    with pytest.raises(UpstreamError, match="HTTP 429") as raised:
        await provider.generate(make_request(n=2))
    assert raised.value.ambiguous is True
    assert fake.hits == 2


async def test_an_edit_server_error_is_not_ambiguous_since_nothing_was_made(
    fake: FakeStabilityUpstream, provider: StabilityProvider
) -> None:
    # Stability bills a generation that succeeded; a 5xx made nothing.
    fake.script(server_error())

    with pytest.raises(UpstreamError) as raised:
        await provider.edit(edit_request())
    assert raised.value.ambiguous is False
    assert fake.hits == 1
