"""What both processes tell Prometheus about themselves: the runtime collectors (CPU,
memory, open file descriptors, garbage collection) and which build is running.

``imagegen_build_info{version, git_commit} 1`` carries the package's version and the commit
it was built from: ``IMAGEGEN_GIT_COMMIT`` (set by an image build), else the checkout's HEAD
when the package runs from a git work tree, else "unknown".
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["git_commit", "register_runtime_metrics", "version"]


def version() -> str:
    try:
        return importlib.metadata.version("imagegen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git_commit() -> str:
    from_env = os.environ.get("IMAGEGEN_GIT_COMMIT", "").strip()
    if from_env:
        return from_env[:40]
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return "unknown"
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else "unknown"


def register_runtime_metrics(registry: CollectorRegistry) -> None:
    """Adds the process, platform and GC collectors and ``imagegen_build_info`` to
    ``registry``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    info = Gauge(
        "imagegen_build_info",
        "Always 1; the labels say which build is running.",
        ("version", "git_commit"),
        registry=registry,
    )
    info.labels(version(), git_commit()).set(1)
