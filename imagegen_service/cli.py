"""``imagegen-admin``: the operator's command line, on the service's own configuration.

It works on the database directly, so it needs no running service:
``accounts``, ``keys``, ``ledger`` and ``db``; ``providers check`` asks the upstreams which
configured models they still offer. ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from imagegen_service import catalog_check, errors, keys
from imagegen_service.config import StartupError, database_error, load_config
from imagegen_service.logging_setup import exit_with_error, start_logging
from imagegen_service.money import format_usd, parse_usd
from imagegen_service.stores.ledger_sql import (
    Account,
    ApiKey,
    LedgerStore,
    SchemaOutOfDate,
    open_store,
)

Printer = Callable[[Any], None]


def _account_json(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "available_micros": a.available_micros,
        "held_micros": a.held_micros,
        "available_usd": format_usd(a.available_micros),
        "held_usd": format_usd(a.held_micros),
        "created": a.created,
    }


def _key_json(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "account_id": k.account_id,
        "created": k.created,
        "revoked": k.revoked,
        "requests_per_minute": k.requests_per_minute,
        "images_per_minute": k.images_per_minute,
    }


def _limit(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a limit must be 0 (unlimited) or more")
    return value


def _usd(text: str) -> int:
    try:
        return parse_usd(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _accounts_create(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    return _account_json(await store.create_account(args.name, args.balance))


async def _accounts_show(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    return _account_json(await store.get_account(args.account))


async def _accounts_credit(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    return _account_json(await store.credit(args.account, args.amount, args.note, args.credit_id))


async def _accounts_list(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    page = await store.list_accounts(args.page_size, args.page_token)
    return {
        "accounts": [_account_json(a) for a in page.items],
        "next_page_token": page.next_token,
    }


async def _keys_list(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    page = await store.list_keys(args.account, args.page_size, args.page_token)
    return {"keys": [_key_json(k) for k in page.items], "next_page_token": page.next_token}


async def _keys_create(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    secret = keys.new_secret()
    key = await store.create_key(args.account, keys.hash_secret(secret))
    return {**_key_json(key), "secret": secret}


async def _keys_revoke(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    return _key_json(await store.revoke_key(args.key_id))


async def _keys_limits(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    rpm = None if args.clear else args.requests_per_minute
    ipm = None if args.clear else args.images_per_minute
    return _key_json(await store.set_key_limits(args.key_id, rpm, ipm))


async def _ledger(store: LedgerStore, args: argparse.Namespace) -> dict[str, Any]:
    page = await store.ledger_page(args.account, args.limit, args.page_token)
    entries = page.items
    return {
        "account_id": args.account,
        "next_page_token": page.next_token,
        "entries": [
            {
                "id": e.id,
                "kind": e.kind,
                "available_delta_micros": e.available_delta_micros,
                "held_delta_micros": e.held_delta_micros,
                "hold_id": e.hold_id,
                "request_id": e.request_id,
                "note": e.note,
                "created": e.created,
                "credit_id": e.credit_id,
            }
            for e in entries
        ],
    }


def _print_human(result: dict[str, Any]) -> None:
    if "accounts" in result or "keys" in result:
        for item in result.get("accounts", result.get("keys", [])):
            print("  ".join(f"{name}={value}" for name, value in item.items()))
        if result["next_page_token"]:
            print(f"\nmore: --page-token {result['next_page_token']}")
        return
    if "entries" in result:
        print(f"{'id':>8}  {'kind':<8} {'available':>14} {'held':>14}  request")
        for e in result["entries"]:
            print(
                f"{e['id']:>8}  {e['kind']:<8} {format_usd(e['available_delta_micros']):>14} "
                f"{format_usd(e['held_delta_micros']):>14}  {e['request_id'] or e['note']}"
            )
        return
    for name, value in result.items():
        if name == "secret":
            continue
        print(f"{name:<17} {value}")
    if "secret" in result:
        print(f"\nsecret            {result['secret']}")
        print("This is the only time the key is shown. Store it now.")


def build_parser() -> argparse.ArgumentParser:
    # --json may stand before or after the subcommand; SUPPRESS keeps a subcommand's
    # parser from resetting a flag given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    paging = argparse.ArgumentParser(add_help=False)
    paging.add_argument("--page-size", type=int, default=100)
    paging.add_argument("--page-token", default="", help="the next_page_token of the page before")
    parser = argparse.ArgumentParser(
        prog="imagegen-admin",
        description="Manage accounts, API keys and balances. Uses IMAGEGEN_CONFIG and "
        "IMAGEGEN_DATA_DIR / IMAGEGEN_DATABASE_URL like the service.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    groups = parser.add_subparsers(dest="group", required=True)

    accounts = groups.add_parser("accounts", help="create, show and credit accounts")
    acc = accounts.add_subparsers(dest="command", required=True)
    p = acc.add_parser("create", parents=[common], help="create an account")
    p.add_argument("name")
    p.add_argument("--balance", type=_usd, default=0, help="opening balance in USD, e.g. 10.00")
    p.set_defaults(run=_accounts_create)
    p = acc.add_parser("show", parents=[common], help="show available and held balance")
    p.add_argument("account")
    p.set_defaults(run=_accounts_show)
    p = acc.add_parser("credit", parents=[common], help="add funds, in USD")
    p.add_argument("account")
    p.add_argument("amount", type=_usd)
    p.add_argument("--note", default="")
    p.add_argument(
        "--credit-id", default="", help="makes a retry safe: a credit with this id counts once"
    )
    p.set_defaults(run=_accounts_credit)
    p = acc.add_parser("list", parents=[common, paging], help="list accounts, oldest first")
    p.set_defaults(run=_accounts_list)

    keys_parser = groups.add_parser("keys", help="create and revoke API keys")
    key_cmds = keys_parser.add_subparsers(dest="command", required=True)
    p = key_cmds.add_parser("create", parents=[common], help="create a key (shown once)")
    p.add_argument("account")
    p.set_defaults(run=_keys_create)
    p = key_cmds.add_parser("revoke", parents=[common], help="revoke a key at once")
    p.add_argument("key_id")
    p.set_defaults(run=_keys_revoke)
    p = key_cmds.add_parser("list", parents=[common, paging], help="list an account's keys")
    p.add_argument("account")
    p.set_defaults(run=_keys_list)

    p = key_cmds.add_parser(
        "limits", parents=[common], help="set a key's own rate limits (0 = unlimited)"
    )
    p.add_argument("key_id")
    p.add_argument("--rpm", dest="requests_per_minute", type=_limit, default=None)
    p.add_argument("--ipm", dest="images_per_minute", type=_limit, default=None)
    p.add_argument("--clear", action="store_true", help="back to the configured defaults")
    p.set_defaults(run=_keys_limits)

    p = groups.add_parser("ledger", parents=[common], help="list an account's ledger entries")
    p.add_argument("account")
    p.add_argument("--limit", type=int, default=100, help="entries per page, newest first")
    p.add_argument("--page-token", default="", help="the next_page_token of the page before")
    p.set_defaults(run=_ledger)

    db = groups.add_parser("db", help="database schema")
    db_cmds = db.add_subparsers(dest="command", required=True)
    p = db_cmds.add_parser("upgrade", parents=[common], help="migrate to the newest schema")
    p.set_defaults(run=None, db="upgrade")
    p = db_cmds.add_parser("current", parents=[common], help="show the schema revision")
    p.set_defaults(run=None, db="current")

    providers = groups.add_parser("providers", help="the configured upstream providers")
    provider_cmds = providers.add_subparsers(dest="command", required=True)
    p = provider_cmds.add_parser(
        "check",
        parents=[common],
        help="ask each provider with a credential which catalog models it still offers; "
        "exit 1 if any is missing, 2 if a provider could not be asked",
    )
    p.set_defaults(run=None, db=None, check=True)
    return parser


def _check_providers(json_output: bool) -> int:
    config = load_config()
    rows = asyncio.run(catalog_check.check_catalog(config))
    if json_output:
        sys.stdout.write(orjson.dumps({"models": [_row_json(r) for r in rows]}).decode() + "\n")
    else:
        print(f"{'model':<28} {'provider':<14} {'upstream model':<34} status")
        for r in rows:
            detail = f" ({r.detail})" if r.detail else ""
            print(f"{r.model:<28} {r.provider:<14} {r.upstream_model:<34} {r.status}{detail}")
    return catalog_check.exit_status(rows)


def _row_json(row: catalog_check.Row) -> dict[str, str]:
    return {
        "model": row.model,
        "provider": row.provider,
        "upstream_model": row.upstream_model,
        "status": row.status,
        "detail": row.detail,
    }


async def _run_db(database_url: str, action: str) -> dict[str, Any]:
    store = LedgerStore(database_url)
    try:
        if action == "upgrade":
            return {"revision": await store.upgrade()}
        return {"revision": await store.current_revision(), "head": store.head_revision()}
    finally:
        await store.close()


async def _run(
    database_url: str,
    work: Callable[[LedgerStore, argparse.Namespace], Awaitable[dict[str, Any]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    store = await open_store(database_url)
    try:
        return await work(store, args)
    finally:
        await store.close()


PROGRAM = "imagegen-admin"


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # Errors are plain lines for the operator at a terminal; JSON when IMAGEGEN_LOG_FORMAT
    # asks for it (the Kubernetes migration Job, say).
    start_logging(PROGRAM, json_unless_terminal=False)
    if getattr(args, "check", False):
        try:
            sys.exit(_check_providers(args.json))
        except StartupError as exc:
            exit_with_error(PROGRAM, str(exc))
    try:
        config = load_config()
    except StartupError as exc:
        exit_with_error(PROGRAM, str(exc))
    try:
        if args.run is None:
            result = asyncio.run(_run_db(config.database_url, args.db))
        else:
            result = asyncio.run(_run(config.database_url, args.run, args))
    except SchemaOutOfDate as exc:
        exit_with_error(PROGRAM, str(exc))
    except errors.ImagegenError as exc:
        exit_with_error(PROGRAM, exc.message)
    except Exception as exc:
        # All it does is database work: a failure to reach the database says so in one line.
        problem = database_error(config.database_url, exc)
        if problem is None:
            raise
        exit_with_error(PROGRAM, str(problem))
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        _print_human(result)


if __name__ == "__main__":
    main()
