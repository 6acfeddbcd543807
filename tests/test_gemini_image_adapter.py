"""The Gemini image adapter, driven against a real loopback fake of the Gemini API."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from imagegen_service.config import ConfigError, ProviderConfig
from imagegen_service.errors import (
    ContentPolicy,
    ImagegenError,
    InvalidParameter,
    UpstreamError,
)
from imagegen_service.providers.base import InputImage, ProviderRequest
from imagegen_service.providers.gemini_image import (
    GEMINI_BASE_URL,
    GeminiImageProvider,
    from_config,
)
from tests.fakes.gemini_upstream import (
    INPUT_IMAGE_TOKENS,
    Behaviour,
    FakeGeminiUpstream,
    finish_refusal,
    garbage,
    google_error,
    input_images,
    invalid_argument,
    ok,
    prompt_blocked,
    rate_limited,
    raw,
    refused_with_400,
    server_error,
    service_unavailable,
    slow,
    text_instead_of_image,
    truncated,
    wrong_content_type,
)
from tests.fakes.loopback import error_texts, free_port, image_bytes, provider_request

API_KEY = "AIza-upstream-test-0042"
MODEL = "gemini-2.5-flash-image"
POLICY_MESSAGE = "The prompt was refused by the provider's content policy."


def make_request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"upstream_model": MODEL}
    return provider_request(**{**defaults, **overrides})


@pytest.fixture
async def fake() -> AsyncIterator[FakeGeminiUpstream]:
    async with FakeGeminiUpstream(api_key=API_KEY) as upstream:
        yield upstream


@pytest.fixture
async def provider(fake: FakeGeminiUpstream) -> AsyncIterator[GeminiImageProvider]:
    adapter = GeminiImageProvider("gemini", base_url=fake.base_url + "/", api_key=API_KEY)
    try:
        yield adapter
    finally:
        await adapter.aclose()


def answer_with_parts(*parts: object) -> Behaviour:
    """A 200 answer whose single candidate carries exactly ``parts``."""
    answer = {
        "candidates": [
            {"content": {"parts": list(parts), "role": "model"}, "finishReason": "STOP"}
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1290},
    }
    return raw(200, orjson.dumps(answer))


def png_b64(width: int = 64, height: int = 48) -> str:
    return base64.b64encode(image_bytes(width, height)).decode()


# --- success ---------------------------------------------------------------------------------


async def test_three_images_come_from_three_concurrent_calls_at_the_real_pixel_size(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(ok(delay=0.2), ok(delay=0.2), ok(delay=0.2))

    result = await provider.generate(make_request(n=3))

    assert fake.hits == 3
    assert fake.max_in_flight == 3
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [
        ("image/png", 1024, 1024)
    ] * 3
    assert result.filtered == 0
    prompt_tokens = len("a lighthouse at dusk") // 4
    assert (result.usage.input_tokens, result.usage.output_tokens) == (3 * prompt_tokens, 3 * 1290)


async def test_the_upstream_sees_the_gemini_request_shape_and_the_api_key_header(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    await provider.generate(make_request(width=1792, height=1024))

    seen = fake.requests[0]
    assert seen.method == "POST"
    assert seen.path == f"/v1beta/models/{MODEL}:generateContent"
    assert seen.query == {}
    assert seen.headers["x-goog-api-key"] == API_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "a lighthouse at dusk"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9"},
            "candidateCount": 1,
        },
    }


async def test_each_of_n_calls_gets_its_own_seed(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    await provider.generate(make_request(n=2, seed=2**31 - 1))

    seeds = sorted(r.body["generationConfig"]["seed"] for r in fake.requests)
    assert seeds == [0, 2**31 - 1]


async def test_a_model_id_with_the_models_prefix_is_accepted(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    result = await provider.generate(make_request(upstream_model=f"models/{MODEL}"))

    assert len(result.images) == 1
    assert fake.requests[0].path == f"/v1beta/models/{MODEL}:generateContent"


async def test_the_mime_type_comes_from_the_image_bytes(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(ok(image_format="JPEG"))

    result = await provider.generate(make_request())

    assert result.images[0].mime_type == "image/jpeg"


async def test_a_text_part_becomes_the_revised_prompt_trimmed_and_capped(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(ok(text="  A lighthouse, warm dusk light.  \n"), ok(text="x" * 5000), ok())

    first, long, plain = [(await provider.generate(make_request())).images[0] for _ in range(3)]

    assert first.revised_prompt == "A lighthouse, warm dusk light."
    assert long.revised_prompt == "x" * 1000
    assert plain.revised_prompt == ""


async def test_snake_case_parts_are_read_and_thought_parts_skipped(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(
        answer_with_parts(
            {"text": "drafting", "thought": True},
            {"inlineData": {"mimeType": "image/png", "data": png_b64(10, 10)}, "thought": True},
            {"text": "Final image."},
            {"inline_data": {"mime_type": "image/png", "data": png_b64(64, 48)}},
        )
    )

    result = await provider.generate(make_request())

    image = result.images[0]
    assert (image.width, image.height, image.revised_prompt) == (64, 48, "Final image.")


async def test_include_text_asks_for_text_and_image(fake: FakeGeminiUpstream) -> None:
    adapter = GeminiImageProvider(
        "gemini", base_url=fake.base_url, api_key=API_KEY, include_text=True
    )
    try:
        result = await adapter.generate(make_request())
    finally:
        await adapter.aclose()

    assert fake.requests[0].body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]
    assert result.images[0].revised_prompt == "Here is the image you asked for."


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "ratio", "real"),
    [
        ((256, 256), "1:1", (1024, 1024)),
        ((1024, 1024), "1:1", (1024, 1024)),
        ((1792, 1024), "16:9", (1344, 768)),
        ((1024, 1792), "9:16", (768, 1344)),
        ((1536, 1024), "3:2", (1248, 832)),
        ((1024, 1536), "2:3", (832, 1248)),
        ((1536, 640), "21:9", (1536, 672)),
        ((1152, 896), "5:4", (1152, 896)),
        ((896, 1152), "4:5", (896, 1152)),
        ((1184, 864), "4:3", (1184, 864)),
        ((800, 600), "4:3", (1184, 864)),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
async def test_openai_sizes_map_to_aspect_ratios_and_the_real_size_comes_back(
    fake: FakeGeminiUpstream,
    provider: GeminiImageProvider,
    size: tuple[int, int],
    ratio: str,
    real: tuple[int, int],
) -> None:
    request = make_request(width=size[0], height=size[1])
    provider.check(request)

    result = await provider.generate(request)

    assert fake.requests[0].body["generationConfig"]["imageConfig"] == {"aspectRatio": ratio}
    assert (result.images[0].width, result.images[0].height) == real


@pytest.mark.parametrize("size", [(4096, 256), (256, 4096), (3000, 1000)])
async def test_a_size_with_no_close_aspect_ratio_is_refused_before_any_call(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, size: tuple[int, int]
) -> None:
    request = make_request(width=size[0], height=size[1])

    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "size"
    with pytest.raises(InvalidParameter):
        await provider.generate(request)
    assert fake.hits == 0


@pytest.mark.parametrize("n", [0, 11])
async def test_n_outside_one_to_ten_is_refused_by_check(
    provider: GeminiImageProvider, n: int
) -> None:
    with pytest.raises(InvalidParameter) as raised:
        provider.check(make_request(n=n))
    assert raised.value.param == "n"


# --- refusals --------------------------------------------------------------------------------


async def test_a_refusal_in_a_400_answer_becomes_content_policy(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(refused_with_400())

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == POLICY_MESSAGE


@pytest.mark.parametrize(
    "behaviour",
    [
        prompt_blocked("SAFETY"),
        prompt_blocked("PROHIBITED_CONTENT"),
        prompt_blocked("BLOCKLIST"),
        prompt_blocked("OTHER"),
        prompt_blocked("IMAGE_SAFETY"),
        finish_refusal("IMAGE_SAFETY"),
        finish_refusal("IMAGE_PROHIBITED_CONTENT"),
        finish_refusal("PROHIBITED_CONTENT"),
        finish_refusal("SAFETY"),
        finish_refusal("SPII"),
        finish_refusal("RECITATION"),
        finish_refusal("IMAGE_RECITATION"),
        text_instead_of_image(reason="STOP"),
        text_instead_of_image(reason="NO_IMAGE"),
    ],
    ids=lambda b: f"{b.kind}-{b.reason}",
)
async def test_a_refusal_inside_a_200_answer_becomes_content_policy(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == POLICY_MESSAGE


async def test_when_every_one_of_n_calls_is_refused_the_request_is_content_policy(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(prompt_blocked(), finish_refusal(), text_instead_of_image())

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request(n=3))
    assert fake.hits == 3


async def test_a_partial_refusal_returns_the_rest_and_counts_the_filtered(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(ok(), prompt_blocked(), finish_refusal("IMAGE_SAFETY"), refused_with_400())

    result = await provider.generate(make_request(n=4, width=1792, height=1024))

    assert len(result.images) == 1
    assert result.filtered == 3
    assert (result.images[0].width, result.images[0].height) == (1344, 768)
    # Only the delivered image's tokens: nobody pays for a withheld one.
    assert result.usage.output_tokens == 1290


# --- upstream failures -----------------------------------------------------------------------


async def test_a_429_is_an_upstream_error_carrying_google_retry_delay(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(rate_limited(retry_delay="7.5s"))

    with pytest.raises(UpstreamError, match=r"HTTP 429 \(RESOURCE_EXHAUSTED\)") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 7.5


async def test_a_retry_after_header_wins_over_retry_info(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(rate_limited(retry_delay="30s", retry_after=3))

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 3.0


async def test_a_429_without_any_delay_has_no_retry_after(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(rate_limited(retry_delay=None))

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds is None


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (server_error(), r"HTTP 500 \(INTERNAL\)"),
        (service_unavailable(), r"HTTP 503 \(UNAVAILABLE\)"),
        (
            google_error(400, "FAILED_PRECONDITION", "User location is not supported."),
            r"HTTP 400 \(FAILED_PRECONDITION\)",
        ),
        (google_error(403, "PERMISSION_DENIED", "denied"), r"HTTP 403 \(PERMISSION_DENIED\)"),
        (raw(502, b"<html>bad gateway</html>", content_type="text/html"), r"HTTP 502$"),
    ],
    ids=["500", "503", "400-precondition", "403", "502-html"],
)
async def test_upstream_failures_become_upstream_errors(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour, expected: str
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=expected):
        await provider.generate(make_request())


async def test_an_unknown_model_is_an_upstream_error(provider: GeminiImageProvider) -> None:
    with pytest.raises(UpstreamError, match=r"HTTP 404 \(NOT_FOUND\)"):
        await provider.generate(make_request(upstream_model="gemini-9-nonexistent"))


async def test_one_failing_call_fails_the_request_at_once_without_waiting_for_the_others(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(slow(2.0), server_error(), slow(2.0))
    started = time.monotonic()

    with pytest.raises(UpstreamError, match="HTTP 500"):
        await provider.generate(make_request(n=3))
    assert time.monotonic() - started < 1.0


async def test_a_slow_upstream_times_out_as_an_upstream_error(fake: FakeGeminiUpstream) -> None:
    fake.script(slow(2.0), slow(2.0))
    adapter = GeminiImageProvider(
        "gemini", base_url=fake.base_url, api_key=API_KEY, timeout_seconds=0.3
    )
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await adapter.generate(make_request(n=2))
    finally:
        await adapter.aclose()


async def test_a_refused_connection_is_an_upstream_error() -> None:
    adapter = GeminiImageProvider(
        "gemini", base_url=f"http://127.0.0.1:{free_port()}/v1beta", api_key=API_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


@pytest.mark.parametrize(
    "behaviour", [garbage(), truncated(), wrong_content_type()], ids=lambda b: b.kind
)
async def test_unreadable_answers_are_upstream_errors(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"candidates": []},
        {"candidates": ["not an object"]},
        {"candidates": [{"content": {"parts": "not a list"}}]},
        {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png"}}]}}]},
        {
            "candidates": [
                {"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "***"}}]}}
            ]
        },
        {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {
                                "inlineData": {
                                    "mimeType": "image/png",
                                    "data": base64.b64encode(b"hello, not a png").decode(),
                                }
                            }
                        ]
                    }
                }
            ]
        },
        ["not", "an", "object"],
    ],
    ids=[
        "empty",
        "no-candidates",
        "bad-candidate",
        "bad-parts",
        "no-data",
        "bad-base64",
        "not-image",
        "list",
    ],
)
async def test_answers_without_a_usable_image_or_refusal_are_upstream_errors(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, answer: object
) -> None:
    fake.script(raw(200, orjson.dumps(answer)))

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


async def test_an_invalid_argument_becomes_invalid_parameter_with_the_param(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(
        invalid_argument(
            "Unsupported aspect ratio for this model.",
            field_path="generation_config.image_config.aspect_ratio",
        ),
        invalid_argument("x" * 1000),
    )

    with pytest.raises(InvalidParameter) as first:
        await provider.generate(make_request())
    with pytest.raises(InvalidParameter) as second:
        await provider.generate(make_request())

    assert (first.value.message, first.value.param) == (
        "Unsupported aspect ratio for this model.",
        "size",
    )
    assert (len(second.value.message), second.value.param) == (300, None)


async def test_an_image_size_the_model_does_not_have_is_invalid_parameter(
    fake: FakeGeminiUpstream,
) -> None:
    adapter = GeminiImageProvider(
        "gemini", base_url=fake.base_url, api_key=API_KEY, image_size="2K"
    )
    try:
        with pytest.raises(InvalidParameter) as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert raised.value.param == "size"


# --- credentials -----------------------------------------------------------------------------


async def test_a_wrong_api_key_is_an_upstream_error_not_a_bad_request(
    fake: FakeGeminiUpstream,
) -> None:
    adapter = GeminiImageProvider("gemini", base_url=fake.base_url, api_key="AIza-wrong-0042")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 400 \(API_KEY_INVALID\)") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert "AIza-wrong-0042" not in error_texts(raised.value)


async def test_a_missing_api_key_is_an_upstream_error(fake: FakeGeminiUpstream) -> None:
    adapter = GeminiImageProvider("gemini", base_url=fake.base_url, api_key=None)
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 403 \(PERMISSION_DENIED\)"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert "x-goog-api-key" not in fake.requests[0].headers


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        rate_limited(),
        refused_with_400(),
        invalid_argument(f"Header was x-goog-api-key: {API_KEY}"),
        google_error(403, "PERMISSION_DENIED", f"Key {API_KEY} may not use this model"),
        google_error(404, "NOT_FOUND", f"No model for key {API_KEY}"),
        google_error(
            400,
            "INVALID_ARGUMENT",
            f"API key not valid: {API_KEY}",
            details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"},
                {"@type": "type.googleapis.com/google.rpc.DebugInfo", "detail": API_KEY},
            ],
        ),
        garbage(),
        truncated(),
        wrong_content_type(),
        prompt_blocked(),
    ],
    ids=[
        "500",
        "429",
        "policy-400",
        "400-echoing-key",
        "403",
        "404",
        "key-invalid-echo",
        "garbage",
        "truncated",
        "content-type",
        "blocked",
    ],
)
async def test_no_error_message_contains_the_api_key(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour, behaviour)

    with pytest.raises(ImagegenError) as raised:
        await provider.generate(make_request(n=2))
    assert API_KEY not in error_texts(raised.value)


async def test_no_error_message_contains_the_api_key_when_unreachable_or_slow(
    fake: FakeGeminiUpstream,
) -> None:
    fake.script(slow(2.0))
    for base_url in (fake.base_url, f"http://127.0.0.1:{free_port()}/v1beta"):
        adapter = GeminiImageProvider(
            "gemini", base_url=base_url, api_key=API_KEY, timeout_seconds=0.3
        )
        try:
            with pytest.raises(UpstreamError) as raised:
                await adapter.generate(make_request())
        finally:
            await adapter.aclose()
        assert API_KEY not in error_texts(raised.value)


async def test_the_provider_repr_does_not_show_the_api_key(
    provider: GeminiImageProvider,
) -> None:
    assert API_KEY not in repr(provider)
    assert API_KEY not in str(provider)


# --- configuration ---------------------------------------------------------------------------


async def test_from_config_builds_a_provider_that_sends_the_configured_image_size(
    fake: FakeGeminiUpstream,
) -> None:
    config = ProviderConfig(
        name="nano-banana",
        type="gemini",
        base_url=fake.base_url,
        api_key_env="GEMINI_API_KEY",
        timeout_seconds=5.0,
        max_connections=4,
        options={"image_size": "2K"},
    )
    adapter = from_config(config, API_KEY)
    try:
        result = await adapter.generate(
            make_request(upstream_model="gemini-3-pro-image-preview", width=1792, height=1024)
        )
    finally:
        await adapter.aclose()

    assert (adapter.name, adapter.timeout_seconds) == ("nano-banana", 5.0)
    assert fake.requests[0].body["generationConfig"]["imageConfig"] == {
        "aspectRatio": "16:9",
        "imageSize": "2K",
    }
    assert (result.images[0].width, result.images[0].height) == (2752, 1536)


def test_from_config_defaults_to_googles_public_endpoint() -> None:
    adapter = from_config(ProviderConfig(name="gemini", type="gemini"), API_KEY)

    assert adapter.base_url == GEMINI_BASE_URL == "https://generativelanguage.googleapis.com/v1beta"
    assert adapter.timeout_seconds == 120.0


@pytest.mark.parametrize(
    "options", [{"image_size": "8K"}, {"image_size": 2}, {"include_text": "yes"}]
)
def test_from_config_rejects_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        from_config(ProviderConfig(name="gemini", type="gemini", options=options), API_KEY)


# -- edits -------------------------------------------------------------------------------


def input_image(width: int = 512, height: int = 512, fmt: str = "PNG") -> InputImage:
    return InputImage(image_bytes(width, height, fmt), fmt.lower(), width, height)


async def test_an_edit_sends_the_images_as_inline_data_before_the_prompt(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    photo, style = input_image(), input_image(640, 480, "JPEG")
    result = await provider.edit(
        make_request(
            prompt="put the cat on the pillow",
            width=1536,
            height=1024,
            images=(photo, style),
            request_id="req-edit",
        )
    )

    assert [(i.width, i.height, i.mime_type) for i in result.images] == [(1248, 832, "image/png")]
    prompt_tokens = len("put the cat on the pillow") // 4 + 2 * INPUT_IMAGE_TOKENS
    assert result.usage.input_tokens == prompt_tokens
    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.path == f"/v1beta/models/{MODEL}:generateContent"
    assert seen.headers["x-goog-api-key"] == API_KEY
    assert seen.headers["X-Request-ID"] == "req-edit"
    parts = seen.body["contents"][0]["parts"]
    assert [sorted(p) for p in parts] == [["inlineData"], ["inlineData"], ["text"]]
    assert parts[2] == {"text": "put the cat on the pillow"}
    assert input_images(seen.body) == [("image/png", photo.data), ("image/jpeg", style.data)]
    assert seen.body["generationConfig"]["imageConfig"] == {"aspectRatio": "3:2"}


async def test_an_edit_with_n_images_makes_n_concurrent_calls_each_with_the_image(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    photo = input_image()
    result = await provider.edit(make_request(n=3, images=(photo,), seed=7))

    assert len(result.images) == 3
    assert fake.hits == 3
    assert all(input_images(r.body) == [("image/png", photo.data)] for r in fake.requests)
    assert sorted(r.body["generationConfig"]["seed"] for r in fake.requests) == [7, 8, 9]


async def test_an_edit_with_a_mask_is_refused_before_any_call(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    request = make_request(images=(input_image(),), mask=input_image())
    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "mask"
    with pytest.raises(InvalidParameter):
        await provider.edit(request)
    assert fake.hits == 0


async def test_more_than_three_input_images_are_refused_before_any_call(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    request = make_request(images=(input_image(),) * 4)
    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(request)
    assert raised.value.param == "image"
    with pytest.raises(InvalidParameter) as empty:
        await provider.edit(make_request())
    assert empty.value.param == "image"
    assert fake.hits == 0
    # Three is allowed.
    provider.check(make_request(images=(input_image(),) * 3))


@pytest.mark.parametrize("behaviour", [prompt_blocked(), finish_refusal(), refused_with_400()])
async def test_a_refused_edit_is_content_policy(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)
    with pytest.raises(ContentPolicy):
        await provider.edit(make_request(images=(input_image(),)))


async def test_an_edit_image_the_upstream_cannot_read_is_invalid_parameter_on_image(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    # The bytes are not the format the image claims: Google answers 400 on the inline data.
    lying = InputImage(image_bytes(64, 64, "JPEG"), "png", 64, 64)
    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(make_request(images=(lying,)))
    assert raised.value.param == "image"
    assert API_KEY not in raised.value.message


@pytest.mark.parametrize("behaviour", [server_error(), service_unavailable(), rate_limited()])
async def test_an_edit_upstream_failure_is_an_upstream_error(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)
    with pytest.raises(UpstreamError) as raised:
        await provider.edit(make_request(images=(input_image(),)))
    assert API_KEY not in raised.value.message


async def test_the_fake_rejects_misspelt_inline_data_and_too_many_images(
    fake: FakeGeminiUpstream,
) -> None:
    b64 = base64.b64encode(image_bytes(8, 8)).decode()
    url = f"{fake.base_url}/models/{MODEL}:generateContent"
    headers = {"x-goog-api-key": API_KEY}
    bodies = [
        {"inlineData": {"mime_type": "image/png", "data": b64}},
        {"inlineData": {"mimeType": "image/gif", "data": b64}},
        {"inlineData": {"mimeType": "image/png", "data": "!!not base64!!"}},
        {"inline_image": {"mimeType": "image/png", "data": b64}},
    ]
    async with aiohttp.ClientSession() as session:
        for part in bodies:
            payload = {
                "contents": [{"parts": [part, {"text": "x"}]}],
                "generationConfig": {"responseModalities": ["IMAGE"]},
            }
            async with session.post(url, json=payload, headers=headers) as resp:
                assert resp.status == 400, part
        image = {"inlineData": {"mimeType": "image/png", "data": b64}}
        payload = {
            "contents": [{"parts": [image] * 4 + [{"text": "x"}]}],
            "generationConfig": {"responseModalities": ["IMAGE"]},
        }
        async with session.post(url, json=payload, headers=headers) as resp:
            assert resp.status == 400
    assert fake.hits == 5
