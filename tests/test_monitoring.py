"""What on-call runs against: the alert rules pass ``promtool check rules`` and their unit
tests, every metric the alerts and the Grafana dashboard query is one the processes really
export, and both processes' expositions pass ``promtool check metrics``.

promtool comes with Debian's ``prometheus`` package; without it these tests skip on a
laptop and fail in CI (``CI=true``), which installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import generate_latest

from tests.conftest import bearer
from tests.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "k8s" / "components" / "servicemonitor"
# Series Prometheus makes itself, not the processes.
PROMETHEUS_OWN = {"up"}
# PromQL words that look like metric names.
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "rate",
    "increase",
    "by",
    "le",
    "histogram_quantile",
    "without",
    "and",
    "or",
    "unless",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
    pytest.skip("promtool is missing: apt-get install prometheus (Debian) to run these")


def _rules() -> dict[str, Any]:
    rule: dict[str, Any] = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    return {"groups": rule["spec"]["groups"]}


def _alerts() -> list[dict[str, Any]]:
    return [r for group in _rules()["groups"] for r in group["rules"] if "alert" in r]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((COMPONENT / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def _metric_names(expr: str) -> set[str]:
    # Strip label matchers and strings, then take identifiers that are not PromQL words,
    # label names in by (...) clauses, or durations.
    without_braces = re.sub(r"\{[^}]*\}", "", expr)
    without_by = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_braces)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_by)
    # An identifier right after a digit is a number's exponent (1e6), not a name.
    names = set(re.findall(r"(?<![0-9.])[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges))
    return names - PROMQL_WORDS


def _exported(exposition: str) -> set[str]:
    """Every series name an exposition can carry: each family's samples (with the
    _total/_bucket/_count/_sum suffixes), and its name itself."""
    names: set[str] = set()
    for line in exposition.splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if not match:
            continue
        name, kind = match.groups()
        names.add(name)
        if kind == "counter":
            names.add(name + "_total" if not name.endswith("_total") else name)
        elif kind == "histogram":
            names |= {name + "_bucket", name + "_count", name + "_sum"}
    return names


def test_the_alert_rules_pass_promtools_checks_and_their_unit_tests(tmp_path: Path) -> None:
    promtool = _promtool()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rules()))
    shutil.copy(COMPONENT / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    checked = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_and_a_summary() -> None:
    tests = yaml.safe_load((COMPONENT / "alerts_test.yaml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == tested
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "warn")
        assert alert["annotations"]["summary"]


async def _expositions(stack: Stack, http: aiohttp.ClientSession) -> tuple[str, str]:
    """The gateway's /metrics and the service's registry, after one generation."""
    _, key, _ = await stack.new_account(1_000_000)
    body = {"model": "local-sketch", "prompt": "a lighthouse", "size": "256x256"}
    async with http.post(
        stack.http_url + "/v1/images/generations", json=body, headers=bearer(key)
    ) as resp:
        assert resp.status == 200
    async with http.get(stack.http_url + "/metrics") as resp:
        assert resp.status == 200
        gateway = await resp.text()
    service = generate_latest(stack.running.pipeline.metrics.registry).decode()
    return gateway, service


async def test_every_metric_the_alerts_and_the_dashboard_query_is_exported(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gateway, service = await _expositions(stack, http)
    exported = _exported(gateway) | _exported(service)
    queried: dict[str, set[str]] = {}
    for alert in _alerts():
        names = _metric_names(alert["expr"])
        assert names, f"{alert['alert']} names no metric"
        queried[alert["alert"]] = names - PROMETHEUS_OWN
    for i, expr in enumerate(_dashboard_exprs()):
        queried[f"dashboard query {i}"] = _metric_names(expr)
    missing = {where: names - exported for where, names in queried.items() if names - exported}
    assert not missing, missing
    assert all(_metric_names(expr) for expr in _dashboard_exprs()), "a panel names no metric"


async def test_both_processes_expositions_pass_promtool_check_metrics(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    promtool = _promtool()
    for exposition in await _expositions(stack, http):
        checked = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_both_processes_export_runtime_metrics_and_their_build(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    for exposition in await _expositions(stack, http):
        for name in (
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "python_gc_collections_total",
            "python_info",
        ):
            assert re.search(rf"^{name}(\{{[^}}]*\}})? ", exposition, re.M), name
        [build] = re.findall(r"^imagegen_build_info\{(.*)\} 1\.0$", exposition, re.M)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', build))
        assert labels["version"] == "0.1.0"
        # A checkout knows its commit: 40 hex digits.
        assert re.fullmatch(r"[0-9a-f]{40}", labels["git_commit"]), labels
