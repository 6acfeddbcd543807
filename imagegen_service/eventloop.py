"""The event loop both processes run on: uvloop where installed (faster sockets and
callbacks for the gRPC and HTTP paths), asyncio's own when IMAGEGEN_UVLOOP=0; and the
heap freeze both do once they are up."""

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


def freeze_startup_heap() -> None:
    """Moves every object alive after start-up (modules, the catalog, SQLAlchemy's and
    protobuf's tables, gRPC's state) out of the cyclic garbage collector's reach.

    Otherwise each full collection walks them all again: 30-90 ms with the loop stopped,
    every few thousand requests, which was the whole p99 at one connection. Called once,
    when the process is ready to serve; the objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()
