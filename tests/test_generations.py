"""POST /v1/images/generations end to end, through the official openai SDK and raw HTTP."""

from __future__ import annotations

import base64

import aiohttp
import pytest

from tests.conftest import LOCAL_256, LOCAL_DEFAULT, LOCAL_HD, Stack, bearer, image_size


async def test_b64_json_returns_a_png_of_exactly_the_requested_size(stack: Stack) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    async with stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="local-sketch",
            prompt="a lighthouse on a cliff",
            size="512x512",
            response_format="b64_json",
        )
    assert answer.data is not None
    assert len(answer.data) == 1
    item = answer.data[0]
    assert item.url is None
    assert item.b64_json is not None
    assert image_size(base64.b64decode(item.b64_json)) == (512, 512)
    assert item.revised_prompt == "a lighthouse on a cliff"
    assert answer.created > 0


async def test_url_is_absolute_and_downloads_through_the_gateway(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    async with stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="local-sketch", prompt="a red barn", size="1024x1536", response_format="url"
        )
    assert answer.data is not None
    assert len(answer.data) == 1
    link = answer.data[0].url
    assert link is not None
    assert answer.data[0].b64_json is None
    assert link.startswith(stack.http_url + "/v1/files/images/")
    # The link is its own authorization: no API key is sent.
    async with http.get(link) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        assert resp.headers.get("x-request-id")
        data = await resp.read()
    assert int(resp.headers["Content-Length"]) == len(data)
    assert image_size(data) == (1024, 1536)


async def test_url_is_the_default_response_format(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    async with http.post(
        stack.http_url + "/v1/images/generations",
        json={"model": "local-sketch", "prompt": "a quiet harbour", "size": "256x256"},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert set(body["data"][0]) == {"url", "revised_prompt"}
    async with http.get(body["data"][0]["url"]) as resp:
        assert resp.status == 200
        assert image_size(await resp.read()) == (256, 256)


async def test_several_images_in_one_request_each_have_the_requested_size(
    stack: Stack,
) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    async with stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="local-sketch",
            prompt="three different sketches",
            n=3,
            size="512x512",
            response_format="b64_json",
        )
    assert answer.data is not None
    assert len(answer.data) == 3
    pictures = [base64.b64decode(item.b64_json or "") for item in answer.data]
    assert [image_size(p) for p in pictures] == [(512, 512)] * 3
    # One seed per image: these are three pictures, not one picture three times.
    assert len(set(pictures)) == 3


async def test_several_urls_in_one_request_all_download(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    async with stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="local-sketch", prompt="a pair", n=2, size="256x256", response_format="url"
        )
    assert answer.data is not None
    links = [item.url for item in answer.data]
    assert len(links) == 2
    assert len(set(links)) == 2
    for link in links:
        assert link is not None
        async with http.get(link) as resp:
            assert resp.status == 200
            assert image_size(await resp.read()) == (256, 256)


@pytest.mark.parametrize("size", ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536"])
async def test_every_local_sketch_size_is_served_exactly(stack: Stack, size: str) -> None:
    _, key, _ = await stack.new_account(1_000_000)
    async with stack.openai_client(key) as client:
        answer = await client.images.generate(
            model="local-sketch", prompt="a size check", size=size, response_format="b64_json"
        )
    assert answer.data is not None
    width, height = (int(side) for side in size.split("x"))
    assert image_size(base64.b64decode(answer.data[0].b64_json or "")) == (width, height)


async def test_ten_large_pngs_in_one_request_fit_through_grpc(stack: Stack) -> None:
    account_id, key, _ = await stack.new_account(1_000_000)
    async with stack.openai_client(key, timeout=60) as client:
        answer = await client.images.generate(
            model="local-sketch",
            prompt="a crowded market at dusk, gold and crimson",
            n=10,
            size="1536x1024",
            response_format="b64_json",
        )
    assert answer.data is not None
    assert len(answer.data) == 10
    for item in answer.data:
        assert image_size(base64.b64decode(item.b64_json or "")) == (1536, 1024)
    await stack.assert_balance(account_id, 1_000_000 - 10 * LOCAL_DEFAULT)


@pytest.mark.parametrize(
    ("size", "quality", "style", "price"),
    [
        ("512x512", "hd", "natural", LOCAL_HD),
        ("512x512", "standard", "vivid", LOCAL_DEFAULT),
        ("256x256", "standard", "natural", LOCAL_256),
        ("256x256", None, None, LOCAL_256),
        # The documented precedence is "SIZE/QUALITY", "SIZE", "*/QUALITY", "default":
        # the "256x256" price wins over "*/hd".
        ("256x256", "hd", "vivid", LOCAL_256),
    ],
)
async def test_quality_and_style_are_accepted_and_priced(
    stack: Stack,
    http: aiohttp.ClientSession,
    size: str,
    quality: str | None,
    style: str | None,
    price: int,
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    body: dict[str, object] = {
        "model": "local-sketch",
        "prompt": "a watercolour fox",
        "size": size,
        "response_format": "b64_json",
    }
    if quality is not None:
        body["quality"] = quality
    if style is not None:
        body["style"] = style
    async with http.post(
        stack.http_url + "/v1/images/generations", json=body, headers=bearer(key)
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()
    width, height = (int(side) for side in size.split("x"))
    assert image_size(base64.b64decode(answer["data"][0]["b64_json"])) == (width, height)
    await stack.assert_balance(account_id, 100_000 - price)


async def test_default_size_is_the_models_default(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, _ = await stack.new_account(100_000)
    async with http.post(
        stack.http_url + "/v1/images/generations",
        json={"model": "local-sketch", "prompt": "no size given", "response_format": "b64_json"},
        headers=bearer(key),
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert image_size(base64.b64decode(answer["data"][0]["b64_json"])) == (1024, 1024)
    await stack.assert_balance(account_id, 100_000 - LOCAL_DEFAULT)


async def test_the_same_seed_gives_the_same_picture(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, key, _ = await stack.new_account(100_000)
    pictures = []
    for _ in range(2):
        async with http.post(
            stack.http_url + "/v1/images/generations",
            json={
                "model": "local-sketch",
                "prompt": "a reproducible tree",
                "size": "256x256",
                "response_format": "b64_json",
                "seed": 42,
            },
            headers=bearer(key),
        ) as resp:
            assert resp.status == 200
            pictures.append((await resp.json())["data"][0]["b64_json"])
    assert pictures[0] == pictures[1]
