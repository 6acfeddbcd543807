"""API keys: ``sk-ig-`` plus 43 URL-safe characters (256 random bits).

Only the SHA-256 of a key is stored. With that much entropy a fast hash is safe, and it
lets authentication be one indexed lookup. The secret is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets

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
