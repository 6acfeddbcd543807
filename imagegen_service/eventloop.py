"""The event loop both processes run on: uvloop where installed (faster sockets and
callbacks for the gRPC and HTTP paths), asyncio's own when IMAGEGEN_UVLOOP=0; and how
both set the cyclic garbage collector once they are up."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("IMAGEGEN_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# Collect the youngest generation after 20,000 net new objects instead of 700, the middle
# one after 20 of those instead of 10 (the oldest stays at 10 middle collections).
#
# A request in flight keeps a few hundred objects alive (its coroutines, gRPC's call state,
# the HTTP client's request and connection): with 2,000 slow upstream calls in flight that
# is ~170,000 objects that every middle and full collection walks again. At CPython's
# defaults the service spent 8.9 s of its 41.5 s of CPU collecting (5.9 s of it in 33 full
# collections of ~180 ms each, the event loop stopped) over a 40 s run of the bench's case
# 7; at these thresholds 3.6 s, with no full collection after start-up, the longest pause
# ~35 ms, and peak memory per request in flight no higher (docs/benchmarks.md). The
# garbage a request leaves to the collector is a handful of gRPC's own small cycles.
GC_THRESHOLDS = (20_000, 20, 10)


def tune_collector() -> None:
    """The collector thresholds both processes run with (GC_THRESHOLDS)."""
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_heap() -> None:
    """Moves every object alive after start-up (modules, the catalog, SQLAlchemy's and
    protobuf's tables, gRPC's state) out of the cyclic garbage collector's reach.

    Otherwise each full collection walks them all again: 30-90 ms with the loop stopped,
    every few thousand requests, which was the whole p99 at one connection. Called once,
    when the process is ready to serve; the objects made later are collected at
    GC_THRESHOLDS.
    """
    gc.collect()
    gc.freeze()
    tune_collector()
