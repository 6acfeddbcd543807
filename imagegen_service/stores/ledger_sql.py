"""Accounts, API keys and the ledger in SQL: SQLite (the default) or PostgreSQL.

The ledger rule: every change to an account's ``available_micros`` / ``held_micros`` is
written in the same transaction as a ledger entry carrying exactly that change, so the
entries always sum to the balance. Holds are placed with one conditional UPDATE
(``available >= amount``), which both backends serialise per account row, so concurrent
requests can never overdraw an account.

Every operation is one transaction written once, as a plain function of a SQLAlchemy
``Connection``, and run by a backend runner. For SQLite, writes are group-committed on the
event loop's own thread: the writes that arrive during one turn of the loop go together in
one transaction, each in its own savepoint, so one refused hold never undoes another; a
write lock held by another process sends the batch to a writer thread instead, so the loop
never waits for it; reads run on a reader thread. For PostgreSQL, a hold and a settlement
are one statement each, sent straight to asyncpg (``_PG_HOLD``, ``_PG_SETTLE``); every other
operation runs on SQLAlchemy's asyncpg pool through ``run_sync``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import asyncpg
import orjson
import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from imagegen_service import errors
from imagegen_service.stores.schema import (
    accounts,
    api_keys,
    holds,
    idempotency_records,
    ledger_entries,
)

# Caller-supplied credit ids (migration 0003): a credit made with one is applied once.
credits = sa.Table(
    "credits",
    sa.MetaData(),
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("account_id", sa.String(40), nullable=False),
    sa.Column("amount_micros", sa.BigInteger, nullable=False),
    sa.Column("entry_id", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
MAX_CREDIT_ID_CHARS = 100
MAX_PAGE_SIZE = 1000

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
T = TypeVar("T")
log = structlog.get_logger("imagegen.ledger")

# The per-request statements, as text built once: they run twice per generation, and
# SQLAlchemy's expression construction and cache-key work cost more than SQLite itself.
# The administrative operations below use the expression language.
_HOLD = sa.text(
    "UPDATE accounts SET available_micros = available_micros - :amount, "
    "held_micros = held_micros + :amount "
    "WHERE id = :account_id AND available_micros >= :amount"
)
_HOLD_FOR_ACTIVE_KEY = sa.text(
    "UPDATE accounts SET available_micros = available_micros - :amount, "
    "held_micros = held_micros + :amount "
    "WHERE id = :account_id AND available_micros >= :amount AND EXISTS ("
    "SELECT 1 FROM api_keys WHERE id = :key_id AND account_id = :account_id "
    "AND revoked_at IS NULL)"
)
_INSERT_HOLD = sa.text(
    "INSERT INTO holds (id, account_id, amount_micros, status, request_id, created_at, "
    "expires_at) VALUES (:id, :account_id, :amount, 'open', :request_id, :now, :expires_at)"
)
_CLOSE_HOLD = sa.text(
    "UPDATE holds SET status = 'settled', captured_micros = :capture "
    "WHERE id = :id AND status = 'open'"
)
_SETTLE_ACCOUNT = sa.text(
    "UPDATE accounts SET available_micros = available_micros + :release, "
    "held_micros = held_micros - :amount WHERE id = :account_id"
)
_INSERT_ENTRY = sa.text(
    "INSERT INTO ledger_entries (account_id, kind, available_delta_micros, held_delta_micros, "
    "hold_id, request_id, note, created_at) "
    "VALUES (:account_id, :kind, :available, :held, :hold_id, :request_id, :note, :now)"
)
_ACTIVE_KEY = sa.text(
    "SELECT id, account_id, created_at, revoked_at, requests_per_minute, images_per_minute "
    "FROM api_keys WHERE key_hash = :key_hash AND revoked_at IS NULL"
)


# The same statements as plain SQL for the SQLite writer's fast path (_FastConnection).
_PLAIN_SQL: dict[sa.TextClause, str] = {
    statement: statement.text
    for statement in (
        _HOLD,
        _HOLD_FOR_ACTIVE_KEY,
        _INSERT_HOLD,
        _CLOSE_HOLD,
        _SETTLE_ACCOUNT,
        _INSERT_ENTRY,
    )
}


_TOO_LOW = "Your balance is too low for this request. Top up the account and retry."


# Seconds to wait for a PostgreSQL connection before giving up.
CONNECT_TIMEOUT_SECONDS = 10.0


def is_database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is the database gone away or unreachable (a connection refused, reset
    or timed out; a server out of connection slots; SQLite's file unusable) rather than a
    bug in a statement."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            ConnectionError
            | TimeoutError
            | socket.gaierror
            | asyncpg.PostgresConnectionError
            | asyncpg.ConnectionDoesNotExistError
            | asyncpg.CannotConnectNowError
            | asyncpg.TooManyConnectionsError
            | sa.exc.DisconnectionError,
        ):
            return True
        if isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sqlite3.OperationalError) and "unable to open" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


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
    credit_id: str = ""


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_token`` is empty on the last page."""

    items: list[T]
    next_token: str


def _page_token(kind: str, *position: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([kind, *position])).decode().rstrip("=")


def _in_creation_order(
    query: sa.Select[Any], table: sa.Table, after: list[Any] | None
) -> sa.Select[Any]:
    """``query`` in creation order (time, then id), from just past ``after``, a page
    token's (created_at, id)."""
    query = query.order_by(table.c.created_at, table.c.id)
    if after is None:
        return query
    created_at, row_id = after
    return query.where(
        sa.or_(
            table.c.created_at > created_at,
            sa.and_(table.c.created_at == created_at, table.c.id > row_id),
        )
    )


def _page_position(kind: str, token: str, types: tuple[type, ...]) -> list[Any] | None:
    """Where a page token says the previous page ended; None for the first page."""
    if not token:
        return None
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != len(types) + 1
        or decoded[0] != kind
        or not all(type(v) is t for v, t in zip(decoded[1:], types, strict=True))
    ):
        raise errors.InvalidParameter(
            "The page_token is not one this listing gave.", param="page_token"
        )
    return decoded[1:]


def _page_size(page_size: int) -> int:
    size = page_size or 100
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise errors.InvalidParameter(
            f"page_size must be between 1 and {MAX_PAGE_SIZE}.", param="page_size"
        )
    return size


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


class _Runner(Protocol):
    dialect: str

    async def write(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def write_alone(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def read(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def close(self) -> None: ...


class _FastConnection:
    """The batch's SQLAlchemy ``Connection``, with the per-request text statements sent
    straight to the sqlite3 connection underneath, in the same transaction.

    SQLAlchemy's execution path (execution context, result wrapping, events) costs several
    times what SQLite takes to run these few-row statements; the transaction functions only
    read ``rowcount`` from them. Every other statement goes through SQLAlchemy as usual.
    """

    __slots__ = ("_conn", "_raw")

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn
        self._raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]

    def execute(self, statement: Any, parameters: Any = None) -> Any:
        sql = _PLAIN_SQL.get(statement) if isinstance(statement, sa.TextClause) else None
        if sql is None:
            return self._conn.execute(statement, parameters)
        try:
            return self._raw.execute(sql, parameters or {})
        except sqlite3.Error as exc:
            # The same exception types as through SQLAlchemy (IntegrityError, ...).
            raise sa.exc.DBAPIError.instance(sql, parameters, exc, sqlite3.Error) from exc

    @property
    def raw(self) -> sqlite3.Connection:
        return self._raw

    def commit(self) -> None:
        """Ends the transaction begun in plain SQL, through SQLAlchemy when one of the
        writes made it start its own (bookkeeping) transaction, so it stays in step."""
        if self._conn.in_transaction():
            self._conn.commit()
        if self._raw.in_transaction:
            self._raw.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.in_transaction():
            self._conn.rollback()
        if self._raw.in_transaction:
            self._raw.execute("ROLLBACK")

    def savepoint(self) -> None:
        self._raw.execute("SAVEPOINT batch_item")

    def release(self) -> None:
        self._raw.execute("RELEASE batch_item")

    def rollback_to(self) -> None:
        self._raw.execute("ROLLBACK TO batch_item")
        self._raw.execute("RELEASE batch_item")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another process holds the write lock."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    code = getattr(orig, "sqlite_errorcode", None)
    return isinstance(orig, sqlite3.OperationalError) and code is not None and code & 0xFF in (5, 6)


class _Busy(Exception):
    """The inline attempt found the database locked by another process."""


class _SqliteRunner:
    """SQLite: writes group-committed on the event loop's thread, reads on a reader thread.

    A write is a few small statements and a commit without fsync (WAL, synchronous=NORMAL):
    tens of microseconds, less than handing it to a thread and back. So writes run on the
    event loop's own thread: those that arrive during one turn of the loop go in one
    transaction at the end of it, each in its own savepoint, so that one refused hold never
    undoes another. While generations are waiting for their upstreams (``at_upstream``),
    a write waits for them too, BATCH_WAIT_SECONDS at most: each comes back at a turn of
    its own, and their settlements went one per commit.

    The loop's connection never waits for a lock (busy_timeout 0): when another process (a
    replica, ``imagegen-admin``) holds SQLite's write lock, the batch goes to a writer
    thread whose connection waits for it, and the loop carries on. Checkpoints, which
    write the database file and fsync it, run on that thread too, never on the loop.
    """

    dialect = "sqlite"
    # Inline commits between two checkpoints (SQLite's own default is ~1000 WAL pages;
    # a generation's two writes append a handful of pages each).
    CHECKPOINT_EVERY = 200
    # The WAL's size past which the next checkpoint makes the writes wait for it, so that
    # the WAL starts over, when the writes come one at a time.
    WAL_RESTART_BYTES = 32 * 1024 * 1024
    # The longest a write waits for those of generations still at their upstreams
    # (uvloop's timers count whole milliseconds).
    BATCH_WAIT_SECONDS = 0.001
    # Of a database this runner creates. A commit writes each page it changed whole to the
    # WAL (about six per write here), and checkpoints copy them back: with 1 KiB pages
    # instead of SQLite's 4 KiB, a hold and its settlement cost 15-25% less CPU (commits
    # and checkpoints), on a ledger of a few rows or of 300,000 generations. A database
    # made with another page size keeps it.
    PAGE_SIZE = 1024

    def __init__(self, path: str) -> None:
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ledger-read")
        # Touched only on the event loop's thread.
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        # A flush is due: at the loop's next turn, or when _waiting fires.
        self._scheduled = False
        self._waiting: asyncio.TimerHandle | None = None
        # Generations waiting for their upstreams, each with a settlement to write after.
        self._at_upstream = 0
        # The writer thread has a batch or a checkpoint: new writes wait in _pending.
        self._in_thread = False
        self._commits = 0
        # A checkpoint is running; the size of the WAL at the last one; commits of more
        # than one write since then.
        self._checkpointing = False
        self._wal_bytes = 0
        self._shared_commits = 0
        # The file's page size, read by the first checkpoint (on the writer thread).
        self._page_size = 0
        # close() waits on it for the writes still queued or running.
        self._drained: asyncio.Future[None] | None = None
        self._write_engine = self._engine(path, begin="BEGIN IMMEDIATE", busy_ms=30000)
        self._read_engine = self._engine(path, begin="BEGIN", busy_ms=30000)
        # The loop's own connection, open for the runner's life. Its transactions are
        # begun and committed in plain SQL (_write_inline): SQLAlchemy's begin/commit
        # machinery cost more than SQLite's commit itself.
        self._inline_engine = self._engine(path, begin=None, busy_ms=0, autocheckpoint=False)
        self._inline: _FastConnection | None = None

    @staticmethod
    def _engine(
        path: str, *, begin: str | None, busy_ms: int, autocheckpoint: bool = True
    ) -> sa.Engine:
        """``begin``: the statement SQLAlchemy's transactions start with; None leaves
        BEGIN and COMMIT to the caller (SQLAlchemy's transaction is then bookkeeping)."""
        # One connection per engine, used by one thread at a time.
        engine = sa.create_engine(
            f"sqlite:///{path}",
            poolclass=sa.pool.StaticPool,
            connect_args={"check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let the "begin" event issue BEGIN itself, so the writer can take the lock up
            # front (IMMEDIATE) and never hit a lock upgrade deadlock with other processes.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            # Only a database not yet created takes it (then kept for good).
            cursor.execute(f"PRAGMA page_size={_SqliteRunner.PAGE_SIZE}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            if not autocheckpoint:
                cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.close()

        if begin is not None:

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Any) -> None:
                conn.exec_driver_sql(begin)

        return engine

    @staticmethod
    def _transaction(engine: sa.Engine, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with engine.begin() as conn:
            return fn(conn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queues the write and returns its outcome to come. The write is made whether or
        not anyone waits for it: a caller cancelled meanwhile does not undo it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, args, future))
        if self._at_upstream == 0:
            self._flush_soon(loop)
        elif not self._scheduled and not self._in_thread:
            self._scheduled = True
            self._waiting = loop.call_later(self.BATCH_WAIT_SECONDS, self._flush, loop)
        return future

    @contextlib.contextmanager
    def at_upstream(self) -> Iterator[None]:
        self._at_upstream += 1
        try:
            yield
        finally:
            self._at_upstream -= 1
            if self._at_upstream == 0 and self._pending:
                self._flush_soon(asyncio.get_running_loop())

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the loop's next turn; when the writer thread has a batch, once it is done."""
        if self._in_thread:
            return
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
            self._scheduled = False
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._waiting = None
        batch, self._pending = self._pending, []
        if not batch:
            self._check_drained()
            return
        work = [(f, a) for f, a, _ in batch]
        try:
            outcomes = self._write_inline(work)
        except _Busy:
            self._in_thread = True
            done = loop.run_in_executor(self._writer, self._write_batch, work)
            done.add_done_callback(lambda outcome: self._thread_done(loop, batch, outcome))
            return
        except Exception as exc:  # the commit, or a write alone, failed: the batch fails
            outcomes = [(False, exc)] * len(batch)
        self._deliver(batch, outcomes)
        self._check_drained()
        self._commits += 1
        self._shared_commits += len(batch) > 1
        if self._commits < self.CHECKPOINT_EVERY or self._checkpointing:
            return
        alone = self._shared_commits == 0
        self._commits = self._shared_commits = 0
        self._checkpointing = True
        checkpoint = loop.run_in_executor(self._writer, self._checkpoint)
        if alone and self._wal_bytes < self.WAL_RESTART_BYTES:
            # One write at a time, where a pause would be a request's latency (3-5 ms,
            # every hundredth request): beside the loop's writes, which never wait for
            # it. It copies back what the WAL held when it began.
            checkpoint.add_done_callback(self._checkpoint_done)
            return
        # The loop's writes wait while this one runs. With nothing appended meanwhile it
        # copies the rest of the WAL back, and the next commit starts the WAL over; under
        # load that never pauses, checkpoints that all raced the loop's commits never
        # caught up, and the WAL grew for as long as the load lasted (~13 KB per
        # generation). With company, the pause costs the loop less than a checkpoint
        # beside it, which takes the CPU the other processes need (~5% fewer requests/s).
        self._in_thread = True
        checkpoint.add_done_callback(lambda outcome: self._checkpointed(loop, outcome))

    def _thread_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]],
        outcome: asyncio.Future[list[tuple[bool, Any]]],
    ) -> None:
        self._in_thread = False
        error = outcome.exception()
        self._deliver(batch, [(False, error)] * len(batch) if error else outcome.result())
        if self._pending:
            self._flush_soon(loop)
        self._check_drained()

    def _check_drained(self) -> None:
        busy = self._pending or self._scheduled or self._in_thread
        if self._drained is not None and not busy and not self._drained.done():
            self._drained.set_result(None)

    @staticmethod
    def _deliver(
        batch: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]],
        outcomes: list[tuple[bool, Any]],
    ) -> None:
        for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled; the write stands
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    @staticmethod
    def _run_batch(
        conn: _FastConnection, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """Runs each write in its own savepoint: one that raises rolls back alone, except
        for a locked database, which is raised for the whole batch. A write alone in its
        transaction needs no savepoint: what it raises is raised, and the caller rolls the
        transaction back."""
        if len(batch) == 1:
            fn, args = batch[0]
            return [(True, fn(conn, *args))]
        outcomes: list[tuple[bool, Any]] = []
        for fn, args in batch:
            conn.savepoint()
            try:
                outcomes.append((True, fn(conn, *args)))
            except Exception as exc:
                if _is_busy(exc):
                    raise
                conn.rollback_to()
                outcomes.append((False, exc))
            else:
                conn.release()
        return outcomes

    def _write_inline(
        self, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """The batch in one transaction on the loop's connection. A locked database raises
        _Busy with nothing written; a failed commit raises, and nothing is written."""
        if self._inline is None:
            self._inline = _FastConnection(self._inline_engine.connect())
        conn = self._inline
        try:
            conn.raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise _Busy from exc
            raise
        try:
            outcomes = self._run_batch(conn, batch)
            conn.commit()
        except BaseException as exc:
            conn.rollback()
            if _is_busy(exc):
                raise _Busy from exc
            raise
        return outcomes

    def _write_batch(
        self, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """The batch in one transaction on the writer thread's connection, which waits for
        the lock. If the commit fails, every write of the batch fails with it."""
        with self._write_engine.begin() as conn:
            return self._run_batch(_FastConnection(conn), batch)

    def _checkpoint(self) -> int:
        """A PASSIVE checkpoint; returns the bytes of pages the WAL held."""
        # Outside any transaction: straight on the driver's connection.
        raw = self._write_engine.raw_connection()
        try:
            driver = raw.driver_connection
            row = driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # type: ignore[union-attr]
            if not self._page_size:  # fixed when the file was made: read once
                self._page_size = int(driver.execute("PRAGMA page_size").fetchone()[0])  # type: ignore[union-attr]
        finally:
            raw.close()
        # (busy, pages in the WAL, pages copied back)
        return int(row[1]) * self._page_size if row is not None else 0

    def _checkpoint_done(self, outcome: asyncio.Future[int], *, restarts: bool = False) -> None:
        """``restarts``: the writes waited, so it copied the WAL back whole and the next
        commit starts the WAL over."""
        self._checkpointing = False
        if outcome.exception() is not None:
            log.warning("ledger.checkpoint_failed", error=str(outcome.exception()))
        else:
            self._wal_bytes = 0 if restarts else outcome.result()

    def _checkpointed(self, loop: asyncio.AbstractEventLoop, outcome: asyncio.Future[int]) -> None:
        self._in_thread = False
        self._checkpoint_done(outcome, restarts=True)
        if self._pending:
            self._flush_soon(loop)
        self._check_drained()

    async def write_alone(self, fn: Callable[..., T], *args: Any) -> T:
        """A write in a transaction of its own (schema migrations)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._writer, self._transaction, self._write_engine, fn, args
        )

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._reader, self._transaction, self._read_engine, fn, args
        )

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pending or self._scheduled or self._in_thread:
            self._drained = loop.create_future()
            await self._drained
        if self._inline is not None:
            self._inline.close()
        self._inline_engine.dispose()
        await loop.run_in_executor(self._writer, self._checkpoint)
        await loop.run_in_executor(self._writer, self._write_engine.dispose)
        await loop.run_in_executor(self._reader, self._read_engine.dispose)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)


# PostgreSQL's per-request writes: each is one statement, so one round trip, atomic on its
# own, and the account row is locked only while the server runs it (not across the round
# trips of BEGIN, three statements and COMMIT). The same effects as _HOLD/_INSERT_HOLD/
# _INSERT_ENTRY and as _settle, which the tests check on both backends.
_PG_HOLD = """
WITH debit AS (
    UPDATE accounts
    SET available_micros = available_micros - $3, held_micros = held_micros + $3
    WHERE id = $2 AND available_micros >= $3 AND ($4::text IS NULL OR EXISTS (
        SELECT 1 FROM api_keys WHERE id = $4 AND account_id = $2 AND revoked_at IS NULL))
    RETURNING id
), hold AS (
    INSERT INTO holds (id, account_id, amount_micros, status, request_id, created_at,
                       expires_at)
    SELECT $1, id, $3, 'open', $5, $6, $7 FROM debit
)
INSERT INTO ledger_entries (account_id, kind, available_delta_micros, held_delta_micros,
                            hold_id, request_id, note, created_at)
SELECT id, 'hold', -$3, $3, $1, $5, '', $6 FROM debit
RETURNING 1
"""
_PG_KEY_ACTIVE = "SELECT revoked_at IS NULL FROM api_keys WHERE id = $1"
_PG_SETTLE = """
WITH closed AS (
    UPDATE holds SET status = 'settled', captured_micros = $2
    WHERE id = $1 AND status = 'open'
    RETURNING account_id, amount_micros
), balance AS (
    UPDATE accounts
    SET available_micros = available_micros + (closed.amount_micros - $2),
        held_micros = held_micros - closed.amount_micros
    FROM closed WHERE accounts.id = closed.account_id
), entries AS (
    INSERT INTO ledger_entries (account_id, kind, available_delta_micros,
                                held_delta_micros, hold_id, request_id, note, created_at)
    SELECT closed.account_id, e.kind, e.available, e.held, $1, $3, '', $4
    FROM closed CROSS JOIN LATERAL (VALUES
        (1, 'capture', 0::bigint, -$2::bigint),
        (2, 'release', closed.amount_micros - $2, $2 - closed.amount_micros)
    ) AS e (seq, kind, available, held)
    WHERE (e.seq = 1 AND $2 > 0) OR (e.seq = 2 AND closed.amount_micros > $2)
    ORDER BY e.seq
)
SELECT count(*) FROM closed
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """asyncpg resets a connection returned to its pool with one more query (RESET ALL,
    UNLISTEN *, ...), a round trip per write. These writes are single statements that leave
    no session state behind, so there is nothing to reset."""


class _PostgresRunner:
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        # A host that drops packets answers nothing: fail after CONNECT_TIMEOUT_SECONDS, not
        # asyncpg's 60 s, so startup errors and readiness say so promptly.
        self._engine = create_async_engine(
            url,
            pool_size=5,
            max_overflow=10,
            connect_args={"timeout": CONNECT_TIMEOUT_SECONDS},
        )
        # The per-request writes go straight to asyncpg, on a pool of their own: through
        # SQLAlchemy's asyncio layer (greenlets, execution contexts) they cost ~2 ms of CPU
        # per generation. Everything else uses the engine.
        self._dsn = "postgresql://" + url.removeprefix("postgresql+asyncpg://")
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    read = write
    write_alone = write

    async def _fast(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=10,
                        reset=_keep_session,
                        timeout=CONNECT_TIMEOUT_SECONDS,
                    )
        return self._pool

    async def hold(self, hold: Hold, key_id: str | None, params: dict[str, Any]) -> None:
        pool = await self._fast()
        async with pool.acquire() as conn:
            placed = await conn.fetchval(
                _PG_HOLD,
                hold.id,
                hold.account_id,
                hold.amount_micros,
                key_id,
                params["request_id"],
                params["now"],
                params["expires_at"],
            )
            if placed is None:
                if key_id is not None and not await conn.fetchval(_PG_KEY_ACTIVE, key_id):
                    raise errors.InvalidApiKey("Incorrect API key provided.")
                raise errors.InsufficientBalance(_TOO_LOW)

    async def settle(self, hold: Hold, capture_micros: int, request_id: str) -> bool:
        pool = await self._fast()
        async with pool.acquire() as conn:
            closed = await conn.fetchval(
                _PG_SETTLE, hold.id, capture_micros, request_id[:128], int(time.time())
            )
        return bool(closed)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self._engine.dispose()


class LedgerStore:
    """The one place that reads and writes accounts, keys, holds and ledger entries."""

    def __init__(self, database_url: str) -> None:
        url = async_url(database_url)
        self._db: _Runner
        if url.startswith("sqlite"):
            self._db = _SqliteRunner(url.removeprefix("sqlite+aiosqlite:///"))
        else:
            self._db = _PostgresRunner(url)
        self.dialect = self._db.dialect

    async def close(self) -> None:
        await self._db.close()

    def at_upstream(self) -> contextlib.AbstractContextManager[None]:
        """Around a generation's wait for its upstream, after its hold and before its
        settlement: on SQLite, the writes queued meanwhile wait a moment (at most
        _SqliteRunner.BATCH_WAIT_SECONDS) for the settlements of the generations coming
        back, so that they share a commit. PostgreSQL commits each write on its own."""
        if isinstance(self._db, _SqliteRunner):
            return self._db.at_upstream()
        return contextlib.nullcontext()

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

        await self._db.write_alone(run)
        return self.head_revision()

    def head_revision(self) -> str:
        head = ScriptDirectory.from_config(self._alembic()).get_current_head()
        assert head is not None
        return head

    async def current_revision(self) -> str | None:
        def read(conn: sa.Connection) -> str | None:
            return MigrationContext.configure(conn).get_current_revision()

        return await self._db.read(read)

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
        account = Account(new_id("acct"), name, initial_micros, 0, int(time.time()))

        def tx(conn: sa.Connection) -> None:
            conn.execute(
                accounts.insert().values(
                    id=account.id,
                    name=name,
                    available_micros=initial_micros,
                    held_micros=0,
                    created_at=account.created,
                )
            )
            if initial_micros:
                _entry(conn, account.id, "credit", initial_micros, 0, note="opening")

        await self._db.write(tx)
        return account

    async def get_account(self, account_id: str) -> Account:
        return await self._db.read(_get_account, account_id)

    async def credit(
        self, account_id: str, amount_micros: int, note: str = "", credit_id: str = ""
    ) -> Account:
        """Adds funds. With a ``credit_id``, a repeat of the same credit (same account and
        amount) changes nothing and answers the account as it is; the same id with another
        account or amount raises IdempotencyConflict."""
        if amount_micros <= 0:
            raise errors.InvalidParameter("A credit must be positive.", param="amount")
        if len(credit_id) > MAX_CREDIT_ID_CHARS:
            raise errors.InvalidParameter(
                f"A credit_id has at most {MAX_CREDIT_ID_CHARS} characters.", param="credit_id"
            )

        def tx(conn: sa.Connection) -> Account:
            if credit_id and _credited_before(conn, credit_id, account_id, amount_micros):
                return _get_account(conn, account_id)
            result = conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(available_micros=accounts.c.available_micros + amount_micros)
            )
            if result.rowcount != 1:
                raise errors.NotFound(f"No account '{account_id}'.")
            if not credit_id:
                _entry(conn, account_id, "credit", amount_micros, 0, note=note)
                return _get_account(conn, account_id)
            now = int(time.time())
            entry_id = conn.execute(
                ledger_entries.insert()
                .values(
                    account_id=account_id,
                    kind="credit",
                    available_delta_micros=amount_micros,
                    held_delta_micros=0,
                    request_id="",
                    note=note[:500],
                    created_at=now,
                )
                .returning(ledger_entries.c.id)
            ).scalar_one()
            conn.execute(
                credits.insert().values(
                    id=credit_id,
                    account_id=account_id,
                    amount_micros=amount_micros,
                    entry_id=entry_id,
                    created_at=now,
                )
            )
            return _get_account(conn, account_id)

        try:
            return await self._db.write(tx)
        except sa.exc.IntegrityError:
            if not credit_id:
                raise
            # The same credit_id arrived twice at once and the other one won: this one is
            # now a repeat (or a conflict), which the second run says.
            return await self._db.write(tx)

    async def list_accounts(self, page_size: int = 0, page_token: str = "") -> Page[Account]:
        """Every account, oldest first (creation time, then id)."""
        size = _page_size(page_size)
        after = _page_position("accounts", page_token, (int, str))

        def read(conn: sa.Connection) -> Page[Account]:
            query = _in_creation_order(accounts.select(), accounts, after)
            rows = conn.execute(query.limit(size + 1)).all()
            items = [
                Account(r.id, r.name, r.available_micros, r.held_micros, r.created_at)
                for r in rows[:size]
            ]
            more = len(rows) > size
            token = _page_token("accounts", items[-1].created, items[-1].id) if more else ""
            return Page(items, token)

        return await self._db.read(read)

    # -- keys ---------------------------------------------------------------------------

    async def create_key(self, account_id: str, key_hash: str) -> ApiKey:
        key = ApiKey(new_id("key"), account_id, int(time.time()), None)

        def tx(conn: sa.Connection) -> None:
            _get_account(conn, account_id)
            conn.execute(
                api_keys.insert().values(
                    id=key.id, account_id=account_id, key_hash=key_hash, created_at=key.created
                )
            )

        await self._db.write(tx)
        return key

    async def revoke_key(self, key_id: str) -> ApiKey:
        now = int(time.time())

        def tx(conn: sa.Connection) -> ApiKey:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            return _get_key(conn, key_id)

        return await self._db.write(tx)

    async def set_key_limits(
        self, key_id: str, requests_per_minute: int | None, images_per_minute: int | None
    ) -> ApiKey:
        """Sets (or with None clears) a key's own rate limits."""

        def tx(conn: sa.Connection) -> ApiKey:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id)
                .values(
                    requests_per_minute=requests_per_minute, images_per_minute=images_per_minute
                )
            )
            return _get_key(conn, key_id)

        return await self._db.write(tx)

    async def list_keys(
        self, account_id: str, page_size: int = 0, page_token: str = ""
    ) -> Page[ApiKey]:
        """An account's keys, revoked ones included, oldest first."""
        size = _page_size(page_size)
        after = _page_position("keys", page_token, (int, str))

        def read(conn: sa.Connection) -> Page[ApiKey]:
            _get_account(conn, account_id)
            query = _in_creation_order(
                api_keys.select().where(api_keys.c.account_id == account_id), api_keys, after
            )
            rows = conn.execute(query.limit(size + 1)).all()
            items = [_key(r) for r in rows[:size]]
            more = len(rows) > size
            token = _page_token("keys", items[-1].created, items[-1].id) if more else ""
            return Page(items, token)

        return await self._db.read(read)

    async def find_active_key(self, key_hash: str) -> ApiKey | None:
        def read(conn: sa.Connection) -> ApiKey | None:
            row = conn.execute(_ACTIVE_KEY, {"key_hash": key_hash}).first()
            return None if row is None else _key(row)

        return await self._db.read(read)

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

        def tx(conn: sa.Connection) -> Claim:
            row = conn.execute(idempotency_records.select().where(*where)).first()
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
                conn.execute(idempotency_records.delete().where(*where))
            conn.execute(
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

        for _ in range(2):
            try:
                return await self._db.write(tx)
            except sa.exc.IntegrityError:
                # A concurrent request with the same key inserted first: read again.
                continue
        return Claim("running")

    async def finish_idempotency(self, account_id: str, key: str, result_ref: str) -> None:
        def tx(conn: sa.Connection) -> None:
            conn.execute(
                idempotency_records.update()
                .where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.idempotency_key == key,
                )
                .values(status="done", result_ref=result_ref)
            )

        await self._db.write(tx)

    async def release_idempotency(self, account_id: str, key: str) -> None:
        """Frees a key whose request failed, so that a retry runs again."""

        def tx(conn: sa.Connection) -> None:
            conn.execute(
                idempotency_records.delete().where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.idempotency_key == key,
                    idempotency_records.c.status == "running",
                )
            )

        await self._db.write(tx)

    async def purge_expired_idempotency(self, now: int | None = None) -> list[str]:
        """Deletes expired records; returns the result references to delete with them."""
        cutoff = int(time.time()) if now is None else now
        expired = idempotency_records.c.expires_at < cutoff

        def tx(conn: sa.Connection) -> list[str]:
            refs = conn.execute(sa.select(idempotency_records.c.result_ref).where(expired))
            found = [ref for ref in refs.scalars().all() if ref]
            conn.execute(idempotency_records.delete().where(expired))
            return found

        return await self._db.write(tx)

    # -- holds --------------------------------------------------------------------------

    async def place_hold(
        self,
        account_id: str,
        amount_micros: int,
        *,
        request_id: str,
        ttl_seconds: int,
        key_id: str | None = None,
    ) -> Hold:
        """Moves ``amount_micros`` from available to held, or raises InsufficientBalance.

        With ``key_id`` the same statement checks the key is still active, so a caller may
        authenticate from a cache and a revocation still stops the very next request: it
        raises InvalidApiKey.
        """
        now = int(time.time())
        hold = Hold(new_id("hold"), account_id, amount_micros)
        params = {
            "id": hold.id,
            "account_id": account_id,
            "key_id": key_id,
            "amount": amount_micros,
            "request_id": request_id[:128],
            "now": now,
            "expires_at": now + ttl_seconds,
        }

        if isinstance(self._db, _PostgresRunner):
            await self._db.hold(hold, key_id, params)
            return hold

        def tx(conn: sa.Connection) -> None:
            statement = _HOLD if key_id is None else _HOLD_FOR_ACTIVE_KEY
            if conn.execute(statement, params).rowcount != 1:
                if key_id is not None and not _key_is_active(conn, key_id):
                    raise errors.InvalidApiKey("Incorrect API key provided.")
                raise errors.InsufficientBalance(_TOO_LOW)
            conn.execute(_INSERT_HOLD, params)
            _entry(conn, account_id, "hold", -amount_micros, amount_micros, hold.id, request_id)

        await self._db.write(tx)
        return hold

    def settle_hold(
        self, hold: Hold, capture_micros: int, *, request_id: str
    ) -> asyncio.Future[bool]:
        """Captures ``capture_micros`` of the hold and releases the rest, once.

        The settlement is under way when this returns, and completes even if nobody waits
        for it (a cancelled request still settles its hold): await the result, through
        ``asyncio.shield`` where the waiter may be cancelled. It is False when the hold was
        already settled (for example released on expiry), in which case nothing moves.
        """
        if not 0 <= capture_micros <= hold.amount_micros:
            raise ValueError("capture must lie between 0 and the held amount")
        if isinstance(self._db, _PostgresRunner):
            return asyncio.ensure_future(self._db.settle(hold, capture_micros, request_id))
        # Queued at once, without a task of its own: a task per settlement cost more than
        # the rest of the write's Python.
        assert isinstance(self._db, _SqliteRunner)
        return self._db.submit(_settle, hold, capture_micros, request_id)

    async def release_expired_holds(self, now: int | None = None) -> int:
        """Releases every open hold past its expiry (a process died mid-request)."""
        cutoff = int(time.time()) if now is None else now

        def tx(conn: sa.Connection) -> int:
            rows = conn.execute(
                sa.select(
                    holds.c.id, holds.c.account_id, holds.c.amount_micros, holds.c.request_id
                ).where(holds.c.status == "open", holds.c.expires_at < cutoff)
            ).all()
            return sum(
                _settle(conn, Hold(r.id, r.account_id, r.amount_micros), 0, r.request_id)
                for r in rows
            )

        return await self._db.write(tx)

    # -- ledger -------------------------------------------------------------------------

    async def ledger(self, account_id: str, limit: int = 100) -> Sequence[LedgerEntry]:
        """The account's newest ``limit`` entries, newest first."""
        return (await self.ledger_page(account_id, limit)).items

    async def ledger_page(
        self, account_id: str, page_size: int = 0, page_token: str = ""
    ) -> Page[LedgerEntry]:
        """The account's entries, newest first (entry ids only grow)."""
        size = _page_size(page_size)
        after = _page_position("ledger", page_token, (int,))

        def read(conn: sa.Connection) -> Page[LedgerEntry]:
            _get_account(conn, account_id)
            query = (
                sa.select(ledger_entries, credits.c.id.label("credit_id"))
                .select_from(
                    ledger_entries.outerjoin(credits, credits.c.entry_id == ledger_entries.c.id)
                )
                .where(ledger_entries.c.account_id == account_id)
                .order_by(ledger_entries.c.id.desc())
            )
            if after is not None:
                query = query.where(ledger_entries.c.id < after[0])
            rows = conn.execute(query.limit(size + 1)).all()
            items = [
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
                    r.credit_id or "",
                )
                for r in rows[:size]
            ]
            more = len(rows) > size
            return Page(items, _page_token("ledger", items[-1].id) if more else "")

        return await self._db.read(read)

    async def ledger_sums(self, account_id: str) -> tuple[int, int]:
        """Sums of the account's entries: (available, held). Equal to the balance, always."""

        def read(conn: sa.Connection) -> tuple[int, int]:
            row = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(ledger_entries.c.available_delta_micros), 0),
                    sa.func.coalesce(sa.func.sum(ledger_entries.c.held_delta_micros), 0),
                ).where(ledger_entries.c.account_id == account_id)
            ).one()
            return int(row[0]), int(row[1])

        return await self._db.read(read)


# -- transaction pieces: plain functions of a Connection, shared by both backends ------------


def _settle(conn: sa.Connection, hold: Hold, capture_micros: int, request_id: str) -> bool:
    release = hold.amount_micros - capture_micros
    if conn.execute(_CLOSE_HOLD, {"id": hold.id, "capture": capture_micros}).rowcount != 1:
        return False
    conn.execute(
        _SETTLE_ACCOUNT,
        {"account_id": hold.account_id, "release": release, "amount": hold.amount_micros},
    )
    if capture_micros:
        _entry(conn, hold.account_id, "capture", 0, -capture_micros, hold.id, request_id)
    if release:
        _entry(conn, hold.account_id, "release", release, -release, hold.id, request_id)
    return True


def _entry(
    conn: sa.Connection,
    account_id: str,
    kind: str,
    available_delta: int,
    held_delta: int,
    hold_id: str | None = None,
    request_id: str = "",
    note: str = "",
) -> None:
    conn.execute(
        _INSERT_ENTRY,
        {
            "account_id": account_id,
            "kind": kind,
            "available": available_delta,
            "held": held_delta,
            "hold_id": hold_id,
            "request_id": request_id[:128],
            "note": note[:500],
            "now": int(time.time()),
        },
    )


def _credited_before(
    conn: sa.Connection, credit_id: str, account_id: str, amount_micros: int
) -> bool:
    """Whether the credit ``credit_id`` was made already; a different one under the same
    id raises IdempotencyConflict."""
    row = conn.execute(credits.select().where(credits.c.id == credit_id)).first()
    if row is None:
        return False
    if row.account_id != account_id or row.amount_micros != amount_micros:
        raise errors.IdempotencyConflict(
            f"The credit_id '{errors.excerpt(credit_id)}' was used for another credit.",
            param="credit_id",
        )
    return True


def _get_account(conn: sa.Connection, account_id: str) -> Account:
    row = conn.execute(accounts.select().where(accounts.c.id == account_id)).first()
    if row is None:
        raise errors.NotFound(f"No account '{account_id}'.")
    return Account(row.id, row.name, row.available_micros, row.held_micros, row.created_at)


def _get_key(conn: sa.Connection, key_id: str) -> ApiKey:
    row = conn.execute(api_keys.select().where(api_keys.c.id == key_id)).first()
    if row is None:
        raise errors.NotFound(f"No API key '{key_id}'.")
    return _key(row)


def _key_is_active(conn: sa.Connection, key_id: str) -> bool:
    row = conn.execute(
        sa.select(api_keys.c.id).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
    ).first()
    return row is not None


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
