"""``imagegen-run`` (``make run``): the service and the gateway together, in the foreground.

On the first start it creates a development account with a balance and prints its key
once, with a ready-to-paste curl. Ctrl-C (or SIGTERM) stops both processes cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from imagegen_service import keys
from imagegen_service.config import ConfigError, ServiceConfig, load_config
from imagegen_service.logging_setup import configure_logging
from imagegen_service.money import format_usd
from imagegen_service.stores.ledger_sql import SchemaOutOfDate, open_store

DEV_ACCOUNT_MARKER = "dev-account"
READY_TIMEOUT_SECONDS = 30.0


async def _ensure_dev_account(config: ServiceConfig) -> tuple[str, str | None]:
    """Returns the dev account id, and its key if it was created just now."""
    marker = config.data_dir / DEV_ACCOUNT_MARKER
    store = await open_store(config.database_url)
    try:
        if marker.exists():
            return marker.read_text().strip(), None
        account = await store.create_account("development", config.dev_account_balance_micros)
        secret = keys.new_secret()
        await store.create_key(account.id, keys.hash_secret(secret))
        # Only the account id is kept: the key exists nowhere but in this terminal.
        marker.write_text(account.id + "\n")
        return account.id, secret
    finally:
        await store.close()


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _banner(config: ServiceConfig, http: str, account_id: str, secret: str | None) -> str:
    lines = [
        "",
        f"imagegen is up: REST {http}/v1   gRPC {config.grpc_address}",
        f"data directory: {config.data_dir.resolve()}",
    ]
    if secret:
        lines += [
            "",
            f"Development account {account_id} with "
            f"{format_usd(config.dev_account_balance_micros)} USD. Its API key, shown once:",
            f"  {secret}",
            "",
            "Try it:",
            f"  curl {http}/v1/images/generations \\",
            f'    -H "Authorization: Bearer {secret}" \\',
            '    -H "Content-Type: application/json" \\',
            '    -d \'{"model": "local-sketch", "prompt": "a lighthouse at dusk", '
            '"size": "512x512"}\'',
        ]
    else:
        lines += [
            "",
            f"Development account: {account_id}. Its key was shown on first start; for a new one:",
            f"  imagegen-admin keys create {account_id}",
        ]
    lines += ["", "Ctrl-C stops both processes.", ""]
    return "\n".join(lines)


def _stop(children: list[subprocess.Popen[bytes]], grace: float = 15.0) -> int:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return max((abs(c.returncode or 0) for c in children), default=0)


def main() -> None:
    configure_logging()
    try:
        config = load_config()
        account_id, secret = asyncio.run(_ensure_dev_account(config))
    except (ConfigError, SchemaOutOfDate) as exc:
        sys.exit(f"imagegen-run: {exc}")
    from http_gateway.config import load_gateway_config

    gateway = load_gateway_config()
    http = f"http://{gateway.http_host}:{gateway.http_port}"
    env = dict(os.environ)
    # The children must see the same data directory even if it was relative.
    env["IMAGEGEN_DATA_DIR"] = str(config.data_dir.resolve())
    children = [
        subprocess.Popen([sys.executable, "-m", "imagegen_service"], env=env),
        subprocess.Popen([sys.executable, "-m", "http_gateway"], env=env),
    ]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not _wait_ready(f"{http}/readyz", children):
        code = _stop(children)
        sys.exit(f"imagegen-run: the stack did not become ready (exit {code}); see the log above")
    print(_banner(config, http, account_id, secret), flush=True)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    code = _stop(children)
    sys.exit(0 if stopping else (code or 1))


if __name__ == "__main__":
    main()
