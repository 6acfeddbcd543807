"""Accounts, API keys and the ledger in SQL: SQLite (the default) or PostgreSQL.

The ledger rule: every change to an account's ``available_micros`` / ``held_micros`` is
written in the same transaction as a ledger entry carrying exactly that change, so the
entries always sum to the balance. Holds are placed with one conditional UPDATE
(``available >= amount``), which both backends serialise per account row, so concurrent
requests can never overdraw an account.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from imagegen_service import errors
from imagegen_service.stores.schema import (
    accounts,
    api_keys,
    holds,
    idempotency_records,
    ledger_entries,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database's schema is not the one this code needs."""


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    available_micros: int
    held_micros: int
    created: int


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    account_id: str
    created: int
    revoked: int | None
    # Per-key overrides of the configured rate limits.
    requests_per_minute: int | None = None
    images_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """What an Idempotency-Key lookup found: "new" (this request runs and owns the key),
    "done" (replay ``result_ref``), "conflict" (another body), "running" (in flight)."""

    state: str
    result_ref: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    account_id: str
    kind: str
    available_delta_micros: int
    held_delta_micros: int
    hold_id: str | None
    request_id: str
    note: str
    created: int


@dataclass(frozen=True, slots=True)
class Hold:
    id: str
    account_id: str
    amount_micros: int


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def async_url(database_url: str) -> str:
    """Maps the operator's URL (sqlite:///..., postgresql://...) to an asyncio driver."""
    if database_url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + database_url.removeprefix("sqlite:///")
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url.removeprefix(prefix)
    if database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return database_url
    raise ValueError("database URL must start with sqlite:/// or postgresql://")


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    path = url.removeprefix("sqlite+aiosqlite:///")
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, pool_size=4, max_overflow=8)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself, so writers can ask for
        # IMMEDIATE and never hit a lock upgrade deadlock.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class LedgerStore:
    """The one place that reads and writes accounts, keys, holds and ledger entries."""

    def __init__(self, database_url: str) -> None:
        url = async_url(database_url)
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            # WAL readers never block, so reads get a plain BEGIN; writers take the lock
            # up front with BEGIN IMMEDIATE.
            self._write = _sqlite_engine(url, immediate=True)
            self._read = _sqlite_engine(url, immediate=False)
        else:
            self._write = create_async_engine(url, pool_size=10, max_overflow=10)
            self._read = self._write

    async def close(self) -> None:
        await self._write.dispose()
        if self._read is not self._write:
            await self._read.dispose()

    # -- schema -------------------------------------------------------------------------

    def _alembic(self) -> AlembicConfig:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        return cfg

    async def upgrade(self) -> str:
        """Brings the schema to the newest revision; returns that revision."""
        cfg = self._alembic()

        def run(conn: sa.Connection) -> None:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

        async with self._write.begin() as conn:
            await conn.run_sync(run)
        return self.head_revision()

    def head_revision(self) -> str:
        head = ScriptDirectory.from_config(self._alembic()).get_current_head()
        assert head is not None
        return head

    async def current_revision(self) -> str | None:
        def read(conn: sa.Connection) -> str | None:
            return MigrationContext.configure(conn).get_current_revision()

        async with self._read.connect() as conn:
            return await conn.run_sync(read)

    async def check_schema(self) -> None:
        current, head = await self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutOfDate(
                f"the database schema is at revision {current or 'none'}, this version needs "
                f"{head}; run `imagegen-admin db upgrade` with the same configuration"
            )

    # -- accounts -----------------------------------------------------------------------

    async def create_account(self, name: str, initial_micros: int = 0) -> Account:
        if initial_micros < 0:
            raise errors.InvalidParameter("The initial balance must not be negative.")
        now = int(time.time())
        account_id = new_id("acct")
        async with self._write.begin() as conn:
            await conn.execute(
                accounts.insert().values(
                    id=account_id,
                    name=name,
                    available_micros=initial_micros,
                    held_micros=0,
                    created_at=now,
                )
            )
            if initial_micros:
                await self._entry(conn, account_id, "credit", initial_micros, 0, note="opening")
        return Account(account_id, name, initial_micros, 0, now)

    async def get_account(self, account_id: str) -> Account:
        async with self._read.connect() as conn:
            row = (await conn.execute(accounts.select().where(accounts.c.id == account_id))).first()
        if row is None:
            raise errors.NotFound(f"No account '{account_id}'.")
        return Account(row.id, row.name, row.available_micros, row.held_micros, row.created_at)

    async def credit(self, account_id: str, amount_micros: int, note: str = "") -> Account:
        if amount_micros <= 0:
            raise errors.InvalidParameter("A credit must be positive.", param="amount")
        async with self._write.begin() as conn:
            result = await conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(available_micros=accounts.c.available_micros + amount_micros)
            )
            if result.rowcount != 1:
                raise errors.NotFound(f"No account '{account_id}'.")
            await self._entry(conn, account_id, "credit", amount_micros, 0, note=note)
        return await self.get_account(account_id)

    # -- keys ---------------------------------------------------------------------------

    async def create_key(self, account_id: str, key_hash: str) -> ApiKey:
        await self.get_account(account_id)
        now = int(time.time())
        key_id = new_id("key")
        async with self._write.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=key_id, account_id=account_id, key_hash=key_hash, created_at=now
                )
            )
        return ApiKey(key_id, account_id, now, None)

    async def revoke_key(self, key_id: str) -> ApiKey:
        now = int(time.time())
        async with self._write.begin() as conn:
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = (await conn.execute(api_keys.select().where(api_keys.c.id == key_id))).first()
        if row is None:
            raise errors.NotFound(f"No API key '{key_id}'.")
        return _key(row)

    async def set_key_limits(
        self, key_id: str, requests_per_minute: int | None, images_per_minute: int | None
    ) -> ApiKey:
        """Sets (or with None clears) a key's own rate limits."""
        async with self._write.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id)
                .values(
                    requests_per_minute=requests_per_minute, images_per_minute=images_per_minute
                )
            )
            if result.rowcount != 1:
                raise errors.NotFound(f"No API key '{key_id}'.")
            row = (await conn.execute(api_keys.select().where(api_keys.c.id == key_id))).one()
        return _key(row)

    async def find_active_key(self, key_hash: str) -> ApiKey | None:
        async with self._read.connect() as conn:
            row = (
                await conn.execute(
                    api_keys.select().where(
                        api_keys.c.key_hash == key_hash, api_keys.c.revoked_at.is_(None)
                    )
                )
            ).first()
        return None if row is None else _key(row)

    # -- idempotency ----------------------------------------------------------------------

    async def claim_idempotency(
        self,
        account_id: str,
        key: str,
        fingerprint: str,
        *,
        ttl_seconds: int,
        stale_after_seconds: int,
    ) -> Claim:
        """Looks the key up and, when it is free (new, expired, or left running by a process
        that died), claims it for this request, all in one transaction."""
        now = int(time.time())
        where = (
            idempotency_records.c.account_id == account_id,
            idempotency_records.c.idempotency_key == key,
        )
        for _ in range(2):
            try:
                async with self._write.begin() as conn:
                    row = (await conn.execute(idempotency_records.select().where(*where))).first()
                    reusable = (
                        row is None
                        or row.expires_at < now
                        or (row.status == "running" and row.created_at < now - stale_after_seconds)
                    )
                    if not reusable:
                        assert row is not None
                        if row.fingerprint != fingerprint:
                            return Claim("conflict")
                        if row.status == "done":
                            return Claim("done", row.result_ref)
                        return Claim("running")
                    if row is not None:
                        await conn.execute(idempotency_records.delete().where(*where))
                    await conn.execute(
                        idempotency_records.insert().values(
                            account_id=account_id,
                            idempotency_key=key,
                            fingerprint=fingerprint,
                            status="running",
                            created_at=now,
                            expires_at=now + ttl_seconds,
                        )
                    )
                return Claim("new")
            except sa.exc.IntegrityError:
                # A concurrent request with the same key inserted first: read again.
                continue
        return Claim("running")

    async def finish_idempotency(self, account_id: str, key: str, result_ref: str) -> None:
        async with self._write.begin() as conn:
            await conn.execute(
                idempotency_records.update()
                .where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.idempotency_key == key,
                )
                .values(status="done", result_ref=result_ref)
            )

    async def release_idempotency(self, account_id: str, key: str) -> None:
        """Frees a key whose request failed, so that a retry runs again."""
        async with self._write.begin() as conn:
            await conn.execute(
                idempotency_records.delete().where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.idempotency_key == key,
                    idempotency_records.c.status == "running",
                )
            )

    async def purge_expired_idempotency(self, now: int | None = None) -> list[str]:
        """Deletes expired records; returns the result references to delete with them."""
        cutoff = int(time.time()) if now is None else now
        async with self._write.begin() as conn:
            refs = (
                (
                    await conn.execute(
                        sa.select(idempotency_records.c.result_ref).where(
                            idempotency_records.c.expires_at < cutoff
                        )
                    )
                )
                .scalars()
                .all()
            )
            await conn.execute(
                idempotency_records.delete().where(idempotency_records.c.expires_at < cutoff)
            )
        return [ref for ref in refs if ref]

    # -- holds --------------------------------------------------------------------------

    async def place_hold(
        self, account_id: str, amount_micros: int, *, request_id: str, ttl_seconds: int
    ) -> Hold:
        """Moves ``amount_micros`` from available to held, or raises InsufficientBalance."""
        now = int(time.time())
        hold_id = new_id("hold")
        async with self._write.begin() as conn:
            result = await conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id, accounts.c.available_micros >= amount_micros)
                .values(
                    available_micros=accounts.c.available_micros - amount_micros,
                    held_micros=accounts.c.held_micros + amount_micros,
                )
            )
            if result.rowcount != 1:
                raise errors.InsufficientBalance(
                    "Your balance is too low for this request. Top up the account and retry."
                )
            await conn.execute(
                holds.insert().values(
                    id=hold_id,
                    account_id=account_id,
                    amount_micros=amount_micros,
                    status="open",
                    request_id=request_id,
                    created_at=now,
                    expires_at=now + ttl_seconds,
                )
            )
            await self._entry(
                conn, account_id, "hold", -amount_micros, amount_micros, hold_id, request_id
            )
        return Hold(hold_id, account_id, amount_micros)

    async def settle_hold(self, hold: Hold, capture_micros: int, *, request_id: str) -> bool:
        """Captures ``capture_micros`` of the hold and releases the rest, once.

        Returns False when the hold was already settled (for example released on expiry),
        in which case nothing moves.
        """
        if not 0 <= capture_micros <= hold.amount_micros:
            raise ValueError("capture must lie between 0 and the held amount")
        release = hold.amount_micros - capture_micros
        async with self._write.begin() as conn:
            closed = await conn.execute(
                holds.update()
                .where(holds.c.id == hold.id, holds.c.status == "open")
                .values(status="settled", captured_micros=capture_micros)
            )
            if closed.rowcount != 1:
                return False
            await conn.execute(
                accounts.update()
                .where(accounts.c.id == hold.account_id)
                .values(
                    available_micros=accounts.c.available_micros + release,
                    held_micros=accounts.c.held_micros - hold.amount_micros,
                )
            )
            if capture_micros:
                await self._entry(
                    conn, hold.account_id, "capture", 0, -capture_micros, hold.id, request_id
                )
            if release:
                await self._entry(
                    conn, hold.account_id, "release", release, -release, hold.id, request_id
                )
        return True

    async def release_expired_holds(self, now: int | None = None) -> int:
        """Releases every open hold past its expiry (a process died mid-request)."""
        cutoff = int(time.time()) if now is None else now
        async with self._read.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        holds.c.id, holds.c.account_id, holds.c.amount_micros, holds.c.request_id
                    ).where(holds.c.status == "open", holds.c.expires_at < cutoff)
                )
            ).all()
        released = 0
        for row in rows:
            hold = Hold(row.id, row.account_id, row.amount_micros)
            if await self.settle_hold(hold, 0, request_id=row.request_id):
                released += 1
        return released

    # -- ledger -------------------------------------------------------------------------

    async def ledger(self, account_id: str, limit: int = 100) -> Sequence[LedgerEntry]:
        await self.get_account(account_id)
        async with self._read.connect() as conn:
            rows = (
                await conn.execute(
                    ledger_entries.select()
                    .where(ledger_entries.c.account_id == account_id)
                    .order_by(ledger_entries.c.id.desc())
                    .limit(limit)
                )
            ).all()
        return [
            LedgerEntry(
                r.id,
                r.account_id,
                r.kind,
                r.available_delta_micros,
                r.held_delta_micros,
                r.hold_id,
                r.request_id,
                r.note,
                r.created_at,
            )
            for r in rows
        ]

    async def ledger_sums(self, account_id: str) -> tuple[int, int]:
        """Sums of the account's entries: (available, held). Equal to the balance, always."""
        async with self._read.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        sa.func.coalesce(sa.func.sum(ledger_entries.c.available_delta_micros), 0),
                        sa.func.coalesce(sa.func.sum(ledger_entries.c.held_delta_micros), 0),
                    ).where(ledger_entries.c.account_id == account_id)
                )
            ).one()
        return int(row[0]), int(row[1])

    async def _entry(
        self,
        conn: AsyncConnection,
        account_id: str,
        kind: str,
        available_delta: int,
        held_delta: int,
        hold_id: str | None = None,
        request_id: str = "",
        note: str = "",
    ) -> None:
        await conn.execute(
            ledger_entries.insert().values(
                account_id=account_id,
                kind=kind,
                available_delta_micros=available_delta,
                held_delta_micros=held_delta,
                hold_id=hold_id,
                request_id=request_id[:128],
                note=note[:500],
                created_at=int(time.time()),
            )
        )


def _key(row: Any) -> ApiKey:
    return ApiKey(
        row.id,
        row.account_id,
        row.created_at,
        row.revoked_at,
        row.requests_per_minute,
        row.images_per_minute,
    )


async def open_store(database_url: str, *, migrate_sqlite: bool = True) -> LedgerStore:
    """Opens the store and makes sure its schema is current.

    The embedded SQLite database is brought up to date automatically; PostgreSQL is
    migrated only by ``imagegen-admin db upgrade``, so several replicas never race.
    """
    store = LedgerStore(database_url)
    try:
        if store.dialect == "sqlite" and migrate_sqlite:
            await store.upgrade()
        await store.check_schema()
    except BaseException:
        await store.close()
        raise
    return store
