"""Summarises py-spy's raw (collapsed-stack) output into where a process spends its time.

Each line of ``py-spy record --format raw --threads`` is one distinct stack and how many
samples it got: ``thread (TID): NAME;frame (file:line);...;leaf (file:line) COUNT``.

Three views per process, as shares of all its samples: by thread (the event loop, the
aiosqlite workers, gRPC's poller), and:

- self time by component: the leaf frame's file decides (SQLAlchemy, asyncio, logging, ...);
- time inside a feature (inclusive): a sample counts for every feature one of whose
  functions is on its stack (authentication, holds, logging, base64, ...).

SQLAlchemy's asyncio layer runs each statement in a greenlet, and py-spy sees only the
greenlet's own frames: those samples start at ``Connection.execute`` and have no caller,
so they are shown as their own feature ("SQL statements in greenlets") rather than under
the ledger method that issued them.

py-spy counts a thread as active when the OS says it is running or runnable. On a busy
2-core machine a woken thread can wait for a CPU for a while: those samples land on the
frame where it sleeps (the event loop's ``epoll_wait``, an aiosqlite worker's queue.get)
and are labelled so; they are contention, not work.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^thread \((?P<tid>[^)]*)\): (?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Leaf file -> component, first match wins.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("sqlalchemy/", "SQLAlchemy"),
    ("aiosqlite/", "aiosqlite"),
    ("greenlet", "SQLAlchemy"),
    ("structlog/", "logging (structlog + logging)"),
    ("logging/", "logging (structlog + logging)"),
    ("prometheus_client/", "prometheus_client"),
    ("grpc", "gRPC (Python side)"),
    ("google/protobuf", "protobuf"),
    ("aiohttp/", "aiohttp"),
    ("multidict", "aiohttp"),
    ("yarl/", "aiohttp"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("base64.py", "base64"),
    ("json/", "JSON"),
    ("imagegen_service/", "imagegen_service (own code)"),
    ("http_gateway/", "http_gateway (own code)"),
    ("threading.py", "threads / locks"),
    ("queue.py", "threads / locks"),
    ("hashlib", "hashing"),
    ("uuid", "ids"),
    ("secrets.py", "ids"),
    ("random.py", "ids"),
)

# Feature -> function names (or file fragments) that mark it on a stack.
FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SQL statements in greenlets (ledger; caller not visible)", ("greenlet:",)),
    ("authenticate: API-key lookup", ("find_active_key", ".authenticate")),
    ("rate limiter", ("ratelimit",)),
    ("place_hold (async part)", ("place_hold",)),
    ("settle_hold (queues the write)", ("settle_hold",)),
    ("SQLite ledger writes and commits (the loop's batches)", ("_write_inline",)),
    ("provider call (precomputed)", ("providers/",)),
    ("image store put (url)", ("images_local.py", "images_s3.py")),
    ("protobuf messages (_to_message)", ("_to_message", "google/protobuf")),
    ("metrics (prometheus + interceptor bookkeeping)", ("prometheus_client/", "metrics.py")),
    ("logging (structlog + logging)", ("structlog/", "logging/")),
    ("gateway: read + parse request JSON", ("_read_json_object", "_generation_request")),
    ("gateway: base64 of images", ("b64encode",)),
    ("gateway: JSON response (orjson)", ("._json", "orjson")),
    ("gateway: gRPC client call", ("grpc/aio/", "_call.py", "_base_call")),
    ("gateway: writing the HTTP response", ("write_eof", "_send_headers_with_payload")),
)


@dataclass
class Sample:
    thread: str
    frames: tuple[tuple[str, str], ...]  # (function, file), root first
    count: int
    leaf_line: int = 0


def parse(path: Path) -> list[Sample]:
    samples = []
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        parts = match["stack"].split(";")
        thread = parts[0].strip()
        frames = []
        line_no = 0
        for part in parts[1:]:
            frame = _FRAME.match(part.strip())
            frames.append((frame["func"], frame["file"]) if frame else (part.strip(), ""))
            line_no = int(frame["line"]) if frame and frame["line"] else 0
        samples.append(Sample(thread, tuple(frames), int(match["count"]), line_no))
    return samples


def thread_group(sample: Sample) -> str:
    name = sample.thread
    if name.startswith("MainThread"):
        return "event loop (MainThread)"
    if "_connection_worker_thread" in name:
        return "aiosqlite worker threads"
    if "_poll_wrapper" in name:
        return "gRPC poller thread"
    if "ThreadPoolExecutor" in name or "asyncio_" in name:
        return "default executor (to_thread)"
    return "other threads"


def component(sample: Sample) -> str:
    if not sample.frames:
        return "(no Python frame: interpreter / C code)"
    func, file = sample.frames[-1]
    if func == "EpollSelector.select":
        return "asyncio: in epoll_wait, woken and runnable (waiting for a CPU)"
    if func == "Handle._run":
        return "asyncio callbacks in C/Cython (gRPC aio core, futures)"
    if func == "_connection_worker_thread":
        # aiosqlite/core.py: tx.get() waits for work; function() runs one SQLite call
        # (with the GIL released, including SQLite's busy-handler sleeps).
        return {
            59: "aiosqlite worker: woken in queue.get (waiting for the GIL/a CPU)",
            63: "aiosqlite worker: one SQLite call (incl. lock waits)",
        }.get(sample.leaf_line, "aiosqlite worker: handing the result back")
    for fragment, name in COMPONENTS:
        if fragment in file:
            return name
    return f"other: {file or func}"


def in_greenlet(sample: Sample) -> bool:
    # Greenlet stacks start inside SQLAlchemy: no runpy/asyncio root frame.
    return bool(sample.frames) and "sqlalchemy/" in sample.frames[0][1]


def features(sample: Sample) -> set[str]:
    found = set()
    names = [f"{func}|{file}" for func, file in sample.frames]
    for feature, markers in FEATURES:
        for marker in markers:
            if marker == "greenlet:":
                if in_greenlet(sample):
                    found.add(feature)
                break
            if marker.startswith("."):
                hit = any(n.split("|", 1)[0].endswith(marker[1:]) for n in names)
            else:
                hit = any(marker in n for n in names)
            if hit:
                found.add(feature)
                break
    return found


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "  n/a"


def summarise(
    path: Path, *, title: str, seconds: float | None = None, rate: int | None = None
) -> list[str]:
    """Shares of the process's on-CPU samples: by thread, by leaf component, by feature."""
    samples = parse(path)
    total = sum(s.count for s in samples)
    if not total:
        return [f"{title}: no samples in {path}"]
    groups: Counter[str] = Counter()
    comps: Counter[str] = Counter()
    feats: Counter[str] = Counter()
    for s in samples:
        groups[thread_group(s)] += s.count
        comps[component(s)] += s.count
        for f in features(s):
            feats[f] += s.count
    expected = seconds * rate if seconds and rate else None
    lines = [f"{title}: {total} samples (py-spy's idle waits excluded)", "  by thread:"]
    for group, count in groups.most_common():
        busy = f"  (busy ~{100 * count / expected:.0f}% of the wall time)" if expected else ""
        lines.append(f"    {_pct(count, total)}  {group}{busy}")
    lines.append("  self time by component (leaf frame):")
    lines += [f"    {_pct(c, total)}  {name}" for name, c in comps.most_common(14)]
    lines.append("  time inside (inclusive: every feature on the stack counts):")
    lines += [f"    {_pct(c, total)}  {name}" for name, c in feats.most_common()]
    return lines


def top_stacks(path: Path, n: int = 10, depth: int = 4) -> Sequence[str]:
    """The heaviest leaf-most call chains, for a closer look."""
    chains: Counter[str] = Counter()
    for s in parse(path):
        tail = " < ".join(f"{f}" for f, _ in reversed(s.frames[-depth:]))
        chains[f"[{thread_group(s)}] {tail}"] += s.count
    return [f"{c:6d}  {chain}" for chain, c in chains.most_common(n)]
