"""The Admin API a back office builds on, through real gRPC stubs with the admin token, on
SQLite and on PostgreSQL: listing accounts, keys and ledger entries page by page, setting
and clearing a key's rate limits, and credits that are safe to retry."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagegen_service.gen import admin_pb2, errors_pb2, images_pb2, images_pb2_grpc
from imagegen_service.stores.ledger_sql import LedgerStore
from tests.services import scratch_postgres_database
from tests.stack import ADMIN_METADATA, Stack, start_stack

T = TypeVar("T")

CONFIG = textwrap.dedent(
    """
    [providers.local]
    type = "local"

    [models.local-sketch]
    provider = "local"
    sizes = ["256x256"]

    [models.local-sketch.price_usd]
    default = "0.001"
    """
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def admin_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """A stack of its own with an empty database, so that listings hold only this module's
    accounts."""
    root = tmp_path_factory.mktemp(f"admin-{request.param}")
    if request.param == "sqlite":
        async with start_stack(CONFIG, root) as stack:
            yield stack
        return
    async with scratch_postgres_database() as url:
        store = LedgerStore(url)
        await store.upgrade()
        await store.close()
        async with start_stack(CONFIG, root, environ={"IMAGEGEN_DATABASE_URL": url}) as stack:
            yield stack


def _reason(exc: grpc.aio.AioRpcError) -> int:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return errors_pb2.ErrorReason.Value(info.reason)


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


async def _all_pages(
    fetch: Callable[[str], Awaitable[tuple[list[T], str]]],
) -> list[list[T]]:
    pages: list[list[T]] = []
    token = ""
    while True:
        items, token = await fetch(token)
        pages.append(items)
        if not token:
            return pages


async def test_accounts_list_page_by_page_each_once_in_a_stable_order(admin_stack: Stack) -> None:
    admin = admin_stack.admin
    made = []
    for i in range(5):
        account = await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(name=f"shop {i}", initial_balance_micros=i),
            metadata=ADMIN_METADATA,
        )
        made.append(account.id)

    async def fetch(token: str) -> tuple[list[str], str]:
        page = await admin.ListAccounts(
            admin_pb2.ListAccountsRequest(page_size=2, page_token=token), metadata=ADMIN_METADATA
        )
        return [a.id for a in page.accounts], page.next_page_token

    pages = await _all_pages(fetch)
    listed = [account_id for page in pages for account_id in page]
    assert all(len(page) <= 2 for page in pages)
    assert len(listed) == len(set(listed))
    # Creation times are whole seconds: within one, the id decides.
    assert set(made) <= set(listed)
    everything = await admin.ListAccounts(admin_pb2.ListAccountsRequest(), metadata=ADMIN_METADATA)
    assert [a.id for a in everything.accounts] == listed
    assert everything.next_page_token == ""


async def test_a_page_token_from_elsewhere_is_invalid_parameter(admin_stack: Stack) -> None:
    admin = admin_stack.admin
    account = await admin.CreateAccount(
        admin_pb2.CreateAccountRequest(name="tokens", initial_balance_micros=3),
        metadata=ADMIN_METADATA,
    )
    for _ in range(2):
        await admin.CreditAccount(
            admin_pb2.CreditAccountRequest(account_id=account.id, amount_micros=1),
            metadata=ADMIN_METADATA,
        )
    ledger_page = await admin.ListLedger(
        admin_pb2.ListLedgerRequest(account_id=account.id, page_size=1), metadata=ADMIN_METADATA
    )
    assert ledger_page.next_page_token
    for token in ("garbage", ledger_page.next_page_token):
        refused = await _refused(
            admin.ListAccounts(
                admin_pb2.ListAccountsRequest(page_token=token), metadata=ADMIN_METADATA
            )
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(refused) == errors_pb2.INVALID_PARAMETER
    refused = await _refused(
        admin.ListAccounts(admin_pb2.ListAccountsRequest(page_size=1001), metadata=ADMIN_METADATA)
    )
    assert _reason(refused) == errors_pb2.INVALID_PARAMETER


async def test_keys_of_an_account_list_revoked_ones_too(admin_stack: Stack) -> None:
    account_id, _, first = await admin_stack.new_account(0)
    admin = admin_stack.admin
    others = [
        (
            await admin.CreateKey(
                admin_pb2.CreateKeyRequest(account_id=account_id), metadata=ADMIN_METADATA
            )
        ).key.id
        for _ in range(2)
    ]
    await admin_stack.revoke(first)
    other_account, _, _ = await admin_stack.new_account(0)

    async def fetch(token: str) -> tuple[list[admin_pb2.ApiKey], str]:
        page = await admin.ListKeys(
            admin_pb2.ListKeysRequest(account_id=account_id, page_size=2, page_token=token),
            metadata=ADMIN_METADATA,
        )
        return list(page.keys), page.next_page_token

    pages = await _all_pages(fetch)
    listed = [key for page in pages for key in page]
    assert sorted(k.id for k in listed) == sorted([first, *others])
    assert {k.id for k in listed if k.revoked} == {first}
    assert {k.account_id for k in listed} == {account_id} != {other_account}
    refused = await _refused(
        admin.ListKeys(admin_pb2.ListKeysRequest(account_id="acct_none"), metadata=ADMIN_METADATA)
    )
    assert refused.code() == grpc.StatusCode.NOT_FOUND


async def test_ledger_pages_newest_first_and_an_entry_added_meanwhile_is_not_repeated(
    admin_stack: Stack,
) -> None:
    admin = admin_stack.admin
    account_id, _, _ = await admin_stack.new_account(1)
    for amount in (2, 3, 4):
        await admin.CreditAccount(
            admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=amount),
            metadata=ADMIN_METADATA,
        )
    first = await admin.ListLedger(
        admin_pb2.ListLedgerRequest(account_id=account_id, page_size=2), metadata=ADMIN_METADATA
    )
    assert [e.available_delta_micros for e in first.entries] == [4, 3]
    await admin.CreditAccount(
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=5),
        metadata=ADMIN_METADATA,
    )
    second = await admin.ListLedger(
        admin_pb2.ListLedgerRequest(
            account_id=account_id, page_size=2, page_token=first.next_page_token
        ),
        metadata=ADMIN_METADATA,
    )
    assert [e.available_delta_micros for e in second.entries] == [2, 1]
    assert second.next_page_token == ""
    # The older `limit` still works where page_size is not given.
    legacy = await admin.ListLedger(
        admin_pb2.ListLedgerRequest(account_id=account_id, limit=1), metadata=ADMIN_METADATA
    )
    assert [e.available_delta_micros for e in legacy.entries] == [5]


async def test_key_limits_are_set_and_cleared_and_limit_the_key(admin_stack: Stack) -> None:
    admin = admin_stack.admin
    _, key, key_id = await admin_stack.new_account(100_000)
    limited = await admin.SetKeyLimits(
        admin_pb2.SetKeyLimitsRequest(key_id=key_id, requests_per_minute=1, images_per_minute=0),
        metadata=ADMIN_METADATA,
    )
    assert limited.HasField("requests_per_minute") and limited.requests_per_minute == 1
    assert limited.HasField("images_per_minute") and limited.images_per_minute == 0
    listed = await admin.ListKeys(
        admin_pb2.ListKeysRequest(account_id=limited.account_id), metadata=ADMIN_METADATA
    )
    assert listed.keys[0] == limited

    images = images_pb2_grpc.ImageGenerationStub(admin_stack.channel)
    request = images_pb2.GenerateImagesRequest(model="local-sketch", prompt="p", size="256x256")
    auth = (("authorization", f"Bearer {key}"),)
    assert [m.WhichOneof("event") async for m in images.GenerateImages(request, metadata=auth)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in images.GenerateImages(request, metadata=auth):
            pass
    assert _reason(refused.value) == errors_pb2.RATE_LIMITED

    cleared = await admin.SetKeyLimits(
        admin_pb2.SetKeyLimitsRequest(key_id=key_id), metadata=ADMIN_METADATA
    )
    assert not cleared.HasField("requests_per_minute")
    assert not cleared.HasField("images_per_minute")
    for bad in (
        admin_pb2.SetKeyLimitsRequest(key_id=key_id, requests_per_minute=-1),
        admin_pb2.SetKeyLimitsRequest(key_id="key_none", requests_per_minute=1),
    ):
        error = await _refused(admin.SetKeyLimits(bad, metadata=ADMIN_METADATA))
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


async def test_a_retried_credit_is_applied_once(admin_stack: Stack) -> None:
    admin = admin_stack.admin
    account_id, _, _ = await admin_stack.new_account(1_000)
    credit = admin_pb2.CreditAccountRequest(
        account_id=account_id, amount_micros=500, note="invoice 7", credit_id="inv-7"
    )
    answers = await asyncio.gather(
        *(admin.CreditAccount(credit, metadata=ADMIN_METADATA) for _ in range(4))
    )
    assert {a.available_micros for a in answers} == {1_500}
    again = await admin.CreditAccount(credit, metadata=ADMIN_METADATA)
    assert again.available_micros == 1_500
    ledger = await admin.ListLedger(
        admin_pb2.ListLedgerRequest(account_id=account_id), metadata=ADMIN_METADATA
    )
    credited = [e for e in ledger.entries if e.credit_id == "inv-7"]
    assert [(e.available_delta_micros, e.note) for e in credited] == [(500, "invoice 7")]
    assert sum(e.available_delta_micros for e in ledger.entries) == 1_500


async def test_a_credit_id_reused_for_another_credit_is_already_exists(
    admin_stack: Stack,
) -> None:
    admin = admin_stack.admin
    account_id, _, _ = await admin_stack.new_account(0)
    other_id, _, _ = await admin_stack.new_account(0)
    await admin.CreditAccount(
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=5, credit_id="c-1"),
        metadata=ADMIN_METADATA,
    )
    for changed in (
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_micros=6, credit_id="c-1"),
        admin_pb2.CreditAccountRequest(account_id=other_id, amount_micros=5, credit_id="c-1"),
    ):
        refused = await _refused(admin.CreditAccount(changed, metadata=ADMIN_METADATA))
        assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
        assert _reason(refused) == errors_pb2.IDEMPOTENCY_CONFLICT
    for account in (account_id, other_id):
        got = await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account), metadata=ADMIN_METADATA
        )
        assert got.available_micros == (5 if account == account_id else 0)


async def test_the_listings_need_the_admin_token(admin_stack: Stack) -> None:
    refused = await _refused(
        admin_stack.admin.ListAccounts(
            admin_pb2.ListAccountsRequest(), metadata=(("authorization", "Bearer wrong"),)
        )
    )
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
