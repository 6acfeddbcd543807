"""``imagegen-run`` (``make run``): the service and the gateway together, in the foreground.

On the first start it creates a development account with a balance and prints its key
once, with a ready-to-paste curl. A key is recorded as shown only once the banner is out: a
first start that fails (a taken port, say) leaves the next start to make a new key and show
that one (the unseen key is revoked).

Ctrl-C (or SIGTERM) stops both processes cleanly: the terminal sends SIGINT to its whole
foreground process group, so the children run in a process group of their own and get one
SIGTERM from here; each finishes the requests it holds (the service within the slowest
provider's timeout) and exits. A second Ctrl-C kills them at once, quietly.

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
from collections.abc import Callable, Mapping
from pathlib import Path

from imagegen_service import keys
from imagegen_service.config import ServiceConfig, StartupError, load_config
from imagegen_service.logging_setup import exit_with_error, start_logging
from imagegen_service.money import format_usd
from imagegen_service.server import check_port_free, drain_seconds, open_ledger
from imagegen_service.stores.ledger_sql import SchemaOutOfDate

PROGRAM = "imagegen-run"
DEV_ACCOUNT_MARKER = "dev-account"
# The id of the development key made at a start whose banner was not printed (yet).
DEV_KEY_PENDING = "dev-key-pending"
READY_TIMEOUT_SECONDS = 30.0
# Beyond the children's own drain: their start-up and closing.
STOP_MARGIN_SECONDS = 15.0
# A stack that never became ready holds no requests worth waiting for.
READY_STOP_SECONDS = 5.0


async def _ensure_dev_account(config: ServiceConfig) -> tuple[str, str | None]:
    """Returns the dev account id, and a new key for it until one has been shown
    (``_key_shown`` records that, once the banner is printed)."""
    marker = config.data_dir / DEV_ACCOUNT_MARKER
    pending = config.data_dir / DEV_KEY_PENDING
    store = await open_ledger(config.database_url)
    try:
        if marker.exists():
            account_id = marker.read_text().strip()
            if not pending.exists():
                return account_id, None
            # Made at a start that failed before its banner: nobody has seen it.
            await store.revoke_key(pending.read_text().strip())
        else:
            account = await store.create_account("development", config.dev_account_balance_micros)
            account_id = account.id
        secret = keys.new_secret()
        key = await store.create_key(account_id, keys.hash_secret(secret))
        # Only the ids are kept: the key exists nowhere but in this terminal.
        pending.write_text(key.id + "\n")
        marker.write_text(account_id + "\n")
        return account_id, secret
    finally:
        await store.close()


def _key_shown(config: ServiceConfig) -> None:
    (config.data_dir / DEV_KEY_PENDING).unlink(missing_ok=True)


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
    interrupted: Callable[[], bool] = lambda: False,
) -> str | None:
    """None once the stack answers ready from the processes started here; else why not."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    foreign: int | None = None
    while time.monotonic() < deadline:
        if interrupted():
            return "stopped before the stack was ready"
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


def _stop(
    children: list[subprocess.Popen[bytes]],
    grace: float,
    at_once: Callable[[], bool] = lambda: False,
) -> int:
    """Sends each child one SIGTERM and waits for them to drain, up to ``grace``; kills
    them when that runs out or as soon as ``at_once()`` says so (a second Ctrl-C)."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(child.poll() is None for child in children):
        if at_once() or time.monotonic() > deadline:
            for child in children:
                if child.poll() is None:
                    child.kill()
            for child in children:
                child.wait()
            break
        time.sleep(0.05)
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
    # Their own process group: the terminal's Ctrl-C reaches this process alone, which
    # passes it on once, as SIGTERM.
    service = subprocess.Popen(
        [sys.executable, "-m", "imagegen_service"],
        env=env,
        stdin=subprocess.DEVNULL,
        process_group=0,
    )
    gateway_process = subprocess.Popen(
        [sys.executable, "-m", "http_gateway"],
        env=env,
        stdin=subprocess.DEVNULL,
        process_group=0,
    )
    children = {"imagegen-service": service, "imagegen-gateway": gateway_process}
    owners = {config.grpc_port: service, gateway.http_port: gateway_process}
    if config.metrics_port:
        owners[config.metrics_port] = service
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    grace = drain_seconds(config) + STOP_MARGIN_SECONDS
    problem = _wait_ready(f"{http}/readyz", children, owners, lambda: signals > 0)
    if problem is not None:
        _stop(list(children.values()), READY_STOP_SECONDS, lambda: signals > 1)
        exit_with_error(PROGRAM, problem)
    print(_banner(config, http, account_id, secret), flush=True)
    _key_shown(config)
    while not signals and all(child.poll() is None for child in children.values()):
        time.sleep(0.2)
    if signals:
        print(
            "Stopping: finishing the requests in flight. Ctrl-C again stops at once.",
            file=sys.stderr,
            flush=True,
        )
    code = _stop(list(children.values()), grace, lambda: signals > 1)
    if signals > 1:
        sys.exit(130)
    sys.exit(0 if signals else (code or 1))


if __name__ == "__main__":
    main()
