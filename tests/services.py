"""Addresses of the real services some tests need (PostgreSQL, Redis).

In CI (``CI=true``) a missing service fails the test; on a laptop it skips with a message
that says what to start.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(what: str, how: str) -> None:
    message = f"{what} is not available: {how}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@asynccontextmanager
async def scratch_postgres_database() -> AsyncIterator[str]:
    """Creates a fresh PostgreSQL database for one test and drops it afterwards."""
    import asyncpg

    base = os.environ.get("IMAGEGEN_TEST_DATABASE_URL", "")
    if not base:
        _unavailable(
            "PostgreSQL",
            "set IMAGEGEN_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test "
            "and start PostgreSQL",
        )
    try:
        admin = await asyncpg.connect(base, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _unavailable("PostgreSQL", f"cannot connect to IMAGEGEN_TEST_DATABASE_URL ({exc})")
    name = f"imagegen_test_{secrets.token_hex(6)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(base)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def scratch_redis_url() -> AsyncIterator[str]:
    """A Redis URL with a key prefix of its own is not possible, so each test gets a fresh
    logical database number that it flushes before and after use."""
    import redis.asyncio as aioredis

    base = os.environ.get("IMAGEGEN_TEST_REDIS_URL", "")
    if not base:
        _unavailable(
            "Redis", "set IMAGEGEN_TEST_REDIS_URL=redis://127.0.0.1:6379/0 and start Redis"
        )
    parts = urlsplit(base)
    url = urlunsplit(parts._replace(path=f"/{secrets.randbelow(14) + 1}"))
    client = aioredis.from_url(url, socket_connect_timeout=2)
    try:
        await client.flushdb()
    except (OSError, aioredis.RedisError) as exc:
        await client.aclose()
        _unavailable("Redis", f"cannot connect to IMAGEGEN_TEST_REDIS_URL ({exc})")
    try:
        yield url
    finally:
        await client.flushdb()
        await client.aclose()
