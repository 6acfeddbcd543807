"""POST /v1/images/edits and POST /v1/images/variations: multipart in, images out, through
the official SDK, raw HTTP and gRPC; served by the local renderer and by an OpenAI upstream
(multipart to its /images/edits and /images/variations). Every refusal costs nothing."""

from __future__ import annotations

import base64
import io
import random

import aiohttp
import grpc
import pytest
from PIL import Image, ImageChops, ImageStat

from imagegen_service.catalog import load_catalog
from imagegen_service.errors import ModelNotSupported
from imagegen_service.gen import images_pb2, images_pb2_grpc
from imagegen_service.providers.base import ProviderRequest, ProviderResult
from imagegen_service.routing import Router
from tests.conftest import assert_openai_error, bearer
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.images_stack import (
    FAKE_DALLE,
    FAKE_GPT_IMAGE,
    LOCAL_IMAGE,
    LOCAL_IMAGE_MAX_FILE,
    MAX_UPLOAD_BYTES,
    ImagesStack,
)

EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
OPENING = 1_000_000
# The edited square of every masked test: alpha 0 inside, opaque outside.
HOLE = (64, 64, 192, 192)


def picture(size: tuple[int, int] = (256, 256), fmt: str = "PNG") -> bytes:
    """A test photo: a diagonal gradient, so every pixel is distinct enough to compare."""
    width, height = size
    image = Image.linear_gradient("L").resize(size)
    rgb = Image.merge("RGB", (image, image.rotate(90), Image.new("L", size, 90)))
    out = io.BytesIO()
    rgb.save(out, fmt)
    assert rgb.size == (width, height)
    return out.getvalue()


def mask(size: tuple[int, int] = (256, 256), hole: tuple[int, int, int, int] = HOLE) -> bytes:
    image = Image.new("RGBA", size, (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), hole)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 * side * side bytes."""
    rng = random.Random(side)
    image = Image.frombytes("RGB", (side, side), rng.randbytes(3 * side * side))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=0)
    return out.getvalue()


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _form(fields: dict[str, str], files: list[tuple[str, bytes, str]]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    for name, data, filename in files:
        # A stream, not bytes: aiohttp warns about large bodies given as bytes.
        form.add_field(name, io.BytesIO(data), filename=filename, content_type="image/png")
    return form


async def _post(
    stack: ImagesStack,
    http: aiohttp.ClientSession,
    path: str,
    key: str,
    fields: dict[str, str],
    files: list[tuple[str, bytes, str]],
) -> aiohttp.ClientResponse:
    resp = await http.post(stack.http_url + path, data=_form(fields, files), headers=bearer(key))
    await resp.read()
    return resp


# -- edits on the local renderer ----------------------------------------------------------


async def test_an_edit_paints_only_where_the_mask_is_transparent(
    images_stack: ImagesStack,
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    original = picture()
    async with images_stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="local-image",
            image=("photo.png", original, "image/png"),
            mask=("mask.png", mask(), "image/png"),
            prompt="a red balloon",
            response_format="b64_json",
        )
    assert answer.data is not None
    assert len(answer.data) == 1
    edited = _open(base64.b64decode(answer.data[0].b64_json or "")).convert("RGB")
    # No size given: the image's own size, which the model offers.
    assert edited.size == (256, 256)
    assert answer.size == "256x256"
    diff = ImageChops.difference(edited, _open(original).convert("RGB"))
    outside = diff.copy()
    outside.paste((0, 0, 0), HOLE)
    assert outside.getbbox() is None, "pixels outside the mask's hole changed"
    inside = diff.crop(HOLE)
    assert max(ImageStat.Stat(inside).mean) > 20
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)


async def test_an_edit_without_a_mask_blends_over_the_whole_image(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    original = picture()
    resp = await _post(
        images_stack,
        http,
        EDITS,
        key,
        {"model": "local-image", "prompt": "blue ocean waves", "response_format": "b64_json"},
        [("image", original, "photo.png")],
    )
    assert resp.status == 200
    edited = _open(base64.b64decode((await resp.json())["data"][0]["b64_json"])).convert("RGB")
    diff = ImageChops.difference(edited, _open(original).convert("RGB"))
    for box in ((0, 0, 128, 128), (128, 0, 256, 128), (0, 128, 128, 256), (128, 128, 256, 256)):
        assert max(ImageStat.Stat(diff.crop(box)).mean) > 5


async def test_a_lossy_edit_keeps_the_unmasked_area_nearly_unchanged(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    original = picture()
    resp = await _post(
        images_stack,
        http,
        EDITS,
        key,
        {
            "model": "local-image",
            "prompt": "a green kite",
            "response_format": "b64_json",
            "output_format": "jpeg",
            "output_compression": "95",
        },
        [("image", original, "photo.png"), ("mask", mask(), "mask.png")],
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["output_format"] == "jpeg"
    edited = _open(base64.b64decode(body["data"][0]["b64_json"]))
    assert edited.format == "JPEG"
    diff = ImageChops.difference(edited.convert("RGB"), _open(original).convert("RGB"))
    # Away from the hole's edge (JPEG blocks bleed a few pixels) only compression noise.
    assert max(ImageStat.Stat(diff.crop((0, 0, 256, 48))).mean) < 4
    assert max(ImageStat.Stat(diff.crop((80, 80, 176, 176))).mean) > 20


async def test_several_images_are_taken_as_repeated_image_fields(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    files = [("image[]", picture(), "a.png"), ("image[]", picture(fmt="JPEG"), "b.jpg")]
    files.append(("image[]", picture(fmt="WEBP"), "c.webp"))
    resp = await _post(
        images_stack,
        http,
        EDITS,
        key,
        {"model": "local-image", "prompt": "a collage", "n": "2", "response_format": "b64_json"},
        files,
    )
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    assert len(data) == 2
    assert data[0]["b64_json"] != data[1]["b64_json"]
    await images_stack.assert_balance(account_id, OPENING - 2 * LOCAL_IMAGE)


async def test_the_sdk_sends_a_list_of_images_and_gets_the_requested_size(
    images_stack: ImagesStack,
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    async with images_stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="local-image",
            image=[("a.png", picture(), "image/png"), ("b.png", picture((300, 200)), "image/png")],
            prompt="a sunset",
            size="512x512",
            response_format="b64_json",
        )
    assert answer.data is not None
    assert _open(base64.b64decode(answer.data[0].b64_json or "")).size == (512, 512)


async def test_an_edit_streams_image_edit_events(images_stack: ImagesStack) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    async with images_stack.openai_client(key) as client:
        stream = await client.images.edit(
            model="local-image",
            image=("photo.png", picture(), "image/png"),
            mask=("mask.png", mask(), "image/png"),
            prompt="a yellow sun",
            stream=True,
            partial_images=2,
        )
        events = [event async for event in stream]
    assert [e.type for e in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    for event in events:
        assert _open(base64.b64decode(event.b64_json)).size == (256, 256)
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)


# -- refusals, none of them charged -------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "param"),
    [
        (
            [("image", picture(), "a.png"), ("mask", mask((128, 128), (0, 0, 64, 64)), "m.png")],
            "mask",
        ),
        ([("image", picture(), "a.png"), ("mask", picture(), "m.png")], "mask"),
        ([("image", picture(), "a.png"), ("mask", picture(fmt="JPEG"), "m.png")], "mask"),
        ([("image", b"hello, I am not a picture", "a.png")], "image"),
        ([("image", b"GIF89a" + bytes(40), "a.png")], "image"),
        ([("image", picture()[:60], "a.png")], "image"),
        ([("image", noise_png(900), "big.png")], "image"),
        ([("image[]", picture(), f"{i}.png") for i in range(17)], "image"),
        ([], "image"),
    ],
    ids=[
        "mask-of-another-size",
        "mask-without-alpha",
        "mask-not-png",
        "text-named-png",
        "gif",
        "truncated-png",
        "file-over-the-models-limit",
        "seventeen-images",
        "no-image",
    ],
)
async def test_unusable_files_are_400_naming_the_field(
    images_stack: ImagesStack,
    http: aiohttp.ClientSession,
    files: list[tuple[str, bytes, str]],
    param: str,
) -> None:
    assert len(noise_png(900)) > LOCAL_IMAGE_MAX_FILE
    account_id, key, _ = await images_stack.new_account(OPENING)
    resp = await _post(
        images_stack, http, EDITS, key, {"model": "local-image", "prompt": "a fix"}, files
    )
    await assert_openai_error(resp, 400, "invalid_value", param=param)
    await images_stack.assert_untouched(account_id, OPENING)


async def test_a_body_over_max_upload_bytes_is_413(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    big = noise_png(1100)
    assert len(big) > MAX_UPLOAD_BYTES
    for path in (EDITS, VARIATIONS):
        resp = await _post(
            images_stack,
            http,
            path,
            key,
            {"model": "local-image", "prompt": "x"},
            [("image", big, "a.png")],
        )
        await assert_openai_error(resp, 413, "request_too_large", should_retry=False)
    await images_stack.assert_untouched(account_id, OPENING)


async def test_a_json_body_on_the_multipart_routes_is_400(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    async with http.post(
        images_stack.http_url + EDITS,
        json={"model": "local-image", "prompt": "x"},
        headers=bearer(key),
    ) as resp:
        await assert_openai_error(resp, 400, "invalid_value")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "two"}, "n"),
        ({"stream": "maybe"}, "stream"),
        ({"n": "0"}, "n"),
        ({"prompt": ""}, "prompt"),
    ],
)
async def test_bad_form_fields_are_400(
    images_stack: ImagesStack, http: aiohttp.ClientSession, fields: dict[str, str], param: str
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    resp = await _post(
        images_stack,
        http,
        EDITS,
        key,
        {"model": "local-image", "prompt": "a fix", **fields},
        [("image", picture(), "a.png")],
    )
    await assert_openai_error(resp, 400, "invalid_value", param=param)
    await images_stack.assert_untouched(account_id, OPENING)


@pytest.mark.parametrize(
    ("path", "model", "operation"),
    [
        (EDITS, "local-sketch", "edits"),
        (VARIATIONS, "local-sketch", "variations"),
        (VARIATIONS, "fake-gpt-image", "variations"),
    ],
)
async def test_a_model_without_the_operation_is_model_not_supported(
    images_stack: ImagesStack, http: aiohttp.ClientSession, path: str, model: str, operation: str
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    resp = await _post(
        images_stack,
        http,
        path,
        key,
        {"model": model, "prompt": "x"},
        [("image", picture(), "a.png")],
    )
    error = await assert_openai_error(resp, 400, "model_not_supported", param="model")
    assert operation in error["message"]
    await images_stack.assert_untouched(account_id, OPENING)


# -- variations on the local renderer -----------------------------------------------------


async def test_variations_are_distinct_and_deterministic_by_seed(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    runs = []
    for seed in ("5", "5", "6"):
        resp = await _post(
            images_stack,
            http,
            VARIATIONS,
            key,
            {"model": "local-image", "n": "2", "seed": seed, "response_format": "b64_json"},
            [("image", picture(), "photo.png")],
        )
        assert resp.status == 200, await resp.text()
        runs.append([item["b64_json"] for item in (await resp.json())["data"]])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 2
    assert runs[2] != runs[0]
    for b64 in runs[0]:
        assert _open(base64.b64decode(b64)).size == (256, 256)
    await images_stack.assert_balance(account_id, OPENING - 6 * LOCAL_IMAGE)


async def test_the_sdk_creates_variations(images_stack: ImagesStack) -> None:
    _, key, _ = await images_stack.new_account(OPENING)
    # The SDK marks create_variation deprecated; the route still serves it.
    async with images_stack.openai_client(key) as client:
        with pytest.deprecated_call():
            answer = await client.images.create_variation(
                model="local-image",
                image=("photo.jpg", picture(fmt="JPEG"), "image/jpeg"),
                n=2,
                size="512x512",
                response_format="b64_json",
            )
    assert answer.data is not None
    assert [_open(base64.b64decode(d.b64_json or "")).size for d in answer.data] == [(512, 512)] * 2


# -- an OpenAI upstream -------------------------------------------------------------------


async def test_a_dall_e_2_edit_goes_upstream_as_multipart(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    original, hole = picture(), mask()
    async with images_stack.openai_client(key) as client:
        answer = await client.images.edit(
            model="fake-dalle",
            image=("photo.png", original, "image/png"),
            mask=("mask.png", hole, "image/png"),
            prompt="a cat in the window",
            size="256x256",
            n=2,
            response_format="b64_json",
        )
    assert answer.data is not None
    assert len(answer.data) == 2
    seen = images_fake.requests[-1]
    assert seen.path == "/v1/images/edits"
    form = seen.body
    assert form.fields == {
        "model": "dall-e-2",
        "prompt": "a cat in the window",
        "n": "2",
        "size": "256x256",
        "response_format": "b64_json",
    }
    assert [p.data for p in form.files["image"]] == [original]
    assert [p.data for p in form.files["mask"]] == [hole]
    await images_stack.assert_balance(account_id, OPENING - 2 * FAKE_DALLE)


async def test_a_gpt_image_edit_sends_its_images_as_an_array(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    first, second = picture((1024, 1024)), picture((512, 512), "WEBP")
    resp = await _post(
        images_stack,
        http,
        EDITS,
        key,
        {
            "model": "fake-gpt-image",
            "prompt": "merge these",
            "background": "transparent",
            "output_format": "webp",
            "quality": "high",
            "response_format": "b64_json",
        },
        [("image[]", first, "a.png"), ("image[]", second, "b.webp")],
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["background"], body["output_format"], body["quality"]) == (
        "transparent",
        "webp",
        "high",
    )
    form = images_fake.requests[-1].body
    assert [p.data for p in form.files["image[]"]] == [first, second]
    assert form.files["image[]"][1].content_type == "image/webp"
    assert "response_format" not in form.fields
    assert (form.fields["background"], form.fields["output_format"]) == ("transparent", "webp")
    await images_stack.assert_balance(account_id, OPENING - FAKE_GPT_IMAGE)


async def test_a_dall_e_2_variation_goes_upstream(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    original = picture()
    async with images_stack.openai_client(key) as client:
        with pytest.deprecated_call():
            answer = await client.images.create_variation(
                model="fake-dalle",
                image=("photo.png", original, "image/png"),
                size="512x512",
                response_format="b64_json",
            )
    assert answer.data is not None
    assert _open(base64.b64decode(answer.data[0].b64_json or "")).size == (512, 512)
    seen = images_fake.requests[-1]
    assert seen.path == "/v1/images/variations"
    assert seen.body.fields == {
        "model": "dall-e-2",
        "n": "1",
        "size": "512x512",
        "response_format": "b64_json",
    }
    assert [p.data for p in seen.body.files["image"]] == [original]
    await images_stack.assert_balance(account_id, OPENING - FAKE_DALLE)


async def test_a_format_the_model_does_not_take_never_reaches_the_upstream(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    resp = await _post(
        images_stack,
        http,
        VARIATIONS,
        key,
        {"model": "fake-dalle"},
        [("image", picture(fmt="JPEG"), "photo.png")],
    )
    error = await assert_openai_error(resp, 400, "invalid_value", param="image")
    assert "png" in error["message"]
    assert images_fake.hits == 0
    await images_stack.assert_untouched(account_id, OPENING)


async def test_an_upstream_refusal_of_the_image_is_400_and_not_charged(
    images_stack: ImagesStack, images_fake: FakeOpenAIUpstream, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    # dall-e-2 wants a square image; the catalog leaves that to the upstream.
    resp = await _post(
        images_stack,
        http,
        EDITS,
        key,
        {"model": "fake-dalle", "prompt": "a hat"},
        [("image", picture((300, 200)), "photo.png")],
    )
    await assert_openai_error(resp, 400, "invalid_value", param="image")
    assert images_fake.hits == 1
    await images_stack.assert_not_charged(account_id, OPENING)


# -- over gRPC ---------------------------------------------------------------------------


async def test_grpc_edits_and_variations_take_raw_bytes(images_stack: ImagesStack) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    stub = images_pb2_grpc.ImageGenerationStub(images_stack.channel)
    auth = (("authorization", f"Bearer {key}"),)
    edit = [
        m
        async for m in stub.EditImages(
            images_pb2.EditImagesRequest(
                model="local-image",
                prompt="a moon",
                images=[picture(), picture(fmt="JPEG")],
                mask=mask(),
                response_format="b64_json",
            ),
            metadata=auth,
            timeout=30,
        )
    ]
    assert [m.WhichOneof("event") for m in edit] == ["image", "summary"]
    assert _open(edit[0].image.data).size == (256, 256)
    variations = [
        m
        async for m in stub.CreateImageVariations(
            images_pb2.CreateImageVariationsRequest(
                model="local-image", image=picture(), n=2, response_format="b64_json", seed=1
            ),
            metadata=auth,
            timeout=30,
        )
    ]
    assert [m.WhichOneof("event") for m in variations] == ["image", "image", "summary"]
    assert variations[-1].summary.cost_micros == 2 * LOCAL_IMAGE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EditImages(
            images_pb2.EditImagesRequest(model="local-image", prompt="no image"),
            metadata=auth,
            timeout=30,
        ).read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await images_stack.assert_balance(account_id, OPENING - 3 * LOCAL_IMAGE)


# -- a provider without the method ---------------------------------------------------------


class _GenerateOnly:
    """A provider that can only generate, as most adapters are."""

    name = "plain"

    def check(self, request: ProviderRequest) -> None:
        return None

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        return ProviderResult(images=[])

    async def aclose(self) -> None:
        return None


def test_the_router_refuses_an_operation_no_deployment_can_serve() -> None:
    catalog = load_catalog(
        {
            "edits-everywhere": {
                "provider": "plain",
                "sizes": ["256x256"],
                "operations": ["generate", "edit", "variation"],
                "price_usd": {"default": "0.01"},
            }
        },
        providers=["plain"],
    )
    model = catalog.models["edits-everywhere"]
    router = Router({"plain": _GenerateOnly()})
    request = ProviderRequest(
        upstream_model="x", prompt="p", n=1, width=256, height=256, quality="standard"
    )
    assert router.check(model, request) == list(model.deployments)
    for operation in ("edit", "variation"):
        with pytest.raises(ModelNotSupported, match=operation):
            router.check(model, request, operation)  # type: ignore[arg-type]


async def test_an_idempotent_edit_is_made_and_charged_once(
    images_stack: ImagesStack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await images_stack.new_account(OPENING)
    answers = []
    for _ in range(2):
        async with http.post(
            images_stack.http_url + EDITS,
            data=_form(
                {"model": "local-image", "prompt": "a kite", "response_format": "b64_json"},
                [("image", picture(), "a.png")],
            ),
            headers={**bearer(key), "Idempotency-Key": "edit-once"},
        ) as resp:
            assert resp.status == 200
            answers.append(await resp.json())
    assert answers[0] == answers[1]
    await images_stack.assert_balance(account_id, OPENING - LOCAL_IMAGE)
