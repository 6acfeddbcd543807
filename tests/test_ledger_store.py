"""The ledger's promises, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from imagegen_service import errors
from imagegen_service.stores.ledger_sql import (
    LedgerStore,
    SchemaOutOfDate,
    _SqliteRunner,
    is_database_unreachable,
    open_store,
)
from tests.services import scratch_postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    if request.param == "sqlite":
        s = await open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
        yield s
        await s.close()
        return
    async with scratch_postgres_database() as url:
        migrator = LedgerStore(url)
        await migrator.upgrade()
        await migrator.close()
        s = await open_store(url)
        yield s
        await s.close()


async def _spend(store: LedgerStore, account_id: str, amount: int, i: int) -> bool:
    try:
        hold = await store.place_hold(account_id, amount, request_id=f"r{i}", ttl_seconds=60)
    except errors.InsufficientBalance:
        return False
    await asyncio.sleep(0)
    assert await store.settle_hold(hold, amount, request_id=f"r{i}")
    return True


async def test_concurrent_holds_never_overdraw_and_entries_sum_to_balance(
    store: LedgerStore,
) -> None:
    account = await store.create_account("race", 7 * 1000)
    results = await asyncio.gather(*(_spend(store, account.id, 1000, i) for i in range(100)))
    assert results.count(True) == 7
    after = await store.get_account(account.id)
    assert (after.available_micros, after.held_micros) == (0, 0)
    assert await store.ledger_sums(account.id) == (0, 0)
    kinds = [e.kind for e in await store.ledger(account.id, 1000)]
    assert kinds.count("capture") == 7 and kinds.count("hold") == 7


async def test_partial_capture_releases_the_rest_once(store: LedgerStore) -> None:
    account = await store.create_account("partial", 10_000)
    hold = await store.place_hold(account.id, 4_000, request_id="r", ttl_seconds=60)
    assert await store.settle_hold(hold, 1_500, request_id="r")
    assert not await store.settle_hold(hold, 4_000, request_id="r"), "settled twice"
    after = await store.get_account(account.id)
    assert (after.available_micros, after.held_micros) == (8_500, 0)
    assert await store.ledger_sums(account.id) == (8_500, 0)


async def test_a_settlement_nobody_waits_for_still_completes(store: LedgerStore) -> None:
    """A request cancelled while its hold settles stops waiting; the settlement is under
    way from the call on and completes, so the money moves and the hold closes anyway."""
    account = await store.create_account("unwaited", 10_000)
    hold = await store.place_hold(account.id, 4_000, request_id="r", ttl_seconds=60)
    waiter = asyncio.ensure_future(asyncio.shield(store.settle_hold(hold, 3_000, request_id="r")))
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(500):
        after = await store.get_account(account.id)
        if after.held_micros == 0:
            break
        await asyncio.sleep(0.01)
    assert (after.available_micros, after.held_micros) == (7_000, 0)
    assert await store.ledger_sums(account.id) == (7_000, 0)
    assert not await store.settle_hold(hold, 0, request_id="r"), "the hold was left open"


async def test_settling_writes_the_same_entries_on_both_backends(store: LedgerStore) -> None:
    """Hold, capture and release entries with their exact amounts, in that order, whatever
    backend wrote them (PostgreSQL's per-request writes are SQL of their own)."""
    account = await store.create_account("entries", 10_000)
    partial = await store.place_hold(account.id, 4_000, request_id="r1", ttl_seconds=60)
    assert await store.settle_hold(partial, 1_500, request_id="r1")
    whole = await store.place_hold(account.id, 2_000, request_id="r2", ttl_seconds=60)
    assert await store.settle_hold(whole, 2_000, request_id="r2")
    none = await store.place_hold(account.id, 1_000, request_id="r3", ttl_seconds=60)
    assert await store.settle_hold(none, 0, request_id="r3")
    entries = [
        (e.kind, e.available_delta_micros, e.held_delta_micros, e.hold_id, e.request_id)
        for e in reversed(await store.ledger(account.id))
    ]
    assert entries == [
        ("credit", 10_000, 0, None, ""),
        ("hold", -4_000, 4_000, partial.id, "r1"),
        ("capture", 0, -1_500, partial.id, "r1"),
        ("release", 2_500, -2_500, partial.id, "r1"),
        ("hold", -2_000, 2_000, whole.id, "r2"),
        ("capture", 0, -2_000, whole.id, "r2"),
        ("hold", -1_000, 1_000, none.id, "r3"),
        ("release", 1_000, -1_000, none.id, "r3"),
    ]
    after = await store.get_account(account.id)
    assert (after.available_micros, after.held_micros) == (6_500, 0)
    assert await store.ledger_sums(account.id) == (6_500, 0)


async def test_a_hold_checks_the_key_and_the_balance_and_moves_nothing_when_refused(
    store: LedgerStore,
) -> None:
    account = await store.create_account("refusals", 5_000)
    key = await store.create_key(account.id, "cd" * 32)
    with pytest.raises(errors.InsufficientBalance):
        await store.place_hold(account.id, 6_000, request_id="big", ttl_seconds=60, key_id=key.id)
    await store.revoke_key(key.id)
    with pytest.raises(errors.InvalidApiKey):
        await store.place_hold(account.id, 1_000, request_id="r", ttl_seconds=60, key_id=key.id)
    after = await store.get_account(account.id)
    assert (after.available_micros, after.held_micros) == (5_000, 0)
    assert [e.kind for e in await store.ledger(account.id)] == ["credit"]


async def test_expired_hold_is_released_with_nothing_charged(store: LedgerStore) -> None:
    account = await store.create_account("crash", 5_000)
    hold = await store.place_hold(account.id, 5_000, request_id="r", ttl_seconds=0)
    held = await store.get_account(account.id)
    assert (held.available_micros, held.held_micros) == (0, 5_000)
    assert await store.release_expired_holds(now=2**40) == 1
    after = await store.get_account(account.id)
    assert (after.available_micros, after.held_micros) == (5_000, 0)
    # A late capture from the process that placed the hold moves nothing.
    assert not await store.settle_hold(hold, 5_000, request_id="r")
    assert await store.ledger_sums(account.id) == (5_000, 0)


async def test_revoked_key_is_not_found_at_once(store: LedgerStore) -> None:
    account = await store.create_account("keys", 0)
    key = await store.create_key(account.id, "ab" * 32)
    assert (await store.find_active_key("ab" * 32)) is not None
    await store.revoke_key(key.id)
    assert await store.find_active_key("ab" * 32) is None


async def test_credit_must_be_positive_and_account_must_exist(store: LedgerStore) -> None:
    account = await store.create_account("credit", 0)
    with pytest.raises(errors.InvalidParameter):
        await store.credit(account.id, 0)
    with pytest.raises(errors.NotFound):
        await store.credit("acct_missing", 10)
    assert (await store.credit(account.id, 2_500_000)).available_micros == 2_500_000


async def test_postgres_service_refuses_an_unmigrated_schema() -> None:
    async with scratch_postgres_database() as url:
        with pytest.raises(SchemaOutOfDate, match="imagegen-admin db upgrade"):
            await open_store(url)


async def test_postgres_out_of_connection_slots_is_the_database_unavailable() -> None:
    """A server with no connection slot left for us ("too many clients") is the database
    unavailable (a retryable 503), not a bug in a statement (a 500): through the ledger's
    SQLAlchemy engine and through its own asyncpg pool."""
    async with scratch_postgres_database() as url:
        migrator = LedgerStore(url)
        await migrator.upgrade()
        account = await migrator.create_account("full", 10_000)
        await migrator.close()
        role = f"imagegen_full_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(url)
        await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        parts = urlsplit(url)
        store = LedgerStore(
            urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        )
        try:
            with pytest.raises(Exception) as engine_refused:
                await store.get_account(account.id)
            with pytest.raises(Exception) as pool_refused:
                await store.place_hold(account.id, 1_000, request_id="r", ttl_seconds=60)
        finally:
            await store.close()
            await admin.execute(f'DROP ROLE "{role}"')
            await admin.close()
        for refused in (engine_refused.value, pool_refused.value):
            assert "too many connections" in str(refused)
            assert is_database_unreachable(refused), repr(refused)


async def test_sqlite_write_locked_by_another_process_waits_off_the_event_loop(
    tmp_path: Path,
) -> None:
    """Writes run on the event loop's thread, but never wait there for a lock: while another
    connection (another process, imagegen-admin) holds SQLite's write lock, the hold waits
    on the writer thread, the loop keeps turning, and the hold goes through once the lock
    is free. Refused and accepted holds in that batch keep their own outcomes."""
    path = tmp_path / "ledger.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        account = await store.create_account("locked", 1_000)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        fits = asyncio.ensure_future(
            store.place_hold(account.id, 1_000, request_id="fits", ttl_seconds=60)
        )
        too_much = asyncio.ensure_future(
            store.place_hold(account.id, 5_000, request_id="too-much", ttl_seconds=60)
        )
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not fits.done() and not too_much.done()
        other.execute("ROLLBACK")
        other.close()
        hold = await asyncio.wait_for(fits, 10)
        with pytest.raises(errors.InsufficientBalance):
            await asyncio.wait_for(too_much, 10)
        assert await store.settle_hold(hold, 400, request_id="fits")
        after = await store.get_account(account.id)
        assert (after.available_micros, after.held_micros) == (600, 0)
        assert await store.ledger_sums(account.id) == (600, 0)
    finally:
        await store.close()


def _commits_in_wal(path: Path) -> int:
    """Commits recorded in a SQLite WAL file: frames of the current salt whose header gives
    the database's size after the commit (0 in the other frames of a transaction)."""
    data = (path.parent / (path.name + "-wal")).read_bytes()
    if len(data) < 32:
        return 0
    page_size = int.from_bytes(data[8:12], "big")
    salt = data[16:24]
    commits, offset = 0, 32
    while offset + 24 + page_size <= len(data):
        header = data[offset : offset + 24]
        if header[8:16] != salt:
            break
        commits += int.from_bytes(header[4:8], "big") != 0
        offset += 24 + page_size
    return commits


async def test_sqlite_writes_wait_for_generations_at_their_upstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a generation waits for its upstream, another's write waits for it instead of
    committing alone, and goes in one commit with the settlement it comes back to write.
    With nobody at an upstream, a write waits for nothing. (The wait is stretched from
    1 ms to a minute here, so that only the rule decides what is committed together.)"""
    monkeypatch.setattr(_SqliteRunner, "BATCH_WAIT_SECONDS", 60.0)
    path = tmp_path / "ledger.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        account = await store.create_account("together", 10_000)
        first = await store.place_hold(account.id, 3_000, request_id="a", ttl_seconds=60)
        second = await store.place_hold(account.id, 2_000, request_id="b", ttl_seconds=60)
        alone = await asyncio.wait_for(
            store.place_hold(account.id, 1_000, request_id="c", ttl_seconds=60), 10
        )
        before = _commits_in_wal(path)
        with store.at_upstream():
            waiting = store.settle_hold(first, 3_000, request_id="a")
            for _ in range(20):
                await asyncio.sleep(0)
            assert not waiting.done(), "committed alone while a generation was upstream"
        # Back from its upstream, the generation settles: both in the next commit.
        settled = store.settle_hold(second, 2_000, request_id="b")
        results = await asyncio.wait_for(asyncio.gather(waiting, settled), 10)
        assert list(results) == [True, True]
        assert _commits_in_wal(path) == before + 1
        assert await asyncio.wait_for(store.settle_hold(alone, 0, request_id="c"), 10)
        after = await store.get_account(account.id)
        assert (after.available_micros, after.held_micros) == (5_000, 0)
        assert await store.ledger_sums(account.id) == (5_000, 0)
    finally:
        await store.close()


async def test_sqlite_ledger_made_here_has_small_pages_and_an_older_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    """A commit writes every page it changed whole to the WAL, so the service creates its
    SQLite ledger with 1 KiB pages instead of SQLite's 4 KiB. A database made before, with
    4 KiB pages, keeps them and serves as before."""
    older = tmp_path / "older.db"
    made = sqlite3.connect(older)
    made.execute("PRAGMA page_size=4096")
    made.execute("PRAGMA journal_mode=WAL")
    made.close()
    for path, page_size in ((tmp_path / "new.db", 1024), (older, 4096)):
        store = await open_store(f"sqlite:///{path}")
        try:
            account = await store.create_account("pages", 5_000)
            spent = [await _spend(store, account.id, 1_000, i) for i in range(6)]
            assert spent == [True] * 5 + [False]
            after = await store.get_account(account.id)
            assert (after.available_micros, after.held_micros) == (0, 0)
            assert await store.ledger_sums(account.id) == (0, 0)
        finally:
            await store.close()
        reader = sqlite3.connect(path)
        assert reader.execute("PRAGMA page_size").fetchone() == (page_size,), path.name
        reader.close()


@pytest.mark.parametrize(
    ("in_flight", "bound_mib"),
    # One at a time, checkpoints run beside the writes until the WAL passes 32 MiB; with
    # company, the writes wait for every checkpoint, each interval's commits at most.
    [(1, 64), (8, 16)],
)
async def test_sqlite_wal_stays_bounded_under_continuous_writes(
    tmp_path: Path, in_flight: int, bound_mib: int
) -> None:
    """Under load that never pauses, checkpoints that run beside the writes never catch
    up with them, and SQLite appended to the WAL for as long as the load lasted (~15 KB
    per generation one at a time with 1 KiB pages, 91 MB after 6,000; ~11 KB at 8 in
    flight with 4 KiB pages). The writes that wait for a checkpoint let it copy the rest
    back, SQLite starts the WAL over, and none of them is lost."""
    path = tmp_path / "ledger.db"
    store = await open_store(f"sqlite:///{path}")
    generations = 6_000
    try:
        account = await store.create_account("steady", generations * 1_000)
        for start in range(0, generations, in_flight):
            spent = await asyncio.gather(
                *(_spend(store, account.id, 1_000, i) for i in range(start, start + in_flight))
            )
            assert all(spent)
        wal_bytes = (tmp_path / "ledger.db-wal").stat().st_size
        after = await store.get_account(account.id)
        assert (after.available_micros, after.held_micros) == (0, 0)
        assert await store.ledger_sums(account.id) == (0, 0)
    finally:
        await store.close()
    assert wal_bytes < bound_mib * 1024 * 1024, f"WAL grew to {wal_bytes / 1e6:.1f} MB"
