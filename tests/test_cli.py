"""``imagegen-admin`` and ``imagegen-run`` as an operator runs them: real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.fakes.loopback import free_port
from tests.fakes.openai_upstream import FakeOpenAIUpstream, slow

BIN = Path(sys.executable).parent


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(IMAGEGEN_DATA_DIR=str(data_dir), **extra)
    return env


def admin(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagegen-admin"), *args],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def admin_json(data_dir: Path, *args: str) -> Any:
    return json.loads(admin(data_dir, "--json", *args).stdout)


def test_admin_cli_manages_accounts_keys_and_ledger(tmp_path: Path) -> None:
    account = admin_json(tmp_path, "accounts", "create", "acme", "--balance", "2.50")
    assert account["available_micros"] == 2_500_000 and account["held_micros"] == 0

    credited = admin_json(tmp_path, "accounts", "credit", account["id"], "0.000001")
    assert credited["available_micros"] == 2_500_001
    shown = admin_json(tmp_path, "accounts", "show", account["id"])
    assert shown["available_usd"] == "2.500001" and shown["held_usd"] == "0.000000"

    key = admin_json(tmp_path, "keys", "create", account["id"])
    assert key["secret"].startswith("sk-") and key["account_id"] == account["id"]
    revoked = admin_json(tmp_path, "keys", "revoke", key["id"])
    assert revoked["revoked"] is not None

    ledger = admin_json(tmp_path, "ledger", account["id"])
    assert [e["kind"] for e in ledger["entries"]] == ["credit", "credit"]
    assert sum(e["available_delta_micros"] for e in ledger["entries"]) == 2_500_001

    # The secret is stored only as a hash.
    db = (tmp_path / "imagegen.db").read_bytes()
    assert key["secret"].encode() not in db


def test_admin_cli_human_output_shows_the_key_once_and_refuses_bad_input(
    tmp_path: Path,
) -> None:
    account = admin_json(tmp_path, "accounts", "create", "acme")
    human = admin(tmp_path, "keys", "create", account["id"]).stdout
    assert "only time the key is shown" in human
    assert re.search(r"sk-ig-[A-Za-z0-9_-]{43}", human)

    missing = admin(tmp_path, "accounts", "show", "acct_nope", check=False)
    assert missing.returncode != 0 and "No account 'acct_nope'" in missing.stderr
    too_fine = admin(tmp_path, "accounts", "credit", account["id"], "0.0000001", check=False)
    assert too_fine.returncode == 2 and "finer than one micro-dollar" in too_fine.stderr
    negative = admin(tmp_path, "accounts", "credit", account["id"], "-1", check=False)
    assert negative.returncode != 0 and "positive" in negative.stderr


def test_admin_cli_reports_schema_revision(tmp_path: Path) -> None:
    assert admin_json(tmp_path, "db", "upgrade") == {"revision": "0003"}
    assert admin_json(tmp_path, "db", "current") == {"revision": "0003", "head": "0003"}


def _post(url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.timeout(90)
def test_run_prints_a_working_dev_key_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    env = _env(
        tmp_path / "var",
        IMAGEGEN_HTTP_PORT=str(http_port),
        IMAGEGEN_GRPC_PORT=str(grpc_port),
        IMAGEGEN_METRICS_PORT=str(free_port()),
    )
    proc = subprocess.Popen(
        [str(BIN / "imagegen-run")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(line)
            if "Ctrl-C stops both" in line:
                break
        banner = "".join(printed)
        match = re.search(r"Bearer (sk-ig-[A-Za-z0-9_-]{43})", banner)
        assert match, banner
        status, body = _post(
            f"http://127.0.0.1:{http_port}/v1/images/generations",
            match.group(1),
            {"model": "local-sketch", "prompt": "a lighthouse at dusk", "size": "256x256"},
        )
        assert status == 200, body
        assert body["data"][0]["url"].startswith(f"http://127.0.0.1:{http_port}/v1/files/images/")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    # The key itself is kept nowhere on disk.
    for path in (tmp_path / "var").rglob("*"):
        if path.is_file():
            assert match.group(1).encode() not in path.read_bytes(), path


# -- make run: Ctrl-C and the first start --------------------------------------------------

SLOW_TOML = """
[providers.upstream]
type = "openai"
base_url = "{upstream_url}"
api_key_env = "IMAGEGEN_TEST_UPSTREAM_KEY"
timeout_seconds = 60
max_retries = 0

[models.slow-dalle]
provider = "upstream"
upstream_model = "dall-e-2"
sizes = ["256x256"]

[models.slow-dalle.price_usd]
default = "0.02"
"""
KEY_PATTERN = re.compile(r"Bearer (sk-ig-[A-Za-z0-9_-]{43})")


class Run:
    """``imagegen-run`` started as a terminal starts it: the leader of its own process
    group, so that ``ctrl_c`` reaches the whole group, as the terminal's Ctrl-C does."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str = "run") -> None:
        self.output = tmp_path / f"{name}.out"
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "imagegen-run")],
                env=env,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    async def banner(self) -> str:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops both" not in self.text():
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            await asyncio.sleep(0.05)
        return self.text()

    async def exit_status(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after {seconds} s"
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _run_env(tmp_path: Path, upstream_url: str) -> tuple[dict[str, str], int, int]:
    config = tmp_path / "imagegen.toml"
    config.write_text(SLOW_TOML.format(upstream_url=upstream_url))
    http_port, grpc_port = free_port(), free_port()
    env = _env(
        tmp_path / "var",
        IMAGEGEN_CONFIG=str(config),
        IMAGEGEN_HTTP_PORT=str(http_port),
        IMAGEGEN_GRPC_PORT=str(grpc_port),
        IMAGEGEN_METRICS_PORT="0",
        IMAGEGEN_TEST_UPSTREAM_KEY=UPSTREAM_KEY,
    )
    return env, http_port, grpc_port


async def _generate(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.post(
        url + "/v1/images/generations",
        json={"model": "slow-dalle", "prompt": "a snail", "size": "256x256"},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        body = await resp.json()
        if resp.status == 200:
            assert len(body["data"]) == 1
        return resp.status


async def _hits(fake: FakeOpenAIUpstream, count: int) -> None:
    deadline = time.monotonic() + 10
    while fake.hits < count:
        assert time.monotonic() < deadline, fake.hits
        await asyncio.sleep(0.05)


def _nothing_listens(*ports: int) -> None:
    for port in ports:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass


@pytest.mark.timeout(90)
async def test_one_ctrl_c_lets_both_processes_finish_every_request_in_flight(
    tmp_path: Path,
) -> None:
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY, default=slow(3.0)) as fake:
        env, http_port, grpc_port = _run_env(tmp_path, fake.base_url)
        run = Run(tmp_path, env)
        try:
            match = KEY_PATTERN.search(await run.banner())
            assert match, run.text()
            url = f"http://127.0.0.1:{http_port}"
            async with aiohttp.ClientSession() as http:
                in_flight = [
                    asyncio.create_task(_generate(http, url, match.group(1))) for _ in range(8)
                ]
                await _hits(fake, 8)
                run.ctrl_c()
                assert await asyncio.gather(*in_flight) == [200] * 8
            assert await run.exit_status(30) == 0
        finally:
            run.kill()
    _nothing_listens(http_port, grpc_port)
    output = run.text()
    assert "Traceback" not in output, output
    assert "Ctrl-C again stops at once" in output


@pytest.mark.timeout(90)
async def test_a_second_ctrl_c_stops_a_drain_at_once_and_quietly(tmp_path: Path) -> None:
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY, default=slow(30.0)) as fake:
        env, http_port, grpc_port = _run_env(tmp_path, fake.base_url)
        run = Run(tmp_path, env)
        try:
            match = KEY_PATTERN.search(await run.banner())
            assert match, run.text()
            url = f"http://127.0.0.1:{http_port}"
            async with aiohttp.ClientSession() as http:
                in_flight = asyncio.create_task(_generate(http, url, match.group(1)))
                await _hits(fake, 1)
                run.ctrl_c()
                await asyncio.sleep(1.0)
                assert run.proc.poll() is None, "the first Ctrl-C must wait for the request"
                started = time.monotonic()
                run.ctrl_c()
                assert await run.exit_status(5) == 130
                assert time.monotonic() - started < 3
                with contextlib.suppress(aiohttp.ClientError):
                    await in_flight
        finally:
            run.kill()
    _nothing_listens(http_port, grpc_port)
    assert "Traceback" not in run.text(), run.text()


@pytest.mark.timeout(120)
async def test_the_dev_key_is_shown_until_a_start_got_as_far_as_showing_it(
    tmp_path: Path,
) -> None:
    async with FakeOpenAIUpstream(api_key=UPSTREAM_KEY) as fake:
        env, http_port, _ = _run_env(tmp_path, fake.base_url)
        # A first start that never gets ready (its gateway dials nothing) and is given up.
        nowhere = {**env, "IMAGEGEN_SERVICE_ADDRESS": f"127.0.0.1:{free_port()}"}
        failed = Run(tmp_path, nowhere, "failed")
        try:
            marker = tmp_path / "var" / "dev-account"
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert time.monotonic() < deadline, failed.text()
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            failed.ctrl_c()
            assert await failed.exit_status(15) != 0
        finally:
            failed.kill()
        assert "Ctrl-C stops both" not in failed.text()
        assert "stopped before the stack was ready" in failed.text()

        second = Run(tmp_path, env, "second")
        try:
            match = KEY_PATTERN.search(await second.banner())
            assert match, second.text()
            assert "shown on first start" not in second.text()
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{http_port}"
                assert await _generate(http, url, match.group(1)) == 200
            second.ctrl_c()
            assert await second.exit_status(30) == 0
        finally:
            second.kill()

        third = Run(tmp_path, env, "third")
        try:
            banner = await third.banner()
            assert not KEY_PATTERN.search(banner)
            assert "shown on first start" in banner
            third.ctrl_c()
            assert await third.exit_status(30) == 0
        finally:
            third.kill()
    # The first start's key, never shown, was revoked; the shown one is the account's only.
    listed = admin_json(tmp_path / "var", "keys", "list", marker.read_text().strip())["keys"]
    assert sorted(k["revoked"] is None for k in listed) == [False, True], listed


def test_admin_cli_lists_pages_and_credits_once_per_credit_id(tmp_path: Path) -> None:
    first = admin_json(tmp_path, "accounts", "create", "one")
    second = admin_json(tmp_path, "accounts", "create", "two")
    page = admin_json(tmp_path, "accounts", "list", "--page-size", "1")
    assert len(page["accounts"]) == 1 and page["next_page_token"]
    rest = admin_json(tmp_path, "accounts", "list", "--page-token", page["next_page_token"])
    assert rest["next_page_token"] == ""
    listed = [a["id"] for a in page["accounts"] + rest["accounts"]]
    assert sorted(listed) == sorted([first["id"], second["id"]])

    key = admin_json(tmp_path, "keys", "create", first["id"])
    admin_json(tmp_path, "keys", "limits", key["id"], "--rpm", "7")
    keys = admin_json(tmp_path, "keys", "list", first["id"])
    assert [(k["id"], k["requests_per_minute"]) for k in keys["keys"]] == [(key["id"], 7)]

    for _ in range(2):
        credited = admin_json(
            tmp_path, "accounts", "credit", first["id"], "1.00", "--credit-id", "wire-42"
        )
        assert credited["available_micros"] == 1_000_000
    conflict = admin(
        tmp_path, "accounts", "credit", first["id"], "2.00", "--credit-id", "wire-42", check=False
    )
    assert conflict.returncode != 0 and "wire-42" in conflict.stderr
    ledger = admin_json(tmp_path, "ledger", first["id"])
    assert [e["credit_id"] for e in ledger["entries"]] == ["wire-42"]
