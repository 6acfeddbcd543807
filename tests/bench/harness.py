"""The benchmark harness behind ``make bench``.

For each case it starts the real stack as production runs it (``python -m imagegen_service``
and ``python -m http_gateway``, two processes on free loopback ports) on a temporary data
directory and a temporary TOML whose local provider has ``precomputed = true``, creates an
account and a key with ``imagegen-admin``, captures one real response, warms up, then drives
the stack with wrk for a fixed time. It then serves the captured response verbatim from a
bare aiohttp server (``tests/bench/floor.py``) and drives that with the same wrk settings;
then, unless told not to, the design's ceiling (``tests/bench/ceiling.py``: a minimal
aiohttp gateway making one grpc.aio call to a service that does nothing, answering the same
image), again with the same wrk settings. When asked (``BENCH_INPROCESS=1``), a third
reference follows: the same work without the gRPC hop (``tests/bench/inprocess.py``: the
real gateway's code calling the real service's pipeline in one process), on a data
directory and TOML of its own, with the same wrk settings and the same billing check.

Cases 5-7 take the path production runs: the model is served by an ``openai`` provider
whose base_url is a loopback upstream (``tests/bench/upstream.py``: OpenAI's Images API
answering the floor's PNG). Cases 5 and 6 (1 and 32 connections) also drive the upstream
alone with the same wrk settings, and skip the ceiling and the in-process server (neither
calls a provider). Case 7 holds 2,000 connections against an upstream that answers after
2 s (the provider's max_concurrency and max_connections 2,000, the price one micro-dollar)
for at least 10 s, and reports throughput against the ideal, latency, errors and peak RSS
above idle per request in flight; it raises the open-file limit when it must. In these
cases billing is checked against the generations charged (see ``Billing``).

A fresh stack per case keeps each process's peak RSS (VmHWM) specific to that case, and
the peak is reset to the idle size before the warm-up (``mark_idle``), so that a start-up
peak does not count as growth under load.
After each case the account must show exactly price x images delivered spent and nothing
held. Targets are reported, not enforced: the exit status is non-zero only when the harness
itself fails or billing is not exact.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import image_checks

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LUA_SCRIPT = HERE / "generations.lua"
ROUTE = "/v1/images/generations"
PROMPT = "a lighthouse at dusk over a calm sea"
# Prices of the benchmark catalog, in micro-dollars per image (written to the TOML as USD).
PRICE_MICROS = {"256x256": 1_000, "1024x1024": 2_000}
DEFAULT_PRICE_MICROS = 2_000
OPENING_BALANCE_USD = "1000000"
WARMUP_SECONDS = 2.0
WRK_TIMEOUT = "30s"
READY_TIMEOUT = 60.0
# The run at one connection that gives the base of the memory per request in flight goes
# on, in rounds of the warm-up's length, until the processes' peaks grow by less than this
# in a round, or for this long at most: what fills once under any load (SQLite's page
# caches as the ledger grows, up to 2 MiB per connection) is then in the base.
ONE_CONNECTION_FLAT_KIB = 128
ONE_CONNECTION_MAX_SECONDS = 30.0
QUIESCE_TIMEOUT = 120.0
RSS_SAMPLE_SECONDS = 0.02
PACKAGES = (
    "grpcio",
    "protobuf",
    "aiohttp",
    "sqlalchemy",
    "aiosqlite",
    "alembic",
    "orjson",
    "structlog",
    "pillow",
    "uvloop",
)

# Targets from the issue "Speed on the path production runs"; reported, not enforced.
# Local path (cases 1, 2): against the design's ceiling.
TARGET_CEILING_SHARE = 0.80
TARGET_P50_BEYOND_CEILING_MS = 0.3
# HTTP provider (cases 5, 6): over the upstream alone at 1 connection, of the floor at 32.
TARGET_UPSTREAM_P50_ADDED_MS = 1.5
TARGET_UPSTREAM_FLOOR_SHARE = 0.12
# 4x1024x1024 b64_json (case 3).
TARGET_MEMORY_X_RESPONSE = 2.0
# Requests in flight (case 7).
TARGET_IDEAL_SHARE = 0.95
TARGET_INFLIGHT_P99_MS = 2_300
TARGET_INFLIGHT_KIB = 64
# Cores used by other processes during a run above which its figures are flagged as noisy.
NOISY_OTHER_CORES = 0.25


class BenchError(RuntimeError):
    """The harness itself failed (not a missed target)."""


@dataclass(frozen=True)
class Case:
    number: int
    size: str
    n: int
    response_format: str
    connections: int
    # The model asked for: "local-sketch" (the local provider, precomputed) or
    # UPSTREAM_MODEL (an `openai` provider whose base_url is tests/bench/upstream.py).
    model: str = "local-sketch"
    # Seconds the loopback upstream waits before answering; None: no upstream (local).
    upstream_delay: float | None = None
    # The catalog price of one image for this case's model; None: PRICE_MICROS by size.
    price_micros: int | None = None
    name: str = ""

    @property
    def title(self) -> str:
        conns = "conn" if self.connections == 1 else "conns"
        if self.upstream_delay is not None and self.upstream_delay >= 1:
            return f"{self.name}, {self.connections:,} in flight"
        prefix = f"{self.name} " if self.name else ""
        return f"{prefix}{self.n}x{self.size} {self.response_format}, {self.connections} {conns}"

    @property
    def uses_upstream(self) -> bool:
        return self.upstream_delay is not None

    @property
    def holds_in_flight(self) -> bool:
        """A slow-upstream case: many connections held open, measured against the ideal
        (connections / delay) rather than against the floor."""
        return self.upstream_delay is not None and self.upstream_delay >= 1

    @property
    def unit_price_micros(self) -> int:
        if self.price_micros is not None:
            return self.price_micros
        return PRICE_MICROS.get(self.size, DEFAULT_PRICE_MICROS)

    def request_body(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "prompt": PROMPT,
                "n": self.n,
                "size": self.size,
                "response_format": self.response_format,
            }
        )


# The model of the upstream cases, served by an `openai` provider whose base_url is the
# loopback upstream (tests/bench/upstream.py); its id belongs to no OpenAI family, so it is
# priced per image and the request takes the compatible-server path (response_format sent).
UPSTREAM_MODEL = "bench-upstream"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
# The provider's max_concurrency and max_connections: at least this, and at least the
# case's connections, so that the provider's own bound is not what is measured.
UPSTREAM_MIN_CONCURRENCY = 64
# The slow-upstream case: how long the upstream waits, and how many connections wrk holds.
SLOW_UPSTREAM_SECONDS = 2.0
SLOW_UPSTREAM_CONNECTIONS = 2_000
# Its measured run lasts at least this many delays (10 s), whatever BENCH_DURATION says.
SLOW_UPSTREAM_ROUNDS = 5
# Its catalog price: one micro-dollar per image (the smallest the catalog takes).
SLOW_UPSTREAM_PRICE_MICROS = 1
# Connections its warm-up uses (code paths, not the 2,000 connections' buffers).
SLOW_UPSTREAM_WARMUP_CONNECTIONS = 32
# File descriptors each process needs beyond one per connection (logs, SQLite, gRPC, ...).
NOFILE_SLACK = 1_024

CASES: tuple[Case, ...] = (
    Case(1, "256x256", 1, "b64_json", 1),
    Case(2, "256x256", 1, "b64_json", 32),
    Case(3, "1024x1024", 4, "b64_json", 8),
    Case(4, "256x256", 1, "url", 32),
    Case(5, "256x256", 1, "b64_json", 1, UPSTREAM_MODEL, 0.0, name="HTTP provider"),
    Case(6, "256x256", 1, "b64_json", 32, UPSTREAM_MODEL, 0.0, name="HTTP provider"),
    Case(
        7,
        "256x256",
        1,
        "b64_json",
        SLOW_UPSTREAM_CONNECTIONS,
        UPSTREAM_MODEL,
        SLOW_UPSTREAM_SECONDS,
        SLOW_UPSTREAM_PRICE_MICROS,
        name="2 s upstream",
    ),
)


# -- small helpers ----------------------------------------------------------------------


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status_kib(pid: int, field_name: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field_name}")


def mark_idle(pid: int) -> int:
    """The process's resident size now (VmRSS, KiB), taken as its idle size; its peak
    (VmHWM) is reset to it, so that the peak read after a run is the run's, not an earlier
    one's: a service's start-up can leave a high-water mark above what it holds once
    idle, which would otherwise count as growth under load."""
    # proc(5), /proc/pid/clear_refs: writing 5 resets the peak resident size (Linux >= 4.0).
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        raise BenchError(f"cannot reset the peak RSS of process {pid}: {exc}") from None
    return proc_status_kib(pid, "VmRSS")


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of the process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5) (utime, stime); the split starts at field 3.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_seconds(pid: int) -> float:
    user, system = proc_cpu_times(pid)
    return user + system


def proc_context_switches(pid: int) -> int:
    """Voluntary context switches of the process's live threads so far: each is a thread
    going to sleep (waiting for a lock, a queue, the GIL, I/O) and being woken again."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class MachineLoad:
    """CPU use during one measured run, in cores: wrk's, and everyone else's (processes
    that are neither wrk nor the servers measured: other work on a shared machine)."""

    wrk_cores: float = 0.0
    other_cores: float = 0.0


class LoadMeter:
    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids

    def __enter__(self) -> LoadMeter:
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_seconds()
        self.children0 = children_cpu_seconds()
        self.procs0 = sum(proc_cpu_seconds(p) for p in self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = max(1e-6, time.monotonic() - self.t0)
        wrk = children_cpu_seconds() - self.children0
        procs = sum(proc_cpu_seconds(p) for p in self.pids) - self.procs0
        busy = machine_busy_seconds() - self.busy0
        self.load = MachineLoad(wrk / elapsed, max(0.0, busy - wrk - procs) / elapsed)


def mib(kib: int) -> float:
    return kib / 1024


def http_get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True
    return False


def generate(url: str, case: Case, authorization: str) -> bytes:
    """POSTs the case's request to a gateway; its answer, checked for the case's shape."""
    request = urllib.request.Request(
        url + ROUTE,
        data=case.request_body().encode(),
        headers={"Content-Type": "application/json", "Authorization": authorization},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            body: bytes = answer.read()
    except urllib.error.HTTPError as exc:
        raise BenchError(f"case {case.number}: {exc.code} {exc.read()[:500]!r}") from None
    data = json.loads(body)["data"]
    key = "b64_json" if case.response_format == "b64_json" else "url"
    if len(data) != case.n or not all(item.get(key) for item in data):
        raise BenchError(f"case {case.number}: unexpected response {body[:300]!r}")
    return body


def admin_command() -> list[str]:
    script = Path(sys.executable).with_name("imagegen-admin")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "imagegen_service.cli"]


class RssSampler:
    """Samples VmRSS of some processes in a thread and keeps the maximum of each."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_kib = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError, BenchError):
                    self.peak_kib[name] = max(self.peak_kib[name], proc_status_kib(pid, "VmRSS"))
            self._stop.wait(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- wrk --------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk's path; installs it with apt-get when missing and running as root."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk is not installed; installing it with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BenchError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
        path = shutil.which("wrk")
        if path:
            return path
        raise BenchError("apt-get reported success but wrk is still not on PATH")
    raise BenchError(
        "wrk is not installed, and it can only be installed automatically as root with apt-get. "
        "Install it (Debian/Ubuntu: `sudo apt-get install wrk`; macOS: `brew install wrk`) "
        "and run `make bench` again."
    )


def wrk_version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


@dataclass
class WrkResult:
    raw: dict[str, Any]

    @property
    def seconds(self) -> float:
        return float(self.raw["duration_us"]) / 1e6

    @property
    def requests(self) -> int:
        return int(self.raw["requests"])

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def latency_ms(self, name: str) -> float:
        return float(self.raw["latency_us"][name]) / 1000

    @property
    def ok(self) -> int:
        return int(self.raw["ok"])

    @property
    def non200(self) -> int:
        return int(self.raw["non200"])

    @property
    def socket_errors(self) -> int:
        e = self.raw["errors"]
        return int(e["connect"]) + int(e["read"]) + int(e["write"]) + int(e["timeout"])

    @property
    def cut(self) -> int:
        """Requests sent whose answer wrk did not wait for when the time was up."""
        return max(0, int(self.raw["sent"]) - self.requests)


def run_wrk(
    wrk: str, url: str, case: Case, authorization: str, seconds: float, threads: int
) -> WrkResult:
    cmd = [
        wrk,
        "-t",
        str(max(1, min(threads, case.connections))),
        "-c",
        str(case.connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(LUA_SCRIPT),
        url.rstrip("/") + ROUTE,
    ]
    env = {**os.environ, "BENCH_BODY": case.request_body(), "BENCH_AUTH": authorization}
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {shlex.join(cmd)}") from None
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = WrkResult(json.loads(line.removeprefix("BENCH_RESULT ")))
            if result.requests == 0:
                raise BenchError(f"wrk completed no request: {shlex.join(cmd)}\n{done.stdout}")
            return result
    raise BenchError(
        f"wrk failed (exit {done.returncode}): {shlex.join(cmd)}\n{done.stdout}\n{done.stderr}"
    )


# -- the stack --------------------------------------------------------------------------


def upstream_bound(case: Case) -> int:
    """The upstream cases' max_concurrency and max_connections (the stack's provider and
    the ceiling's client alike): at least the case's connections."""
    return max(UPSTREAM_MIN_CONCURRENCY, case.connections)


def upstream_config(url: str, case: Case) -> str:
    """The TOML of the upstream cases: an `openai` provider whose base_url is the loopback
    upstream, and the model it serves at the case's price. max_concurrency and
    max_connections are at least the case's connections (2,000 in the slow case)."""
    bound = upstream_bound(case)
    return f"""
[providers.upstream]
type = "openai"
# tests/bench/upstream.py on loopback: OpenAI's Images API answering one fixed PNG.
base_url = "{url}/v1"
api_key_env = "{UPSTREAM_KEY_ENV}"
timeout_seconds = 60
max_connections = {bound}
max_concurrency = {bound}

[models.{UPSTREAM_MODEL}]
provider = "upstream"
# No OpenAI family: priced per image, asked with response_format (a compatible server).
family = ""
owned_by = "imagegen"
sizes = ["256x256"]
default_size = "256x256"
max_images = 10
max_prompt_chars = 4000

[models.{UPSTREAM_MODEL}.price_usd]
default = "{case.unit_price_micros / 1e6:.6f}"
"""


def benchmark_config(
    data_dir: Path, grpc_port: int, http_port: int, metrics_port: int, extra: str = ""
) -> str:
    prices = "\n".join(f'"{size}" = "{micros / 1e6:.6f}"' for size, micros in PRICE_MICROS.items())
    return f"""\
# Written by tests/bench for one benchmark case; not for production.
[service]
grpc_host = "127.0.0.1"
grpc_port = {grpc_port}
data_dir = "{data_dir}"
url_ttl_seconds = 3600
hold_ttl_seconds = 900
metrics_port = {metrics_port}

[gateway]
http_host = "127.0.0.1"
http_port = {http_port}
max_body_bytes = 1048576
request_timeout_seconds = 300

[rate_limits]
# No per-key limits: the benchmark key sends far more than the default 300 requests/minute.
requests_per_minute = 0
images_per_minute = 0

[providers.local]
type = "local"
# One precomputed image per size: the figures measure our request path, not drawing.
precomputed = true

[models.local-sketch]
provider = "local"
owned_by = "imagegen"
sizes = ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536"]
default_size = "1024x1024"
qualities = ["standard", "hd"]
styles = ["vivid", "natural"]
max_images = 10
max_prompt_chars = 4000

[models.local-sketch.price_usd]
default = "{DEFAULT_PRICE_MICROS / 1e6:.6f}"
{prices}
{extra}"""


@dataclass(frozen=True)
class Snapshot:
    available_micros: int
    held_micros: int
    served: Counter[int]
    # Charges the service logged (count, micro-dollars): a cross-check, not the reference.
    charged: int
    charged_micros: int

    @property
    def served_200(self) -> int:
        return self.served.get(200, 0)


@dataclass
class ServiceMetrics:
    """The service's own account of a run, from its /metrics: calls by gRPC status (a call
    refused before the servicer saw it is in none), and the providers' queues."""

    calls_ok: int = 0
    calls_failed: dict[str, int] = field(default_factory=dict)
    queue_waits: int = 0
    queue_waits_over_10ms: int = 0
    # The upper bound of the slowest bucket any wait fell in ("-" with no waits).
    queue_longest_bucket: str = "-"
    queue_full: int = 0

    @classmethod
    def parse(cls, text: str) -> ServiceMetrics:
        from prometheus_client.parser import text_string_to_metric_families

        seen = cls()
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels, value = sample.labels, int(sample.value)
                if (
                    sample.name == "grpc_server_handled_total"
                    and labels.get("grpc_service") == "imagegen.v1.ImageGeneration"
                ):
                    if labels["grpc_code"] == "OK":
                        seen.calls_ok += value
                    elif value:
                        code = labels["grpc_code"]
                        seen.calls_failed[code] = seen.calls_failed.get(code, 0) + value
                elif sample.name == "imagegen_provider_queue_seconds_bucket":
                    bound = float(labels["le"])
                    buckets[bound] = buckets.get(bound, 0) + sample.value
                elif sample.name == "imagegen_provider_queue_seconds_count":
                    seen.queue_waits += value
                elif sample.name == "imagegen_provider_queue_full_total":
                    seen.queue_full += value
        at_10ms = buckets.get(0.01)
        if at_10ms is not None:
            seen.queue_waits_over_10ms = seen.queue_waits - int(at_10ms)
        # The first bucket holding every wait bounds the longest one.
        for bound in sorted(buckets):
            if seen.queue_waits and buckets[bound] >= seen.queue_waits:
                seen.queue_longest_bucket = f"<= {bound:g} s"
                break
        return seen


class _ProcessPair:
    """A service and a gateway process, each logging to a file of its own."""

    # "the {what}service" in error messages.
    what = ""

    def __init__(self, logs: dict[str, Path]) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def assert_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.logs[name].read_text(errors="replace")[-3000:]
                raise BenchError(f"the {self.what}{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Stack(_ProcessPair):
    """Service and gateway as two processes, on their own data directory and TOML."""

    # Its processes (one log file each), and the logs with the gateway's access lines and
    # the service's generation lines: InProcess has one process writing both.
    process_names: tuple[str, ...] = ("service", "gateway")
    access_log = "gateway"
    generation_log = "service"
    # "the {label} did not ..." in error messages.
    label = "stack"

    def __init__(self, root: Path, extra_config: str = "") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.config_path = root / "config.toml"
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.config_path.write_text(
            benchmark_config(
                self.data_dir, self.grpc_port, self.http_port, self.metrics_port, extra_config
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
        env.update(
            IMAGEGEN_CONFIG=str(self.config_path),
            IMAGEGEN_DATA_DIR=str(self.data_dir),
            IMAGEGEN_SERVICE_ADDRESS=f"127.0.0.1:{self.grpc_port}",
            IMAGEGEN_LOG_FORMAT="json",
            PYTHONPATH=str(REPO),
        )
        # The loopback upstream takes any key; the provider is disabled without one.
        env[UPSTREAM_KEY_ENV] = "sk-bench-loopback"
        # BENCH_DATABASE_URL: the ledger on that PostgreSQL instead of the SQLite file.
        self.database_url = os.environ.get("BENCH_DATABASE_URL", "")
        if self.database_url:
            env["IMAGEGEN_DATABASE_URL"] = self.database_url
        self.env = env
        super().__init__({name: root / f"{name}.log" for name in self.process_names})
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.account_id = ""
        self.secret = ""
        self.opening_micros = 0

    # admin ----------------------------------------------------------------------------

    def admin(self, *args: str) -> dict[str, Any]:
        cmd = [*admin_command(), "--json", *args]
        done = subprocess.run(
            cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"`imagegen-admin {' '.join(args)}` failed: {done.stderr.strip()}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def create_account(self) -> None:
        if self.database_url:
            self.admin("db", "upgrade")
        account = self.admin("accounts", "create", "bench", "--balance", OPENING_BALANCE_USD)
        self.account_id = account["id"]
        self.opening_micros = int(account["available_micros"])
        self.secret = self.admin("keys", "create", self.account_id)["secret"]

    def account(self) -> tuple[int, int]:
        shown = self.admin("accounts", "show", self.account_id)
        return int(shown["available_micros"]), int(shown["held_micros"])

    # processes ------------------------------------------------------------------------

    def start(self) -> None:
        for name, module in (("service", "imagegen_service"), ("gateway", "http_gateway")):
            with self.logs[name].open("ab") as out:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", module],
                    env=self.env,
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.assert_alive()
            if http_get_ok(self.url + "/readyz"):
                return
            time.sleep(0.1)
        raise BenchError(
            f"the {self.label} did not become ready in {READY_TIMEOUT:.0f} s; {self.root}"
        )

    # observations ---------------------------------------------------------------------

    def _log_events(self, name: str) -> Iterator[dict[str, Any]]:
        with self.logs[name].open("rb") as f:
            for line in f:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)

    def snapshot(self) -> Snapshot:
        available, held = self.account()
        served = Counter(
            int(e["status"])
            for e in self._log_events(self.access_log)
            if e.get("event") == "http.request" and e.get("route") == ROUTE
        )
        charged = [
            int(e.get("cost_micros", 0))
            for e in self._log_events(self.generation_log)
            if e.get("event") == "generation.charged"
            or (e.get("event") == "generation" and e.get("status") == "ok")
        ]
        return Snapshot(available, held, served, len(charged), sum(charged))

    def quiesce(self) -> Snapshot:
        """Waits until nothing is held and the logs stop moving; returns that state."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT
        time.sleep(0.2)
        previous = self.snapshot()
        while time.monotonic() < deadline:
            self.assert_alive()
            time.sleep(0.2)
            current = self.snapshot()
            if current == previous and current.held_micros == 0:
                return current
            previous = current
        raise BenchError(f"the {self.label} did not settle in {QUIESCE_TIMEOUT:.0f} s: {previous}")

    def capture(self, case: Case) -> bytes:
        return generate(self.url, case, self.authorization)

    def service_metrics(self) -> ServiceMetrics:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                return ServiceMetrics.parse(answer.read().decode())
        except urllib.error.URLError as exc:
            raise BenchError(f"cannot read the service's metrics at {url}: {exc}") from None

    def first_image(self, case: Case, body: bytes) -> tuple[bytes, str]:
        """The bytes of the first image of a captured answer, and its URL's path and query
        ("" for b64_json): what the ceiling's service answers. A URL is fetched from the
        gateway, so only while the stack runs."""
        item = json.loads(body)["data"][0]
        if case.response_format == "b64_json":
            return base64.b64decode(item["b64_json"]), ""
        url = urllib.parse.urlsplit(item["url"])
        path = url.path + (f"?{url.query}" if url.query else "")
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as answer:
                image: bytes = answer.read()
        except urllib.error.URLError as exc:
            raise BenchError(f"case {case.number}: cannot fetch {item['url']}: {exc}") from None
        return image, path

    @property
    def authorization(self) -> str:
        return f"Bearer {self.secret}"


class _LoopbackServer:
    """A bench helper server: one ``python -m MODULE`` child on a free loopback port,
    ready once its /healthz answers."""

    name = "server"
    module = ""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        return ["--port", str(self.port)]

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args()],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.assert_alive()
            if http_get_ok(self.url + "/healthz"):
                return
            time.sleep(0.1)
        raise BenchError(f"the {self.name} did not start")

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the {self.name} exited: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Floor(_LoopbackServer):
    """tests/bench/floor.py serving one captured body."""

    name = "floor server"
    module = "tests.bench.floor"

    def __init__(self, root: Path, body: bytes) -> None:
        super().__init__(root / "floor.log")
        self.body_path = root / "floor-body.json"
        self.body_path.write_bytes(body)

    def args(self) -> list[str]:
        return [*super().args(), "--body", str(self.body_path)]


class Upstream(_LoopbackServer):
    """tests/bench/upstream.py: OpenAI's Images API on loopback, answering one fixed PNG
    after ``delay`` seconds."""

    name = "upstream"
    module = "tests.bench.upstream"

    def __init__(self, root: Path, delay: float) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "upstream.log")
        self.delay = delay

    def args(self) -> list[str]:
        return [*super().args(), "--delay", str(self.delay)]

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the upstream is not running")
        return self.proc.pid

    def images(self) -> int:
        """Images the upstream has answered so far."""
        try:
            with urllib.request.urlopen(self.url + "/stats", timeout=10) as answer:
                return int(json.loads(answer.read())["images"])
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            raise BenchError(f"cannot read the upstream's counts: {exc}") from None


class Ceiling(_ProcessPair):
    """tests/bench/ceiling.py: its no-op service and minimal gateway, two processes on free
    loopback ports, answering the image of one case."""

    what = "ceiling's "

    def __init__(
        self,
        root: Path,
        env: dict[str, str],
        image: bytes,
        url_path: str,
        case: Case,
        upstream: Upstream | None = None,
        *,
        ledger: bool = False,
    ) -> None:
        # With an upstream, the ceiling's service asks it for each call's images (the one
        # HTTP call a provider needs), with the stack's model and connection bound.
        self.upstream_args: tuple[str, ...] = ()
        if upstream is not None:
            self.upstream_args = (
                *("--upstream", f"{upstream.url}/v1", "--upstream-model", UPSTREAM_MODEL),
                *("--max-connections", str(upstream_bound(case))),
            )
        self.image_path = root / "ceiling-image"
        self.image_path.write_bytes(image)
        # With the ledger, its service holds and settles each generation in a new SQLite
        # file, as the real service does (the money that exact billing cannot do without).
        self.ledger = ledger
        self.url_path = url_path
        self.env = env
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        super().__init__({name: root / f"ceiling-{name}.log" for name in ("service", "gateway")})

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        with self.logs[name].open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.ceiling", name, *args],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.assert_alive()
            if ready():
                return
            time.sleep(0.1)
        raise BenchError(f"the ceiling's {what} did not become ready in {READY_TIMEOUT:.0f} s")

    def start(self) -> None:
        """The service first, then the gateway once the service listens (so that the
        gateway's first connection does not fail into gRPC's reconnect backoff)."""
        url = ("--url", self.url_path) if self.url_path else ()
        ledger_file = self.image_path.with_name(f"ceiling-ledger-{self.grpc_port}.db")
        ledger = ("--ledger", str(ledger_file)) if self.ledger else ()
        self._spawn(
            "service",
            [
                *("--grpc-port", str(self.grpc_port), "--image", str(self.image_path), *url),
                *self.upstream_args,
                *ledger,
            ],
        )
        self._wait("service", lambda: port_open(self.grpc_port))
        self._spawn(
            "gateway", ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        )
        self._wait("gateway", lambda: http_get_ok(self.url + "/healthz"))


class InProcess(Stack):
    """tests/bench/inprocess.py: the real gateway's code calling the real service's pipeline
    in one process, on a data directory and TOML of its own (``root``), with an account and
    a key of its own. A Stack in everything but its processes: the same configuration,
    ``imagegen-admin`` set-up (which creates the SQLite schema before the server starts),
    account snapshots and billing checks; its one log holds both the access lines and
    the generation lines."""

    process_names = ("server",)
    access_log = generation_log = "server"
    label = "in-process server"
    what = "in-process "

    def start(self) -> None:
        with self.logs["server"].open("ab") as out:
            self.procs["server"] = subprocess.Popen(
                [
                    *(sys.executable, "-m", "tests.bench.inprocess"),
                    *("--http-port", str(self.http_port)),
                ],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.assert_alive()
            if http_get_ok(self.url + "/healthz"):
                return
            time.sleep(0.1)
        raise BenchError(
            f"the in-process server did not become ready in {READY_TIMEOUT:.0f} s; {self.root}"
        )

    @property
    def pid(self) -> int:
        return self.procs["server"].pid


# -- one case ---------------------------------------------------------------------------


@dataclass
class ProcessFigures:
    idle_kib: int = 0
    peak_kib: int = 0  # VmHWM at the end of the case: its peak since mark_idle
    # VmHWM after a run at one connection, before the case's own warm-up (0: not taken).
    one_in_flight_kib: int = 0
    sampled_peak_kib: int = 0  # highest VmRSS seen during the measured run
    cpu_seconds: float = 0.0  # during the measured run
    user_seconds: float = 0.0
    context_switches: int = 0  # voluntary, during the measured run

    @property
    def growth_kib(self) -> int:
        return max(0, self.peak_kib - self.idle_kib)


def growth_per_in_flight(figures: Iterable[ProcessFigures], connections: int) -> float | None:
    """Bytes one more request in flight costs, both processes together: the peaks at
    ``connections`` less those at one connection, over the connections added; None when no
    peak at one connection was taken."""
    processes = list(figures)
    if connections < 2 or not all(f.one_in_flight_kib for f in processes):
        return None
    added_kib = sum(max(0, f.peak_kib - f.one_in_flight_kib) for f in processes)
    return added_kib * 1024 / (connections - 1)


@dataclass
class Billing:
    unit_price_micros: int
    images_per_request: int
    before: Snapshot
    after: Snapshot
    opening_micros: int
    wrk_ok: int
    wrk_cut: int
    # The upstream cases: images the loopback upstream answered during the run, which the
    # images charged may not exceed.
    upstream_images: int | None = None
    # The charge is counted against the images generated: the service's charge lines, each
    # of which must be an answer the gateway sent (200) or one whose client had left (499:
    # wrk closing its connections at the deadline; the service charges, then answers).
    by_generated: bool = True

    @classmethod
    def of_run(
        cls,
        case: Case,
        opening_micros: int,
        before: Snapshot,
        after: Snapshot,
        result: WrkResult,
        upstream_images: int | None = None,
    ) -> Billing:
        """The billing of one measured run of ``case`` on an account opened with
        ``opening_micros``."""
        return cls(
            unit_price_micros=case.unit_price_micros,
            images_per_request=case.n,
            before=before,
            after=after,
            opening_micros=opening_micros,
            wrk_ok=result.ok,
            wrk_cut=result.cut,
            upstream_images=upstream_images,
        )

    @property
    def client_gone(self) -> int:
        """Answers the gateway logged as 499: the client left before its answer was sent."""
        return self.after.served.get(499, 0) - self.before.served.get(499, 0)

    @property
    def images_basis(self) -> int:
        """The requests the expected charge is counted from: 200s served, or (upstream
        cases) generations the service logged as charged."""
        return self.charged if self.by_generated else self.served_200

    @property
    def spent_micros(self) -> int:
        return self.before.available_micros - self.after.available_micros

    @property
    def served_200(self) -> int:
        return self.after.served_200 - self.before.served_200

    @property
    def charged(self) -> int:
        return self.after.charged - self.before.charged

    @property
    def charged_micros(self) -> int:
        return self.after.charged_micros - self.before.charged_micros

    @property
    def expected_micros(self) -> int:
        return self.unit_price_micros * self.images_per_request * self.images_basis

    @property
    def total_spent_micros(self) -> int:
        return self.opening_micros - self.after.available_micros

    @property
    def total_expected_micros(self) -> int:
        total = self.after.charged if self.by_generated else self.after.served_200
        return self.unit_price_micros * self.images_per_request * total

    def problems(self) -> list[str]:
        found = []
        if self.after.held_micros != 0:
            found.append(f"{self.after.held_micros} micro-dollars still held")
        if self.spent_micros != self.expected_micros:
            found.append(
                f"spent {self.spent_micros} during the run, expected {self.expected_micros} "
                f"(= {self.unit_price_micros} x {self.images_per_request} x {self.images_basis})"
            )
        if self.total_spent_micros != self.total_expected_micros:
            found.append(
                f"spent {self.total_spent_micros} since opening, expected "
                f"{self.total_expected_micros}"
            )
        # The service's per-generation log line is a cross-check when it is recognised.
        if self.after.charged and (
            (self.charged != self.served_200 and not self.by_generated)
            or self.charged_micros != self.spent_micros
        ):
            found.append(
                f"the service logged {self.charged} charges of {self.charged_micros} in all, "
                f"but {self.served_200} answered 200 and {self.spent_micros} were spent"
            )
        if self.by_generated:
            images = self.charged * self.images_per_request
            if self.after.charged == 0:
                found.append("no charge line in the service's log (has its format changed?)")
            if not self.served_200 <= self.charged <= self.served_200 + self.client_gone:
                found.append(
                    f"the service charged {self.charged} generations, the gateway answered "
                    f"{self.served_200} x 200 and {self.client_gone} x 499 (client gone)"
                )
            if self.upstream_images is not None and images > self.upstream_images:
                found.append(
                    f"{images} images charged but the upstream answered only {self.upstream_images}"
                )
        if self.served_200 == 0:
            found.append("no 200 in the gateway's access log (has its format changed?)")
        if not self.wrk_ok <= self.served_200 <= self.wrk_ok + self.wrk_cut:
            found.append(
                f"the gateway answered {self.served_200} x 200 but wrk counted {self.wrk_ok} "
                f"(+ at most {self.wrk_cut} cut off when the time was up)"
            )
        return found

    @property
    def exact(self) -> bool:
        return not self.problems()


@dataclass
class CeilingResult:
    """The design's ceiling measured with the case's wrk settings."""

    wrk: WrkResult
    response_bytes: int  # of its answer to the case's request (the stack's size, normally)
    processes: dict[str, ProcessFigures]
    load: MachineLoad

    def cores(self, name: str) -> float:
        return self.processes[name].cpu_seconds / self.wrk.seconds if self.wrk.seconds else 0.0


@dataclass
class InProcessResult:
    """The same work without the gRPC hop (tests/bench/inprocess.py), measured with the
    case's wrk settings and checked like the stack."""

    wrk: WrkResult
    response_bytes: int  # of its answer to the case's request (the stack's size, checked)
    process: ProcessFigures
    billing: Billing
    served_statuses: dict[int, int]
    load: MachineLoad

    @property
    def cores(self) -> float:
        return self.process.cpu_seconds / self.wrk.seconds if self.wrk.seconds else 0.0

    def cpu_text(self) -> str:
        """CPU ms per request as user+system."""
        p, n = self.process, max(1, self.wrk.requests)
        return f"{p.user_seconds * 1000 / n:.2f}+{(p.cpu_seconds - p.user_seconds) * 1000 / n:.2f}"


@dataclass
class UpstreamAlone:
    """The loopback upstream driven directly with the case's wrk settings."""

    wrk: WrkResult
    process: ProcessFigures
    load: MachineLoad


@dataclass
class CaseResult:
    case: Case
    response_bytes: int
    stack: WrkResult
    floor: WrkResult
    processes: dict[str, ProcessFigures]
    floor_process: ProcessFigures
    billing: Billing
    served_statuses: dict[int, int] = field(default_factory=dict)
    load: MachineLoad = field(default_factory=MachineLoad)
    floor_load: MachineLoad = field(default_factory=MachineLoad)
    ceiling: CeilingResult | None = None
    inprocess: InProcessResult | None = None
    # The upstream cases: the loopback upstream's CPU while the stack ran, and the upstream
    # alone driven with the same wrk settings.
    upstream_process: ProcessFigures | None = None
    upstream: UpstreamAlone | None = None

    def floor_share(self, rps: float) -> float:
        """``rps`` as a share of the floor's."""
        return rps / self.floor.rps if self.floor.rps else 0.0

    def p50_added_over_floor(self, run: WrkResult) -> float:
        return run.latency_ms("p50") - self.floor.latency_ms("p50")

    @property
    def rps_ratio(self) -> float:
        return self.floor_share(self.stack.rps)

    @property
    def p50_added_ms(self) -> float:
        return self.p50_added_over_floor(self.stack)

    @property
    def measured_ceiling(self) -> CeilingResult:
        if self.ceiling is None:
            raise BenchError(f"case {self.case.number}: the ceiling was not measured")
        return self.ceiling

    @property
    def ceiling_rps_ratio(self) -> float:
        return self.floor_share(self.measured_ceiling.wrk.rps)

    @property
    def ceiling_p50_added_ms(self) -> float:
        return self.p50_added_over_floor(self.measured_ceiling.wrk)

    @property
    def ceiling_share(self) -> float:
        """Our rps as a share of the ceiling's."""
        rps = self.measured_ceiling.wrk.rps
        return self.stack.rps / rps if rps else 0.0

    @property
    def measured_inprocess(self) -> InProcessResult:
        if self.inprocess is None:
            raise BenchError(f"case {self.case.number}: the in-process server was not measured")
        return self.inprocess

    @property
    def inprocess_rps_ratio(self) -> float:
        return self.floor_share(self.measured_inprocess.wrk.rps)

    @property
    def inprocess_p50_added_ms(self) -> float:
        return self.p50_added_over_floor(self.measured_inprocess.wrk)

    @property
    def inprocess_share(self) -> float:
        """The in-process server's rps as a multiple of ours: what dropping the hop buys."""
        return self.measured_inprocess.wrk.rps / self.stack.rps if self.stack.rps else 0.0

    @property
    def billing_exact(self) -> bool:
        """The stack's billing, and the in-process server's when it was measured."""
        return self.billing.exact and (self.inprocess is None or self.inprocess.billing.exact)

    @property
    def growth_per_in_flight_bytes(self) -> float:
        """What one more request in flight costs: the peak at the case's connections less
        the peak at one connection, over the connections added. Growth that does not depend
        on how many requests are in flight (SQLite's page caches filling as the ledger
        grows, the allocator's first arenas, lazily built state) is in both peaks; divided
        by the connections it would read as per-request memory (``growth_over_connections``)."""
        growth = growth_per_in_flight(self.processes.values(), self.case.connections)
        return self.growth_over_connections if growth is None else growth

    @property
    def ceiling_growth_per_in_flight(self) -> float | None:
        """The ceiling's, measured the same way; None without a ceiling or its base run."""
        if self.ceiling is None:
            return None
        return growth_per_in_flight(self.ceiling.processes.values(), self.case.connections)

    @property
    def growth_over_connections(self) -> float:
        """All growth above idle over the connections, one-off growth included."""
        total_kib = sum(f.growth_kib for f in self.processes.values())
        return total_kib * 1024 / self.case.connections

    def cpu_ms_per_request(self, name: str) -> float:
        return self.processes[name].cpu_seconds * 1000 / max(1, self.stack.requests)

    def cpu_text(self, name: str) -> str:
        """CPU ms per request as user+system."""
        p, n = self.processes[name], max(1, self.stack.requests)
        return f"{p.user_seconds * 1000 / n:.2f}+{(p.cpu_seconds - p.user_seconds) * 1000 / n:.2f}"

    def switches_per_request(self, name: str) -> float:
        return self.processes[name].context_switches / max(1, self.stack.requests)


def one_connection_peaks(
    case: Case,
    wrk: str,
    url: str,
    authorization: str,
    pids: dict[str, int],
    seconds: float,
    threads: int,
) -> dict[str, int]:
    """Runs ``case`` at one connection in rounds of ``seconds`` until the processes' peaks
    (``VmHWM``, KiB) stop growing (ONE_CONNECTION_FLAT_KIB), ONE_CONNECTION_MAX_SECONDS at
    most; returns each process's peak then."""
    one = dataclasses.replace(case, connections=1)
    peaks = {name: proc_status_kib(pid, "VmHWM") for name, pid in pids.items()}
    spent = 0.0
    while True:
        run_wrk(wrk, url, one, authorization, seconds, threads)
        spent += seconds
        before, peaks = peaks, {name: proc_status_kib(pid, "VmHWM") for name, pid in pids.items()}
        grew = sum(peaks.values()) - sum(before.values())
        if grew < ONE_CONNECTION_FLAT_KIB or spent >= ONE_CONNECTION_MAX_SECONDS:
            log(
                f"case {case.number}: {spent:.0f} s at 1 connection, the peaks moved "
                f"{grew:+,} KiB in the last {seconds:.0f} s"
            )
            return peaks


def measure_ceiling(
    case: Case,
    wrk: str,
    ceiling: Ceiling,
    authorization: str,
    seconds: float,
    warmup: float,
    threads: int,
    *,
    warm_case: Case | None = None,
) -> CeilingResult:
    """Starts the ceiling, checks its answer, warms it up (with ``warm_case``'s settings
    when given) and drives it like the stack."""
    figures = {"service": ProcessFigures(), "gateway": ProcessFigures()}
    try:
        ceiling.start()
        answer = generate(ceiling.url, case, authorization)
        for name, pid in ceiling.pids.items():
            figures[name].idle_kib = mark_idle(pid)
        if case.connections > 1 and not case.holds_in_flight:
            # As for the stack: the base of the memory per request in flight.
            peaks = one_connection_peaks(
                case, wrk, ceiling.url, authorization, ceiling.pids, warmup, threads
            )
            for name, kib in peaks.items():
                figures[name].one_in_flight_kib = kib
        log(f"case {case.number}: ceiling, warm-up {warmup:.0f} s then {seconds:.0f} s")
        run_wrk(wrk, ceiling.url, warm_case or case, authorization, warmup, threads)
        cpu_before = {name: proc_cpu_times(pid) for name, pid in ceiling.pids.items()}
        cs_before = {name: proc_context_switches(pid) for name, pid in ceiling.pids.items()}
        with LoadMeter(list(ceiling.pids.values())) as meter:
            result = run_wrk(wrk, ceiling.url, case, authorization, seconds, threads)
        ceiling.assert_alive()
        for name, pid in ceiling.pids.items():
            user, system = proc_cpu_times(pid)
            figures[name].user_seconds = user - cpu_before[name][0]
            figures[name].cpu_seconds = user + system - sum(cpu_before[name])
            figures[name].context_switches = proc_context_switches(pid) - cs_before[name]
            figures[name].peak_kib = proc_status_kib(pid, "VmHWM")
    finally:
        ceiling.stop()
    return CeilingResult(result, len(answer), figures, meter.load)


def size_without_origin(body: bytes, origin: str) -> int:
    """The size of an answer without the origin of its absolute URLs: the ``url`` answers of
    two servers differ there (their ports) and nowhere else."""
    return len(body) - body.count(origin.encode()) * len(origin)


def measure_inprocess(
    case: Case,
    wrk: str,
    root: Path,
    reference: tuple[bytes, str],
    seconds: float,
    warmup: float,
    threads: int,
) -> InProcessResult:
    """Starts the in-process server on a data directory and TOML of its own, checks that it
    answers the stack's answer (``reference``: the stack's body and origin) by size, then
    warms it up, drives it and checks its billing exactly like the stack's."""
    server = InProcess(root)
    figures = ProcessFigures()
    try:
        server.create_account()
        server.start()
        answer = server.capture(case)
        body, origin = reference
        if size_without_origin(answer, server.url) != size_without_origin(body, origin):
            raise BenchError(
                f"case {case.number}: the in-process answer is {len(answer)} bytes, the "
                f"stack's {len(body)} (URL origins aside): it does not do the same work"
            )
        server.quiesce()
        figures.idle_kib = mark_idle(server.pid)
        log(f"case {case.number}: in process, warm-up {warmup:.0f} s then {seconds:.0f} s")
        run_wrk(wrk, server.url, case, server.authorization, warmup, threads)
        before = server.quiesce()
        cpu_before = proc_cpu_times(server.pid)
        cs_before = proc_context_switches(server.pid)
        with RssSampler(server.pids) as sampler, LoadMeter([server.pid]) as meter:
            result = run_wrk(wrk, server.url, case, server.authorization, seconds, threads)
        user, system = proc_cpu_times(server.pid)
        figures.user_seconds = user - cpu_before[0]
        figures.cpu_seconds = user + system - sum(cpu_before)
        figures.context_switches = proc_context_switches(server.pid) - cs_before
        figures.sampled_peak_kib = sampler.peak_kib["server"]
        after = server.quiesce()
        figures.peak_kib = proc_status_kib(server.pid, "VmHWM")
        server.assert_alive()
    finally:
        server.stop()
    billing = Billing.of_run(case, server.opening_micros, before, after, result)
    served = after.served - before.served
    return InProcessResult(
        result, len(answer), figures, billing, dict(sorted(served.items())), meter.load
    )


def measure_upstream_alone(
    case: Case, wrk: str, upstream: Upstream, seconds: float, warmup: float, threads: int
) -> UpstreamAlone:
    """Drives the loopback upstream itself with the case's wrk settings: what the stack's
    figures are read against in the upstream cases."""
    figures = ProcessFigures()
    log(f"case {case.number}: the upstream alone, warm-up {warmup:.0f} s then {seconds:.0f} s")
    run_wrk(wrk, upstream.url, case, "", warmup, threads)
    user0, system0 = proc_cpu_times(upstream.pid)
    with LoadMeter([upstream.pid]) as meter:
        result = run_wrk(wrk, upstream.url, case, "", seconds, threads)
    upstream.assert_alive()
    user, system = proc_cpu_times(upstream.pid)
    figures.user_seconds = user - user0
    figures.cpu_seconds = user + system - user0 - system0
    figures.peak_kib = proc_status_kib(upstream.pid, "VmHWM")
    return UpstreamAlone(result, figures, meter.load)


def run_case(
    case: Case,
    wrk: str,
    root: Path,
    seconds: float,
    warmup: float,
    threads: int,
    *,
    with_ceiling: bool = True,
    ceiling_ledger: bool = False,
    with_inprocess: bool = False,
) -> CaseResult:
    """One case on a fresh stack; an upstream case starts its loopback upstream first, and
    its ceiling calls the same upstream; it skips the in-process server (which calls no
    provider over HTTP)."""
    if not case.uses_upstream:
        return _run_case(
            case,
            wrk,
            root,
            seconds,
            warmup,
            threads,
            with_ceiling=with_ceiling,
            ceiling_ledger=ceiling_ledger,
            with_inprocess=with_inprocess,
            upstream=None,
        )
    upstream = Upstream(root, case.upstream_delay or 0.0)
    try:
        upstream.start()
        return _run_case(
            case,
            wrk,
            root,
            seconds,
            warmup,
            threads,
            with_ceiling=with_ceiling,
            ceiling_ledger=ceiling_ledger,
            with_inprocess=False,
            upstream=upstream,
        )
    finally:
        upstream.stop()


def _run_case(
    case: Case,
    wrk: str,
    root: Path,
    seconds: float,
    warmup: float,
    threads: int,
    *,
    with_ceiling: bool,
    ceiling_ledger: bool,
    with_inprocess: bool,
    upstream: Upstream | None,
) -> CaseResult:
    stack = Stack(root, upstream_config(upstream.url, case) if upstream else "")
    upstream_figures = ProcessFigures() if upstream else None
    others = [upstream.pid] if upstream else []
    figures = {"service": ProcessFigures(), "gateway": ProcessFigures()}
    image, url_path = b"", ""
    try:
        stack.create_account()
        stack.start()
        body = stack.capture(case)
        if with_ceiling:
            image, url_path = stack.first_image(case, body)
        stack.quiesce()
        for name, pid in stack.pids.items():
            figures[name].idle_kib = mark_idle(pid)
        if case.connections > 1:
            # The peak with one request in flight: the base of the growth per request.
            peaks = one_connection_peaks(
                case, wrk, stack.url, stack.authorization, stack.pids, warmup, threads
            )
            stack.quiesce()
            for name, kib in peaks.items():
                figures[name].one_in_flight_kib = kib
        log(f"case {case.number}: warm-up {warmup:.0f} s")
        run_wrk(wrk, stack.url, case, stack.authorization, warmup, threads)
        before = stack.quiesce()
        cpu_before = {name: proc_cpu_times(pid) for name, pid in stack.pids.items()}
        cs_before = {name: proc_context_switches(pid) for name, pid in stack.pids.items()}
        upstream_before = [proc_cpu_times(pid) for pid in others]
        images_before = upstream.images() if upstream else 0
        log(f"case {case.number}: {case.title} for {seconds:.0f} s")
        measured = [*stack.pids.values(), *others]
        with RssSampler(stack.pids) as sampler, LoadMeter(measured) as meter:
            result = run_wrk(wrk, stack.url, case, stack.authorization, seconds, threads)
        if upstream is not None and upstream_figures is not None:
            user, system = proc_cpu_times(upstream.pid)
            upstream_figures.user_seconds = user - upstream_before[0][0]
            upstream_figures.cpu_seconds = user + system - sum(upstream_before[0])
        for name, pid in stack.pids.items():
            user, system = proc_cpu_times(pid)
            figures[name].user_seconds = user - cpu_before[name][0]
            figures[name].cpu_seconds = user + system - sum(cpu_before[name])
            figures[name].context_switches = proc_context_switches(pid) - cs_before[name]
            figures[name].sampled_peak_kib = sampler.peak_kib[name]
        after = stack.quiesce()
        upstream_images = upstream.images() - images_before if upstream else None
        for name, pid in stack.pids.items():
            figures[name].peak_kib = proc_status_kib(pid, "VmHWM")
        stack.assert_alive()
    finally:
        stack.stop()
    billing = Billing.of_run(case, stack.opening_micros, before, after, result, upstream_images)
    served = after.served - before.served

    upstream_alone = None
    if upstream is not None:
        upstream_alone = measure_upstream_alone(case, wrk, upstream, seconds, warmup, threads)

    floor = Floor(root, body)
    floor_figures = ProcessFigures()
    try:
        floor.start()
        assert floor.proc is not None
        floor_figures.idle_kib = mark_idle(floor.proc.pid)
        log(f"case {case.number}: floor, warm-up {warmup:.0f} s then {seconds:.0f} s")
        run_wrk(wrk, floor.url, case, "", warmup, threads)
        cpu_before_floor = proc_cpu_seconds(floor.proc.pid)
        with LoadMeter([floor.proc.pid]) as floor_meter:
            floor_result = run_wrk(wrk, floor.url, case, "", seconds, threads)
        floor_figures.cpu_seconds = proc_cpu_seconds(floor.proc.pid) - cpu_before_floor
        floor_figures.peak_kib = proc_status_kib(floor.proc.pid, "VmHWM")
    finally:
        floor.stop()

    ceiling_result = None
    if with_ceiling:
        # The stack's environment: its TOML (gRPC options, timeout) and its event loop.
        ceiling = Ceiling(root, stack.env, image, url_path, case, upstream, ledger=ceiling_ledger)
        ceiling_result = measure_ceiling(
            case, wrk, ceiling, stack.authorization, seconds, warmup, threads
        )
    inprocess_result = None
    if with_inprocess:
        inprocess_result = measure_inprocess(
            case, wrk, root / "inprocess", (body, stack.url), seconds, warmup, threads
        )
    return CaseResult(
        case=case,
        response_bytes=len(body),
        stack=result,
        floor=floor_result,
        processes=figures,
        floor_process=floor_figures,
        billing=billing,
        served_statuses=dict(sorted(served.items())),
        load=meter.load,
        floor_load=floor_meter.load,
        ceiling=ceiling_result,
        inprocess=inprocess_result,
        upstream_process=upstream_figures,
        upstream=upstream_alone,
    )


# -- the slow upstream: many requests in flight ------------------------------------------


def ensure_nofile(needed: int) -> str:
    """Raises this process's soft RLIMIT_NOFILE to at least ``needed`` (the children, wrk
    and the servers, inherit it); a note of what was done."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise BenchError(
                f"{needed} open files are needed per process but the hard limit is {hard}: "
                "raise it (`ulimit -Hn`, limits.conf) or leave this case out (BENCH_CASES)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return f"raised the open-file limit from {soft} to {needed}"
    return f"open-file limit {soft} (hard {hard}), enough"


def closed_loop_rps(connections: int, result: WrkResult) -> float:
    """connections / mean latency: a closed loop's throughput once its connections are open."""
    mean_s = result.latency_ms("mean") / 1000
    return connections / mean_s if mean_s else 0.0


@dataclass
class InFlightResult:
    """The slow-upstream case: ``case.connections`` requests held in flight for a bounded
    time against an upstream that answers after ``case.upstream_delay`` seconds."""

    case: Case
    response_bytes: int
    stack: WrkResult
    processes: dict[str, ProcessFigures]
    upstream_process: ProcessFigures
    billing: Billing
    served_statuses: dict[int, int]
    load: MachineLoad
    nofile: str
    # What the service's own /metrics say about the whole case (warm-up included).
    service_seen: ServiceMetrics
    # The design's ceiling driven the same way, its service asking the same upstream.
    ceiling: CeilingResult | None = None

    def ceiling_share_of_ideal(self) -> float | None:
        if self.ceiling is None:
            return None
        ideal = self.case.connections * int(self.ceiling.wrk.seconds // self.delay)
        return self.ceiling.wrk.requests / ideal if ideal else 0.0

    @property
    def delay(self) -> float:
        return self.case.upstream_delay or 0.0

    @property
    def ideal_requests(self) -> int:
        """What wrk could count at best: each connection completes one request per delay,
        and the answers due after the deadline are cut (so a 5 s run of a 2 s upstream
        counts 2 per connection, not 2.5)."""
        return self.case.connections * int(self.stack.seconds // self.delay)

    @property
    def ideal_rps(self) -> float:
        return self.ideal_requests / self.stack.seconds if self.stack.seconds else 0.0

    @property
    def steady_rps(self) -> float:
        """connections / delay: the ideal once every connection is in its rhythm."""
        return self.case.connections / self.delay

    @property
    def share_of_ideal(self) -> float:
        """Answers counted in the run against the ideal count. wrk starts every connection
        at once, so the rounds stay in step and the count is quantised: a round that ends
        a moment after wrk's deadline is lost whole for every connection (a 10 s run of a
        2 s upstream counts 4 rounds of the ideal 5, 80%, as soon as a round takes a few
        ms over its 2 s or the connects take a few ms)."""
        return self.stack.requests / self.ideal_requests if self.ideal_requests else 0.0

    @property
    def steady_rps_achieved(self) -> float:
        """Throughput once the connections are open: in a closed loop (each connection
        sends its next request as its answer arrives) connections / mean latency (Little's
        law). wrk's latency starts when a request is written, so the connects (the ramp)
        are not in it, and nothing is lost to the deadline's rounding."""
        return closed_loop_rps(self.case.connections, self.stack)

    @property
    def steady_share(self) -> float:
        """The steady throughput against connections / delay, i.e. delay / mean latency."""
        return self.steady_rps_achieved / self.steady_rps if self.delay else 0.0

    def ceiling_steady_share(self) -> float | None:
        if self.ceiling is None or not self.delay:
            return None
        return closed_loop_rps(self.case.connections, self.ceiling.wrk) / self.steady_rps

    def growth_per_request(self, name: str) -> float:
        """Bytes of peak RSS (VmHWM) above idle per request in flight."""
        return self.processes[name].growth_kib * 1024 / self.case.connections

    @property
    def billing_exact(self) -> bool:
        return self.billing.exact


def run_inflight_case(
    case: Case,
    wrk: str,
    root: Path,
    seconds: float,
    warmup: float,
    threads: int,
    *,
    with_ceiling: bool = True,
    ceiling_ledger: bool = False,
) -> InFlightResult:
    """Holds ``case.connections`` connections on a fresh stack whose provider answers after
    ``case.upstream_delay`` seconds, for at least two rounds of that delay; measures
    throughput, latency, errors, peak RSS per request in flight and billing."""
    delay = case.upstream_delay or 0.0
    nofile = ensure_nofile(case.connections + NOFILE_SLACK)
    # At least SLOW_UPSTREAM_ROUNDS delays: with fewer, the ramp (2,000 connects, the first
    # round's queueing) is most of the run.
    seconds = max(seconds, SLOW_UPSTREAM_ROUNDS * delay)
    warm_case = dataclasses.replace(case, connections=SLOW_UPSTREAM_WARMUP_CONNECTIONS)
    warm_seconds = max(warmup, delay + 1)
    upstream = Upstream(root, delay)
    stack = Stack(root, upstream_config(upstream.url, case))
    figures = {"service": ProcessFigures(), "gateway": ProcessFigures()}
    upstream_figures = ProcessFigures()
    try:
        upstream.start()
        stack.create_account()
        stack.start()
        body = stack.capture(case)
        stack.quiesce()
        for name, pid in stack.pids.items():
            figures[name].idle_kib = mark_idle(pid)
        upstream_figures.idle_kib = mark_idle(upstream.pid)
        log(
            f"case {case.number}: warm-up {warm_seconds:.0f} s at "
            f"{warm_case.connections} connections ({nofile})"
        )
        run_wrk(wrk, stack.url, warm_case, stack.authorization, warm_seconds, threads)
        before = stack.quiesce()
        images_before = upstream.images()
        pids = {**stack.pids, "upstream": upstream.pid}
        cpu_before = {name: proc_cpu_times(pid) for name, pid in pids.items()}
        log(f"case {case.number}: {case.title} for {seconds:.0f} s")
        with RssSampler(pids) as sampler, LoadMeter(list(pids.values())) as meter:
            result = run_wrk(wrk, stack.url, case, stack.authorization, seconds, threads)
        every = {**figures, "upstream": upstream_figures}
        for name, pid in pids.items():
            user, system = proc_cpu_times(pid)
            every[name].user_seconds = user - cpu_before[name][0]
            every[name].cpu_seconds = user + system - sum(cpu_before[name])
            every[name].sampled_peak_kib = sampler.peak_kib[name]
        # The requests wrk cut at its deadline are still in flight: the settle waits for them.
        after = stack.quiesce()
        service_seen = stack.service_metrics()
        upstream_images = upstream.images() - images_before
        for name, pid in pids.items():
            every[name].peak_kib = proc_status_kib(pid, "VmHWM")
        stack.assert_alive()
        upstream.assert_alive()
        image, url_path = stack.first_image(case, body)
        stack.stop()
        ceiling_result = None
        if with_ceiling:
            # The same upstream, waiting its delay, asked by the ceiling's service.
            ceiling = Ceiling(
                root, stack.env, image, url_path, case, upstream, ledger=ceiling_ledger
            )
            log(f"case {case.number}: ceiling, its service calling the upstream")
            ceiling_result = measure_ceiling(
                case,
                wrk,
                ceiling,
                stack.authorization,
                seconds,
                warm_seconds,
                threads,
                warm_case=warm_case,
            )
    finally:
        stack.stop()
        upstream.stop()
    billing = Billing.of_run(case, stack.opening_micros, before, after, result, upstream_images)
    served = after.served - before.served
    return InFlightResult(
        case=case,
        response_bytes=len(body),
        stack=result,
        processes=figures,
        upstream_process=upstream_figures,
        billing=billing,
        served_statuses=dict(sorted(served.items())),
        load=meter.load,
        nofile=nofile,
        service_seen=service_seen,
        ceiling=ceiling_result,
    )


def inflight_lines(results: Sequence[InFlightResult]) -> list[str]:
    if not results:
        return []
    lines = [
        "",
        "Requests in flight (the provider an `openai` upstream on loopback answering after a "
        "delay; max_concurrency and max_connections = the connections; counted: the answers "
        "wrk counted against ideal = connections x whole delays in the run / run time "
        "(answers due after wrk's deadline are not counted, so a round late by a few ms is "
        "lost whole); steady: connections / mean latency (Little's law, the connects "
        "excluded) against connections / delay; growth = peak RSS (VmHWM) above idle / "
        "connections)",
    ]
    lines += table(
        [
            "case",
            "run s",
            "requests",
            "rps",
            "ideal rps",
            "counted of ideal",
            "conns/delay",
            "conns/mean",
            "steady of ideal",
            "p50 ms",
            "p99 ms",
            "max ms",
            "non-200",
            "connect/read/write/timeout err",
            "svc idle->peak MiB",
            "gw idle->peak MiB",
            "svc growth/req",
            "gw growth/req",
            "cores svc/gw/upstream/wrk/others",
            "billing",
        ],
        [
            [
                f"{r.case.number}. {r.case.title}",
                f"{r.stack.seconds:.1f}",
                str(r.stack.requests),
                f"{r.stack.rps:.1f}",
                f"{r.ideal_rps:.1f}",
                f"{r.share_of_ideal:.1%}",
                f"{r.steady_rps:.0f}",
                f"{r.steady_rps_achieved:.0f}",
                f"{r.steady_share:.1%}",
                f"{r.stack.latency_ms('p50'):.0f}",
                f"{r.stack.latency_ms('p99'):.0f}",
                f"{r.stack.latency_ms('max'):.0f}",
                str(r.stack.non200),
                "/".join(
                    str(r.stack.raw["errors"][k]) for k in ("connect", "read", "write", "timeout")
                ),
                f"{mib(r.processes['service'].idle_kib):.1f} -> "
                f"{mib(r.processes['service'].peak_kib):.1f}",
                f"{mib(r.processes['gateway'].idle_kib):.1f} -> "
                f"{mib(r.processes['gateway'].peak_kib):.1f}",
                size_text(r.growth_per_request("service")),
                size_text(r.growth_per_request("gateway")),
                "/".join(
                    f"{p.cpu_seconds / r.stack.seconds:.2f}"
                    for p in (r.processes["service"], r.processes["gateway"], r.upstream_process)
                )
                + f"/{r.load.wrk_cores:.2f}/{r.load.other_cores:.2f}",
                "exact" if r.billing.exact else "NOT exact",
            ]
            for r in results
        ],
    )
    for r in results:
        b = r.billing
        lines.append(
            f"  case {r.case.number}: {r.nofile}; billing: spent {b.spent_micros} = "
            f"{r.case.unit_price_micros} x {r.case.n} x {b.charged} generations charged "
            f"({b.served_200} answered 200, {b.wrk_ok} seen by wrk, {b.client_gone} clients "
            f"gone before their answer; the upstream answered {b.upstream_images} images), "
            f"held {b.after.held_micros}; statuses "
            + " ".join(f"{s}:{n}" for s, n in r.served_statuses.items())
        )
        if r.ceiling is not None:
            c, share = r.ceiling, r.ceiling_share_of_ideal() or 0.0
            steady = r.ceiling_steady_share() or 0.0
            lines.append(
                f"  case {r.case.number}, the design's ceiling driven the same way (its service "
                f"asks the same upstream, which waits {r.delay:g} s): {c.wrk.rps:.1f} rps = "
                f"{share:.1%} of its ideal counted, {steady:.1%} steady; "
                f"p50 {c.wrk.latency_ms('p50'):.0f} ms, p99 "
                f"{c.wrk.latency_ms('p99'):.0f} ms; non-200 {c.wrk.non200}; cores svc/gw "
                f"{c.cores('service'):.2f}/{c.cores('gateway'):.2f}; growth/req svc/gw "
                + "/".join(
                    size_text(c.processes[name].growth_kib * 1024 / r.case.connections)
                    for name in ("service", "gateway")
                )
            )
        seen = r.service_seen
        lines.append(
            f"  case {r.case.number}, the service's /metrics (warm-up included): "
            f"{seen.calls_ok} calls OK, other statuses {seen.calls_failed or 'none'}; "
            f"provider queue waits: {seen.queue_waits}, {seen.queue_waits_over_10ms} over "
            f"10 ms, longest bucket {seen.queue_longest_bucket}; "
            f"{seen.queue_full} gave up on a full queue"
        )
        problems = b.problems()
        if problems:
            lines.append(f"NOTE case {r.case.number}: billing is NOT exact: " + "; ".join(problems))
        if r.load.other_cores > NOISY_OTHER_CORES:
            lines.append(
                f"NOTE case {r.case.number}: other processes used {r.load.other_cores:.2f} "
                "cores during its run; its figures are noisy"
            )
    lines.append("  Targets (reported, not enforced; billing exactness is enforced)")
    for v in inflight_verdicts(results):
        lines.append(f"  {'PASS' if v.passed else 'FAIL'}  case {v.case}: {v.target}: {v.detail}")
    return lines


def inflight_json(r: InFlightResult) -> dict[str, Any]:
    return {
        "case": r.case.number,
        "title": r.case.title,
        "response_bytes": r.response_bytes,
        "stack": r.stack.raw,
        "ideal_requests": r.ideal_requests,
        "ideal_rps": r.ideal_rps,
        "share_of_ideal": r.share_of_ideal,
        "steady_rps": r.steady_rps,
        "steady_rps_achieved": r.steady_rps_achieved,
        "steady_share": r.steady_share,
        "growth_per_request_bytes": {n: r.growth_per_request(n) for n in r.processes},
        "processes": {n: vars(p) for n, p in r.processes.items()},
        "upstream_process": vars(r.upstream_process),
        "billing": billing_json(r.billing),
        "served_statuses": r.served_statuses,
        "load": vars(r.load),
        "nofile": r.nofile,
        "service_metrics": dataclasses.asdict(r.service_seen),
        "ceiling": None
        if r.ceiling is None
        else {
            "stack": r.ceiling.wrk.raw,
            "share_of_ideal": r.ceiling_share_of_ideal(),
            "steady_share": r.ceiling_steady_share(),
            "processes": {n: vars(p) for n, p in r.ceiling.processes.items()},
        },
    }


# -- the report -------------------------------------------------------------------------


def machine_lines(wrk: str, threads: int, seconds: float, warmup: float) -> list[str]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    overrides = " ".join(
        f"{k}={os.environ[k]}" for k in ("BENCH_DURATION", "BENCH_CASES") if os.environ.get(k)
    )
    command = "make bench" if os.environ.get("MAKELEVEL") else "python -m tests.bench"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"command:  {(overrides + ' ' + command).strip()}",
        f"machine:  nproc {os.cpu_count()}, CPU {cpu_model}, memory {mem_kib / 1024**2:.1f} GiB, "
        f"{platform.system()} {platform.release()}, load average at start {load}",
        f"python:   {platform.python_implementation()} {platform.python_version()}",
        f"packages: {', '.join(versions)}",
        f"load:     {wrk_version(wrk)}, {threads} thread(s), {seconds:.0f} s per run after "
        f"{warmup:.0f} s warm-up, loopback; a fresh stack per case; local provider precomputed; "
        "cases 5-7: an openai provider to tests/bench/upstream.py on loopback",
        f"ledger:   {ledger_description()}",
    ]


def ledger_description() -> str:
    url = os.environ.get("BENCH_DATABASE_URL", "")
    if not url:
        return "SQLite, a new file per case"
    parsed = urllib.parse.urlsplit(url)
    where = f"{parsed.hostname}:{parsed.port or 5432}{parsed.path}"
    return f"PostgreSQL at {where} (BENCH_DATABASE_URL), a new account per case"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in rows
    ]


def size_text(n: float) -> str:
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.2f} MiB"
    return f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class Verdict:
    case: int
    target: str
    passed: bool
    detail: str


def verdicts(results: Sequence[CaseResult]) -> list[Verdict]:
    """The speed issue's targets for cases 1-6, and billing; reported, not enforced (but
    billing, which run() enforces)."""
    out = []
    for r in results:
        c = r.case
        if c.connections >= 32:
            out.append(
                Verdict(
                    c.number,
                    f"all answers 200 at {c.connections} connections",
                    r.stack.non200 == 0 and r.stack.socket_errors == 0,
                    f"{r.stack.non200} non-200, {r.stack.socket_errors} socket errors",
                )
            )
        if c.uses_upstream and r.upstream is not None:
            upstream = r.upstream.wrk
            if c.connections == 1:
                added = r.stack.latency_ms("p50") - upstream.latency_ms("p50")
                # The design's skeleton making the same upstream call, for comparison.
                skeleton = (
                    f"; the ceiling with the same call: "
                    f"{r.ceiling.wrk.latency_ms('p50') - upstream.latency_ms('p50'):+.2f} ms"
                    if r.ceiling is not None
                    else ""
                )
                out.append(
                    Verdict(
                        c.number,
                        f"<= +{TARGET_UPSTREAM_P50_ADDED_MS:g} ms p50 added over the upstream "
                        "alone at 1 connection",
                        added <= TARGET_UPSTREAM_P50_ADDED_MS,
                        f"{added:+.2f} ms ({r.stack.latency_ms('p50'):.2f} vs "
                        f"{upstream.latency_ms('p50'):.2f} ms{skeleton})",
                    )
                )
            else:
                skeleton = (
                    f"; the ceiling with the same call: {r.ceiling_rps_ratio:.1%}"
                    if r.ceiling is not None
                    else ""
                )
                out.append(
                    Verdict(
                        c.number,
                        f">= {TARGET_UPSTREAM_FLOOR_SHARE:.0%} of the floor's rps",
                        r.rps_ratio >= TARGET_UPSTREAM_FLOOR_SHARE,
                        f"{r.rps_ratio:.1%} ({r.stack.rps:.0f} / {r.floor.rps:.0f} rps{skeleton})",
                    )
                )
        elif r.ceiling is not None and c.connections == 1:
            beyond = r.stack.latency_ms("p50") - r.ceiling.wrk.latency_ms("p50")
            out.append(
                Verdict(
                    c.number,
                    f"<= +{TARGET_P50_BEYOND_CEILING_MS:g} ms p50 beyond the design's ceiling "
                    "at 1 connection",
                    beyond <= TARGET_P50_BEYOND_CEILING_MS,
                    f"{beyond:+.2f} ms ({r.stack.latency_ms('p50'):.2f} vs "
                    f"{r.ceiling.wrk.latency_ms('p50'):.2f} ms)",
                )
            )
        elif r.ceiling is not None and c.response_format == "b64_json" and c.n == 1:
            out.append(
                Verdict(
                    c.number,
                    f">= {TARGET_CEILING_SHARE:.0%} of the design's ceiling's rps",
                    r.ceiling_share >= TARGET_CEILING_SHARE,
                    f"{r.ceiling_share:.1%} ({r.stack.rps:.0f} / {r.ceiling.wrk.rps:.0f} rps)",
                )
            )
        if c.n == 4:
            limit = TARGET_MEMORY_X_RESPONSE * r.response_bytes
            out.append(
                Verdict(
                    c.number,
                    f"memory growth per in-flight request <= {TARGET_MEMORY_X_RESPONSE:g}x "
                    "response size",
                    r.growth_per_in_flight_bytes <= limit,
                    f"{size_text(r.growth_per_in_flight_bytes)} per request = "
                    f"{r.growth_per_in_flight_bytes / r.response_bytes:.1f}x the "
                    f"{size_text(r.response_bytes)} response (all growth over the "
                    f"connections: {r.growth_over_connections / r.response_bytes:.1f}x"
                    f"{ceiling_memory_text(r)})",
                )
            )
        problems = r.billing.problems()
        out.append(
            Verdict(
                c.number,
                "billing exact",
                not problems,
                "; ".join(problems)
                or f"spent {r.billing.spent_micros} = {c.unit_price_micros} x {c.n} x "
                f"{r.billing.images_basis}"
                + (" generations charged" if r.billing.by_generated else "")
                + ", held 0",
            )
        )
    return out


def inflight_verdicts(results: Sequence[InFlightResult]) -> list[Verdict]:
    """The speed issue's targets for the requests-in-flight case."""
    out = []
    for r in results:
        n = r.case.number
        errors = r.stack.non200 + sum(r.stack.raw["errors"].values())
        out += [
            Verdict(
                n,
                f">= {TARGET_IDEAL_SHARE:.0%} of the ideal throughput (steady)",
                r.steady_share >= TARGET_IDEAL_SHARE,
                f"{r.steady_share:.1%} ({r.steady_rps_achieved:.1f} / {r.steady_rps:.0f} rps; "
                f"counted {r.share_of_ideal:.1%}, {r.stack.rps:.1f} / {r.ideal_rps:.1f} rps)",
            ),
            Verdict(
                n,
                f"p99 <= {TARGET_INFLIGHT_P99_MS:,} ms",
                r.stack.latency_ms("p99") <= TARGET_INFLIGHT_P99_MS,
                f"{r.stack.latency_ms('p99'):,.0f} ms",
            ),
            Verdict(n, "no errors", errors == 0, f"{errors} non-200 or socket errors"),
        ]
        for name in ("service", "gateway"):
            growth = r.growth_per_request(name)
            out.append(
                Verdict(
                    n,
                    f"{name}: <= {TARGET_INFLIGHT_KIB} KiB per request in flight",
                    growth <= TARGET_INFLIGHT_KIB * 1024,
                    size_text(growth),
                )
            )
        problems = r.billing.problems()
        out.append(Verdict(n, "billing exact", not problems, "; ".join(problems) or "held 0"))
    return out


def report(results: Sequence[CaseResult]) -> list[str]:
    lines = [
        "Figures (the stack: gateway + service processes; CPU and voluntary context switches "
        "(cs) per request are of the measured run, all threads)"
    ]
    lines += table(
        [
            "case",
            "response",
            "rps",
            "p50 ms",
            "p99 ms",
            "200s",
            "non-200",
            "sock err",
            "svc peak MiB",
            "gw peak MiB",
            "svc CPU ms/req usr+sys",
            "gw CPU ms/req usr+sys",
            "svc cs/req",
            "gw cs/req",
        ],
        [
            [
                f"{r.case.number}. {r.case.title}",
                size_text(r.response_bytes),
                f"{r.stack.rps:.1f}",
                f"{r.stack.latency_ms('p50'):.2f}",
                f"{r.stack.latency_ms('p99'):.2f}",
                str(r.stack.ok),
                str(r.stack.non200),
                str(r.stack.socket_errors),
                f"{mib(r.processes['service'].peak_kib):.1f}",
                f"{mib(r.processes['gateway'].peak_kib):.1f}",
                r.cpu_text("service"),
                r.cpu_text("gateway"),
                f"{r.switches_per_request('service'):.0f}",
                f"{r.switches_per_request('gateway'):.0f}",
            ]
            for r in results
        ],
    )
    lines += ["", "Against the floor (bare aiohttp serving the same bytes, same wrk settings)"]
    lines += table(
        [
            "case",
            "floor rps",
            "floor p50 ms",
            "floor p99 ms",
            "floor peak MiB",
            "rps ratio",
            "p50 added ms",
            "p99 added ms",
        ],
        [
            [
                f"{r.case.number}",
                f"{r.floor.rps:.1f}",
                f"{r.floor.latency_ms('p50'):.2f}",
                f"{r.floor.latency_ms('p99'):.2f}",
                f"{mib(r.floor_process.peak_kib):.1f}",
                f"{r.rps_ratio:.1%}",
                f"{r.p50_added_ms:+.2f}",
                f"{r.stack.latency_ms('p99') - r.floor.latency_ms('p99'):+.2f}",
            ]
            for r in results
        ],
    )
    lines += upstream_lines(results)
    lines += ceiling_lines(results)
    lines += inprocess_lines(results)
    lines += [
        "",
        "Memory under load (idle = VmRSS before warm-up, when the peak is reset to it; "
        "1 conn = peak (VmHWM) after a run at one connection; peak = VmHWM after the run; "
        "growth per in-flight request = (peak - 1 conn, both processes) / (connections - 1); "
        "over conns = (peak - idle, both) / connections, one-off growth included)",
    ]
    lines += table(
        [
            "case",
            "svc idle->1 conn->peak MiB",
            "gw idle->1 conn->peak MiB",
            "growth/in-flight",
            "response",
            "growth / response",
            "over conns / response",
            "the ceiling's growth / response",
        ],
        [
            [
                f"{r.case.number}",
                *(
                    " -> ".join(
                        f"{mib(kib):.1f}"
                        for kib in (f.idle_kib, f.one_in_flight_kib, f.peak_kib)
                        if kib
                    )
                    for f in (r.processes["service"], r.processes["gateway"])
                ),
                size_text(r.growth_per_in_flight_bytes),
                size_text(r.response_bytes),
                f"{r.growth_per_in_flight_bytes / r.response_bytes:.1f}x",
                f"{r.growth_over_connections / r.response_bytes:.1f}x",
                ceiling_growth_ratio_text(r),
            ]
            for r in results
        ],
    )
    lines += [
        "",
        "Billing (expected = price x n x the generations the service charged, each answered "
        "200 or to a client gone (499: wrk closes its connections at the deadline, and the "
        "service charges, then answers), and, with an upstream, none beyond its images)",
    ]
    lines += table(
        [
            "case",
            "price/image",
            "200s served",
            "200s seen by wrk",
            "cut at stop",
            "charged (svc log)",
            "upstream images",
            "spent micros",
            "expected",
            "held",
            "statuses",
        ],
        [
            [
                f"{r.case.number}",
                str(r.case.unit_price_micros),
                str(r.billing.served_200),
                str(r.billing.wrk_ok),
                str(r.billing.wrk_cut),
                str(r.billing.charged),
                "-" if r.billing.upstream_images is None else str(r.billing.upstream_images),
                str(r.billing.spent_micros),
                str(r.billing.expected_micros),
                str(r.billing.after.held_micros),
                " ".join(f"{s}:{n}" for s, n in r.served_statuses.items()),
            ]
            for r in results
        ],
    )
    lines += [
        "",
        "The machine during the measured runs (cores busy; 'others' = processes that are "
        "neither wrk nor the servers measured, e.g. other work on a shared machine)",
    ]
    show_ceiling = any(r.ceiling for r in results)
    show_inprocess = any(r.inprocess for r in results)

    def ceiling_cores(r: CaseResult) -> list[str]:
        if not show_ceiling:
            return []
        if r.ceiling is None:
            return ["-"] * 4
        return [
            f"{r.ceiling.cores('service'):.2f}",
            f"{r.ceiling.cores('gateway'):.2f}",
            f"{r.ceiling.load.wrk_cores:.2f}",
            f"{r.ceiling.load.other_cores:.2f}",
        ]

    def inprocess_cores(r: CaseResult) -> list[str]:
        if not show_inprocess:
            return []
        if r.inprocess is None:
            return ["-"] * 3
        return [
            f"{r.inprocess.cores:.2f}",
            f"{r.inprocess.load.wrk_cores:.2f}",
            f"{r.inprocess.load.other_cores:.2f}",
        ]

    lines += table(
        [
            *("case", "stack: svc", "stack: gw", "stack: wrk", "stack: others"),
            *("floor", "floor: wrk", "floor: others"),
            *(
                ("ceiling: svc", "ceiling: gw", "ceiling: wrk", "ceiling: others")
                if show_ceiling
                else ()
            ),
            *(("in-proc", "in-proc: wrk", "in-proc: others") if show_inprocess else ()),
        ],
        [
            [
                f"{r.case.number}",
                f"{r.processes['service'].cpu_seconds / r.stack.seconds:.2f}",
                f"{r.processes['gateway'].cpu_seconds / r.stack.seconds:.2f}",
                f"{r.load.wrk_cores:.2f}",
                f"{r.load.other_cores:.2f}",
                f"{r.floor_process.cpu_seconds / r.floor.seconds:.2f}",
                f"{r.floor_load.wrk_cores:.2f}",
                f"{r.floor_load.other_cores:.2f}",
                *ceiling_cores(r),
                *inprocess_cores(r),
            ]
            for r in results
        ],
    )
    for r in results:
        noisy = max(
            r.load.other_cores,
            r.floor_load.other_cores,
            r.ceiling.load.other_cores if r.ceiling else 0.0,
            r.inprocess.load.other_cores if r.inprocess else 0.0,
        )
        if noisy > NOISY_OTHER_CORES:
            lines.append(
                f"NOTE case {r.case.number}: other processes used up to {noisy:.2f} cores "
                "during its runs; its figures are noisy (rerun on a quiet machine)"
            )
    lines += ["", "Targets (reported, not enforced; billing exactness is enforced)"]
    for v in verdicts(results):
        lines.append(f"  {'PASS' if v.passed else 'FAIL'}  case {v.case}: {v.target}: {v.detail}")
    return lines


def upstream_cores(r: CaseResult) -> float:
    """The loopback upstream's CPU while the stack ran, in cores."""
    busy = r.upstream_process.cpu_seconds if r.upstream_process else 0.0
    return busy / r.stack.seconds if r.stack.seconds else 0.0


def upstream_lines(results: Sequence[CaseResult]) -> list[str]:
    """The upstream cases against the loopback upstream alone (same wrk settings)."""
    measured = [(r, u) for r in results if (u := r.upstream) is not None]
    if not measured:
        return []
    lines = [
        "",
        "Against the upstream alone (tests/bench/upstream.py, the `openai` provider's base_url, "
        "driven directly with the same wrk settings; 'upstream cores' = its CPU while the stack "
        "ran)",
    ]
    lines += table(
        [
            "case",
            "upstream rps",
            "upstream p50 ms",
            "upstream p99 ms",
            "non-200",
            "stack p50 added over upstream ms",
            "stack p99 added ms",
            "stack rps / upstream",
            "stack rps / floor",
            "upstream cores (stack run)",
            "upstream CPU ms/req",
        ],
        [
            [
                f"{r.case.number}",
                f"{u.wrk.rps:.1f}",
                f"{u.wrk.latency_ms('p50'):.2f}",
                f"{u.wrk.latency_ms('p99'):.2f}",
                str(u.wrk.non200 + u.wrk.socket_errors),
                f"{r.stack.latency_ms('p50') - u.wrk.latency_ms('p50'):+.2f}",
                f"{r.stack.latency_ms('p99') - u.wrk.latency_ms('p99'):+.2f}",
                f"{r.stack.rps / u.wrk.rps if u.wrk.rps else 0.0:.1%}",
                f"{r.rps_ratio:.1%}",
                f"{upstream_cores(r):.2f}",
                f"{u.process.cpu_seconds * 1000 / max(1, u.wrk.requests):.3f}",
            ]
            for r, u in measured
        ],
    )
    return lines


def ceiling_growth_ratio_text(r: CaseResult) -> str:
    growth = r.ceiling_growth_per_in_flight
    return "-" if growth is None else f"{growth / r.response_bytes:.1f}x"


def ceiling_memory_text(r: CaseResult) -> str:
    """``; the ceiling: ...`` with the design's ceiling's memory per request in flight, when
    it was measured."""
    growth = r.ceiling_growth_per_in_flight
    if growth is None:
        return ""
    return f"; the ceiling: {size_text(growth)} = {growth / r.response_bytes:.1f}x"


def ceiling_lines(results: Sequence[CaseResult]) -> list[str]:
    """The table against the design's ceiling, and notes on ceilings that misbehaved."""
    measured = [(r, r.ceiling) for r in results if r.ceiling is not None]
    if not measured:
        return []
    lines = [
        "",
        "Against the design's ceiling (aiohttp + one grpc.aio call to a service that does "
        "nothing but, in the upstream cases, ask the same upstream for the images: "
        "tests/bench/ceiling.py, same wrk settings)",
    ]
    lines += table(
        [
            "case",
            "ceiling rps",
            "ceiling p50 ms",
            "ceiling p99 ms",
            "200s",
            "non-200",
            "sock err",
            "ceiling rps / floor",
            "ceiling p50 added ms",
            "our rps / ceiling",
        ],
        [
            [
                f"{r.case.number}",
                f"{c.wrk.rps:.1f}",
                f"{c.wrk.latency_ms('p50'):.2f}",
                f"{c.wrk.latency_ms('p99'):.2f}",
                str(c.wrk.ok),
                str(c.wrk.non200),
                str(c.wrk.socket_errors),
                f"{r.ceiling_rps_ratio:.1%}",
                f"{r.ceiling_p50_added_ms:+.2f}",
                f"{r.ceiling_share:.1%}",
            ]
            for r, c in measured
        ],
    )
    for r, c in measured:
        if c.wrk.non200 or c.wrk.socket_errors:
            lines.append(
                f"NOTE case {r.case.number}: the ceiling answered {c.wrk.non200} non-200 and had "
                f"{c.wrk.socket_errors} socket errors; its figures are not a ceiling (BENCH_KEEP=1 "
                "keeps its logs, ceiling-*.log)"
            )
        if c.response_bytes != r.response_bytes:
            lines.append(
                f"NOTE case {r.case.number}: the ceiling's answer is {c.response_bytes} bytes, "
                f"the stack's {r.response_bytes}: has the real answer's shape changed?"
            )
    return lines


def inprocess_lines(results: Sequence[CaseResult]) -> list[str]:
    """The table of the same work without the gRPC hop, and notes on runs that misbehaved."""
    measured = [(r, i) for r in results if (i := r.inprocess) is not None]
    if not measured:
        return []
    lines = [
        "",
        "In process (the same work without the gRPC hop: tests/bench/inprocess.py, one "
        "process, same wrk settings; 'ours' = the stack, CPU of both its processes)",
    ]
    lines += table(
        [
            "case",
            "in-proc rps",
            "in-proc p50 ms",
            "in-proc p99 ms",
            "200s",
            "non-200",
            "sock err",
            "CPU ms/req usr+sys",
            "our CPU ms/req",
            "peak MiB",
            "in-proc rps / floor",
            "in-proc p50 added ms",
            "in-proc rps / ours",
            "billing",
        ],
        [
            [
                f"{r.case.number}",
                f"{i.wrk.rps:.1f}",
                f"{i.wrk.latency_ms('p50'):.2f}",
                f"{i.wrk.latency_ms('p99'):.2f}",
                str(i.wrk.ok),
                str(i.wrk.non200),
                str(i.wrk.socket_errors),
                i.cpu_text(),
                f"{sum(r.cpu_ms_per_request(name) for name in r.processes):.2f}",
                f"{mib(i.process.peak_kib):.1f}",
                f"{r.inprocess_rps_ratio:.1%}",
                f"{r.inprocess_p50_added_ms:+.2f}",
                f"{r.inprocess_share:.2f}x",
                "exact" if i.billing.exact else "NOT exact",
            ]
            for r, i in measured
        ],
    )
    for r, i in measured:
        if i.wrk.non200 or i.wrk.socket_errors:
            lines.append(
                f"NOTE case {r.case.number}: the in-process server answered {i.wrk.non200} "
                f"non-200 and had {i.wrk.socket_errors} socket errors (statuses "
                f"{' '.join(f'{s}:{n}' for s, n in i.served_statuses.items())}; BENCH_KEEP=1 "
                "keeps its log, inprocess/server.log)"
            )
        problems = i.billing.problems()
        if problems:
            lines.append(
                f"NOTE case {r.case.number}: the in-process billing is NOT exact: "
                + "; ".join(problems)
            )
    return lines


def billing_json(billing: Billing) -> dict[str, Any]:
    return {
        "spent_micros": billing.spent_micros,
        "expected_micros": billing.expected_micros,
        "served_200": billing.served_200,
        "wrk_ok": billing.wrk_ok,
        "wrk_cut": billing.wrk_cut,
        "charged": billing.charged,
        "client_gone": billing.client_gone,
        "upstream_images": billing.upstream_images,
        "held_micros": billing.after.held_micros,
        "problems": billing.problems(),
    }


def results_json(results: Sequence[CaseResult], header: Sequence[str]) -> dict[str, Any]:
    return {
        "header": list(header),
        "cases": [
            {
                "case": r.case.number,
                "title": r.case.title,
                "response_bytes": r.response_bytes,
                "stack": r.stack.raw,
                "floor": r.floor.raw,
                "rps_ratio": r.rps_ratio,
                "p50_added_ms": r.p50_added_ms,
                "growth_per_in_flight_bytes": r.growth_per_in_flight_bytes,
                "growth_over_connections_bytes": r.growth_over_connections,
                "processes": {n: vars(p) for n, p in r.processes.items()},
                "floor_process": vars(r.floor_process),
                "billing": billing_json(r.billing),
                "served_statuses": r.served_statuses,
                "load": vars(r.load),
                "floor_load": vars(r.floor_load),
                "ceiling": None
                if r.ceiling is None
                else {
                    "wrk": r.ceiling.wrk.raw,
                    "response_bytes": r.ceiling.response_bytes,
                    "rps_ratio": r.ceiling_rps_ratio,
                    "p50_added_ms": r.ceiling_p50_added_ms,
                    "stack_rps_share": r.ceiling_share,
                    "growth_per_in_flight_bytes": r.ceiling_growth_per_in_flight,
                    "processes": {n: vars(p) for n, p in r.ceiling.processes.items()},
                    "load": vars(r.ceiling.load),
                },
                "upstream": None
                if r.upstream is None
                else {
                    "wrk": r.upstream.wrk.raw,
                    "p50_added_ms": r.stack.latency_ms("p50") - r.upstream.wrk.latency_ms("p50"),
                    "process": vars(r.upstream.process),
                    "process_during_stack_run": None
                    if r.upstream_process is None
                    else vars(r.upstream_process),
                    "load": vars(r.upstream.load),
                },
                "inprocess": None
                if r.inprocess is None
                else {
                    "wrk": r.inprocess.wrk.raw,
                    "response_bytes": r.inprocess.response_bytes,
                    "rps_ratio": r.inprocess_rps_ratio,
                    "p50_added_ms": r.inprocess_p50_added_ms,
                    "rps_over_stack": r.inprocess_share,
                    "process": vars(r.inprocess.process),
                    "billing": billing_json(r.inprocess.billing),
                    "served_statuses": r.inprocess.served_statuses,
                    "load": vars(r.inprocess.load),
                },
            }
            for r in results
        ],
        "verdicts": [vars(v) for v in verdicts(results)],
    }


# -- the profile (optional) -------------------------------------------------------------


def find_py_spy() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found:
        return found
    raise BenchError(
        "profiling needs py-spy: `.venv/bin/pip install py-spy` (it is not a project dependency)"
    )


def _in_background(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn(*args))
        except BaseException as exc:  # handed to the caller through the box
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _joined(thread: threading.Thread, box: list[Any]) -> Any:
    thread.join()
    if not box:
        raise BenchError("a background run ended without a result")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def busy_handler_sleeps(pid: int, seconds: float) -> tuple[int, float] | None:
    """(calls, seconds) of clock_nanosleep/nanosleep in all the process's threads, by strace.

    In the service these are SQLite's busy handler: a connection that finds the database
    locked (BEGIN IMMEDIATE while another connection writes) sleeps 1, 2, 5, 10, 15, 20,
    25, 25, 25, 50, 50, 100 ms between retries. None when strace is not installed.
    """
    strace = shutil.which("strace")
    if strace is None:
        return None
    proc = subprocess.Popen(
        [strace, "-f", "-c", "-w", "-e", "trace=clock_nanosleep,nanosleep", "-p", str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    calls, total = 0, 0.0
    for line in err.splitlines():
        parts = line.split()
        if parts and parts[-1] in ("clock_nanosleep", "nanosleep") and len(parts) >= 5:
            total += float(parts[1])
            calls += int(parts[3])
    return calls, total


def perf_by_library(pid: int, seconds: float, out: Path) -> list[str]:
    """Where a process's CPU goes by shared object (libpython, kernel, libsqlite3, gRPC's
    Cython core, ...), sampled by ``perf record``; a note when perf is missing or refused."""
    perf = shutil.which("perf")
    if perf is None:
        return ["perf is not installed: no CPU split by library"]
    recorded = subprocess.run(
        [
            *(perf, "record", "-F", "499", "-p", str(pid), "-o", str(out)),
            *("--", "sleep", str(round(seconds))),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if recorded.returncode != 0:
        return [f"perf record failed: {recorded.stderr.strip()[-300:]}"]
    reported = subprocess.run(
        [perf, "report", "-i", str(out), "--sort", "dso", "--stdio", "--no-children"],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = [
        line.strip()
        for line in reported.stdout.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return rows[:8] or [f"perf report gave nothing: {reported.stderr.strip()[-300:]}"]


def profile_case(
    case: Case, wrk: str, root: Path, seconds: float, warmup: float, threads: int, out_dir: Path
) -> list[str]:
    """Runs ``case`` on a fresh stack: py-spy on both processes during one wrk run, then
    strace counting the service's busy-handler sleeps during a second one."""
    from tests.bench import pyspy

    py_spy = find_py_spy()
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_nofile(case.connections + NOFILE_SLACK)
    # An upstream case profiles the production path: the loopback upstream answers it.
    upstream = Upstream(root, case.upstream_delay) if case.upstream_delay is not None else None
    if upstream is not None:
        upstream.start()
    stack = Stack(root, "" if upstream is None else upstream_config(upstream.url, case))
    raw_files = {name: out_dir / f"case{case.number}-{name}.txt" for name in ("service", "gateway")}
    rate = 200
    spy_seconds = max(1, round(seconds) - 1)
    sleeps: tuple[int, float] | None = None
    try:
        stack.create_account()
        stack.start()
        stack.capture(case)
        if case.holds_in_flight:
            # As when measured: warmed at a few connections for a whole delay and more.
            delay = case.upstream_delay or 0.0
            warm = dataclasses.replace(case, connections=SLOW_UPSTREAM_WARMUP_CONNECTIONS)
            run_wrk(wrk, stack.url, warm, stack.authorization, max(warmup, delay + 1), threads)
            seconds = max(seconds, SLOW_UPSTREAM_ROUNDS * delay)
        else:
            run_wrk(wrk, stack.url, case, stack.authorization, warmup, threads)
        stack.quiesce()
        log(f"profiling case {case.number} for {seconds:.0f} s with py-spy")
        load = _in_background(run_wrk, wrk, stack.url, case, stack.authorization, seconds, threads)
        time.sleep(0.5)
        spies = [
            subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(pid), "--duration", str(spy_seconds)),
                    *("--rate", str(rate), "--format", "raw", "--nonblocking", "--threads"),
                    *(("--gil",) if os.environ.get("BENCH_PROFILE_GIL") else ()),
                    *("--output", str(raw_files[name])),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name, pid in stack.pids.items()
        ]
        for spy in spies:
            _, err = spy.communicate(timeout=seconds + 60)
            if spy.returncode != 0:
                raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
        result: WrkResult = _joined(*load)
        stack.quiesce()
        before = stack.snapshot().served_200
        strace_seconds = min(5.0, seconds)
        log(f"counting the service's busy-handler sleeps for {strace_seconds:.0f} s with strace")
        load = _in_background(
            run_wrk, wrk, stack.url, case, stack.authorization, strace_seconds + 1, threads
        )
        time.sleep(0.5)
        sleeps = busy_handler_sleeps(stack.pids["service"], strace_seconds)
        traced: WrkResult = _joined(*load)
        served = stack.quiesce().served_200 - before
        perf_lines: dict[str, list[str]] = {}
        perf_seconds = min(4.0, seconds)
        log(f"sampling CPU by library for {perf_seconds:.0f} s with perf")
        load = _in_background(
            run_wrk, wrk, stack.url, case, stack.authorization, perf_seconds + 1, threads
        )
        time.sleep(0.5)
        perfs = {
            name: _in_background(perf_by_library, pid, perf_seconds, out_dir / f"perf-{name}.data")
            for name, pid in stack.pids.items()
        }
        perf_lines = {name: _joined(*running) for name, running in perfs.items()}
        _joined(*load)
        stack.quiesce()
    finally:
        stack.stop()
        if upstream is not None:
            upstream.stop()
    lines = [
        f"Profile of case {case.number} ({case.title}): py-spy at {rate} Hz for "
        f"{spy_seconds} s, {result.rps:.0f} rps while profiled; raw stacks in {out_dir}",
    ]
    for name, path in raw_files.items():
        lines += ["", *pyspy.summarise(path, title=name, seconds=spy_seconds, rate=rate)]
    if sleeps is None:
        lines += ["", "strace is not installed: busy-handler sleeps not counted"]
    else:
        calls, slept = sleeps
        lines += [
            "",
            f"service, SQLite busy-handler sleeps (strace, {strace_seconds:.0f} s of a "
            f"{traced.seconds:.0f} s run at {traced.rps:.0f} rps, slowed by strace):",
            f"  {calls} sleeps, {slept:.2f} s asleep in all threads = "
            f"{slept / strace_seconds:.1f} connections asleep on average; "
            f"~{calls / max(1, served):.1f} sleeps and ~{1000 * slept / max(1, served):.0f} ms "
            f"asleep per request ({served} requests in the traced run)",
        ]
    for name, rows in perf_lines.items():
        lines += ["", f"{name}, CPU by library (perf record -F 499, {perf_seconds:.0f} s):"]
        lines += [f"  {row}" for row in rows]
    return lines


# -- entry point ------------------------------------------------------------------------


def selected_cases(spec: str) -> list[Case]:
    if not spec:
        return list(CASES)
    wanted = {int(x) for x in spec.replace(" ", "").split(",") if x}
    unknown = wanted - {c.number for c in CASES}
    if unknown:
        raise BenchError(f"no case {sorted(unknown)}; cases are 1-{len(CASES)}")
    return [c for c in CASES if c.number in wanted]


def run(
    *,
    seconds: float,
    warmup: float,
    cases: Sequence[Case],
    threads: int,
    json_path: Path | None,
    profile_dir: Path | None,
    keep: bool,
    ceiling: bool = True,
    ceiling_ledger: bool = False,
    inprocess: bool = False,
) -> int:
    wrk = ensure_wrk()
    header = machine_lines(wrk, threads, seconds, warmup)
    if ceiling and ceiling_ledger:
        header.append(
            "ceiling:  its service also holds and settles each generation in the real ledger "
            "(SQLite, a new file per run; --ceiling-ledger)"
        )
    for line in header:
        print(line, flush=True)
    print(flush=True)
    root = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    results: list[CaseResult] = []
    inflight: list[InFlightResult] = []
    failed = True
    try:
        for case in cases:
            if case.holds_in_flight:
                inflight.append(
                    run_inflight_case(
                        case,
                        wrk,
                        root / f"case{case.number}",
                        seconds,
                        warmup,
                        threads,
                        with_ceiling=ceiling,
                        ceiling_ledger=ceiling_ledger,
                    )
                )
                continue
            results.append(
                run_case(
                    case,
                    wrk,
                    root / f"case{case.number}",
                    seconds,
                    warmup,
                    threads,
                    with_ceiling=ceiling,
                    ceiling_ledger=ceiling_ledger,
                    with_inprocess=inprocess,
                )
            )
        if results:
            print("\n".join(report(results)), flush=True)
        if inflight:
            print("\n".join(inflight_lines(inflight)), flush=True)
        print("\n" + "\n".join(image_checks.measure()), flush=True)
        if json_path is not None:
            figures = results_json(results, header)
            figures["in_flight"] = [inflight_json(r) for r in inflight]
            figures["in_flight_verdicts"] = [vars(v) for v in inflight_verdicts(inflight)]
            json_path.write_text(json.dumps(figures, indent=2) + "\n")
        if profile_dir is not None:
            case = selected_cases(os.environ.get("BENCH_PROFILE_CASE") or "2")[0]
            lines = profile_case(case, wrk, root / "profile", seconds, warmup, threads, profile_dir)
            print("\n" + "\n".join(lines), flush=True)
        failed = False
    finally:
        if keep or failed:
            log(f"kept the working directory (configs, logs): {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    exact = [r.billing_exact for r in results] + [r.billing_exact for r in inflight]
    if not all(exact):
        print("\nbench: billing was NOT exact; see above", file=sys.stderr)
        return 1
    return 0
