"""The Google Imagen adapter (Gemini API and Vertex AI), driven against a loopback fake that
speaks Imagen's real ``:predict`` wire format."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from imagegen_service.providers.base import Editing, InputImage, ProviderRequest, supports
from imagegen_service.providers.google_imagen import (
    GoogleImagenProvider,
    VertexImagenProvider,
    from_config,
    vertex_from_config,
)
from tests.fakes.google_imagen_upstream import (
    Behaviour,
    FakeGoogleImagen,
    all_filtered,
    garbage,
    google_error,
    invalid_argument,
    ok,
    prompt_blocked,
    rate_limited,
    raw,
    response_blocked,
    server_error,
    slow,
    truncated,
    unavailable,
    wrong_content_type,
)
from tests.fakes.loopback import error_texts, free_port, image_bytes, provider_request

API_KEY = "AIzaSy-test-key-0123456789"
TOKEN = "ya29.test-access-token-0123456789"
MODEL = "imagen-3.0-generate-002"


def make_request(**overrides: Any) -> ProviderRequest:
    defaults: dict[str, Any] = {"upstream_model": MODEL}
    return provider_request(**{**defaults, **overrides})


def gemini_config(base_url: str, **options: Any) -> ProviderConfig:
    return ProviderConfig(name="imagen", type="google-imagen", base_url=base_url, options=options)


def vertex_config(base_url: str, **options: Any) -> ProviderConfig:
    options.setdefault("project", "test-project")
    return ProviderConfig(name="vertex", type="vertex-imagen", base_url=base_url, options=options)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGoogleImagen]:
    async with FakeGoogleImagen.gemini(API_KEY) as upstream:
        yield upstream


@pytest.fixture
async def provider(fake: FakeGoogleImagen) -> AsyncIterator[GoogleImagenProvider]:
    adapter = from_config(gemini_config(fake.base_url), API_KEY)
    try:
        yield adapter
    finally:
        await adapter.aclose()


@pytest.fixture
async def vertex_fake() -> AsyncIterator[FakeGoogleImagen]:
    async with FakeGoogleImagen.vertex_ai(TOKEN) as upstream:
        yield upstream


@pytest.fixture
async def vertex(vertex_fake: FakeGoogleImagen) -> AsyncIterator[GoogleImagenProvider]:
    adapter = vertex_from_config(vertex_config(vertex_fake.base_url), TOKEN)
    try:
        yield adapter
    finally:
        await adapter.aclose()


# --- success -------------------------------------------------------------------------------


async def test_two_images_come_back_as_png_at_imagens_real_pixel_size(
    provider: GoogleImagenProvider,
) -> None:
    result = await provider.generate(make_request(n=2))

    assert len(result.images) == 2
    assert result.filtered == 0
    for image in result.images:
        assert (image.mime_type, image.width, image.height) == ("image/png", 1024, 1024)
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.size == (1024, 1024)


async def test_the_gemini_api_sees_its_wire_format_and_the_key_in_x_goog_api_key(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    await provider.generate(make_request(n=2, seed=7, style="vivid", user="u-1"))

    assert fake.hits == 1
    seen = fake.requests[0]
    assert seen.path == f"/v1beta/models/{MODEL}:predict"
    assert seen.headers["x-goog-api-key"] == API_KEY
    assert "Authorization" not in seen.headers
    assert seen.query == {}
    assert seen.headers["Content-Type"] == "application/json"
    # No seed and no watermark flag: the Gemini API accepts neither.
    assert seen.body == {
        "instances": [{"prompt": "a lighthouse at dusk"}],
        "parameters": {
            "sampleCount": 2,
            "aspectRatio": "1:1",
            "personGeneration": "allow_adult",
            "includeRaiReason": True,
            "outputOptions": {"mimeType": "image/png"},
        },
    }


@pytest.mark.parametrize(
    ("width", "height", "ratio", "real"),
    [
        (1792, 1024, "16:9", (1408, 768)),
        (1024, 1792, "9:16", (768, 1408)),
        (1536, 1024, "4:3", (1280, 896)),
        (1024, 1536, "3:4", (896, 1280)),
        (512, 512, "1:1", (1024, 1024)),
        (1344, 768, "16:9", (1408, 768)),
    ],
)
async def test_sizes_map_to_imagen_aspect_ratios_and_come_back_at_imagens_pixel_size(
    fake: FakeGoogleImagen,
    provider: GoogleImagenProvider,
    width: int,
    height: int,
    ratio: str,
    real: tuple[int, int],
) -> None:
    request = make_request(width=width, height=height)
    provider.check(request)

    result = await provider.generate(request)

    assert fake.requests[0].body["parameters"]["aspectRatio"] == ratio
    assert [(i.width, i.height) for i in result.images] == [real]


async def test_an_impossible_size_is_refused_by_check_before_any_call(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    with pytest.raises(InvalidParameter) as raised:
        provider.check(make_request(width=4096, height=256))
    assert raised.value.param == "size"
    with pytest.raises(InvalidParameter):
        await provider.generate(make_request(width=4096, height=256))
    assert fake.hits == 0


async def test_jpeg_output_is_asked_for_and_returned_as_jpeg(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    result = await provider.generate(make_request(output_format="jpeg", width=1792, height=1024))

    assert fake.requests[0].body["parameters"]["outputOptions"] == {"mimeType": "image/jpeg"}
    assert [(i.mime_type, i.width, i.height) for i in result.images] == [("image/jpeg", 1408, 768)]


async def test_more_than_four_images_are_split_into_concurrent_calls_and_merged() -> None:
    async with FakeGoogleImagen.gemini(API_KEY, default=ok(delay=0.3)) as slow_fake:
        adapter = from_config(gemini_config(slow_fake.base_url), API_KEY)
        try:
            result = await adapter.generate(make_request(n=10))
        finally:
            await adapter.aclose()

    assert len(result.images) == 10
    assert result.filtered == 0
    counts = sorted(r.body["parameters"]["sampleCount"] for r in slow_fake.requests)
    assert counts == [2, 4, 4]
    assert slow_fake.max_in_flight == 3


async def test_max_images_per_call_lowers_the_batch_size(fake: FakeGoogleImagen) -> None:
    adapter = from_config(gemini_config(fake.base_url, max_images_per_call=1), API_KEY)
    try:
        result = await adapter.generate(make_request(n=3))
    finally:
        await adapter.aclose()

    assert len(result.images) == 3
    assert [r.body["parameters"]["sampleCount"] for r in fake.requests] == [1, 1, 1]


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour", [prompt_blocked(), response_blocked()], ids=["prompt", "response"]
)
async def test_a_refusal_in_a_400_becomes_content_policy(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(ContentPolicy) as raised:
        await provider.generate(make_request(n=2))
    assert raised.value.message == "The prompt was refused by the provider's content policy."


async def test_every_image_filtered_inside_a_200_becomes_content_policy(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    fake.script(all_filtered())

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request(n=3))


@pytest.mark.parametrize(
    "answer",
    [{}, {"predictions": []}, {"predictions": [{"raiFilteredReason": "Support codes: 1"}]}],
    ids=["empty-object", "empty-list", "reason-only"],
)
async def test_an_answer_with_no_image_left_becomes_content_policy(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, answer: dict[str, Any]
) -> None:
    fake.script(raw(200, orjson.dumps(answer)))

    with pytest.raises(ContentPolicy):
        await provider.generate(make_request())


async def test_some_filtered_images_give_a_partial_result_with_the_filtered_count(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    fake.script(ok(filtered=1))

    result = await provider.generate(make_request(n=3))

    assert len(result.images) == 2
    assert result.filtered == 1


async def test_images_merely_missing_from_predictions_count_as_filtered(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    png = base64.b64encode(_png(1024, 1024)).decode()
    fake.script(
        raw(
            200,
            orjson.dumps({"predictions": [{"bytesBase64Encoded": png, "mimeType": "image/png"}]}),
        )
    )

    result = await provider.generate(make_request(n=4))

    assert (len(result.images), result.filtered) == (1, 3)


async def test_filtered_images_across_split_calls_are_added_up() -> None:
    async with FakeGoogleImagen.gemini(API_KEY, default=ok(filtered=1)) as filtering:
        adapter = from_config(gemini_config(filtering.base_url), API_KEY)
        try:
            result = await adapter.generate(make_request(n=6))
        finally:
            await adapter.aclose()

    assert (len(result.images), result.filtered) == (4, 2)


async def test_a_refused_call_of_a_split_request_counts_as_filtered_images() -> None:
    async with FakeGoogleImagen.gemini(API_KEY, default=prompt_blocked()) as upstream:
        upstream.script(ok())
        adapter = from_config(gemini_config(upstream.base_url), API_KEY)
        try:
            result = await adapter.generate(make_request(n=6))
        finally:
            await adapter.aclose()

    # Whichever call arrived first was answered; the other was refused.
    delivered = upstream.requests[0].body["parameters"]["sampleCount"]
    assert len(result.images) == delivered
    assert result.filtered == 6 - delivered


async def test_a_split_request_refused_everywhere_becomes_content_policy() -> None:
    async with FakeGoogleImagen.gemini(API_KEY, default=prompt_blocked()) as upstream:
        adapter = from_config(gemini_config(upstream.base_url), API_KEY)
        try:
            with pytest.raises(ContentPolicy):
                await adapter.generate(make_request(n=5))
        finally:
            await adapter.aclose()
    assert upstream.hits == 2


# --- upstream failures ---------------------------------------------------------------------


async def test_429_is_an_upstream_error_carrying_googles_retry_delay(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    fake.script(rate_limited(retry_delay="7s"))

    with pytest.raises(UpstreamError, match=r"HTTP 429 \(RESOURCE_EXHAUSTED\)") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 7.0


async def test_a_retry_after_header_wins_over_retry_info(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    fake.script(rate_limited(retry_delay="7s", retry_after=3))

    with pytest.raises(UpstreamError) as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds == 3.0


@pytest.mark.parametrize("behaviour", [server_error(), unavailable()], ids=["500", "503"])
async def test_server_errors_are_upstream_errors(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=rf"answered HTTP {behaviour.status}") as raised:
        await provider.generate(make_request())
    assert raised.value.retry_after_seconds is None


async def test_a_failed_call_of_a_split_request_fails_the_whole_request() -> None:
    async with FakeGoogleImagen.gemini(API_KEY, default=server_error()) as upstream:
        upstream.script(ok())
        adapter = from_config(gemini_config(upstream.base_url), API_KEY)
        try:
            with pytest.raises(UpstreamError, match="HTTP 500"):
                await adapter.generate(make_request(n=8))
        finally:
            await adapter.aclose()


async def test_a_slow_upstream_times_out_as_an_upstream_error(fake: FakeGoogleImagen) -> None:
    fake.script(slow(2.0), slow(2.0))
    adapter = from_config(
        ProviderConfig("imagen", "google-imagen", base_url=fake.base_url, timeout_seconds=0.3),
        API_KEY,
    )
    try:
        with pytest.raises(UpstreamError, match=r"did not answer within 0\.3 s"):
            await adapter.generate(make_request(n=6))
    finally:
        await adapter.aclose()


async def test_a_refused_connection_is_an_upstream_error() -> None:
    adapter = from_config(gemini_config(f"http://127.0.0.1:{free_port()}/v1beta"), API_KEY)
    try:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


@pytest.mark.parametrize(
    "behaviour",
    [garbage(), truncated(), wrong_content_type()],
    ids=["garbage", "truncated", "html"],
)
async def test_unreadable_answers_are_upstream_errors(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "answer",
    [
        {"predictions": "none"},
        {"predictions": ["not an object"]},
        {"predictions": [{"mimeType": "image/png"}]},
        {"predictions": [{"bytesBase64Encoded": "***", "mimeType": "image/png"}]},
        {"predictions": [{"bytesBase64Encoded": base64.b64encode(b"text").decode()}]},
        ["a", "list"],
    ],
    ids=["not-a-list", "not-an-object", "no-image", "bad-base64", "not-an-image", "list"],
)
async def test_answers_without_usable_images_are_upstream_errors(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, answer: object
) -> None:
    fake.script(raw(200, orjson.dumps(answer)))

    with pytest.raises(UpstreamError, match="unreadable answer"):
        await provider.generate(make_request())


async def test_a_wrong_api_key_is_an_upstream_error_not_a_bad_request(
    fake: FakeGoogleImagen,
) -> None:
    wrong = "AIzaSy-wrong-key-42"
    adapter = from_config(gemini_config(fake.base_url), wrong)
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 400 \(API_KEY_INVALID\)") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert wrong not in error_texts(raised.value)


async def test_no_credential_fails_before_any_call(fake: FakeGoogleImagen) -> None:
    adapter = from_config(gemini_config(fake.base_url), None)
    try:
        with pytest.raises(UpstreamError, match="no credential"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert fake.hits == 0


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        (google_error(403, "PERMISSION_DENIED", "Requests to this API are blocked."), "403"),
        (google_error(404, "NOT_FOUND", "Requested entity was not found."), "404"),
        (invalid_argument("Imagen API is only accessible to billed users at this time."), "400"),
        (google_error(400, "FAILED_PRECONDITION", "User location is not supported."), "400"),
    ],
    ids=["403-blocked-key", "404-not-a-model", "unbilled", "failed-precondition"],
)
async def test_account_problems_are_upstream_errors(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, behaviour: Behaviour, code: str
) -> None:
    fake.script(behaviour)

    with pytest.raises(UpstreamError, match=f"HTTP {code}") as raised:
        await provider.generate(make_request())
    assert not isinstance(raised.value, UpstreamModelUnavailable)


@pytest.mark.parametrize("model", ["dall-e-3", MODEL])
async def test_a_model_google_does_not_have_is_model_unavailable_on_the_gemini_api(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, model: str
) -> None:
    # Every Imagen model was shut down in August 2026: without private access, Google answers
    # 404 NOT_FOUND for it as for an id it never had.
    fake.retired.add(MODEL)

    with pytest.raises(UpstreamModelUnavailable) as raised:
        await provider.generate(make_request(upstream_model=model, n=6))

    assert (raised.value.upstream_model, raised.value.provider) == (model, "imagen")
    assert raised.value.message == (
        f"upstream 'imagen' no longer offers the model {model!r} (HTTP 404)"
    )


async def test_a_model_google_does_not_have_is_model_unavailable_on_vertex(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    vertex_fake.retired.update({MODEL, EDIT_MODEL})

    with pytest.raises(UpstreamModelUnavailable) as generated:
        await vertex.generate(make_request(upstream_model=MODEL))
    assert isinstance(vertex, VertexImagenProvider)
    with pytest.raises(UpstreamModelUnavailable) as edited:
        await vertex.edit(make_request(upstream_model=EDIT_MODEL, images=(input_image(64, 64),)))

    assert (generated.value.upstream_model, edited.value.upstream_model) == (MODEL, EDIT_MODEL)
    assert generated.value.provider == edited.value.provider == "vertex"
    assert TOKEN not in error_texts(edited.value)
    assert "Publisher Model" not in error_texts(edited.value)


async def test_another_bad_request_becomes_invalid_parameter_with_a_scrubbed_message(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider
) -> None:
    fake.script(invalid_argument(f"Unsupported aspect ratio for key {API_KEY}."))

    with pytest.raises(InvalidParameter) as raised:
        await provider.generate(make_request())
    assert raised.value.param == "size"
    assert raised.value.message == "Unsupported aspect ratio for key ***."


@pytest.mark.parametrize(
    "behaviour",
    [
        server_error(),
        rate_limited(),
        prompt_blocked(),
        invalid_argument(f"Bad request from key {API_KEY}"),
        invalid_argument("x" * 1000 + API_KEY),
        google_error(403, "PERMISSION_DENIED", f"Key {API_KEY} is blocked"),
        google_error(404, "NOT_FOUND", f"No model for {API_KEY}"),
        google_error(
            400,
            "INVALID_ARGUMENT",
            "API key not valid.",
            details=[
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": API_KEY},
                {"@type": "type.googleapis.com/google.rpc.DebugInfo", "detail": API_KEY},
            ],
        ),
        garbage(),
        truncated(),
        wrong_content_type(),
    ],
    ids=[
        "500",
        "429",
        "policy",
        "400-echoing-key",
        "long-400",
        "403",
        "404",
        "key-as-reason",
        "garbage",
        "truncated",
        "html",
    ],
)
async def test_no_error_message_contains_the_api_key(
    fake: FakeGoogleImagen, provider: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    fake.script(behaviour)

    with pytest.raises(ImagegenError) as raised:
        await provider.generate(make_request())
    assert API_KEY not in error_texts(raised.value)


async def test_no_error_message_contains_the_key_when_unreachable_or_slow(
    fake: FakeGoogleImagen,
) -> None:
    fake.script(slow(2.0))
    for base_url in (fake.base_url, f"http://127.0.0.1:{free_port()}/v1beta"):
        adapter = from_config(
            ProviderConfig("imagen", "google-imagen", base_url=base_url, timeout_seconds=0.3),
            API_KEY,
        )
        try:
            with pytest.raises(UpstreamError) as raised:
                await adapter.generate(make_request())
        finally:
            await adapter.aclose()
        assert API_KEY not in error_texts(raised.value)


async def test_the_provider_repr_shows_no_credential(
    provider: GoogleImagenProvider, vertex: GoogleImagenProvider
) -> None:
    assert API_KEY not in repr(provider)
    assert TOKEN not in repr(vertex)


# --- Vertex AI -----------------------------------------------------------------------------


async def test_vertex_sees_its_path_and_a_bearer_token(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    result = await vertex.generate(make_request(n=2, width=1024, height=1792, seed=5))

    assert [(i.width, i.height) for i in result.images] == [(768, 1408), (768, 1408)]
    seen = vertex_fake.requests[0]
    assert seen.path == (
        f"/v1/projects/test-project/locations/us-central1/publishers/google/models/{MODEL}:predict"
    )
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "x-goog-api-key" not in seen.headers
    # The watermark is Vertex's default and left alone; a seed needs it off, so none is sent.
    assert seen.body["parameters"] == {
        "sampleCount": 2,
        "aspectRatio": "9:16",
        "personGeneration": "allow_adult",
        "includeRaiReason": True,
        "outputOptions": {"mimeType": "image/png"},
    }


async def test_vertex_sends_the_watermark_setting_and_then_the_seed(
    vertex_fake: FakeGoogleImagen,
) -> None:
    adapter = vertex_from_config(
        vertex_config(vertex_fake.base_url, add_watermark=False, person_generation="dont_allow"),
        TOKEN,
    )
    try:
        await adapter.generate(make_request(n=6, seed=100))
    finally:
        await adapter.aclose()

    parameters = sorted(
        (r.body["parameters"] for r in vertex_fake.requests), key=lambda p: p["seed"]
    )
    assert [(p["seed"], p["sampleCount"]) for p in parameters] == [(100, 4), (101, 2)]
    assert all(p["addWatermark"] is False for p in parameters)
    assert all(p["personGeneration"] == "dont_allow" for p in parameters)


async def test_vertex_with_a_wrong_token_is_an_upstream_error(
    vertex_fake: FakeGoogleImagen,
) -> None:
    adapter = vertex_from_config(vertex_config(vertex_fake.base_url), "ya29.expired")
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 401 \(ACCESS_TOKEN_TYPE_UNSUPPORTED\)"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


async def test_vertex_in_another_project_is_an_upstream_error(
    vertex_fake: FakeGoogleImagen,
) -> None:
    adapter = vertex_from_config(
        vertex_config(vertex_fake.base_url, project="other-project"), TOKEN
    )
    try:
        with pytest.raises(UpstreamError, match=r"HTTP 403 \(IAM_PERMISSION_DENIED\)"):
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("behaviour", [prompt_blocked(), all_filtered()], ids=["400", "200"])
async def test_vertex_refusals_become_content_policy(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    vertex_fake.script(behaviour)

    with pytest.raises(ContentPolicy):
        await vertex.generate(make_request())


async def test_a_rotated_token_file_is_picked_up_without_a_restart(
    vertex_fake: FakeGoogleImagen, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = ProviderConfig(
        name="vertex",
        type="vertex-imagen",
        base_url=vertex_fake.base_url,
        api_key_file=str(token_file),
        options={"project": "test-project"},
    )
    adapter = vertex_from_config(config, config.credential({}))
    try:
        await adapter.generate(make_request())
        rotated = "ya29.rotated-token-9876543210"
        token_file.write_text(rotated + "\n")
        stat = token_file.stat()
        # Some filesystems keep coarse mtimes: make the change visible for certain.
        os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        vertex_fake.token = rotated
        await adapter.generate(make_request())
        vertex_fake.script(server_error())
        token_file.unlink()
        # A file missing mid-rotation: the last good token is still used.
        with pytest.raises(UpstreamError, match="HTTP 500") as raised:
            await adapter.generate(make_request())
    finally:
        await adapter.aclose()

    assert [r.headers["Authorization"] for r in vertex_fake.requests] == [
        f"Bearer {TOKEN}",
        f"Bearer {rotated}",
        f"Bearer {rotated}",
    ]
    assert rotated not in error_texts(raised.value)


async def test_an_environment_token_is_not_replaced_by_the_file(
    vertex_fake: FakeGoogleImagen, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("ya29.file-token")
    config = ProviderConfig(
        name="vertex",
        type="vertex-imagen",
        base_url=vertex_fake.base_url,
        api_key_env="VERTEX_TOKEN",
        api_key_file=str(token_file),
        options={"project": "test-project"},
    )
    adapter = vertex_from_config(config, config.credential({"VERTEX_TOKEN": TOKEN}))
    try:
        await adapter.generate(make_request())
    finally:
        await adapter.aclose()
    assert vertex_fake.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


# --- configuration -------------------------------------------------------------------------


def test_from_config_defaults_to_the_public_gemini_api() -> None:
    adapter = from_config(ProviderConfig(name="imagen", type="google-imagen"), API_KEY)

    assert adapter.name == "imagen"
    assert adapter.endpoint("imagen-4.0-generate-001") == (
        "https://generativelanguage.googleapis.com/v1beta/models/imagen-4.0-generate-001:predict"
    )
    assert adapter.timeout_seconds == 120.0


def test_vertex_from_config_builds_the_regional_endpoint_from_project_and_location() -> None:
    config = ProviderConfig(
        name="vertex",
        type="vertex-imagen",
        timeout_seconds=30.0,
        options={"project": "my-proj", "location": "europe-west4"},
    )
    adapter = vertex_from_config(config, TOKEN)

    assert adapter.endpoint("imagen-3.0-generate-002") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/my-proj/locations/"
        "europe-west4/publishers/google/models/imagen-3.0-generate-002:predict"
    )
    assert adapter.timeout_seconds == 30.0
    default = vertex_from_config(
        ProviderConfig(name="v", type="vertex-imagen", options={"project": "p"}), TOKEN
    )
    assert default.endpoint("m").startswith(
        "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/"
    )


@pytest.mark.parametrize(
    ("make", "options", "match"),
    [
        (vertex_from_config, {}, "project is required"),
        (vertex_from_config, {"project": "p", "location": "us/central"}, "location"),
        (from_config, {"person_generation": "everyone"}, "person_generation"),
        (from_config, {"add_watermark": False}, "Vertex AI setting"),
        (from_config, {"max_images_per_call": 8}, "max_images_per_call"),
        (vertex_from_config, {"project": "p", "add_watermark": "no"}, "true or false"),
    ],
    ids=["no-project", "bad-location", "person", "gemini-watermark", "per-call", "watermark"],
)
def test_bad_options_are_config_errors_at_construction(
    make: Any, options: dict[str, Any], match: str
) -> None:
    config = ProviderConfig(name="g", type="vertex-imagen", options=options)
    with pytest.raises(ConfigError, match=match):
        make(config, TOKEN)


async def test_allow_all_on_the_gemini_api_is_refused_by_check_before_any_call(
    fake: FakeGoogleImagen, vertex_fake: FakeGoogleImagen
) -> None:
    gemini = from_config(gemini_config(fake.base_url, person_generation="ALLOW_ALL"), API_KEY)
    vertex = vertex_from_config(
        vertex_config(vertex_fake.base_url, person_generation="allow_all"), TOKEN
    )
    try:
        with pytest.raises(InvalidParameter) as raised:
            gemini.check(make_request())
        assert "person_generation 'allow_all'" in raised.value.message
        assert "Vertex AI" in raised.value.message
        with pytest.raises(InvalidParameter):
            await gemini.generate(make_request())
        assert fake.hits == 0

        # Vertex AI takes it.
        vertex.check(make_request())
        await vertex.generate(make_request())
    finally:
        await gemini.aclose()
        await vertex.aclose()
    assert vertex_fake.requests[0].body["parameters"]["personGeneration"] == "allow_all"


# --- edits (Vertex AI only) ----------------------------------------------------------------

EDIT_MODEL = "imagen-3.0-capability-001"


def input_image(width: int, height: int, fmt: str = "PNG") -> InputImage:
    return InputImage(
        data=image_bytes(width, height, fmt), format=fmt.lower(), width=width, height=height
    )


def openai_mask(width: int, height: int) -> InputImage:
    """An OpenAI-style mask: the left half transparent (edit), the right half opaque (keep)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return InputImage(
        data=buffer.getvalue(), format="png", width=width, height=height, has_alpha=True
    )


def edit_request(**overrides: Any) -> ProviderRequest:
    fields: dict[str, Any] = {
        "upstream_model": EDIT_MODEL,
        "images": (input_image(512, 384),),
        "mask": openai_mask(512, 384),
        "request_id": "req-edit-1",
    }
    fields.update(overrides)
    return make_request(**fields)


def sent_references(fake: FakeGoogleImagen) -> tuple[bytes, Image.Image, dict[str, Any]]:
    """The raw image's bytes, the decoded mask and the mask's config the upstream received."""
    raw_ref, mask_ref = fake.requests[-1].body["instances"][0]["referenceImages"]
    raw_bytes = base64.b64decode(raw_ref["referenceImage"]["bytesBase64Encoded"])
    mask = Image.open(
        io.BytesIO(base64.b64decode(mask_ref["referenceImage"]["bytesBase64Encoded"]))
    )
    return raw_bytes, mask, mask_ref["maskImageConfig"]


async def test_a_vertex_edit_sends_the_image_and_an_imagen_mask_and_reads_the_images(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    request = edit_request(n=2)
    assert isinstance(vertex, Editing)

    result = await vertex.edit(request)

    assert [(i.mime_type, i.width, i.height) for i in result.images] == [
        ("image/png", 512, 384)
    ] * 2
    seen = vertex_fake.requests[0]
    assert seen.path.endswith(f"/publishers/google/models/{EDIT_MODEL}:predict")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["X-Request-ID"] == "req-edit-1"
    instance = seen.body["instances"][0]
    assert instance["prompt"] == "a lighthouse at dusk"
    assert [(r["referenceType"], r["referenceId"]) for r in instance["referenceImages"]] == [
        ("REFERENCE_TYPE_RAW", 1),
        ("REFERENCE_TYPE_MASK", 2),
    ]
    assert seen.body["parameters"] == {
        "sampleCount": 2,
        "editMode": "EDIT_MODE_INPAINT_INSERTION",
        "personGeneration": "allow_adult",
        "includeRaiReason": True,
        "outputOptions": {"mimeType": "image/png"},
    }
    raw_bytes, mask, config = sent_references(vertex_fake)
    assert raw_bytes == request.images[0].data
    assert config == {"maskMode": "MASK_MODE_USER_PROVIDED", "dilation": 0.01}
    # OpenAI's transparent = edit became Imagen's white = edit.
    assert (mask.mode, mask.size) == ("L", (512, 384))
    assert mask.getpixel((10, 10)) == 255
    assert mask.getpixel((500, 10)) == 0


async def test_an_edit_without_a_mask_edits_the_whole_opaque_image_and_webp_becomes_png(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    await vertex.edit(edit_request(images=(input_image(300, 200, "WEBP"),), mask=None))

    raw_bytes, mask, _ = sent_references(vertex_fake)
    with Image.open(io.BytesIO(raw_bytes)) as raw_image:
        assert (raw_image.format, raw_image.size) == ("PNG", (300, 200))
    assert mask.getextrema() == (255, 255)


async def test_the_gemini_api_provider_offers_no_edits(
    provider: GoogleImagenProvider, vertex: GoogleImagenProvider
) -> None:
    assert not supports(provider, "edit")
    assert supports(vertex, "edit")
    assert not supports(vertex, "variation")


async def test_an_edit_of_several_images_is_refused_before_any_call(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    request = edit_request(images=(input_image(64, 64), input_image(64, 64)), mask=None)
    with pytest.raises(InvalidParameter) as raised:
        vertex.check(request)
    assert raised.value.param == "image"
    with pytest.raises(InvalidParameter):
        await vertex.edit(request)
    assert vertex_fake.hits == 0


@pytest.mark.parametrize(
    "behaviour", [prompt_blocked(), response_blocked(), all_filtered()], ids=["400", "after", "200"]
)
async def test_a_refused_edit_is_content_policy(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    vertex_fake.script(behaviour)
    with pytest.raises(ContentPolicy):
        await vertex.edit(edit_request())


async def test_a_partly_filtered_edit_gives_the_rest(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    vertex_fake.script(ok(filtered=1))
    result = await vertex.edit(edit_request(n=3))
    assert (len(result.images), result.filtered) == (2, 1)


async def test_an_edit_the_upstream_rejects_is_invalid_parameter(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider
) -> None:
    vertex_fake.script(invalid_argument("Image editing failed: the image is too small."))
    with pytest.raises(InvalidParameter, match="too small"):
        await vertex.edit(edit_request())
    # A generation model cannot edit: the fake (like Vertex) answers 400.
    with pytest.raises(InvalidParameter, match="does not support image editing"):
        await vertex.edit(edit_request(upstream_model=MODEL))


@pytest.mark.parametrize("behaviour", [server_error(), unavailable()], ids=["500", "503"])
async def test_an_edit_failing_upstream_is_an_upstream_error(
    vertex_fake: FakeGoogleImagen, vertex: GoogleImagenProvider, behaviour: Behaviour
) -> None:
    vertex_fake.script(behaviour)
    with pytest.raises(UpstreamError) as raised:
        await vertex.edit(edit_request())
    assert TOKEN not in error_texts(raised.value)
