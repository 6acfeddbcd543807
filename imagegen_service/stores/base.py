"""The image store interface: the local directory and the S3 bucket both implement it."""

from __future__ import annotations

from typing import Protocol

from imagegen_service.stores.images_local import StoredImage


class ImageStore(Protocol):
    ttl_seconds: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, data: bytes, mime_type: str) -> str:
        """Stores an image; returns its URL (absolute, or a path under the gateway)."""
        ...

    async def get(self, token: str) -> StoredImage: ...

    async def put_blob(self, name: str, data: bytes) -> str: ...

    async def get_blob(self, ref: str) -> bytes: ...

    async def delete_blob(self, ref: str) -> None: ...

    async def delete_expired(self) -> int: ...
