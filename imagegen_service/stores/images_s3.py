"""Images behind ``url`` in an S3-compatible bucket, handed out as presigned GET URLs that
expire like the local store's signed ones. Any replica can serve any image, and the
gateway never proxies the bytes: clients fetch them from the bucket directly.

Credentials come from botocore's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
a web identity token on Kubernetes, an instance profile).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from imagegen_service import errors
from imagegen_service.stores.images_local import EXT_BY_MIME, StoredImage

IMAGES = "images/"
RESULTS = "results/"


class S3ImageStore:
    def __init__(
        self,
        *,
        bucket: str,
        ttl_seconds: int,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.bucket = bucket
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._endpoint_url = endpoint_url or None
        self._region = region
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self._endpoint_url,
                region_name=self._region,
                config=AioConfig(
                    signature_version="s3v4",
                    retries={"max_attempts": 3, "mode": "standard"},
                    # Path style works with every S3-compatible server (MinIO, moto, Ceph).
                    s3={"addressing_style": "path"},
                ),
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def put(self, data: bytes, mime_type: str) -> str:
        key = (
            f"{self.prefix}{IMAGES}img_{secrets.token_hex(16)}.{EXT_BY_MIME.get(mime_type, 'png')}"
        )
        await self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=mime_type)
        url: str = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.ttl_seconds,
        )
        return url

    async def get(self, token: str) -> StoredImage:
        # S3 URLs point at the bucket itself; nothing is served through the gateway.
        raise errors.NotFound("No such image.")

    async def put_blob(self, name: str, data: bytes) -> str:
        key = f"{self.prefix}{RESULTS}{name}"
        await self._client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return key

    async def get_blob(self, ref: str) -> bytes:
        try:
            answer = await self._client.get_object(Bucket=self.bucket, Key=ref)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise errors.NotFound("The stored result has expired.") from None
            raise
        async with answer["Body"] as body:
            data: bytes = await body.read()
        return data

    async def delete_blob(self, ref: str) -> None:
        await self._client.delete_object(Bucket=self.bucket, Key=ref)

    async def delete_expired(self) -> int:
        """Deletes images older than the URL lifetime: no presigned URL can reach them."""
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.ttl_seconds)
        paginator = self._client.get_paginator("list_objects_v2")
        removed = 0
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + IMAGES):
            stale = [
                {"Key": item["Key"]}
                for item in page.get("Contents", [])
                if item["LastModified"] < cutoff
            ]
            for start in range(0, len(stale), 1000):
                batch = stale[start : start + 1000]
                await self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                removed += len(batch)
        return removed
