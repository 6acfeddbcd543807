"""The S3 image store against a local S3-compatible server (moto's server mode): presigned
GET URLs with the same lifetime as the local store's, and expired images deleted."""

from __future__ import annotations

import asyncio
import contextlib
import io
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer
from PIL import Image

from imagegen_service.stores.images_s3 import S3ImageStore
from tests.conftest import bearer
from tests.stack import start_stack

BUCKET = "imagegen-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
async def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    async with get_session().create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
    ) as client:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            await client.create_bucket(Bucket=BUCKET)
        yield BUCKET


def _config(data_dir: Path, endpoint: str) -> str:
    return textwrap.dedent(
        f"""
        [service]
        data_dir = "{data_dir}"
        url_ttl_seconds = 600

        [images]
        backend = "s3"
        bucket = "{BUCKET}"
        prefix = "stack"
        endpoint_url = "{endpoint}"

        [providers.local]
        type = "local"

        [models.local-sketch]
        provider = "local"
        sizes = ["256x256", "512x512"]
        max_images = 4

        [models.local-sketch.price_usd]
        default = "0.001"
        """
    )


async def test_url_answers_are_presigned_bucket_urls_that_download(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    async with (
        start_stack(
            _config(tmp_path / "data", s3_endpoint), tmp_path, environ=CREDENTIALS
        ) as stack,
        aiohttp.ClientSession() as http,
    ):
        _, key, _ = await stack.new_account(100_000)
        answer = await http.post(
            stack.http_url + "/v1/images/generations",
            json={"model": "local-sketch", "prompt": "a pier", "size": "512x512", "n": 2},
            headers=bearer(key),
        )
        assert answer.status == 200
        urls = [item["url"] for item in (await answer.json())["data"]]
        for url in urls:
            assert url.startswith(f"{s3_endpoint}/{bucket}/stack/images/img_")
            assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url
            # The client fetches straight from the bucket; the gateway is not involved.
            async with http.get(url) as image:
                assert image.status == 200
                assert image.headers["Content-Type"] == "image/png"
                assert Image.open(io.BytesIO(await image.read())).size == (512, 512)


async def test_expired_images_and_results_are_deleted(s3_endpoint: str, bucket: str) -> None:
    # S3 keeps LastModified in whole seconds, so an object can look up to 1 s older than it is.
    store = S3ImageStore(bucket=bucket, ttl_seconds=3, prefix="expiry", endpoint_url=s3_endpoint)
    await store.start()
    try:
        await store.put(b"\x89PNG\r\n\x1a\nold", "image/png")
        ref = await store.put_blob("idem_test", b"frames")
        assert await store.get_blob(ref) == b"frames"
        assert await store.delete_expired() == 0
        await asyncio.sleep(4.2)
        await store.put(b"\x89PNG\r\n\x1a\nnew", "image/png")
        assert await store.delete_expired() == 1, "only the image past its URLs' life goes"
        await store.delete_blob(ref)
        with pytest.raises(Exception, match="expired"):
            await store.get_blob(ref)
    finally:
        await store.close()
