"""``imagegen-admin`` and ``imagegen-run`` as an operator runs them: real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.loopback import free_port

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
    assert admin_json(tmp_path, "db", "upgrade") == {"revision": "0002"}
    assert admin_json(tmp_path, "db", "current") == {"revision": "0002", "head": "0002"}


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
