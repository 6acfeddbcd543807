"""``imagegen-run`` (``make run``): the service and the gateway together, in the foreground.

On the first start it creates a development account with a balance and prints its key
once, with a ready-to-paste curl. Ctrl-C (or SIGTERM) stops both processes cleanly.

It announces "imagegen is up" only when the two processes it started are the ones listening
on the ports: a port another process holds (an earlier ``make run``, say) stops it before it
starts anything, with one line naming the port; and where the system shows which process
owns a listening socket (Linux's /proc), it checks that the answers come from its own.
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
from collections.abc import Mapping
from pathlib import Path

from imagegen_service import keys
from imagegen_service.config import ServiceConfig, StartupError, database_error, load_config
from imagegen_service.logging_setup import exit_with_error, start_logging
from imagegen_service.money import format_usd
from imagegen_service.server import check_port_free
from imagegen_service.stores.ledger_sql import LedgerStore, SchemaOutOfDate, open_store

PROGRAM = "imagegen-run"
DEV_ACCOUNT_MARKER = "dev-account"
READY_TIMEOUT_SECONDS = 30.0


async def _open_store(database_url: str) -> LedgerStore:
    try:
        return await open_store(database_url)
    except Exception as exc:
        problem = database_error(database_url, exc)
        if problem is None:
            raise
        raise problem from None


async def _ensure_dev_account(config: ServiceConfig) -> tuple[str, str | None]:
    """Returns the dev account id, and its key if it was created just now."""
    marker = config.data_dir / DEV_ACCOUNT_MARKER
    store = await _open_store(config.database_url)
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


def _listening_sockets(port: int) -> set[int] | None:
    """The inodes of the TCP sockets listening on ``port``, or None where the system does
    not show them (no /proc: not Linux)."""
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:
            fields = row.split()
            # local address (hex ip:port), state (0A: LISTEN), inode
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                found.add(int(fields[9]))
    return found if readable else None


def _sockets_of(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in descriptors:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _foreign_listener(owners: Mapping[int, subprocess.Popen[bytes]]) -> int | None:
    """A port of ``owners`` (port -> the child that should listen there) on which some
    other process listens, or None when each is its child's alone (or cannot be told)."""
    for port, child in owners.items():
        listening = _listening_sockets(port)
        if listening is None:
            return None
        if not listening or not listening <= _sockets_of(child.pid):
            return port
    return None


def _wait_ready(
    url: str,
    children: Mapping[str, subprocess.Popen[bytes]],
    owners: Mapping[int, subprocess.Popen[bytes]],
) -> str | None:
    """None once the stack answers ready from the processes started here; else why not."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    foreign: int | None = None
    while time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                return (
                    f"{name} exited with status {child.returncode} before the stack was "
                    "ready; its error is above"
                )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    foreign = _foreign_listener(owners)
                    if foreign is None:
                        return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    if foreign is not None:
        return (
            f"port {foreign} answers, but not from a process this command started (another "
            "imagegen still running?); stop it, or choose other ports"
        )
    return f"the stack did not become ready within {READY_TIMEOUT_SECONDS:.0f} s"


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


def _check_ports(config: ServiceConfig, http_host: str, http_port: int) -> None:
    check_port_free(
        config.grpc_host, config.grpc_port, "gRPC", "IMAGEGEN_GRPC_PORT (or [service] grpc_port)"
    )
    if config.metrics_port:
        check_port_free(
            config.grpc_host,
            config.metrics_port,
            "metrics",
            "IMAGEGEN_METRICS_PORT (or [service] metrics_port; 0 turns it off)",
        )
    check_port_free(http_host, http_port, "HTTP", "IMAGEGEN_HTTP_PORT (or [gateway] http_port)")


def main() -> None:
    start_logging(PROGRAM)
    from http_gateway.config import GatewayConfigError, load_gateway_config

    try:
        config = load_config()
        gateway = load_gateway_config()
        _check_ports(config, gateway.http_host, gateway.http_port)
        account_id, secret = asyncio.run(_ensure_dev_account(config))
    except (StartupError, SchemaOutOfDate, GatewayConfigError) as exc:
        exit_with_error(PROGRAM, str(exc))
    http = f"http://{gateway.http_host}:{gateway.http_port}"
    env = dict(os.environ)
    # The children must see the same data directory even if it was relative.
    env["IMAGEGEN_DATA_DIR"] = str(config.data_dir.resolve())
    service = subprocess.Popen([sys.executable, "-m", "imagegen_service"], env=env)
    gateway_process = subprocess.Popen([sys.executable, "-m", "http_gateway"], env=env)
    children = {"imagegen-service": service, "imagegen-gateway": gateway_process}
    owners = {config.grpc_port: service, gateway.http_port: gateway_process}
    if config.metrics_port:
        owners[config.metrics_port] = service
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    problem = _wait_ready(f"{http}/readyz", children, owners)
    if problem is not None:
        _stop(list(children.values()))
        exit_with_error(PROGRAM, problem)
    print(_banner(config, http, account_id, secret), flush=True)
    while not stopping and all(child.poll() is None for child in children.values()):
        time.sleep(0.2)
    code = _stop(list(children.values()))
    sys.exit(0 if stopping else (code or 1))


if __name__ == "__main__":
    main()
