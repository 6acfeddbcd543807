"""The Azure OpenAI adapter, driven against the loopback fake in its Azure mode: the
deployment routes with a dated api-version, the v1 API, API keys and Entra ID tokens."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
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
from imagegen_service.providers.openai_compat import (
    AZURE_API_VERSION,
    AZURE_GPT_IMAGE_API_VERSION,
    AzureOpenAIProvider,
    azure_from_config,
)
from tests.fakes.loopback import error_texts, free_port, image_bytes, provider_request
from tests.fakes.openai_upstream import (
    Behaviour,
    FakeOpenAIUpstream,
    Form,
    azure_content_policy_violation,
    azure_rate_limited,
    filtered,
    http_error,
    raw,
    refusal_in_200,
    server_error,
    service_unavailable,
    slow,
)

AZURE_KEY = "0123456789abcdef0123456789abcdef"
ENTRA_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.entra-access-token.signature"
DEPLOYMENTS = {
    "gpt-image-1": "gpt-image-1",
    "dall-e-3": "dall-e-3",
    "team-dalle": "dall-e-3",
    "painter": "gpt-image-1",
    "canvas": "gpt-image-2",
    "flare": "gpt-image-2.5-flare",
}


def make_request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"upstream_model": "gpt-image-1"}
    return provider_request(**{**defaults, **overrides})


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIUpstream]:
    async with FakeOpenAIUpstream(
        api_key=AZURE_KEY,
        azure_deployments=DEPLOYMENTS,
        azure_tokens={ENTRA_TOKEN},
    ) as upstream:
        yield upstream


def azure(fake: FakeOpenAIUpstream, **options: Any) -> AzureOpenAIProvider:
    options.setdefault("api_key", AZURE_KEY)
    return AzureOpenAIProvider("azure", base_url=fake.base_url, **options)


@pytest.fixture
async def provider(fake: FakeOpenAIUpstream) -> AsyncIterator[AzureOpenAIProvider]:
    adapter = azure(fake)
    try:
        yield adapter
    finally:
        await adapter.aclose()


async def test_two_gpt_image_images_come_back_from_the_deployment_named_by_the_model(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    result = await provider.generate(
        make_request(n=2, width=1536, height=1024, quality="hd", request_id="req-9")
    )

    assert [(i.width, i.height, i.mime_type) for i in result.images] == [
        (1536, 1024, "image/png")
    ] * 2
    assert result.filtered == 0
    # 6240 output tokens per 1536x1024 high-quality image, as Azure bills gpt-image-1.
    assert (result.usage.input_tokens, result.usage.output_tokens) == (4, 2 * 6240)
    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.path == "/openai/deployments/gpt-image-1/images/generations"
    assert seen.query == {"api-version": AZURE_GPT_IMAGE_API_VERSION}
    assert seen.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["X-Request-ID"] == "req-9"
    # No model (the deployment decides), no response_format (gpt-image rejects it).
    assert seen.body == {
        "prompt": "a lighthouse at dusk",
        "n": 2,
        "size": "1536x1024",
        "quality": "high",
    }


async def test_a_dall_e_3_deployment_gets_one_call_per_image_on_the_ga_api_version(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure(fake, deployment="team-dalle")
    try:
        result = await adapter.generate(
            make_request(upstream_model="dall-e-3", n=2, width=1792, height=1024, style="vivid")
        )
    finally:
        await adapter.aclose()

    # Items carry content_filter_results with nothing filtered: both are delivered.
    assert [(i.width, i.height) for i in result.images] == [(1792, 1024)] * 2
    assert result.filtered == 0
    assert result.images[0].revised_prompt == "revised: a lighthouse at dusk"
    assert [seen.path for seen in fake.requests] == [
        "/openai/deployments/team-dalle/images/generations"
    ] * 2
    assert all(seen.query == {"api-version": AZURE_API_VERSION} for seen in fake.requests)
    assert all(
        seen.body
        == {
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1792x1024",
            "response_format": "b64_json",
            "style": "vivid",
        }
        for seen in fake.requests
    )


async def test_deployment_model_decides_the_rules_for_a_deployment_with_its_own_name(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure(fake, deployment="painter", deployment_model="gpt-image-1")
    try:
        result = await adapter.generate(make_request(upstream_model="house-style", n=3))
    finally:
        await adapter.aclose()

    assert len(result.images) == 3
    assert fake.hits == 1
    assert fake.requests[0].path == "/openai/deployments/painter/images/generations"
    assert "response_format" not in fake.requests[0].body


async def test_a_configured_api_version_is_sent_for_every_deployment(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure(fake, api_version="2024-02-01")
    try:
        await adapter.generate(make_request(upstream_model="dall-e-3"))
        await adapter.generate(make_request(upstream_model="gpt-image-1"))
    finally:
        await adapter.aclose()

    assert [seen.query["api-version"] for seen in fake.requests] == ["2024-02-01"] * 2


@pytest.mark.parametrize(
    ("output_format", "sent", "mime_type"),
    [("jpeg", "jpeg", "image/jpeg"), ("webp", None, "image/png"), ("png", None, "image/png")],
)
async def test_azure_gets_only_the_output_formats_it_makes(
    fake: FakeOpenAIUpstream,
    provider: AzureOpenAIProvider,
    output_format: str,
    sent: str | None,
    mime_type: str,
) -> None:
    result = await provider.generate(make_request(output_format=output_format))

    assert fake.requests[0].body.get("output_format") == sent
    assert [i.mime_type for i in result.images] == [mime_type]


@pytest.mark.parametrize(
    ("model", "size"), [("gpt-image-1", "1792x1024"), ("dall-e-3", "1536x1024")]
)
def test_check_refuses_sizes_the_deployments_model_cannot_make(model: str, size: str) -> None:
    adapter = AzureOpenAIProvider("azure", base_url="https://r.openai.azure.com", api_key="k")
    width, height = (int(side) for side in size.split("x"))

    with pytest.raises(InvalidParameter) as raised:
        adapter.check(make_request(upstream_model=model, width=width, height=height))
    assert raised.value.param == "size"


def test_check_passes_sizes_through_for_a_deployment_of_unknown_model() -> None:
    adapter = AzureOpenAIProvider("azure", base_url="https://r.openai.azure.com", api_key="k")

    adapter.check(make_request(upstream_model="my-flux", width=4096, height=256))


async def test_a_400_refusal_with_inner_error_is_a_content_policy_error(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(azure_content_policy_violation())

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request())
    assert raised.value.message == "The prompt was refused by the provider's content policy."


async def test_a_refusal_inside_a_200_is_a_content_policy_error(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(refusal_in_200())

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request())


async def test_items_withheld_by_the_content_filter_are_counted_and_the_rest_delivered(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(filtered(1))

    result = await provider.generate(make_request(n=3))

    assert len(result.images) == 2
    assert result.filtered == 1


async def test_a_withheld_dall_e_3_call_counts_as_filtered_among_the_parallel_calls(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(filtered(1), "ok", azure_content_policy_violation())

    result = await provider.generate(make_request(upstream_model="dall-e-3", n=3))

    assert len(result.images) == 1
    assert result.filtered == 2


async def test_an_item_without_image_data_counts_as_filtered(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    png = base64.b64encode(image_bytes(1024, 1024)).decode()
    answer = {"created": 1, "data": [{"b64_json": png}, {"revised_prompt": "withheld"}]}
    fake.script(raw(200, orjson.dumps(answer)))

    result = await provider.generate(make_request(n=2))

    assert (len(result.images), result.filtered) == (1, 1)


async def test_every_item_withheld_is_a_content_policy_error(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(filtered(2))

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request(n=2))


async def test_a_rate_limit_keeps_azures_millisecond_retry_hint(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(azure_rate_limited(retry_after_ms=1500))

    with pytest.raises(UpstreamError, match=r"HTTP 429") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 1.5


@pytest.mark.parametrize("behaviour", [server_error(), service_unavailable()], ids=["500", "503"])
async def test_server_errors_are_upstream_errors(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=rf"answered HTTP {behaviour.status}"):
        await provider.generate(make_request())


async def test_a_slow_upstream_times_out_as_an_upstream_error(fake: FakeOpenAIUpstream) -> None:
    fake.script(slow(2.0))
    adapter = azure(fake, timeout_seconds=0.3)
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_a_refused_connection_is_an_upstream_error() -> None:
    adapter = AzureOpenAIProvider(
        "azure", base_url=f"http://127.0.0.1:{free_port()}", api_key=AZURE_KEY
    )
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("behaviour", ["garbage", "truncated", "wrong_content_type"])
async def test_unreadable_answers_are_upstream_errors(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider, behaviour: str
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


async def test_a_wrong_key_is_an_upstream_error(fake: FakeOpenAIUpstream) -> None:
    adapter = azure(fake, api_key="ffffffffffffffffffffffffffffffff")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert "ffffffff" not in error_texts(raised.value)


async def test_a_missing_deployment_is_model_unavailable_after_one_call(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    with pytest.raises(UpstreamModelUnavailable, match=r"HTTP 404") as raised:
        await provider.generate(make_request(upstream_model="gpt-image-1-mini"))
    assert raised.value.upstream_model == "gpt-image-1-mini"
    assert fake.hits == 1


async def test_an_unsupported_api_version_is_an_upstream_error_not_the_callers(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure(fake, api_version="2023-05-15")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 400 \(BadRequest\)"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_a_resource_endpoint_with_a_wrong_path_is_an_upstream_error(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = AzureOpenAIProvider("azure", base_url=fake.base_url + "/v1", api_key=AZURE_KEY)
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 404"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_an_endpoint_copied_with_its_openai_suffix_still_works(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = AzureOpenAIProvider("azure", base_url=fake.base_url + "/openai/", api_key=AZURE_KEY)
    try:
        result = await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert len(result.images) == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        azure_rate_limited(),
        azure_content_policy_violation(),
        http_error(400, message=f"The key {AZURE_KEY} is not valid here", param="prompt"),
        http_error(403, message=f"Key {AZURE_KEY} is blocked", code="Forbidden"),
        "garbage",
        "truncated",
        raw(200, orjson.dumps({"data": [{"url": "http://127.0.0.1:1/gone.png"}]})),
    ],
    ids=["500", "429", "policy", "400-echoing-key", "403", "garbage", "truncated", "dead-url"],
)
async def test_no_error_message_contains_the_key(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider, behaviour: Behaviour | str
) -> None:
    fake.script(behaviour)

    with pytest.raises(ImagegenError) as raised:
        await provider.generate(make_request())
    assert AZURE_KEY not in error_texts(raised.value)


def test_the_provider_repr_does_not_show_the_key() -> None:
    adapter = AzureOpenAIProvider("azure", base_url="https://r.openai.azure.com", api_key=AZURE_KEY)
    assert AZURE_KEY not in repr(adapter)


async def test_azure_from_config_reads_deployment_model_and_api_version(
    fake: FakeOpenAIUpstream,
) -> None:
    config = ProviderConfig(
        name="azure",
        type="azure-openai",
        base_url=fake.base_url,
        timeout_seconds=5,
        options={
            "deployment": "painter",
            "deployment_model": "gpt-image-1",
            "api_version": "2025-04-01-preview",
        },
    )
    adapter = azure_from_config(config, AZURE_KEY)
    try:
        result = await adapter.generate(make_request(upstream_model="anything", quality="standard"))
    finally:
        await adapter.aclose()

    assert len(result.images) == 1
    seen = fake.requests[0]
    assert seen.path == "/openai/deployments/painter/images/generations"
    assert seen.query == {"api-version": "2025-04-01-preview"}
    assert seen.headers["api-key"] == AZURE_KEY
    assert seen.body["quality"] == "medium"


@pytest.mark.parametrize("base_url", ["", "   "])
def test_azure_from_config_requires_the_resource_endpoint(base_url: str) -> None:
    config = ProviderConfig(name="azure", type="azure-openai", base_url=base_url)

    with pytest.raises(ValueError, match=r"providers\.azure: base_url is required"):
        azure_from_config(config, AZURE_KEY)


def test_azure_from_config_rejects_a_non_string_option() -> None:
    config = ProviderConfig(
        name="azure",
        type="azure-openai",
        base_url="https://r.openai.azure.com",
        options={"api_version": 20241021},
    )

    with pytest.raises(ValueError, match=r"providers\.azure\.api_version must be a string"):
        azure_from_config(config, AZURE_KEY)


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/openai/deployments/gpt-image-1/images/generations", {"api-key": AZURE_KEY}, 404, "404"),
        (
            "/openai/deployments/gpt-image-1/images/generations?api-version=2024-10-21",
            {"Authorization": f"Bearer {AZURE_KEY}"},
            401,
            "401",
        ),
        (
            "/openai/deployments/gpt-image-1/images/generations?api-version=2023-05-15",
            {"api-key": AZURE_KEY},
            400,
            "BadRequest",
        ),
        (
            "/openai/deployments/nope/images/generations?api-version=2024-10-21",
            {"api-key": AZURE_KEY},
            404,
            "DeploymentNotFound",
        ),
    ],
    ids=["no-api-version", "bearer-instead-of-api-key", "unknown-version", "no-such-deployment"],
)
async def test_the_fake_answers_wrong_addresses_and_keys_as_azure_does(
    fake: FakeOpenAIUpstream, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.base_url + path, json={"prompt": "p"}, headers=headers) as resp,
    ):
        answer = await resp.json()
    assert resp.status == status
    assert answer["error"]["code"] == code


# -- edits -------------------------------------------------------------------------------


def png_input(width: int = 1024, height: int = 1024) -> InputImage:
    return InputImage(image_bytes(width, height), "png", width, height)


def alpha_mask(width: int = 1024, height: int = 1024) -> InputImage:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 0, 0)).save(buffer, "PNG")
    return InputImage(buffer.getvalue(), "png", width, height, has_alpha=True)


async def test_an_edit_posts_the_multipart_form_to_the_deployments_edits_route(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    image, mask = png_input(), alpha_mask()
    result = await provider.edit(
        make_request(
            prompt="add a red door",
            n=2,
            quality="hd",
            request_id="req-e",
            images=(image,),
            mask=mask,
        )
    )

    assert [(i.width, i.height) for i in result.images] == [(1024, 1024)] * 2
    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.path == "/openai/deployments/gpt-image-1/images/edits"
    assert seen.query == {"api-version": AZURE_GPT_IMAGE_API_VERSION}
    assert seen.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["X-Request-ID"] == "req-e"
    form = seen.body
    assert isinstance(form, Form)
    # No model: the deployment decides.
    assert form.fields == {
        "prompt": "add a red door",
        "n": "2",
        "size": "1024x1024",
        "quality": "high",
    }
    assert [p.data for p in form.files["image"]] == [image.data]
    assert [p.data for p in form.files["mask"]] == [mask.data]


async def test_an_edit_of_several_images_sends_the_array_form(fake: FakeOpenAIUpstream) -> None:
    images = (png_input(), png_input(512, 512))
    adapter = azure(fake, deployment="painter", deployment_model="gpt-image-1")
    try:
        result = await adapter.edit(make_request(upstream_model="anything", images=images))
    finally:
        await adapter.aclose()

    assert len(result.images) == 1
    seen = fake.requests[0]
    assert seen.path == "/openai/deployments/painter/images/edits"
    assert isinstance(seen.body, Form)
    assert [p.data for p in seen.body.files["image[]"]] == [i.data for i in images]


async def test_an_edit_refusal_is_a_content_policy_error(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(azure_content_policy_violation())

    with pytest.raises(ContentPolicy):
        await provider.edit(make_request(images=(png_input(),)))


async def test_an_edit_the_deployment_rejects_is_invalid_parameter(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    # dall-e-3 deployments have no edits: Azure answers 400 naming the model.
    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(make_request(upstream_model="team-dalle", images=(png_input(),)))
    assert raised.value.param == "model"
    assert fake.requests[0].path == "/openai/deployments/team-dalle/images/edits"


async def test_an_edit_with_a_mask_of_another_size_is_invalid_parameter(
    provider: AzureOpenAIProvider,
) -> None:
    with pytest.raises(InvalidParameter) as raised:
        await provider.edit(make_request(images=(png_input(),), mask=alpha_mask(512, 512)))
    assert raised.value.param == "mask"


async def test_an_edit_server_error_is_an_upstream_error(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    fake.script(server_error())

    with pytest.raises(UpstreamError) as raised:
        await provider.edit(make_request(images=(png_input(),)))
    assert AZURE_KEY not in raised.value.message


async def test_an_edit_with_a_wrong_key_is_an_upstream_error(fake: FakeOpenAIUpstream) -> None:
    adapter = azure(fake, api_key="wrong-key-wrong-key")
    try:
        with pytest.raises(UpstreamError) as raised:
            await adapter.edit(make_request(images=(png_input(),)))
    finally:
        await adapter.aclose()
    assert "wrong-key-wrong-key" not in raised.value.message
    assert fake.requests[0].path == "/openai/deployments/gpt-image-1/images/edits"


# -- classic deployment routes: newer families, user, Entra ID -----------------------------


async def test_a_gpt_image_2_deployment_takes_a_free_size_and_the_callers_user_as_user(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    result = await provider.generate(
        make_request(
            upstream_model="canvas",
            family="gpt-image-2",
            width=1536,
            height=864,
            quality="high",
            user="u-1",
        )
    )

    assert [(i.width, i.height) for i in result.images] == [(1536, 864)]
    seen = fake.requests[0]
    assert seen.path == "/openai/deployments/canvas/images/generations"
    # The dated versions document `user`; safety_identifier is left to the v1 API.
    assert seen.body == {
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "1536x864",
        "quality": "high",
        "user": "u-1",
    }


async def test_the_catalogs_family_shapes_a_deployment_whose_name_says_nothing(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    # Without a family (or deployment_model) "canvas" is an unknown id: the legacy payload,
    # which the gpt-image-2 deployment refuses for its response_format.
    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request(upstream_model="canvas"))
    assert raised.value.param == "response_format"

    await provider.generate(make_request(upstream_model="canvas", family="gpt-image-2"))
    assert "response_format" not in fake.requests[-1].body


def write_token(path: Path, token: str) -> None:
    path.write_text(token + "\n")


async def test_an_entra_id_token_file_is_sent_as_bearer_on_the_deployment_routes(
    fake: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, ENTRA_TOKEN)
    adapter = azure(fake, api_key=None, token_file=str(token_file))
    try:
        result = await adapter.generate(make_request(upstream_model="painter", family="gpt-image"))
    finally:
        await adapter.aclose()

    assert len(result.images) == 1
    seen = fake.requests[0]
    assert seen.path == "/openai/deployments/painter/images/generations"
    assert seen.query == {"api-version": AZURE_GPT_IMAGE_API_VERSION}
    assert seen.headers["Authorization"] == f"Bearer {ENTRA_TOKEN}"
    assert "api-key" not in seen.headers


# -- the v1 API ----------------------------------------------------------------------------


def azure_v1(fake: FakeOpenAIUpstream, **options: Any) -> AzureOpenAIProvider:
    return azure(fake, api="v1", **options)


async def test_v1_posts_to_the_v1_route_with_the_deployment_as_model_and_no_api_version(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure_v1(fake)
    try:
        result = await adapter.generate(
            make_request(
                upstream_model="canvas",
                family="gpt-image-2",
                width=1536,
                height=864,
                quality="hd",
                output_format="jpeg",
                user="u-2",
                request_id="req-v1",
            )
        )
    finally:
        await adapter.aclose()

    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/jpeg", 1536, 864)]
    seen = fake.requests[0]
    assert (seen.method, seen.path, seen.query) == ("POST", "/openai/v1/images/generations", {})
    assert seen.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["X-Request-ID"] == "req-v1"
    assert seen.body == {
        "model": "canvas",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "1536x864",
        "quality": "high",
        "output_format": "jpeg",
        "safety_identifier": "u-2",
    }


async def test_v1_names_the_configured_deployment_and_follows_its_model(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure_v1(fake, deployment="flare", deployment_model="gpt-image-2.5-flare")
    try:
        adapter.check(make_request(upstream_model="house", width=1536, height=864, quality="max"))
        await adapter.generate(make_request(upstream_model="house", quality="xhigh"))
    finally:
        await adapter.aclose()

    assert fake.requests[0].body["model"] == "flare"
    assert fake.requests[0].body["quality"] == "xhigh"


async def test_v1_with_an_entra_id_token_file_sends_bearer_and_rereads_a_changed_file(
    fake: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, "expired-token")
    adapter = azure_v1(fake, api_key=None, token_file=str(token_file))
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401") as raised:
            await adapter.generate(make_request(upstream_model="canvas", family="gpt-image-2"))
        assert "expired-token" not in error_texts(raised.value)
        stamp = token_file.stat().st_mtime_ns
        write_token(token_file, ENTRA_TOKEN)
        # A refresher may rewrite the file within the same clock tick: the size still tells.
        os.utime(token_file, ns=(stamp, stamp))
        result = await adapter.generate(make_request(upstream_model="canvas", family="gpt-image-2"))
    finally:
        await adapter.aclose()

    assert len(result.images) == 1
    assert [seen.headers["Authorization"] for seen in fake.requests] == [
        "Bearer expired-token",
        f"Bearer {ENTRA_TOKEN}",
    ]
    assert all("api-key" not in seen.headers for seen in fake.requests)


@pytest.mark.parametrize("state", ["missing", "empty"])
async def test_an_unusable_token_file_is_an_upstream_error_that_names_no_path(
    fake: FakeOpenAIUpstream, tmp_path: Path, state: str
) -> None:
    token_file = tmp_path / "secret-dir" / "token"
    if state == "empty":
        token_file.parent.mkdir()
        token_file.write_text("  \n")
    adapter = azure_v1(fake, api_key=None, token_file=str(token_file))
    try:
        with pytest.raises(UpstreamError, match="Entra ID token file") as raised:
            await adapter.generate(make_request(upstream_model="canvas", family="gpt-image-2"))
    finally:
        await adapter.aclose()
    assert "secret-dir" not in raised.value.message
    assert fake.hits == 0


async def test_an_error_echoing_the_entra_token_never_shows_it(
    fake: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, ENTRA_TOKEN)
    fake.script(http_error(400, message=f"Token {ENTRA_TOKEN} is odd", param="prompt"))
    adapter = azure_v1(fake, api_key=None, token_file=str(token_file))
    try:
        with pytest.raises(InvalidParameter) as raised:
            await adapter.generate(make_request(upstream_model="canvas", family="gpt-image-2"))
    finally:
        await adapter.aclose()
    assert ENTRA_TOKEN not in error_texts(raised.value)


async def test_v1_edit_posts_the_form_with_the_deployment_as_model(
    fake: FakeOpenAIUpstream,
) -> None:
    images = (png_input(), png_input(512, 512))
    mask = alpha_mask()
    adapter = azure_v1(fake)
    try:
        result = await adapter.edit(
            make_request(
                upstream_model="canvas", family="gpt-image-2", images=images, mask=mask, user="u-3"
            )
        )
    finally:
        await adapter.aclose()

    assert len(result.images) == 1
    seen = fake.requests[0]
    assert (seen.path, seen.query) == ("/openai/v1/images/edits", {})
    form = seen.body
    assert isinstance(form, Form)
    assert form.fields == {
        "model": "canvas",
        "prompt": "a lighthouse at dusk",
        "n": "1",
        "size": "1024x1024",
        "safety_identifier": "u-3",
    }
    assert [p.data for p in form.files["image[]"]] == [i.data for i in images]
    assert [p.data for p in form.files["mask"]] == [mask.data]


async def test_v1_for_a_deployment_that_does_not_exist_is_model_unavailable(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure_v1(fake)
    try:
        with pytest.raises(UpstreamModelUnavailable) as raised:
            await adapter.generate(make_request(upstream_model="gpt-image-1.5"))
    finally:
        await adapter.aclose()
    assert raised.value.upstream_model == "gpt-image-1.5"
    assert fake.hits == 1


async def test_v1_streams_from_the_v1_route(fake: FakeOpenAIUpstream) -> None:
    adapter = azure_v1(fake)
    try:
        events = [
            event
            async for event in adapter.generate_stream(
                make_request(upstream_model="canvas", family="gpt-image-2", partial_images=1)
            )
        ]
    finally:
        await adapter.aclose()

    assert [type(e).__name__ for e in events] == ["PartialImage", "ProviderImage"]
    seen = fake.requests[0]
    assert seen.path == "/openai/v1/images/generations"
    assert (seen.body["model"], seen.body["stream"], seen.body["partial_images"]) == (
        "canvas",
        True,
        1,
    )


# -- model lists ---------------------------------------------------------------------------


async def test_v1_lists_the_resources_models_less_those_past_their_inference_date(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, ENTRA_TOKEN)
    async with FakeOpenAIUpstream(
        api_key=AZURE_KEY,
        azure_deployments=DEPLOYMENTS,
        azure_tokens={ENTRA_TOKEN},
        retired_models={"gpt-image-1"},
    ) as fake:
        adapter = azure_v1(fake, api_key=None, token_file=str(token_file))
        assert isinstance(adapter, ModelListing)
        try:
            models = await adapter.list_models()
        finally:
            await adapter.aclose()

    # gpt-image-1 is retired on this resource: its deprecation.inference date has passed.
    assert models == frozenset({"dall-e-3", "gpt-image-2", "gpt-image-2.5-flare"})
    seen = fake.requests[0]
    assert (seen.method, seen.path, seen.query) == ("GET", "/openai/v1/models", {})
    assert seen.headers["Authorization"] == f"Bearer {ENTRA_TOKEN}"


async def test_the_deployment_routes_offer_no_model_list(
    fake: FakeOpenAIUpstream, provider: AzureOpenAIProvider
) -> None:
    assert await provider.list_models() is None
    assert fake.hits == 0


async def test_a_v1_model_list_refused_for_the_key_is_an_upstream_error_without_it(
    fake: FakeOpenAIUpstream,
) -> None:
    adapter = azure_v1(fake, api_key="ffffffffffffffffffffffffffffffff")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401") as raised:
            await adapter.list_models()
    finally:
        await adapter.aclose()
    assert "ffffffff" not in error_texts(raised.value)


# -- configuration -------------------------------------------------------------------------


async def test_azure_from_config_reads_api_and_token_file(
    fake: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, ENTRA_TOKEN)
    config = ProviderConfig(
        name="azure",
        type="azure-openai",
        base_url=fake.base_url + "/openai/v1/",
        options={"api": "v1", "deployment": "canvas", "token_file": str(token_file)},
    )
    adapter = azure_from_config(config, None)
    try:
        await adapter.generate(make_request(upstream_model="anything", family="gpt-image-2"))
    finally:
        await adapter.aclose()

    seen = fake.requests[0]
    assert (seen.path, seen.body["model"]) == ("/openai/v1/images/generations", "canvas")
    assert seen.headers["Authorization"] == f"Bearer {ENTRA_TOKEN}"


@pytest.mark.parametrize(
    ("options", "credential", "message"),
    [
        ({"api": "v2"}, AZURE_KEY, r"providers\.azure\.api must be one of deployments, v1"),
        (
            {"api": "v1", "api_version": "2025-04-01-preview"},
            AZURE_KEY,
            r"api_version does not apply to api = 'v1'",
        ),
        ({"token_file": "/run/secrets/token"}, AZURE_KEY, r"mutually exclusive"),
        ({"token_file": 7}, None, r"providers\.azure\.token_file must be a string"),
    ],
    ids=["unknown-api", "v1-with-version", "key-and-token", "token-file-type"],
)
def test_azure_from_config_refuses_contradictory_options(
    options: dict[str, object], credential: str | None, message: str
) -> None:
    config = ProviderConfig(
        name="azure", type="azure-openai", base_url="https://r.openai.azure.com", options=options
    )

    with pytest.raises(ValueError, match=message):
        azure_from_config(config, credential)


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/openai/v1/images/generations", {"api-key": AZURE_KEY}, 404, "model_not_found"),
        ("/openai/v1/images/generations", {"Authorization": "Bearer nope"}, 401, "401"),
        (
            "/openai/v1/images/generations?api-version=2024-10-21",
            {"api-key": AZURE_KEY},
            400,
            "BadRequest",
        ),
    ],
    ids=["unknown-deployment", "bad-token", "dated-version"],
)
async def test_the_fake_answers_v1_mistakes_as_azure_does(
    fake: FakeOpenAIUpstream, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    body = {"model": "no-such-deployment", "prompt": "p"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(fake.base_url + path, json=body, headers=headers) as resp,
    ):
        answer = await resp.json()
    assert resp.status == status
    assert answer["error"]["code"] == code
