"""Images behind ``url``: files in a local directory, served through HMAC-signed,
expiring tokens. The gateway fetches them over gRPC (``GetImage``), so it needs no shared
disk with the service.

A token is ``<image id>.<ext>.<expires unix>.<signature>``; the signature is
HMAC-SHA256 over the first three parts with the service's signing key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import time
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from pathlib import Path

from imagegen_service import errors

MIME_BY_EXT = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXT_BY_MIME = {mime: ext for ext, mime in MIME_BY_EXT.items()}
_TOKEN = re.compile(r"^(img_[0-9a-f]{32})\.(png|jpeg|webp)\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})$")
URL_PREFIX = "/v1/files/images/"
# Images up to this size are written on the event loop's thread: a few tens of microseconds
# into the page cache, less than handing the write to a thread and back. Larger ones go to
# a thread, so that a slow disk never stalls the loop for long.
INLINE_WRITE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    mime_type: str


class LocalImageStore:
    def __init__(self, directory: Path, signing_key: bytes, ttl_seconds: int) -> None:
        self.directory = directory
        # Stored answers for Idempotency-Key replays; their expiry is the ledger's business.
        self.blob_directory = directory / "results"
        self._key = signing_key
        self.ttl_seconds = ttl_seconds
        self.blob_directory.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        """Nothing to open: the directory exists from the constructor on."""

    async def close(self) -> None:
        """Nothing to close."""

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()
        return urlsafe_b64encode(digest).decode().rstrip("=")

    async def put(self, data: bytes, mime_type: str) -> str:
        """Stores the image and returns its signed URL path (relative to the public base)."""
        ext = EXT_BY_MIME.get(mime_type, "png")
        image_id = f"img_{secrets.token_hex(16)}"
        path = self.directory / f"{image_id}.{ext}"
        if len(data) <= INLINE_WRITE_BYTES:
            _write_atomically(path, data)
        else:
            await asyncio.to_thread(_write_atomically, path, data)
        expires = int(time.time()) + self.ttl_seconds
        payload = f"{image_id}.{ext}.{expires}"
        return f"{URL_PREFIX}{payload}.{self._sign(payload)}"

    async def get(self, token: str) -> StoredImage:
        """Checks the token's signature and expiry, then returns the image."""
        match = _TOKEN.match(token)
        if not match:
            raise errors.NotFound("No such image.")
        image_id, ext, expires, signature = match.groups()
        expected = self._sign(f"{image_id}.{ext}.{expires}")
        if not hmac.compare_digest(expected, signature):
            raise errors.NotFound("No such image.")
        if int(expires) < time.time():
            raise errors.NotFound("This image URL has expired.")
        try:
            data = await asyncio.to_thread((self.directory / f"{image_id}.{ext}").read_bytes)
        except FileNotFoundError:
            raise errors.NotFound("No such image.") from None
        return StoredImage(data, MIME_BY_EXT[ext])

    async def put_blob(self, name: str, data: bytes) -> str:
        await asyncio.to_thread(_write_atomically, self._blob_path(name), data)
        return name

    async def get_blob(self, ref: str) -> bytes:
        try:
            return await asyncio.to_thread(self._blob_path(ref).read_bytes)
        except FileNotFoundError:
            raise errors.NotFound("The stored result has expired.") from None

    async def delete_blob(self, ref: str) -> None:
        self._blob_path(ref).unlink(missing_ok=True)

    def _blob_path(self, name: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", name):
            raise ValueError(f"bad blob name {name!r}")
        return self.blob_directory / name

    async def delete_expired(self) -> int:
        """Deletes files whose every URL has expired (older than the URL lifetime)."""
        return await asyncio.to_thread(self._delete_older_than, time.time() - self.ttl_seconds)

    def _delete_older_than(self, cutoff: float) -> int:
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.name.startswith("img_") and entry.stat().st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
