"""Idempotency-Key: a retried request gets the first one's result, generated and charged once.

The first request with a key claims it (in the ledger database) and runs; its answer
frames (opaque bytes, one per streamed message) are stored in the image store as one blob
and replayed to any later request with the same key and the same body, for 24 hours. The
same key with a different body is a conflict. A request that fails frees its key, so that a
retry runs again (nothing was charged). A claim left running by a process that died is
taken over once it is older than the hold expiry.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import Protocol

from imagegen_service import errors
from imagegen_service.stores.ledger_sql import Claim, LedgerStore

TTL_SECONDS = 24 * 3600
MAX_KEY_CHARS = 255
_LENGTH = struct.Struct(">I")


class BlobStore(Protocol):
    async def put_blob(self, name: str, data: bytes) -> str: ...

    async def get_blob(self, ref: str) -> bytes: ...

    async def delete_blob(self, ref: str) -> None: ...


def fingerprint(canonical_request: bytes) -> str:
    """SHA-256 of the request's canonical encoding."""
    return hashlib.sha256(canonical_request).hexdigest()


def pack(frames: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(f)) + f for f in frames)


def unpack(blob: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset < len(blob):
        (size,) = _LENGTH.unpack_from(blob, offset)
        offset += _LENGTH.size
        frames.append(blob[offset : offset + size])
        offset += size
    return frames


class IdempotencyKeys:
    def __init__(self, ledger: LedgerStore, blobs: BlobStore, *, stale_after_seconds: int) -> None:
        self.ledger = ledger
        self.blobs = blobs
        self.stale_after_seconds = stale_after_seconds

    async def claim(self, account_id: str, key: str, request_fingerprint: str) -> Claim:
        if not key or len(key) > MAX_KEY_CHARS:
            raise errors.InvalidParameter(
                f"The Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters.",
                param="Idempotency-Key",
            )
        claim = await self.ledger.claim_idempotency(
            account_id,
            key,
            request_fingerprint,
            ttl_seconds=TTL_SECONDS,
            stale_after_seconds=self.stale_after_seconds,
        )
        if claim.state == "conflict":
            raise errors.IdempotencyConflict(
                "This Idempotency-Key was already used with a different request body."
            )
        if claim.state == "running":
            raise errors.IdempotencyInProgress(
                "A request with this Idempotency-Key is still in progress; retry shortly."
            )
        return claim

    async def replay(self, claim: Claim) -> list[bytes]:
        assert claim.result_ref is not None
        return unpack(await self.blobs.get_blob(claim.result_ref))

    async def finish(self, account_id: str, key: str, frames: list[bytes]) -> None:
        name = "idem_" + hashlib.sha256(f"{account_id}\0{key}".encode()).hexdigest()
        ref = await self.blobs.put_blob(name, pack(frames))
        await self.ledger.finish_idempotency(account_id, key, ref)

    async def release(self, account_id: str, key: str) -> None:
        await self.ledger.release_idempotency(account_id, key)

    async def purge_expired(self) -> int:
        refs = await self.ledger.purge_expired_idempotency()
        for ref in refs:
            await self.blobs.delete_blob(ref)
        return len(refs)
