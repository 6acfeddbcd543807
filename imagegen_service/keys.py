"""API keys: ``sk-ig-`` plus 43 URL-safe characters (256 random bits).

Only the SHA-256 of a key is stored. With that much entropy a fast hash is safe, and it
lets authentication be one indexed lookup. The secret is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Generic, TypeVar

T = TypeVar("T")

PREFIX = "sk-ig-"


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyCache(Generic[T]):
    """Recently authenticated keys, by hash, for ``ttl_seconds``.

    Only safe where the key is checked again before any answer: the hold is placed with the
    key's id and fails for a revoked key, and a request refused before its hold looks the
    key up again (``ImagePipeline.refusal_for``), so from the moment a revocation is written
    every answer treats the key as unknown. Rate-limit overrides read from a cached key may
    lag by ``ttl_seconds``.
    """

    def __init__(self, ttl_seconds: float = 30.0, max_entries: int = 10_000) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, T]] = {}

    def get(self, key_hash: str, now: float) -> T | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < now:
            return None
        return entry[1]

    def put(self, key_hash: str, value: T, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            # Dropping everything is crude but bounded, and refills at one lookup per key.
            self._entries.clear()
        self._entries[key_hash] = (now + self.ttl_seconds, value)

    def discard(self, key_hash: str) -> None:
        self._entries.pop(key_hash, None)

    def clear(self) -> None:
        self._entries.clear()
