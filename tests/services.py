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
