"""API keys (revocation takes effect at once), signed image URLs, and the model list."""

from __future__ import annotations

import hashlib
import hmac
import time
from base64 import urlsafe_b64encode

import aiohttp
import openai
import pytest

from imagegen_service.gen import admin_pb2
from tests.conftest import (
    ADMIN_METADATA,
    SIGNING_KEY,
    Stack,
    assert_openai_error,
    bearer,
    image_size,
)

GENERATIONS = "/v1/images/generations"
_BODY = {"model": "local-sketch", "prompt": "a signed picture", "size": "256x256"}


def _sign(payload: str) -> str:
    """Exactly as imagegen_service/stores/images_local.py signs tokens."""
    digest = hmac.new(SIGNING_KEY.encode(), payload.encode(), hashlib.sha256).digest()
    return urlsafe_b64encode(digest).decode().rstrip("=")


async def _image_url(stack: Stack, http: aiohttp.ClientSession) -> str:
    _, key, _ = await stack.new_account(100_000)
    async with http.post(
        stack.http_url + GENERATIONS, json={**_BODY, "response_format": "url"}, headers=bearer(key)
    ) as resp:
        assert resp.status == 200
        link: str = (await resp.json())["data"][0]["url"]
    return link


def _split(link: str) -> tuple[str, str, str, str, str]:
    """(prefix up to the token, image id, ext, expires, signature)."""
    prefix, _, token = link.rpartition("/")
    image_id, ext, expires, signature = token.split(".")
    return prefix, image_id, ext, expires, signature


# -- keys --------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_on_its_very_next_request(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, key, key_id = await stack.new_account(100_000)
    async with http.post(stack.http_url + GENERATIONS, json=_BODY, headers=bearer(key)) as resp:
        assert resp.status == 200
    revoked = await stack.revoke(key_id)
    assert revoked.id == key_id
    assert revoked.revoked > 0
    async with http.post(stack.http_url + GENERATIONS, json=_BODY, headers=bearer(key)) as resp:
        await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)
    async with http.get(stack.http_url + "/v1/models", headers=bearer(key)) as resp:
        await assert_openai_error(resp, 401, "invalid_api_key")
    # Only the first request was charged.
    await stack.assert_balance(account_id, 100_000 - 1_000)


async def test_revoking_one_key_leaves_the_accounts_other_keys_working(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    account_id, first, first_id = await stack.new_account(100_000)
    second = await stack.admin.CreateKey(
        admin_pb2.CreateKeyRequest(account_id=account_id), metadata=ADMIN_METADATA
    )
    assert second.secret != first
    await stack.revoke(first_id)
    async with http.post(
        stack.http_url + GENERATIONS, json=_BODY, headers=bearer(second.secret)
    ) as resp:
        assert resp.status == 200
    async with http.post(stack.http_url + GENERATIONS, json=_BODY, headers=bearer(first)) as resp:
        assert resp.status == 401


async def test_keys_look_like_openai_keys(stack: Stack) -> None:
    _, key, key_id = await stack.new_account(1)
    assert key.startswith("sk-ig-")
    assert len(key) >= 40
    assert key_id not in key


# -- signed URLs -------------------------------------------------------------------------


async def test_a_changed_signature_is_refused_with_404(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    link = await _image_url(stack, http)
    prefix, image_id, ext, expires, signature = _split(link)
    flipped = "B" if signature[10] == "A" else "A"
    tampered = signature[:10] + flipped + signature[11:]
    async with http.get(f"{prefix}/{image_id}.{ext}.{expires}.{tampered}") as resp:
        await assert_openai_error(resp, 404, "not_found", should_retry=False)
    # The untouched link still works.
    async with http.get(link) as resp:
        assert resp.status == 200


async def test_a_changed_expiry_is_refused_with_404(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    link = await _image_url(stack, http)
    prefix, image_id, ext, expires, signature = _split(link)
    later = int(expires) + 86_400
    async with http.get(f"{prefix}/{image_id}.{ext}.{later}.{signature}") as resp:
        await assert_openai_error(resp, 404, "not_found")


async def test_a_correctly_signed_but_expired_url_is_refused(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    link = await _image_url(stack, http)
    prefix, image_id, ext, _, _ = _split(link)
    # Control: a token we forge with a future expiry is accepted, so the forging is right
    # and only the expiry refuses the next one.
    future = int(time.time()) + 600
    forged = f"{image_id}.{ext}.{future}"
    async with http.get(f"{prefix}/{forged}.{_sign(forged)}") as resp:
        assert resp.status == 200
        assert image_size(await resp.read()) == (256, 256)
    past = int(time.time()) - 60
    expired = f"{image_id}.{ext}.{past}"
    async with http.get(f"{prefix}/{expired}.{_sign(expired)}") as resp:
        await assert_openai_error(resp, 404, "not_found")


async def test_a_url_signed_with_another_key_is_refused(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    link = await _image_url(stack, http)
    prefix, image_id, ext, expires, _ = _split(link)
    payload = f"{image_id}.{ext}.{expires}"
    digest = hmac.new(b"another-key", payload.encode(), hashlib.sha256).digest()
    signature = urlsafe_b64encode(digest).decode().rstrip("=")
    async with http.get(f"{prefix}/{payload}.{signature}") as resp:
        await assert_openai_error(resp, 404, "not_found")


async def test_a_signed_url_for_a_missing_image_is_404(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    payload = f"img_{'0' * 32}.png.{int(time.time()) + 600}"
    async with http.get(f"{stack.http_url}/v1/files/images/{payload}.{_sign(payload)}") as resp:
        await assert_openai_error(resp, 404, "not_found")


async def test_garbage_tokens_are_404(stack: Stack, http: aiohttp.ClientSession) -> None:
    for token in ["nothing", "img_x.png.1.abc", "..%2F..%2Fimagegen.db", "a" * 300]:
        async with http.get(f"{stack.http_url}/v1/files/images/{token}") as resp:
            await assert_openai_error(resp, 404, "not_found")


# -- models ------------------------------------------------------------------------------


async def test_models_lists_the_served_models_only(stack: Stack) -> None:
    _, key, _ = await stack.new_account(1)
    async with stack.openai_client(key) as client:
        page = await client.models.list()
        ids = [model.id async for model in page]
    assert {"local-sketch", "fake-dalle", "dead-model"} <= set(ids)
    assert "hidden-model" not in ids
    assert "gpt-4o" not in ids
    assert len(ids) == len(set(ids))


async def test_models_without_a_key_is_401(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.get(stack.http_url + "/v1/models") as resp:
        await assert_openai_error(resp, 401, "invalid_api_key", should_retry=False)
    async with stack.openai_client("sk-ig-not-a-real-key") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    assert caught.value.status_code == 401


async def test_models_answer_in_openai_shape(stack: Stack, http: aiohttp.ClientSession) -> None:
    _, key, _ = await stack.new_account(1)
    async with http.get(stack.http_url + "/v1/models", headers=bearer(key)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["local-sketch"] == {
        "id": "local-sketch",
        "object": "model",
        "created": 0,
        "owned_by": "imagegen",
    }
    assert by_id["fake-dalle"]["owned_by"] == "openai"


async def test_revocation_straight_in_the_database_stops_the_next_generation_and_listing(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # As `imagegen-admin keys revoke` does from another process: the service learns of it
    # only through the database, while its key cache still holds the key.
    account, key, key_id = await stack.new_account(100_000)
    body = {"model": "local-sketch", "prompt": "p", "size": "256x256"}
    url = stack.http_url + "/v1/images/generations"
    assert (await http.post(url, json=body, headers=bearer(key))).status == 200
    await stack.running.ledger.revoke_key(key_id)
    refused = await http.post(url, json=body, headers=bearer(key))
    await assert_openai_error(refused, 401, "invalid_api_key", should_retry=False)
    listing = await http.get(stack.http_url + "/v1/models", headers=bearer(key))
    await assert_openai_error(listing, 401, "invalid_api_key")
    await stack.assert_balance(account, 100_000 - 1_000)
