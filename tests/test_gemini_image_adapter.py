"""The Gemini image adapter (types ``gemini`` and ``vertex-gemini``), driven against a real
loopback fake of the Gemini API and of Vertex AI."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from imagegen_service.config import PROVIDER_TYPES, ConfigError, ProviderConfig
from imagegen_service.errors import (
    ContentPolicy,
    ImagegenError,
    InvalidParameter,
    UpstreamError,
    UpstreamModelUnavailable,
)
from imagegen_service.families import FAMILIES
from imagegen_service.providers.base import InputImage, ModelListing, ProviderRequest
from imagegen_service.providers.gemini_image import (
    GEMINI_BASE_URL,
    GeminiImageProvider,
    VertexGeminiImageProvider,
    from_config,
    image_size_for,
    vertex_base_url,
    vertex_from_config,
)
from imagegen_service.providers.registry import FACTORIES, build_provider
from tests.fakes.gemini_upstream import (
    INPUT_IMAGE_TOKENS,
    Behaviour,
    FakeGeminiUpstream,
    finish_refusal,
    finished,
    garbage,
    google_error,
    input_images,
    invalid_argument,
    ok,
    pixel_size,
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
TOKEN = "ya29.vertex-gemini-token-0042"
FLASH = "gemini-3.1-flash-image"
PRO = "gemini-3-pro-image"
LEGACY = "gemini-2.5-flash-image"
POLICY_MESSAGE = "The prompt was refused by the provider's content policy."
PROMPT_TOKENS = len("a lighthouse at dusk") // 4


def make_request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"upstream_model": FLASH}
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


@pytest.fixture
async def vertex_fake() -> AsyncIterator[FakeGeminiUpstream]:
    async with FakeGeminiUpstream.vertex_ai(TOKEN, project="proj-1", location="global") as fake:
        yield fake


def vertex_config(base_url: str, **options: Any) -> ProviderConfig:
    options.setdefault("project", "proj-1")
    return ProviderConfig(
        name="vertex-gemini", type="vertex-gemini", base_url=base_url, options=options
    )


@pytest.fixture
async def vertex(vertex_fake: FakeGeminiUpstream) -> AsyncIterator[VertexGeminiImageProvider]:
    adapter = vertex_from_config(vertex_config(vertex_fake.base_url), TOKEN)
    try:
        yield adapter
    finally:
        await adapter.aclose()


def answer_with_parts(*parts: object, finish_reason: str = "STOP") -> Behaviour:
    """A 200 answer whose single candidate carries exactly ``parts``."""
    answer = {
        "candidates": [
            {"content": {"parts": list(parts), "role": "model"}, "finishReason": finish_reason}
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1120},
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
    # gemini-3.1-flash-image: 1120 output tokens per 1K image.
    assert (result.usage.input_tokens, result.usage.output_tokens) == (3 * PROMPT_TOKENS, 3 * 1120)


async def test_the_upstream_sees_the_gemini_request_shape_and_the_api_key_header(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    await provider.generate(make_request(width=1792, height=1024))

    seen = fake.requests[0]
    assert seen.method == "POST"
    assert seen.path == f"/v1/models/{FLASH}:generateContent"
    assert seen.query == {}
    assert seen.headers["x-goog-api-key"] == API_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "a lighthouse at dusk"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "1K"},
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
    result = await provider.generate(make_request(upstream_model=f"models/{FLASH}"))

    assert len(result.images) == 1
    assert fake.requests[0].path == f"/v1/models/{FLASH}:generateContent"
    # The family is known from the id without its prefix.
    assert fake.requests[0].body["generationConfig"]["imageConfig"]["imageSize"] == "1K"


async def test_a_v1beta_base_url_still_works(fake: FakeGeminiUpstream) -> None:
    adapter = GeminiImageProvider("gemini", base_url=f"{fake.origin}/v1beta", api_key=API_KEY)
    try:
        await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert fake.requests[0].path == f"/v1beta/models/{FLASH}:generateContent"


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


async def test_thinking_tokens_count_as_output(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    answer = {
        "candidates": [
            {
                "content": {
                    "parts": [{"inlineData": {"mimeType": "image/png", "data": png_b64()}}],
                    "role": "model",
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 9,
            "candidatesTokenCount": 1120,
            "thoughtsTokenCount": 200,
        },
    }
    fake.script(raw(200, orjson.dumps(answer)))

    result = await provider.generate(make_request())

    assert (result.usage.input_tokens, result.usage.output_tokens) == (9, 1320)


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


# --- sizes: aspect ratio and image size tier ---------------------------------------------------


@pytest.mark.parametrize(
    ("model", "size", "ratio", "tier"),
    [
        (FLASH, (512, 512), "1:1", "512"),
        (FLASH, (1024, 1024), "1:1", "1K"),
        (FLASH, (1536, 1024), "3:2", "1K"),
        (FLASH, (1024, 1536), "2:3", "1K"),
        (FLASH, (1792, 1024), "16:9", "1K"),
        (FLASH, (1024, 1792), "9:16", "1K"),
        (FLASH, (2048, 2048), "1:1", "2K"),
        (FLASH, (4096, 4096), "1:1", "4K"),
        (FLASH, (2048, 512), "4:1", "1K"),
        (FLASH, (256, 1024), "1:4", "512"),
        (FLASH, (2048, 256), "8:1", "512"),
        (FLASH, (1536, 640), "21:9", "1K"),
        (FLASH, (1152, 896), "4:3", "1K"),
        (FLASH, (1000, 800), "5:4", "1K"),
        (FLASH, (800, 640), "5:4", "512"),
        (PRO, (512, 512), "1:1", "1K"),
        (PRO, (1024, 1024), "1:1", "1K"),
        (PRO, (1792, 1024), "16:9", "1K"),
        (PRO, (1024, 1536), "2:3", "1K"),
        (PRO, (2048, 2048), "1:1", "2K"),
        (PRO, (4096, 4096), "1:1", "4K"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
async def test_a_size_becomes_the_familys_aspect_ratio_and_image_size_and_the_real_size_comes_back(
    fake: FakeGeminiUpstream,
    provider: GeminiImageProvider,
    model: str,
    size: tuple[int, int],
    ratio: str,
    tier: str,
) -> None:
    request = make_request(upstream_model=model, width=size[0], height=size[1])
    provider.check(request)

    result = await provider.generate(request)

    assert fake.requests[0].body["generationConfig"]["imageConfig"] == {
        "aspectRatio": ratio,
        "imageSize": tier,
    }
    assert (result.images[0].width, result.images[0].height) == pixel_size(model, ratio, tier)


async def test_every_catalog_size_of_both_families_is_served(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    for family in (FLASH, PRO):
        for size in FAMILIES[family].sizes:
            width, height = map(int, size.split("x"))
            provider.check(make_request(upstream_model=family, width=width, height=height))


@pytest.mark.parametrize(
    ("pixels", "tiers", "expected"),
    [
        (512 * 512, ("512", "1K", "2K", "4K"), "512"),
        (700 * 700, ("512", "1K", "2K", "4K"), "512"),
        (750 * 750, ("512", "1K", "2K", "4K"), "1K"),
        (1400 * 1400, ("512", "1K", "2K", "4K"), "1K"),
        (1500 * 1500, ("512", "1K", "2K", "4K"), "2K"),
        (2800 * 2800, ("512", "1K", "2K", "4K"), "2K"),
        (3000 * 3000, ("512", "1K", "2K", "4K"), "4K"),
        (256 * 256, ("1K", "2K", "4K"), "1K"),
        (8192 * 8192, ("1K", "2K", "4K"), "4K"),
    ],
)
def test_the_image_size_is_the_tier_nearest_in_pixels_on_a_log_scale(
    pixels: int, tiers: tuple[str, ...], expected: str
) -> None:
    assert image_size_for(pixels, 1, tiers) == expected


@pytest.mark.parametrize("size", [(2048, 256), (256, 2048), (2048, 512), (1024, 256)])
async def test_a_ratio_only_the_flash_family_has_is_refused_for_pro_before_any_call(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, size: tuple[int, int]
) -> None:
    request = make_request(upstream_model=PRO, width=size[0], height=size[1])

    with pytest.raises(InvalidParameter) as raised:
        provider.check(request)
    assert raised.value.param == "size"
    assert "21:9" in raised.value.message and "8:1" not in raised.value.message
    with pytest.raises(InvalidParameter):
        await provider.generate(request)
    assert fake.hits == 0


async def test_the_requests_family_wins_over_the_upstream_id(provider: GeminiImageProvider) -> None:
    # A catalog entry may name its family for an id the prefixes do not know.
    provider.check(
        make_request(upstream_model="tuned-image-7", family=FLASH, width=2048, height=256)
    )
    with pytest.raises(InvalidParameter):
        provider.check(
            make_request(upstream_model=FLASH, family=PRO, width=2048, height=256),
        )


@pytest.mark.parametrize("size", [(4096, 256), (256, 4096), (3000, 1000)])
async def test_a_model_of_no_known_family_gets_the_standard_ratios_and_no_image_size(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, size: tuple[int, int]
) -> None:
    await provider.generate(make_request(upstream_model=LEGACY, width=1792, height=1024))
    assert fake.requests[0].body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}

    with pytest.raises(InvalidParameter) as raised:
        provider.check(make_request(upstream_model=LEGACY, width=size[0], height=size[1]))
    assert raised.value.param == "size"


async def test_the_image_size_option_applies_to_models_of_no_known_family_only(
    fake: FakeGeminiUpstream,
) -> None:
    adapter = GeminiImageProvider(
        "gemini", base_url=fake.base_url, api_key=API_KEY, image_size="2K"
    )
    fake.script(ok(), ok())
    try:
        await adapter.generate(make_request(upstream_model=FLASH))
        with pytest.raises(InvalidParameter) as raised:
            await adapter.generate(make_request(upstream_model=LEGACY))
    finally:
        await adapter.aclose()
    # The family's own tier follows the size; the legacy model is sent what was configured,
    # and the upstream refuses it.
    assert fake.requests[0].body["generationConfig"]["imageConfig"]["imageSize"] == "1K"
    assert fake.requests[1].body["generationConfig"]["imageConfig"]["imageSize"] == "2K"
    assert raised.value.param == "size"


@pytest.mark.parametrize("n", [0, 11])
async def test_n_outside_one_to_ten_is_refused_by_check(
    provider: GeminiImageProvider, n: int
) -> None:
    with pytest.raises(InvalidParameter) as raised:
        provider.check(make_request(n=n))
    assert raised.value.param == "n"


# --- thinking level ----------------------------------------------------------------------------


async def test_a_configured_thinking_level_goes_to_the_flash_family_only(
    fake: FakeGeminiUpstream,
) -> None:
    config = ProviderConfig(
        name="gemini", type="gemini", base_url=fake.base_url, options={"thinking_level": "high"}
    )
    adapter = from_config(config, API_KEY)
    try:
        await adapter.generate(make_request(upstream_model=FLASH))
        await adapter.generate(make_request(upstream_model=PRO))
    finally:
        await adapter.aclose()

    flash, pro = (r.body["generationConfig"] for r in fake.requests)
    assert flash["thinkingConfig"] == {"thinkingLevel": "HIGH"}
    assert "thinkingConfig" not in pro


async def test_no_thinking_config_is_sent_unless_configured(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    await provider.generate(make_request(upstream_model=FLASH))
    assert "thinkingConfig" not in fake.requests[0].body["generationConfig"]


# --- refusals ----------------------------------------------------------------------------------


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
        prompt_blocked("MODEL_ARMOR"),
        prompt_blocked("JAILBREAK"),
        finish_refusal("SAFETY"),
        finish_refusal("IMAGE_SAFETY"),
        finish_refusal("PROHIBITED_CONTENT"),
        finish_refusal("IMAGE_PROHIBITED_CONTENT"),
        finish_refusal("BLOCKLIST"),
        finish_refusal("SPII"),
        finish_refusal("RECITATION"),
        finish_refusal("IMAGE_RECITATION"),
        finish_refusal("MODEL_ARMOR"),
        finished("IMAGE_SAFETY", text="I can't make that image."),
    ],
    ids=lambda b: f"{b.kind}-{b.reason}" + ("-text" if b.text else ""),
)
async def test_a_safety_ending_inside_a_200_answer_becomes_content_policy(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == POLICY_MESSAGE


@pytest.mark.parametrize(
    "behaviour",
    [
        finished("MAX_TOKENS"),
        finished("OTHER"),
        finished("MALFORMED_RESPONSE"),
        finished("IMAGE_OTHER"),
        finished("NO_IMAGE"),
        finished("FINISH_REASON_UNSPECIFIED"),
        finished("LANGUAGE"),
        finished("STOP"),
        text_instead_of_image(reason="STOP"),
        text_instead_of_image(reason="NO_IMAGE"),
        text_instead_of_image(reason="MAX_TOKENS"),
    ],
    ids=lambda b: f"{b.reason}" + ("-text" if b.text else ""),
)
async def test_an_ending_without_an_image_that_is_not_a_safety_ending_is_an_upstream_error(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert not isinstance(raised.value, UpstreamModelUnavailable)
    assert behaviour.reason in raised.value.message
    # The model's words are not passed on.
    assert "can't create" not in raised.value.message


async def test_an_image_is_delivered_whatever_the_non_safety_ending(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(
        answer_with_parts(
            {"inlineData": {"mimeType": "image/png", "data": png_b64()}},
            finish_reason="MAX_TOKENS",
        )
    )
    result = await provider.generate(make_request())
    assert len(result.images) == 1


async def test_when_every_one_of_n_calls_is_refused_the_request_is_content_policy(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(prompt_blocked(), finish_refusal(), refused_with_400())

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
    assert (result.images[0].width, result.images[0].height) == (1376, 768)
    # Only the delivered image's tokens: nobody pays for a withheld one.
    assert result.usage.output_tokens == 1120


async def test_one_text_only_answer_among_n_fails_the_whole_request(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.script(ok(), text_instead_of_image(), ok())

    with pytest.raises(UpstreamError, match="answered in text only"):
        await provider.generate(make_request(n=3))


# --- the model is gone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "gemini-3-pro-image-preview",
        "gemini-3.1-flash-image-preview",
        "imagen-4.0-generate-001",
        "gemini-9-nonexistent",
    ],
)
async def test_a_model_google_does_not_have_is_model_unavailable(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, model: str
) -> None:
    with pytest.raises(UpstreamModelUnavailable) as raised:
        await provider.generate(make_request(upstream_model=model))

    error = raised.value
    assert (error.upstream_model, error.provider) == (model, "gemini")
    assert error.message == f"upstream 'gemini' no longer offers the model {model!r} (HTTP 404)"
    assert "ListModels" not in error_texts(error)


async def test_a_model_shut_down_while_configured_is_model_unavailable_on_every_call(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    await provider.generate(make_request(upstream_model=PRO))
    fake.retired.add(PRO)

    with pytest.raises(UpstreamModelUnavailable):
        await provider.generate(make_request(upstream_model=PRO, n=3))
    assert fake.hits == 4


@pytest.mark.parametrize(
    "behaviour",
    [
        google_error(404, "NOT_FOUND", "Requested entity was not found."),
        raw(404, b"<html><body>404. That's an error.</body></html>", content_type="text/html"),
        google_error(403, "PERMISSION_DENIED", "Permission denied on model gemini-3-pro-image."),
    ],
    ids=["404-not-a-model", "404-html", "403-about-model"],
)
async def test_other_not_found_answers_are_plain_upstream_errors(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert not isinstance(raised.value, UpstreamModelUnavailable)


async def test_a_vertex_error_wrapped_in_a_list_is_read(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    error = {
        "error": {
            "code": 404,
            "message": "Publisher Model `projects/p/locations/global/publishers/google/models/"
            "gemini-3.1-flash-image` was not found or your project does not have access to it.",
            "status": "NOT_FOUND",
        }
    }
    fake.script(raw(404, orjson.dumps([error])))

    with pytest.raises(UpstreamModelUnavailable):
        await provider.generate(make_request())


# --- upstream failures -------------------------------------------------------------------------


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
        "gemini", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=API_KEY
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


# --- credentials -------------------------------------------------------------------------------


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
        google_error(404, "NOT_FOUND", f"No model for key {API_KEY} was found"),
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
        text_instead_of_image(text=f"key {API_KEY}"),
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
        "text-only",
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
    for base_url in (fake.base_url, f"http://127.0.0.1:{free_port()}/v1"):
        adapter = GeminiImageProvider(
            "gemini", base_url=base_url, api_key=API_KEY, timeout_seconds=0.3
        )
        try:
            with pytest.raises(UpstreamError) as raised:
                await adapter.generate(make_request())
        finally:
            await adapter.aclose()
        assert API_KEY not in error_texts(raised.value)


async def test_the_provider_repr_does_not_show_the_credential(
    provider: GeminiImageProvider, vertex: VertexGeminiImageProvider
) -> None:
    assert API_KEY not in repr(provider) and API_KEY not in str(provider)
    assert TOKEN not in repr(vertex) and TOKEN not in str(vertex)


# --- the model list ------------------------------------------------------------------------


async def test_list_models_reads_every_page_of_the_gemini_api_list(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider
) -> None:
    fake.max_page_size = 2

    listed = await provider.list_models()

    assert listed == frozenset(fake.listed_ids())
    assert {FLASH, PRO} <= listed and LEGACY not in listed
    assert fake.hits == 3
    first, second, third = fake.requests
    assert (first.method, first.path, first.query) == ("GET", "/v1/models", {"pageSize": "1000"})
    assert second.query == {"pageSize": "1000", "pageToken": "2"}
    assert third.query == {"pageSize": "1000", "pageToken": "4"}
    assert all(r.headers["x-goog-api-key"] == API_KEY for r in fake.requests)
    assert isinstance(provider, ModelListing)

    # A model Google shuts down leaves the list.
    fake.retired.add(PRO)
    assert await provider.list_models() == listed - {PRO}


async def test_a_list_that_cannot_be_had_is_an_upstream_error(fake: FakeGeminiUpstream) -> None:
    adapter = GeminiImageProvider("gemini", base_url=fake.base_url, api_key="AIza-wrong-7")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 400 \(API_KEY_INVALID\)") as raised:
            await adapter.list_models()
    finally:
        await adapter.aclose()
    assert "AIza-wrong-7" not in error_texts(raised.value)


@pytest.mark.parametrize(
    "page",
    [
        {"models": "nope"},
        {"models": [], "nextPageToken": "same"},
    ],
    ids=["not-a-list", "token-loop"],
)
async def test_a_broken_list_is_an_upstream_error(page: dict[str, Any]) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(page)

    app = web.Application()
    app.router.add_get("/v1/models", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    adapter = GeminiImageProvider("gemini", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    try:
        with pytest.raises(UpstreamError, match="unreadable answer"):
            await adapter.list_models()
    finally:
        await adapter.aclose()
        await runner.cleanup()


# --- Vertex AI ---------------------------------------------------------------------------------


async def test_vertex_sends_the_same_body_to_the_publisher_model_with_a_bearer_token(
    vertex_fake: FakeGeminiUpstream, vertex: VertexGeminiImageProvider
) -> None:
    result = await vertex.generate(
        make_request(upstream_model=PRO, width=2048, height=2048, seed=3, request_id="req-v")
    )

    assert (result.images[0].width, result.images[0].height) == (2048, 2048)
    seen = vertex_fake.requests[0]
    assert seen.path == (
        f"/v1/projects/proj-1/locations/global/publishers/google/models/{PRO}:generateContent"
    )
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "x-goog-api-key" not in seen.headers
    assert seen.headers["X-Request-ID"] == "req-v"
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "a lighthouse at dusk"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "1:1", "imageSize": "2K"},
            "candidateCount": 1,
            "seed": 3,
        },
    }


async def test_vertex_edits_send_the_images_as_inline_data(
    vertex_fake: FakeGeminiUpstream, vertex: VertexGeminiImageProvider
) -> None:
    photo = input_image()
    result = await vertex.edit(make_request(images=(photo,), prompt="make it night"))

    assert len(result.images) == 1
    assert input_images(vertex_fake.requests[0].body) == [("image/png", photo.data)]


async def test_vertex_reads_a_rotated_token_from_its_file(
    vertex_fake: FakeGeminiUpstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = ProviderConfig(
        name="vertex-gemini",
        type="vertex-gemini",
        base_url=vertex_fake.base_url,
        api_key_file=str(token_file),
        options={"project": "proj-1"},
    )
    adapter = vertex_from_config(config, config.credential({}))
    try:
        await adapter.generate(make_request())
        rotated = "ya29.rotated-token-0099"
        token_file.write_text(rotated)
        vertex_fake.token = rotated
        await adapter.generate(make_request())
        await adapter.list_models()
    finally:
        await adapter.aclose()
    assert [r.headers["Authorization"] for r in vertex_fake.requests] == [
        f"Bearer {TOKEN}",
        f"Bearer {rotated}",
        f"Bearer {rotated}",
    ]


async def test_vertex_without_a_token_fails_before_any_call(
    vertex_fake: FakeGeminiUpstream,
) -> None:
    adapter = vertex_from_config(vertex_config(vertex_fake.base_url), None)
    try:
        with pytest.raises(UpstreamError, match="no credential"):
            await adapter.generate(make_request())
        with pytest.raises(UpstreamError, match="no credential"):
            await adapter.list_models()
    finally:
        await adapter.aclose()
    assert vertex_fake.hits == 0


@pytest.mark.parametrize(
    ("token", "project", "expected"),
    [
        ("ya29.expired-0042", "proj-1", r"HTTP 401 \(ACCESS_TOKEN_EXPIRED\)"),
        (TOKEN, "someone-elses", r"HTTP 403 \(IAM_PERMISSION_DENIED\)"),
    ],
    ids=["bad-token", "other-project"],
)
async def test_vertex_auth_and_project_failures_are_upstream_errors(
    vertex_fake: FakeGeminiUpstream, token: str, project: str, expected: str
) -> None:
    adapter = vertex_from_config(vertex_config(vertex_fake.base_url, project=project), token)
    try:
        with pytest.raises(UpstreamError, match=expected) as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert token not in error_texts(raised.value)


async def test_vertex_says_a_model_it_does_not_have_is_unavailable(
    vertex_fake: FakeGeminiUpstream, vertex: VertexGeminiImageProvider
) -> None:
    with pytest.raises(UpstreamModelUnavailable) as raised:
        await vertex.generate(make_request(upstream_model="gemini-3-pro-image-preview"))
    assert raised.value.provider == "vertex-gemini"


async def test_vertex_lists_the_publisher_models_on_v1beta1(
    vertex_fake: FakeGeminiUpstream, vertex: VertexGeminiImageProvider
) -> None:
    vertex_fake.max_page_size = 4

    listed = await vertex.list_models()

    assert listed == frozenset(vertex_fake.listed_ids())
    assert {FLASH, PRO} <= listed
    assert [(r.method, r.path) for r in vertex_fake.requests] == [
        ("GET", "/v1beta1/publishers/google/models"),
        ("GET", "/v1beta1/publishers/google/models"),
    ]
    assert vertex_fake.requests[1].query == {"pageSize": "1000", "pageToken": "4"}
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in vertex_fake.requests)


@pytest.mark.parametrize(
    ("location", "base"),
    [
        ("global", "https://aiplatform.googleapis.com/v1"),
        ("us-central1", "https://us-central1-aiplatform.googleapis.com/v1"),
        ("europe-west4", "https://europe-west4-aiplatform.googleapis.com/v1"),
        ("us", "https://aiplatform.us.rep.googleapis.com/v1"),
        ("eu", "https://aiplatform.eu.rep.googleapis.com/v1"),
    ],
)
def test_vertex_endpoints_per_location(location: str, base: str) -> None:
    assert vertex_base_url(location) == base
    adapter = vertex_from_config(
        ProviderConfig(
            name="v", type="vertex-gemini", options={"project": "p", "location": location}
        ),
        TOKEN,
    )
    assert adapter._endpoint(FLASH) == (
        f"{base}/projects/p/locations/{location}/publishers/google/models/{FLASH}:generateContent"
    )
    root = base.removesuffix("/v1")
    assert adapter._list_url() == f"{root}/v1beta1/publishers/google/models"


def test_vertex_defaults_to_the_global_location() -> None:
    adapter = vertex_from_config(
        ProviderConfig(name="v", type="vertex-gemini", options={"project": "p"}), TOKEN
    )
    assert adapter.location == "global"
    assert adapter.base_url == "https://aiplatform.googleapis.com/v1"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "project is required"),
        ({"project": "p", "location": "us/central"}, "location"),
        ({"project": "p", "thinking_level": "extreme"}, "thinking_level"),
        ({"project": "p", "include_text": "yes"}, "include_text"),
    ],
)
def test_vertex_bad_options_are_config_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        vertex_from_config(ProviderConfig(name="v", type="vertex-gemini", options=options), TOKEN)


def test_vertex_gemini_is_a_configurable_provider_type() -> None:
    assert "vertex-gemini" in PROVIDER_TYPES
    assert FACTORIES["vertex-gemini"].endswith("gemini_image:vertex_from_config")
    config = ProviderConfig(
        name="vg", type="vertex-gemini", api_key_env="VG_TOKEN", options={"project": "p"}
    )
    built = build_provider(config, {"VG_TOKEN": TOKEN})
    assert isinstance(built, VertexGeminiImageProvider)
    assert isinstance(built, ModelListing)


# --- configuration -----------------------------------------------------------------------------


async def test_from_config_builds_a_provider_with_the_configured_timeout(
    fake: FakeGeminiUpstream,
) -> None:
    config = ProviderConfig(
        name="nano-banana",
        type="gemini",
        base_url=fake.base_url,
        api_key_env="GEMINI_API_KEY",
        timeout_seconds=5.0,
        max_connections=4,
    )
    adapter = from_config(config, API_KEY)
    try:
        result = await adapter.generate(make_request(upstream_model=PRO, width=1792, height=1024))
    finally:
        await adapter.aclose()

    assert (adapter.name, adapter.timeout_seconds) == ("nano-banana", 5.0)
    assert (result.images[0].width, result.images[0].height) == (1376, 768)


def test_from_config_defaults_to_googles_public_endpoint_on_the_sdks_version() -> None:
    adapter = from_config(ProviderConfig(name="gemini", type="gemini"), API_KEY)

    assert adapter.base_url == GEMINI_BASE_URL == "https://generativelanguage.googleapis.com/v1"
    assert adapter.timeout_seconds == 120.0


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": "8K"},
        {"image_size": 2},
        {"include_text": "yes"},
        {"thinking_level": "extreme"},
        {"thinking_level": 3},
    ],
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

    assert [(i.width, i.height, i.mime_type) for i in result.images] == [(1264, 848, "image/png")]
    prompt_tokens = len("put the cat on the pillow") // 4 + 2 * INPUT_IMAGE_TOKENS
    assert result.usage.input_tokens == prompt_tokens
    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.path == f"/v1/models/{FLASH}:generateContent"
    assert seen.headers["x-goog-api-key"] == API_KEY
    assert seen.headers["X-Request-ID"] == "req-edit"
    parts = seen.body["contents"][0]["parts"]
    assert [sorted(p) for p in parts] == [["inlineData"], ["inlineData"], ["text"]]
    assert parts[2] == {"text": "put the cat on the pillow"}
    assert input_images(seen.body) == [("image/png", photo.data), ("image/jpeg", style.data)]
    assert seen.body["generationConfig"]["imageConfig"] == {"aspectRatio": "3:2", "imageSize": "1K"}


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


@pytest.mark.parametrize("model", [FLASH, PRO])
async def test_fourteen_input_images_are_sent_and_fifteen_refused_before_any_call(
    fake: FakeGeminiUpstream, provider: GeminiImageProvider, model: str
) -> None:
    small = input_image(16, 16)
    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(make_request(upstream_model=model, images=(small,) * 15))
    assert raised.value.param == "image"
    assert "14" in raised.value.message
    with pytest.raises(InvalidParameter) as empty:
        await provider.edit(make_request(upstream_model=model))
    assert empty.value.param == "image"
    assert fake.hits == 0

    await provider.edit(make_request(upstream_model=model, images=(small,) * 14))
    assert len(input_images(fake.requests[0].body)) == 14


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


# --- the fake itself ---------------------------------------------------------------------------


async def test_the_fake_rejects_what_google_rejects(fake: FakeGeminiUpstream) -> None:
    b64 = base64.b64encode(image_bytes(8, 8)).decode()
    headers = {"x-goog-api-key": API_KEY}
    image = {"inlineData": {"mimeType": "image/png", "data": b64}}

    def body(*parts: object, **config: object) -> dict[str, Any]:
        return {
            "contents": [{"parts": [*parts, {"text": "x"}]}],
            "generationConfig": {"responseModalities": ["IMAGE"], **config},
        }

    cases = [
        (FLASH, body({"inlineData": {"mime_type": "image/png", "data": b64}})),
        (FLASH, body({"inlineData": {"mimeType": "image/gif", "data": b64}})),
        (FLASH, body({"inlineData": {"mimeType": "image/png", "data": "!!not base64!!"}})),
        (FLASH, body({"inline_image": {"mimeType": "image/png", "data": b64}})),
        (FLASH, body(*[image] * 15)),
        (LEGACY, body(*[image] * 4)),
        (PRO, body(imageConfig={"aspectRatio": "8:1"})),
        (PRO, body(imageConfig={"imageSize": "512"})),
        (LEGACY, body(imageConfig={"imageSize": "1K"})),
        (PRO, body(thinkingConfig={"thinkingLevel": "HIGH"})),
        (FLASH, body(thinkingConfig={"thinking_level": "HIGH"})),
        (FLASH, body(thinkingConfig={"thinkingLevel": "EXTREME"})),
    ]
    async with aiohttp.ClientSession() as session:
        for model, payload in cases:
            url = f"{fake.base_url}/models/{model}:generateContent"
            async with session.post(url, json=payload, headers=headers) as resp:
                assert resp.status == 400, (model, payload)
                error = (await resp.json())["error"]
                assert error["status"] == "INVALID_ARGUMENT"
    assert fake.hits == len(cases)
